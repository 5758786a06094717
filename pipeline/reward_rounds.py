"""Iterated RLHF inside PPO (`ppo.reward_rounds` > 1): the reward model goes on learning from the policy's samples.

A reward model trained on a fixed set of preference pairs checks replies like those pairs. PPO soon writes replies
it never saw, and the model's checks fail there: on the small recipe PPO learned to answer "Which is larger, 90 or
68?" with "98", which the first reward model scores above "90" (README "The small recipe"). As in iterated online
RLHF (Bai et al. 2022, section 4.5), the run is split into `reward_rounds` rounds of equal length, and before each
round after the first:

1. the current policy answers `reward_round_prompts` of the training prompts twice, sampled as the rollouts are;
2. the annotator labels each pair: the world's simulated annotator with the world's label noise (`world.label_noise`),
   standing in for people who label fresh samples; pairs of equal quality are dropped. The verifier is not asked:
   the gold score stays a measurement;
3. the reward model's accuracy on these fresh pairs against the annotator's clean labels is recorded (how far the
   policy had learned to fool it), then it is fine-tuned on the pairs of every round so far (Bradley-Terry,
   `reward_round_epochs` epochs at `reward_round_learning_rate`, batches of `reward_round_batch_size` pairs), and its
   normalisation (the mean and std of its scores on the pairs' replies) measured again;
4. it is saved under `<stage>.partial/reward-rounds/round-<r>/` (safetensors, the statistics in its config,
   pairs.json, state.json) and scores every later step.

The critic keeps training across rounds: its targets move with the reward. A round folder is written under a
temporary name and renamed when whole, and the global random state is left as it was, so a killed run resumes to the
result of one that was never killed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import devices, faults, judges, log, runs
from pipeline.generation import generate
from pipeline.reward_model import (RewardModel, encode, encode_prompt, head_pad_id, next_token_loss, pad_right,
                                   save_statistics, tools_of)

STATE, PAIRS = "state.json", "pairs.json"


def round_starts(max_steps: int, rounds: int) -> list[int]:
    """Steps done when rounds 2..rounds begin."""
    return [max_steps * r // rounds for r in range(1, rounds)]


def round_at(steps_done: int, max_steps: int, rounds: int) -> int:
    """The round (1..rounds) of the step that follows `steps_done` finished steps."""
    return 1 + sum(steps_done >= s for s in round_starts(max_steps, rounds))


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "reward-rounds" / f"round-{r}"


def is_whole(folder: Path) -> bool:
    return (Path(folder) / STATE).is_file()  # written last, inside the temporary folder, before the rename


def annotated_rows(prompts) -> list[int]:
    """Indices of prompts the annotator can judge (judges.annotator_judges): world problems with a `skill`/`answer`
    (a skill of your own has no annotator), not tool tasks."""
    skills = prompts["skill"] if "skill" in prompts.column_names else [None] * len(prompts)
    answers = prompts["answer"] if "answer" in prompts.column_names else [None] * len(prompts)
    return [i for i, (s, a) in enumerate(zip(skills, answers)) if judges.annotator_judges({"skill": s, "answer": a})]


def load_round(recipe, folder: Path, device) -> RewardModel:
    return RewardModel.load(recipe, runs.Checkpoint(folder.name, str(folder), None, "local"), device)


def label(rows: list[dict], first: list[str], second: list[str], rng, noise: float):
    """(pairs, clean): each prompt's two replies as a (chosen, rejected) pair by the noisy annotator, ties dropped;
    and the clean outcome (+1 first better, -1 second, 0 equal) of every prompt, for the accuracy before training."""
    pairs, clean = [], []
    for row, a, b in zip(rows, first, second):
        clean.append(judges.annotator_outcome(row, a, b))
        outcome = judges.noisy_annotator_outcome(row, a, b, rng, noise)
        if outcome:
            chosen, rejected = (a, b) if outcome > 0 else (b, a)
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs, clean


def clean_accuracy(reward: RewardModel, rows, first, second, clean) -> float | None:
    """Share of the pairs of different quality the reward model orders as the annotator's clean label does."""
    judged = [i for i, c in enumerate(clean) if c]
    if not judged:
        return None
    prompts = [rows[i]["prompt"] for i in judged]
    a = reward.scores(prompts, [first[i] for i in judged], desc="rewards")
    b = reward.scores(prompts, [second[i] for i in judged], desc="rewards")
    return float(np.mean([(x > y) == (clean[i] > 0) for x, y, i in zip(a, b, judged)]))


def fine_tune(reward: RewardModel, pairs: list[dict], *, epochs: int, learning_rate: float, batch_size: int,
              seed: int, lm_loss_coefficient: float = 0.0, lm_head=None) -> dict:
    """Fine-tune `reward.model` in place on (prompt, chosen, rejected) text pairs with the reward stage's objective:
    the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)), plus `lm_loss_coefficient` times GRM's next-token
    loss on the chosen replies read by the frozen LM head `lm_head` (reward_model.next_token_loss). AdamW, gradients
    clipped to 1. Returns the mean loss and accuracy of the last epoch (on the pairs as they came in the batches)."""
    model, tokenizer = reward.model, reward.tokenizer
    keep = -reward.max_length if reward.max_length else 0  # as `score` reads them: the last max_length tokens
    seqs, reply_starts = [], []
    for p in pairs:
        tools = tools_of(p)
        prompt = reward.as_trained(p["prompt"])
        chosen, rejected = (encode(tokenizer, prompt, p[side], tools) for side in ("chosen", "rejected"))
        cut = len(chosen) - len(chosen[keep:])  # tokens truncation drops from the front of the chosen sequence
        reply_starts.append(max(0, len(encode_prompt(tokenizer, prompt, tools)) - cut))
        seqs.append((chosen[keep:], rejected[keep:]))
    first = next(model.parameters())
    device = first.device
    if lm_loss_coefficient:
        lm_head = lm_head.to(device, first.dtype)  # once, not per batch
    model.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    order_rng = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        losses, lm_losses, right = [], [], []
        order = torch.randperm(len(seqs), generator=order_rng).tolist()
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            n = len(rows)
            ids, mask = pad_right([seqs[i][0] for i in rows] + [seqs[i][1] for i in rows],
                                  head_pad_id(model, tokenizer.pad_token_id))
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                        output_hidden_states=bool(lm_loss_coefficient))
            margin = out.logits[:n, 0] - out.logits[n:, 0]
            loss = -torch.nn.functional.logsigmoid(margin.float()).mean()
            if lm_loss_coefficient:
                labels = ids[:n].masked_fill(mask[:n] == 0, -100)
                for row, i in enumerate(rows):
                    labels[row, :reply_starts[i]] = -100  # the prompt is context, as in the reward stage
                lm_loss = next_token_loss(out.hidden_states[-1][:n], labels.to(device), lm_head)
                loss = loss + lm_loss_coefficient * lm_loss
                lm_losses.append(lm_loss.item() * n)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item() * n)
            right.append(int((margin > 0).sum()))
    model.requires_grad_(False).eval()
    return {"train_loss": sum(losses) / len(seqs), "train_accuracy": sum(right) / len(seqs),
            **({"train_lm_loss": sum(lm_losses) / len(seqs)} if lm_losses else {})}


def standardise(reward: RewardModel, pairs: list[dict]) -> None:
    """The reward model's mean and std over both replies of `pairs`: what PPO normalises its scores with."""
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    replies = [p[side] for p in pairs for side in ("chosen", "rejected")]
    raw = np.array(reward.scores(prompts, replies, desc="rewards"))
    reward.mean, reward.std, reward.standardised = float(raw.mean()), float(raw.std()) or 1.0, True


def replayable(prompts) -> list[int]:
    """The rows of the prompt dataset that are preference pairs (their `chosen` is set)."""
    return [i for i, c in enumerate(prompts["chosen"]) if c is not None] if "chosen" in prompts.column_names else []


def replay_pairs(prompts, n: int, seed: int) -> list[dict]:
    """`n` of the prompt dataset's own preference pairs (its `chosen`/`rejected` columns: the kind of pairs the reward
    model was trained on), drawn at random: mixed into a round's fine-tuning so it does not forget them."""
    if not n:  # ppo.check_keys refuses replay from prompts without chosen/rejected
        return []
    rows = replayable(prompts)  # a list of prompt files and pair files: the pairs' rows
    pick = sorted(random.Random(seed).sample(rows, min(n, len(rows))))
    return [{c: prompts[i][c] for c in ("prompt", "chosen", "rejected", "tools") if c in prompts.column_names}
            for i in pick]


def build_round(r: int, *, out: Path, reward: RewardModel, policy, tokenizer, prompts, rows: list[int], cfg,
                noise: float, step: int, device, lm_head=None) -> dict:
    """Round r's reward model from `reward` (round r-1's), saved whole under round_dir(out, r); returns its record.
    Only the main process calls it; the global random state (the CPU's and that of `device`, which the policy and
    the reward model are on) is left as it was. `lm_head`: the frozen LM head of GRM's next-token loss, when
    `cfg.reward_round_lm_loss_coefficient` is set."""
    started, folder = time.time(), round_dir(out, r)
    pick = random.Random(cfg.seed * 1000 + r).sample(rows, min(cfg.reward_round_prompts, len(rows)))
    chosen_rows = [{c: prompts[i][c] for c in ("prompt", "skill", "answer")} for i in sorted(pick)]
    # the sampling and the training's dropout draw from the global generators: a run that resumes past a round built
    # before it was killed (not built again) must draw the rest as the uninterrupted run does
    with devices.fork_random_state(device):
        replies = generate(policy, tokenizer, [row["prompt"] for row in chosen_rows], max_new_tokens=cfg.max_new_tokens,
                           do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, num_samples=2,
                           batch_size=64, seed=cfg.seed * 1000 + r, desc=f"reward round {r}: samples")
        first, second = [s[0].text for s in replies], [s[1].text for s in replies]
        pairs, clean = label(chosen_rows, first, second, random.Random(cfg.seed * 1000 + r), noise)
        before = clean_accuracy(reward, chosen_rows, first, second, clean)
        earlier = [pair for k in range(2, r) for pair in json.loads((round_dir(out, k) / PAIRS).read_text())]
        replay = replay_pairs(prompts, cfg.reward_round_replay, cfg.seed * 1000 + r)
        trained = {}  # every fresh pair a tie, none from earlier rounds or replayed: the model stays as it was
        if earlier + pairs + replay:
            trained = fine_tune(reward, earlier + pairs + replay, epochs=cfg.reward_round_epochs,
                                learning_rate=cfg.reward_round_learning_rate, batch_size=cfg.reward_round_batch_size,
                                seed=cfg.seed * 1000 + r, lm_loss_coefficient=cfg.reward_round_lm_loss_coefficient,
                                lm_head=lm_head)
        after = clean_accuracy(reward, chosen_rows, first, second, clean)
    if earlier + pairs + replay:  # a model trained on replayed pairs alone is standardised on them
        standardise(reward, earlier + pairs or replay)
    record = {"round": r, "step": step, "prompts": len(chosen_rows), "pairs": len(pairs),
              "ties_dropped": len(chosen_rows) - len(pairs), "pairs_trained": len(earlier) + len(pairs) + len(replay),
              "pairs_replayed": len(replay),
              "accuracy_before": before, "accuracy_after": after, **trained,
              "reward_mean": reward.mean, "reward_std": reward.std, "seconds": round(time.time() - started, 1)}

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    reward.model.save_pretrained(str(tmp), safe_serialization=True)
    reward.tokenizer.save_pretrained(str(tmp))
    save_statistics(tmp, reward.model, mean=reward.mean, std=reward.std, max_length=reward.max_length,
                    conversational=reward.conversational)
    (tmp / PAIRS).write_text(json.dumps(pairs, ensure_ascii=False))
    faults.point("reward-round")
    (tmp / STATE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info(f"reward round {r} (before step {step + 1}): {len(pairs)} pairs of fresh samples "
             f"({record['ties_dropped']} ties dropped); the reward model's accuracy on them against clean labels "
             f"{_fmt(before)} before, {_fmt(after)} after fine-tuning on {record['pairs_trained']} pairs "
             f"({record['seconds']:.0f} s)")
    return record


def records(out: Path, rounds: int) -> list[dict]:
    """state.json of every round built so far, in order."""
    return [json.loads((round_dir(out, r) / STATE).read_text()) for r in range(2, rounds + 1)
            if is_whole(round_dir(out, r))]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
