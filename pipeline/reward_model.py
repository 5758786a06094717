"""The reward model: one way to load, save, encode and score it, for every stage that reads one.

The reward stage trains a one-output `AutoModelForSequenceClassification` with TRL's RewardTrainer; PPO (its reward
and its critic), GRPO/RLOO's reward function and the eval stage score replies with it. They all go through this
module, so a reply is scored exactly as the reward stage trained on it:

- encoding (`encode`): a conversational prompt (a list of messages) gets the reply as an assistant turn through the
  reward model's own chat template (with the row's tools); a text prompt gets `prompt + reply + eos`, as TRL builds
  text pairs, unless the model trained on conversations (`reward_conversational` in its config): then it is the user
  turn the policy answered (`RewardModel.as_trained`);
- truncation: a sequence over `max_length` keeps its last `max_length` tokens (the score head reads the last one);
  `max_length` is the reward stage's, stored in the saved config as `reward_max_length`;
- normalisation: `(raw - reward_mean) / reward_std` with the statistics of the training pairs the stage stored in the
  config (absent: raw scores).

Several reward models score together as a `RewardEnsemble` (ppo's `reward_ensemble`), each member as above, their
normalised scores combined into one (`combine`). The reward stage's GRM regulariser (`next_token_loss`) is here too,
for the reward stage and for PPO's reward rounds, and so is DPO's implicit reward, a per-token reward read off a DPO
policy (`ImplicitReward`, ppo's `implicit_reward`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import cli, faults, generation, hub, models
from pipeline.formats import as_messages
from pipeline.key_checks import key_prefix


def saved_head(path, from_hub: bool = False, revision: str | None = None) -> str | None:
    """"classifier" (a reward model: sequence classification) or "causal" for a saved model, full or an adapter: a
    folder, or `from_hub` a hub id (at `revision`) whose config the hub or, offline, the local cache gives; None when
    there is no saved model (a hub id neither has: loading it says why), or when the hub is reachable but reading
    its config failed otherwise (said on stderr). A causal LM read as a reward model gets a random score head,
    silently."""
    folder = Path(models.model_path(path))
    config, adapter = folder / "config.json", folder / "adapter_config.json"
    if from_hub:  # an adapter's file first, as transformers follows it; the config only without one
        failures = []
        adapter = _read_hub_file(path, "adapter_config.json", revision, failures)
        config = None if adapter else _read_hub_file(path, "config.json", revision, failures)
        if adapter is None and config is None and failures:  # a full model's cached config still answers
            name, err = failures[0]
            print(f"warning: {path}: reading {name} from the hub failed ({cli.typed_line(err, 200)}); whether it is "
                  f"a reward model or a causal LM is not checked", file=sys.stderr)
            return None
    if adapter is not None and adapter.is_file():
        return "classifier" if json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS" else "causal"
    if config is not None and config.is_file():
        values = json.loads(config.read_text())
        archs = " ".join(values.get("architectures") or [])  # a remote-code reward model maps the auto class
        return ("classifier" if "ForSequenceClassification" in archs
                or "AutoModelForSequenceClassification" in (values.get("auto_map") or {}) else "causal")
    return None


def checkpoint_head(recipe, cp) -> str | None:
    """saved_head of a runs.Checkpoint: its folder, or a hub id at the recipe's `model.revision`."""
    return saved_head(cp.path, from_hub=cp.source == "hub", revision=recipe.model.revision)


def _read_hub_file(repo, name: str, revision: str | None, failures: list) -> Path | None:
    """hub.repo_file, with a failure other than the file's absence (a dropped connection, the hub's 5xx) added to
    `failures` as (name, error) instead of raised."""
    try:
        return hub.repo_file(str(repo), name, revision)
    except Exception as err:
        failures.append((name, err))
        return None


def refuse_causal_head(recipe, section: str, key: str, cp, head: str | None) -> None:
    """One line when the checkpoint `section.key` names (a runs.Checkpoint; `head` its checkpoint_head) is a causal
    LM, which read as a reward model would be scored by a random head, silently. It names where the key was set."""
    if head == "causal":
        raise cli.PipelineError(f"{key_prefix(recipe, section, key)}{key}: {cp.path} is not a reward model (a "
                                f"sequence-classification model, e.g. the reward stage)")


def load_reward_model(recipe, path, peft_values=None):
    """A one-output sequence-classification model from a causal LM folder (full or adapter) or a reward model."""
    from transformers import AutoModelForSequenceClassification

    try:  # the fresh score head and the dropped LM head are expected: TRL silences the load report for them
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # pragma: no cover - a TRL without it only prints a longer load report
        suppress_seqcls_warning = contextlib.nullcontext
    with suppress_seqcls_warning():
        return models.load_causal_lm(recipe, path, peft_values=peft_values, cls=AutoModelForSequenceClassification,
                                     num_labels=1, revision=recipe.model.revision)


def save_reward_model(trainer, tokenizer, out: Path, recipe, init_path: str) -> None:
    """Save the trained reward model as a full safetensors model with its tokenizer. A LoRA run keeps its adapter
    (with the trained score head) under `adapter/` and saves the merged model at the top, so the folder always
    loads with AutoModelForSequenceClassification.from_pretrained."""
    from peft import PeftModel

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if not isinstance(unwrapped, PeftModel):
        trainer.save_model(str(out))
    else:
        trainer.save_model(str(out / "adapter"))
        if trainer.accelerator.is_main_process:  # merge from disk: works whatever sharding trained the adapter
            with models.single_process():  # under ZeRO-3 a load would wait for the other processes
                base = load_reward_model(recipe, init_path)
                models.fit_embeddings(base, tokenizer)
                merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
                merged.config.pad_token_id = tokenizer.pad_token_id
                merged.save_pretrained(str(out), safe_serialization=True)
    faults.point("final-save")
    if trainer.accelerator.is_main_process:
        for folder in (out, out / "adapter"):  # a pickle of the arguments; manifest.json records the config
            (folder / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(out))
    trainer.accelerator.wait_for_everyone()


def save_statistics(out: Path, model, *, mean: float, std: float, max_length: int | None,
                    conversational: bool | None) -> None:
    """Write what every later reader needs into the saved config: normalisation, the training max_length, and
    whether it trained on conversations (None: not known)."""
    model.config.reward_mean, model.config.reward_std = mean, std
    model.config.reward_max_length = max_length
    model.config.reward_conversational = conversational
    model.config.save_pretrained(str(out))


def lm_head_weight(recipe, path: str, tokenizer):
    """The output embedding (LM head) of the causal LM at `path`, sized to the tokenizer, as a frozen tensor: what
    reads the reward model's hidden states in `next_token_loss`."""
    with models.single_process():  # a plain load on every process; under ZeRO-3 it would wait for the others
        lm = models.load_causal_lm(recipe, path, tokenizer=tokenizer)
        return lm.get_output_embeddings().weight.detach().clone()


def next_token_loss(hidden, labels, lm_head):
    """The GRM regulariser (Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model
    for LLMs"): the mean next-token loss of `labels` (B, T: token ids, -100 where not counted) read from the reward
    model's last hidden states `hidden` (B, T, H) by a frozen LM head `lm_head` (V, H). It keeps the hidden states
    those of a language model that predicts good replies, so the score head can check a reply against them instead
    of settling on surface features such as style (README "Reward model"). A batch of empty replies adds 0."""
    import torch.nn.functional as F

    logits = F.linear(hidden[:, :-1], lm_head.to(hidden.device, hidden.dtype)).flatten(0, 1).float()
    labels = labels[:, 1:].flatten()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (labels != -100).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------- encoding


def tools_of(row) -> list | None:
    """A row's `tools` column (a list of schemas, or a JSON string of one), as apply_chat_template takes it."""
    tools = row.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def offered_tools(rows) -> list[list | None]:
    """The tool schemas each row offers (None where it offers none: no `tools` column, null or an empty list)."""
    return [tools_of(row) or None for row in rows]


def as_reply(prompt, reply):
    """A generated reply's text in the form its prompt pairs with: an assistant turn after a conversation."""
    if isinstance(prompt, list) and isinstance(reply, str):
        return [{"role": "assistant", "content": reply}]
    return reply


def encode(tokenizer, prompt, reply, tools=None) -> list[int]:
    """Token ids of prompt + reply exactly as TRL's RewardTrainer builds them (chat template, or text + eos)."""
    reply = as_reply(prompt, reply)
    if isinstance(reply, list):  # a conversation (a reply with tool turns): a text prompt is its user turn
        return list(tokenizer.apply_chat_template(as_messages(prompt) + reply, tools=tools, tokenize=True,
                                                  return_dict=True)["input_ids"])
    if not reply.endswith(tokenizer.eos_token):
        reply = reply + tokenizer.eos_token
    return list(tokenizer(prompt + reply)["input_ids"])


def encode_prompt(tokenizer, prompt, tools=None) -> list[int]:
    """Token ids of the prompt as it begins `encode(tokenizer, prompt, reply)`: the reply's tokens follow them (for a
    text prompt, up to a BPE merge across the boundary, which moves the split by a token)."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tools=tools, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def reply_text(reply) -> str:
    return reply if isinstance(reply, str) else "\n".join(str(m.get("content") or "") for m in reply)


# ---------------------------------------------------------------------------------------------- scoring


def score(model, sequences: list[list[int]], pad_id: int, batch_size: int, max_length: int | None,
          desc: str = "scoring") -> list[float]:
    """Raw reward of each token-id sequence (batched by length, right-padded); a sequence over max_length keeps its
    last max_length tokens (the score head reads the last one)."""
    import torch
    from tqdm.auto import tqdm

    if max_length:
        sequences = [s[-max_length:] for s in sequences]
    pad_id = head_pad_id(model, pad_id)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards = [0.0] * len(sequences)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=len(order) <= batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_right([sequences[i] for i in idx], pad_id)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(idx):
                rewards[i] = float(out[row, 0])
    model.train(was_training)
    return rewards


def head_pad_id(model, fallback: int) -> int:
    """The id to pad a reward model's batches with: transformers reads the score at the last token that is not the
    config's pad_token_id, so padding with another (a user's model whose config and tokenizer disagree) moved where
    a short sequence's score was read, and it changed with the longer ones beside it, in scoring and training."""
    pad = getattr(model.config, "pad_token_id", None)
    return fallback if pad is None else pad


def pad_right(sequences: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) of token-id sequences padded on the right, as the score head expects (it reads
    each row's last non-pad token)."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask


@dataclass
class PairScores:
    """Rewards of preference pairs, with reply lengths in tokens and how many pairs were cut to max_length."""

    chosen: list[float]
    rejected: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]
    truncated: int


class RewardModel:
    """A reward model with its tokenizer and the settings its stage trained it with (see the module docstring).

    `scores(prompts, replies)` gives raw scores; `normalise` standardises them with the stored mean and std."""

    def __init__(self, model, tokenizer, max_length: int | None, mean: float | None, std: float | None,
                 conversational: bool | None = None):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.conversational = conversational
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tokenizer.pad_token_id
        self.standardised = mean is not None and std is not None and std > 0
        self.mean, self.std = (float(mean), float(std)) if self.standardised else (0.0, 1.0)

    @classmethod
    def load(cls, recipe, checkpoint, device="cpu", max_length: int | None = None) -> "RewardModel":
        """The reward model saved at `checkpoint` (a runs.Checkpoint), frozen, on `device`. max_length: the config's
        `reward_max_length`, else the model's context size."""
        model = load_reward_model(recipe, checkpoint.path).to(device).eval().requires_grad_(False)
        tokenizer = models.load_tokenizer(recipe, checkpoint, as_saved=True)  # as the reward model was trained
        config = model.config
        max_length = max_length or getattr(config, "reward_max_length", None) or generation.config_positions(config)
        return cls(model, tokenizer, max_length, getattr(config, "reward_mean", None),
                   getattr(config, "reward_std", None), getattr(config, "reward_conversational", None))

    def as_trained(self, prompt):
        """A prompt in the form this model trained on: a text prompt to a model that trained on conversations is a
        user turn (its chat template renders it, as eval, our PPO and GRPO/RLOO render it for the policy); as given
        otherwise."""
        return as_messages(prompt) if self.conversational and isinstance(prompt, str) else prompt

    def scores(self, prompts, replies, tools=None, *, batch_size: int = 64, desc: str = "rewards") -> list[float]:
        """Raw score of each (prompt, reply): reply as text or as messages; tools: one list per row, or None."""
        tools = tools or [None] * len(prompts)
        seqs = [encode(self.tokenizer, self.as_trained(p), r, t) for p, r, t in zip(prompts, replies, tools)]
        return score(self.model, seqs, self.tokenizer.pad_token_id, batch_size, self.max_length, desc)

    def policy_scores(self, prompts, replies, ended, missing_eos_penalty: float | None, *, tools=None,
                      clip: float | None = None, desc: str = "rewards"):
        """What an online RL step (PPO, GRPO, RLOO) rewards a sampled reply with: (raw, normalised, score) tensors of
        shape (B,), the score being the normalised reward (clamped to [-clip, clip] when `clip` is set) minus
        `missing_eos_penalty` where the reply did not end.
        A reply with tool calls is its messages (assistant and tool turns), read with the tools its prompt offered
        (`tools`: one list per row, or None), as the reward stage reads a conversation with tools."""
        from pipeline import rl

        raw, normalised = self.normalised_scores(prompts, replies, tools, desc=desc)
        raw, normalised = raw.to(ended.device), normalised.to(ended.device)
        if clip is not None:
            normalised = normalised.clamp(-clip, clip)
        return raw, normalised, rl.score_with_eos_penalty(normalised, ended, missing_eos_penalty)

    def normalised_scores(self, prompts, replies, tools=None, *, desc: str = "rewards"):
        """(raw, normalised) score tensors of shape (B,)."""
        import torch

        raw = torch.tensor(self.scores(prompts, replies, tools, desc=desc))
        return raw, self.normalise(raw)

    def to(self, device) -> "RewardModel":
        self.model.to(device)
        return self

    def normalise(self, raw):
        """Standardised scores (a list or a tensor); raw scores when the config stores no statistics."""
        if isinstance(raw, list):
            return [(x - self.mean) / self.std for x in raw]
        return (raw - self.mean) / self.std

    def score_pairs(self, rows, *, batch_size: int, desc: str) -> PairScores:
        """Preference rows (`prompt`, `chosen`, `rejected`, optional `tools`) scored on both sides."""
        seqs, lengths = [], []
        for row in rows:
            for side in ("chosen", "rejected"):
                seqs.append(encode(self.tokenizer, self.as_trained(row["prompt"]), row[side], tools_of(row)))
                lengths.append(len(self.tokenizer(reply_text(row[side]), add_special_tokens=False)["input_ids"]))
        rewards = score(self.model, seqs, self.tokenizer.pad_token_id, batch_size, self.max_length, desc)
        cut = sum(max(len(c), len(r)) > self.max_length for c, r in zip(seqs[0::2], seqs[1::2])) \
            if self.max_length else 0
        return PairScores(rewards[0::2], rewards[1::2], lengths[0::2], lengths[1::2], cut)


# ---------------------------------------------------------------------------------------------- ensembles


def combine(normalised, objective: str, penalty: float = 0.0):
    """One score per reply from the members' normalised scores (K members, B replies): their `mean`; the
    `worst_case` (lowest); or `uncertainty_weighted`, the mean minus `penalty` times their variance (Coste et al.
    2023)."""
    if objective == "worst_case":
        return normalised.min(0).values
    mean = normalised.mean(0)
    if objective == "uncertainty_weighted":
        return mean - penalty * normalised.var(0, unbiased=False)
    return mean


class RewardEnsemble:
    """Reward models scored together (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization").
    Each member reads a reply as its own stage trained it and normalises its raw score with its own statistics;
    `combine` makes one score of them. Where the members disagree the policy has left their data, and the worst-case
    and uncertainty-weighted objectives pay less there. The first member stands for the ensemble where one model is
    needed (the critic's starting weights, the log line); the raw score is the members' mean."""

    def __init__(self, members: list[RewardModel], objective: str = "mean", penalty: float = 0.0):
        self.members, self.objective, self.penalty = list(members), objective, penalty
        first = self.members[0]
        self.model, self.tokenizer, self.mean, self.std = first.model, first.tokenizer, first.mean, first.std

    def normalised_scores(self, prompts, replies, tools=None, *, desc: str = "rewards"):
        import torch

        n = len(self.members)
        raws = torch.stack([m.normalised_scores(prompts, replies, tools, desc=f"{desc} ({k + 1}/{n})")[0]
                            for k, m in enumerate(self.members)])
        normalised = torch.stack([m.normalise(raw) for m, raw in zip(self.members, raws)])
        return raws.mean(0), combine(normalised, self.objective, self.penalty)

    policy_scores = RewardModel.policy_scores  # the same clip and end-of-turn penalty on the combined score

    def to(self, device) -> "RewardEnsemble":
        for member in self.members:
            member.to(device)
        return self


def check_reads(recipe, checkpoints: list, prompts, spec: str, key: str) -> None:
    """One line before any work when a reward model (runs.Checkpoint each) cannot read the prompts: conversational
    ones go through its own chat template, and one trained elsewhere may have none."""
    row = next((i for i, p in enumerate(prompts) if isinstance(p, list)), None)
    for cp in checkpoints if row is not None else []:
        if not models.load_tokenizer(recipe, cp, as_saved=True).chat_template:
            raise cli.PipelineError(f"{cp.path}: {key}: its tokenizer has no chat template, so it cannot read the "
                                    f"conversational prompts of {spec} (row {row + 1}); give it one or use text "
                                    f"prompts")


def load_scorer(recipe, checkpoints: list, device="cpu", objective: str = "mean", penalty: float = 0.0):
    """The reward model at the one checkpoint, or the ensemble of the models at several (runs.Checkpoint each)."""
    members = [RewardModel.load(recipe, cp, device) for cp in checkpoints]
    return members[0] if len(members) == 1 else RewardEnsemble(members, objective, penalty)


class ImplicitReward:
    """DPO's implicit reward as a dense reward (RTO, Zhong et al. 2024): beta x (log pi_dpo - log pi_ref) of each
    token the policy chose, read at temperature 1 off a policy DPO tuned from the PPO reference."""

    def __init__(self, recipe, checkpoint, tokenizer, beta: float, device):
        if models.load_tokenizer(recipe, checkpoint).get_vocab() != tokenizer.get_vocab():
            raise cli.PipelineError(f"{checkpoint.path}: ppo.implicit_reward needs a policy with the policy's "
                                    f"tokenizer (its log-probabilities are read on the policy's tokens)")
        self.model = models.load_causal_lm(recipe, checkpoint.path).to(device).eval().requires_grad_(False)
        self.beta = beta

    def token_rewards(self, batch, ref_logprobs):
        """(B, R) rewards of a Rollout's reply tokens (0 where its mask is 0), given the reference's log-probs."""
        from pipeline import rl
        from pipeline.ppo_rollout import reply_logits

        logits = reply_logits(self.model, batch.sequences, batch.attention_mask, batch.context_length, 1.0)
        return self.beta * (rl.logprobs_of(logits, batch.replies) - ref_logprobs) * batch.mask
