"""What one PPO step samples (`Rollout`) and how: its prompts (`PromptSampler`), one reply per prompt
(`sample_replies`), and the logits the update reads them with (`reply_logits`). Replies with tool calls come from
pipeline/ppo_tools.py in the same `Rollout`, with `mask` 1 only on the tokens the policy chose: every later phase
(log-probabilities, KL, values, GAE, losses) reads `mask`, so tool results are context, never actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import metrics, rl
from pipeline.generation import UNSHAPED, stop_ids


@dataclass
class Rollout:
    """One step's sampled replies, and what the update needs of them.

    B: replies of this step on this process (`batch_size`: `num_generations` to each prompt, consecutive), P: the
    longest prompt (the others left-padded to it), R: reply tokens (at most `max_new_tokens`; with tools, the longest
    reply, tool results included). Reply tokens after the reply's end are padding. The first block is filled by the
    rollout, the second by `score`, the third by `advantages`.
    """

    rows: list[int]                # (B,) indices into the prompt dataset
    sequences: torch.Tensor        # (B, P + R) long: prompt then reply token ids
    attention_mask: torch.Tensor   # (B, P + R) long: 0 on left padding and on reply padding
    replies: torch.Tensor          # (B, R) long: reply token ids, pad after the reply's end
    mask: torch.Tensor             # (B, R) float: 1 on the tokens the policy chose (up to and including end-of-turn)
    ended: torch.Tensor            # (B,) bool: the reply stopped with end-of-turn within the budget (with tools: a
                                   #   final answer, a turn without calls)
    context_length: int            # P
    texts: list[str] = None        # (B,) decoded replies, what the reward model and the verifier read
    # with tools (pipeline/ppo_tools.py); None without
    tools: list = None             # (B,) the tool schemas each prompt offered, None where it offered none
    tool_mask: torch.Tensor = None  # (B, R) float: 1 on the tokens tool results put in (and their turn headers)
    calls: list = None             # (B,) the ToolResults of each reply's calls, in order
    turns: list = None             # (B,) each reply's assistant and tool messages
    final: list = None             # (B,) the text of each reply's last assistant turn

    raw: torch.Tensor = None           # (B,) reward-model scores
    normalised: torch.Tensor = None    # (B,) the same standardised with the reward stage's mean and std
    correct: torch.Tensor = None       # (B,) float 1/0: the verifier, the gold score (when prompts have answers)
    judged: torch.Tensor = None        # (B,) bool: the verifier has a verdict on the row (a tool task has none)
    verdicts: list = None              # (B,) tools: tool_world.verify's outcome on tool tasks, None elsewhere
    tool_correct: torch.Tensor = None  # (B,) float 1/0: the same verdicts' `correct` (0 where none)
    vs_start: tuple = None             # logged steps: (wins, judged) of the replies against the starting policy's by
                                       #   the world's noise-free annotator, a tie half a win; None: not measured
    scores: torch.Tensor = None        # (B,) the score given at the last reply token
    logprobs: torch.Tensor = None      # (B, R) log pi(token) under the policy that sampled it
    ref_logprobs: torch.Tensor = None  # (B, R) the same under the frozen reference
    implicit: torch.Tensor = None      # (B, R) ppo.implicit_reward: implicit_reward_beta x (log pi_dpo - log pi_ref) of
                                       #   each chosen token at temperature 1, 0 elsewhere; None without
    values: torch.Tensor = None        # (B, R) the critic's value before each reply token; None without a critic

    kl: torch.Tensor = None            # (B, R) per-token KL estimate, 0 where mask is 0
    kl_coef: float = None              # beta of the KL penalty in the rewards (0 with use_kl_loss: in the loss)
    rewards: torch.Tensor = None       # (B, R) -kl_coef * kl per token, plus the score (less a group estimator's
                                       #   baseline) on the last token
    advantages: torch.Tensor = None    # (B, R) GAE advantages, or without a critic the return-to-go (whitened with
                                       #   whiten_advantages)
    returns: torch.Tensor = None       # (B, R) advantages + values: the critic's targets (no critic: the return-to-go)

    def statistics(self, update: dict[str, torch.Tensor], num_generations: int) -> dict[str, torch.Tensor]:
        """This process's means of the step's statistics (README "PPO"), the update's minibatch means in `update`."""
        kl = self.kl.sum(1).mean()
        local = {
            "reward_raw": self.raw.mean(), "reward": self.normalised.mean(), "score": self.scores.mean(),
            "kl": kl, "non_score_reward": -self.kl_coef * kl, **update,
            "reply_length": self.mask.sum(1).mean(), "ended": self.ended.float().mean(),
            # diversity of this process's replies (no n-gram at all: none)
            **{f"distinct_{n}": torch.tensor(metrics.distinct_n(self.texts, n) or 0.0, device=self.mask.device)
               for n in (1, 2)},
        }
        if self.values is not None:  # a critic's
            local["explained_variance"] = torch.tensor(rl.explained_variance(self.values, self.returns, self.mask),
                                                       device=self.mask.device)
        if num_generations > 1:  # GRPO's zero-variance groups (all replies scored alike) show here
            local["group_score_std"] = self.scores.view(-1, num_generations).std(1).mean()
        if self.implicit is not None:  # the DPO policy's implicit reward of each reply, summed over its tokens
            local["implicit_reward"] = self.implicit.sum(1).mean()
        return local


class PromptSampler:
    """Shuffled passes over the prompts; each step takes `batch_size` per process. Its state is the data position."""

    def __init__(self, n: int, batch_size: int, num_processes: int, rank: int, seed: int):
        self.n, self.batch_size, self.num_processes, self.rank, self.seed = n, batch_size, num_processes, rank, seed
        self.epoch, self.position = 0, 0

    def next_batch(self) -> list[int]:
        need = self.batch_size * self.num_processes
        if self.position + need > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        chunk = order[self.position:self.position + need]
        self.position += need
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def positions(attention_mask):
    """Position ids that ignore left padding, as generate() used them."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def reply_logits(model, sequences, attention_mask, context_length: int, temperature: float):
    """Logits (scaled by the sampling temperature) of the distributions each reply token was drawn from."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=positions(attention_mask),
                use_cache=False)
    return out.logits[:, context_length - 1:-1].float() / temperature


@torch.no_grad()
def sample_replies(policy, tokenizer, prompt_ids: list[list[int]], rows: list[int], cfg, device,
                   engine=None) -> Rollout:
    """One sampled reply per prompt (KV cache, left padding; or vLLM: `engine`, holding the policy's weights);
    reply tokens after the first end-of-turn become padding."""
    stops, pad = stop_ids(tokenizer, policy), tokenizer.pad_token_id
    enc = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt").to(device)
    context_length = enc["input_ids"].shape[1]
    if engine is not None:
        sampled = engine.sample(prompt_ids, stops=stops, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        width = max(1, max(map(len, sampled)))
        fill = stops[0] if pad is None else pad
        replies = torch.tensor([row + [fill] * (width - len(row)) for row in sampled], device=device)
    else:
        sequences = policy.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                    max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                    use_cache=True, **UNSHAPED)
        replies = sequences[:, context_length:]
    is_eos = torch.isin(replies, torch.tensor(stops, device=replies.device))
    ended = is_eos.any(1)
    last = torch.where(ended, is_eos.int().argmax(1), replies.shape[1] - 1)
    mask = (torch.arange(replies.shape[1], device=device)[None] <= last[:, None]).long()
    replies = replies.masked_fill(mask == 0, pad)
    return Rollout(rows=rows, sequences=torch.cat([enc["input_ids"], replies], 1),
                   attention_mask=torch.cat([enc["attention_mask"], mask], 1), replies=replies, mask=mask.float(),
                   ended=ended, context_length=context_length)
