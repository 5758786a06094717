"""Iterated DPO (`dpo.rounds` > 1), as OpenRLHF's iterative DPO: round 1 trains on the stage's dataset; each later
round samples two replies per prompt of that dataset from the current policy (pipeline/generation.py, temperature
1), labels each pair with the reward model (pipeline/reward_model.py) or the world's annotator with its label noise
(pipeline/judges.py), drops ties, and runs a DPO step (a new DPOTrainer) on those pairs.

A prompt that offers tools (a `tools` column, as world:tool_preference's rows) is sampled with its tools rendered by
the chat template, as the eval and ppo stages render it; a sampled reply is one assistant turn (its calls are not
run). A reply that is tool calls, every one of them parsed (pipeline/tool_calls.py), becomes an assistant message with
structured `tool_calls` (arguments as JSON strings, as the world's tool pairs hold them); one whose calls do not parse
stays text. The reward model scores each reply with its row's tools, and the pair keeps `tools`, so DPO renders it
as round 1 renders the dataset's tool pairs. The world's annotator cannot judge a tool reply (pipeline/tool_world.py
judges whole rollouts, the calls run): with `round_labeller: annotator` tool prompts are left out of rounds 2+
(`annotator_prompts`, logged).

The reference stays the stage's initial model in every round, as in OpenRLHF: each round's KL is then measured
against the same model (the one the held-out comparison and the eval stage compare with), and a reference that
followed the policy would let the KL budget compound from round to round.

After each round the policy is measured: its held-out verifier accuracy (pipeline/heldout.py, greedy replies), and on
the two samples per prompt it draws for the next round's pairs: the KL to the reference (the mean log-ratio of those
samples), distinct-1/2 and self-BLEU (pipeline/metrics.py). pipeline/monitors.py's collapse rule compares each round
with the one before (held-out accuracy against distinct-2).

Kill and resume: round r's policy (safetensors), the next round's labelled pairs (JSON) and `state.json` (the round's
record, written last) go under `<stage>.partial/rounds/round-<r>/`; a rerun with the same inputs continues after the
last round whose state, policy and next pairs are whole. Trainer checkpoints of a later round go in its folder.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import data, faults, integrity, judges, log, metrics as M, models, monitors, runs, safe_resume
from pipeline.cli import PipelineError
from pipeline.generation import generate, prompt_ids, reply_logprob_sums
from pipeline.heldout import verifier_accuracy
from pipeline.reward_model import as_reply, offered_tools, tools_of
from pipeline.tool_formats import call_reader

STATE = "state.json"
PAIRS = "pairs.json"


@dataclass
class Rounds:
    """What the rounds need from the DPO stage. `trainer_for(policy, pairs, output_dir, dataset_pairs)`: the stage's
    DPOTrainer over those pairs (dataset_pairs: round 1's, the dataset's own); reference: the frozen initial model
    (also with LoRA); reward: a RewardModel when the labeller is the reward model; prompts: one row per distinct
    training prompt (`prompt`, `tools` where it offers some, and `skill`/`answer` for the annotator)."""

    recipe: object
    keys: object
    run: object
    tokenizer: object
    reference: object
    trainer_for: object
    prompts: list[dict]
    heldout: list[dict] | None
    reward: object = None


def distinct_prompts(ds) -> list[dict]:
    """One row per distinct prompt of preference pairs (a prompt with other tools is another prompt), in first-seen
    order; `tools` kept where a row offers some."""
    seen, rows = set(), []
    for row in ds:
        tools = row.get("tools") or None
        k = json.dumps(row["prompt"] if tools is None else [row["prompt"], tools], sort_keys=True)
        if k not in seen:
            seen.add(k)
            rows.append({c: row[c] for c in ("prompt", "skill", "answer") if c in row})
            if tools is not None:
                rows[-1]["tools"] = tools
    return rows


def annotator_prompts(rows: list[dict], spec: str) -> list[dict]:
    """The prompts the world's annotator can judge replies to: those that offer no tools. Its tool judge
    (tool_world.annotator_prefers_tool) ranks whole rollouts whose calls ran (and whose drawn images the image judge
    read); a sampled turn is not run, so a tool prompt's replies cannot be judged and the prompt is left out of rounds
    2+ (round 1 trains on its pairs as on the others). Every prompt a tool prompt: an error."""
    kept = [row for row in rows if not row.get("tools")]
    if not kept:
        raise PipelineError(f"{spec}: every prompt offers tools, and dpo.round_labeller=annotator cannot judge a tool "
                            f"reply (the world's annotator ranks rollouts whose calls ran); use dpo.round_labeller="
                            f"reward")
    if len(kept) < len(rows):
        log.warning(f"{spec}: {len(rows) - len(kept)} of {len(rows)} prompts offer tools: rounds 2+ leave them out, "
                    f"as the world's annotator cannot judge a tool reply without running its calls "
                    f"(dpo.round_labeller=reward samples them)")
    return kept


def pair_reply(row: dict, reply, tokenizer, read=None):
    """A sampled reply (generation.Reply) as its pair holds it: `as_reply`; after a conversation that offers tools, a
    reply with tool calls, every one parsed (in the tokenizer's own format: tool_formats.call_reader, or `read`), is
    an assistant message with structured `tool_calls` (arguments as JSON strings, content None when the reply is only
    calls, as tool_world.call_message writes them). A call that does not parse keeps the reply as text."""
    prompt, text = row["prompt"], reply.text
    if not row.get("tools") or not isinstance(prompt, list):
        return as_reply(prompt, text)
    read = read or call_reader(tokenizer)
    turn = (reply.token_ids if reply.token_ids is not None else tokenizer(text, add_special_tokens=False)["input_ids"])
    tools = tools_of(row)
    end = reply.end_id if reply.end_id is not None else tokenizer.eos_token_id  # the turn as sampled, with its end
    content, calls = read(list(turn) + [end], prompt_ids(tokenizer, prompt, tools), tools)
    if not calls or any(c.error for c in calls):
        return as_reply(prompt, text)
    return [{"role": "assistant", "content": content or None,
             "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                            for c in calls]}]


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "rounds" / f"round-{r}"


def finished_rounds(out: Path, rounds: int) -> list[dict]:
    """The states of the rounds a killed run finished, in order: each with its state, its policy whole and (before
    the last round) the next round's pairs."""
    states = []
    for r in range(1, rounds + 1):
        folder = round_dir(out, r)
        state = safe_resume.read_json(folder / STATE)
        if state is None or state.get("round") != r:
            break
        if (problem := integrity.model_folder_problem(folder / "policy")):
            log.warning("round %d is not resumed from: %s", r, problem)
            break
        if r < rounds and safe_resume.read_json(round_dir(out, r + 1) / PAIRS) is None:
            break
        states.append(state)
    return states


def load_policy(recipe, folder: Path, policy):
    """A round's saved policy: a full model, or a LoRA adapter put back (trainable) on `policy`'s base model."""
    if models.is_adapter(folder):
        from peft import PeftModel

        return PeftModel.from_pretrained(policy, str(folder), is_trainable=True)
    return models.load_causal_lm(recipe, str(folder), revision=None)


def prompt_draw(setup: Rounds, r: int) -> list[dict]:
    """Round r's prompts: every training prompt, or `round_max_prompts` of them drawn anew each round."""
    k = setup.keys.round_max_prompts
    if not k or k >= len(setup.prompts):
        return setup.prompts
    picked = random.Random(setup.recipe.run.seed * 1000 + r).sample(range(len(setup.prompts)), k)
    return [setup.prompts[i] for i in sorted(picked)]


def label_pairs(setup: Rounds, rows, samples, r: int) -> tuple[list[dict], int]:
    """Each prompt's two samples as a (chosen, rejected) pair by the round's labeller; ties (and prompts it cannot
    judge) dropped. Returns the pairs and how many were dropped. A tool prompt's replies are scored and paired as
    `pair_reply` writes them, with the row's tools (kept in its pair)."""
    a, b = [s[0].text for s in samples], [s[1].text for s in samples]
    read = call_reader(setup.tokenizer)
    replies_a = [pair_reply(row, s[0], setup.tokenizer, read) for row, s in zip(rows, samples)]
    replies_b = [pair_reply(row, s[1], setup.tokenizer, read) for row, s in zip(rows, samples)]
    if setup.keys.round_labeller == "reward":
        prompts, tools = [row["prompt"] for row in rows], offered_tools(rows)
        outcomes = judges.outcomes(rows, "reward", a, b, setup.reward.scores(prompts, replies_a, tools, desc="rewards"),
                                   setup.reward.scores(prompts, replies_b, tools, desc="rewards"))
    else:
        rng = random.Random(setup.recipe.run.seed * 1000 + r)
        outcomes = [judges.noisy_annotator_outcome(row, x, y, rng, setup.recipe.world.label_noise)
                    for row, x, y in zip(rows, a, b)]
    pairs = []
    for row, x, y, outcome in zip(rows, replies_a, replies_b, outcomes):
        if outcome:
            chosen, rejected = (x, y) if outcome > 0 else (y, x)
            pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                          **({"tools": row["tools"]} if row.get("tools") else {})})
    return pairs, len(rows) - len(pairs)


def sample(setup: Rounds, policy, rows, r: int):
    """Two samples (temperature 1) per row from round r's policy, each prompt rendered with the tools it offers."""
    keys = setup.keys
    return generate(policy, setup.tokenizer, [row["prompt"] for row in rows], max_new_tokens=keys.round_max_new_tokens,
                    batch_size=keys.heldout_batch_size, do_sample=True, num_samples=2,
                    seed=setup.recipe.run.seed * 1000 + r, desc=f"round {r} samples", tools=offered_tools(rows))


def measure(setup: Rounds, policy, r: int, rows, samples, previous: dict | None) -> dict:
    """Round r's record beyond its pairs: held-out accuracy, KL to the reference and diversity of its samples, and
    the collapse check against the round before."""
    keys, tokenizer = setup.keys, setup.tokenizer
    record: dict = {}
    if setup.heldout is not None:
        scored = verifier_accuracy(policy, tokenizer, setup.heldout, max_new_tokens=keys.heldout_max_new_tokens,
                                   batch_size=keys.heldout_batch_size, desc=f"round {r} held-out")
        record["heldout_accuracy"] = scored["accuracy"]
    prompts, tools = [row["prompt"] for row in rows], offered_tools(rows)
    own = reply_logprob_sums(policy, tokenizer, prompts, samples, keys.heldout_batch_size, f"round {r} policy",
                             tools=tools)
    ref = reply_logprob_sums(setup.reference, tokenizer, prompts, samples, keys.heldout_batch_size,
                             f"round {r} reference", tools=tools)
    record["kl"] = float(np.mean(own - ref))  # E_{y ~ policy}[log policy(y|x) - log ref(y|x)] over its samples
    record.update(M.diversity([[s.text for s in pair] for pair in samples]))
    record["collapse"] = None
    if previous and all(m.get(k) is not None for m in (previous, record) for k in ("heldout_accuracy", "distinct_2")):
        record["collapse"] = monitors.collapse_check((previous["heldout_accuracy"], previous["distinct_2"]),
                                                     (record["heldout_accuracy"], record["distinct_2"]))
        if record["collapse"]["collapsing"]:
            log.warning(f"collapse after round {r}: distinct-2 of the samples changed by "
                        f"{record['collapse']['diversity_change']:+.3f}, held-out accuracy by "
                        f"{record['collapse']['accuracy_change']:+.3f}")
    return record


def train_round(setup: Rounds, policy, pairs, r: int, output_dir: Path, resume):
    """One DPO step of the iteration: a DPOTrainer over the round's pairs from the current policy."""
    import datasets

    if isinstance(pairs, list):  # from_list takes its columns from the first row: a text pair among tool pairs
        with_tools = any("tools" in p for p in pairs)  # gets tools None, as in the loaded dataset
        pairs = datasets.Dataset.from_list([{**p, "tools": p.get("tools")} if with_tools else p for p in pairs])
    trainer = setup.trainer_for(policy, pairs, output_dir, dataset_pairs=r == 1)
    data.warn_many_epochs(trainer.args, len(trainer.train_dataset), setup.run.state.num_processes)
    result = trainer.train(resume_from_checkpoint=resume)
    logged = [{**{k: v for k, v in h.items() if k == "step" or "/" in k or k == "loss"}, "round": r}
              for h in trainer.state.log_history if "loss" in h and "logps/chosen" in h]
    return trainer, {"steps": result.global_step, "train_loss": runs.train_loss(trainer), "history": logged}


def run_rounds(setup: Rounds, policy, first_pairs):
    """Every round (resuming after the last finished one). Returns (policy, last trainer or None when every round
    was resumed, summary: the records, steps, step-weighted train loss, pairs and history over the rounds)."""
    run, keys = setup.run, setup.keys
    main = run.state.is_main_process
    states = finished_rounds(run.out, keys.rounds)
    if states:
        done = len(states)
        policy = load_policy(setup.recipe, round_dir(run.out, done) / "policy", policy)
        models.configure_generation(policy, setup.tokenizer)
        log.info(f"resuming after round {done} of {keys.rounds} (its policy from {round_dir(run.out, done)})")
    trainer = None
    for r in range(len(states) + 1, keys.rounds + 1):
        folder = round_dir(run.out, r)
        if r == 1:
            pairs, dropped, output_dir, resume = first_pairs, 0, run.out, run.last_checkpoint()
        else:
            pairs, dropped = safe_resume.read_json(folder / PAIRS), states[-1]["dropped_next"]
            output_dir, resume = folder, safe_resume.find_checkpoint(folder)
        previous = states[-1]["record"] if states else None
        if pairs:
            trainer, stats = train_round(setup, policy, pairs, r, output_dir, str(resume) if resume else None)
            policy = run_model(trainer)
        else:  # every sampled pair a tie: nothing to learn from this round
            log.warning(f"round {r}: no pairs left after dropping {dropped} ties: the policy is unchanged")
            stats = {"steps": 0, "train_loss": None, "history": []}  # metrics.json never holds NaN
        rows = prompt_draw(setup, r + 1)  # the next round's prompts: these samples measure this round's policy
        state = {"round": r, **stats, "dropped_next": 0}
        if main:
            policy.save_pretrained(str(folder / "policy"), safe_serialization=True)
            samples = sample(setup, policy, rows, r)
            record = {"round": r, "pairs": len(pairs), "ties_dropped": dropped, "sample_prompts": len(rows),
                      **measure(setup, policy, r, rows, samples, previous)}
            if r < keys.rounds:
                next_pairs, state["dropped_next"] = label_pairs(setup, rows, samples, r + 1)
                round_dir(run.out, r + 1).mkdir(parents=True, exist_ok=True)
                runs.write_json(round_dir(run.out, r + 1) / PAIRS, next_pairs)
            state["record"] = record
            runs.write_json(folder / STATE, state)  # last: the round counts as finished from here
            log.info(round_line(record, keys.rounds))
        run.state.wait_for_everyone()
        states.append(safe_resume.read_json(folder / STATE))
        faults.point("round")
    return policy, trainer, summary(states)


def run_model(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def round_line(record: dict, rounds: int) -> str:
    parts = [f"round {record['round']}/{rounds}: {record['pairs']} pairs"]
    if record.get("heldout_accuracy") is not None:
        parts.append(f"held-out accuracy {record['heldout_accuracy']:.3f}")
    parts.append(f"KL {record['kl']:.3f}")
    parts += [f"{name} {record[k]:.3f}" for k, name in (("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                                                         ("self_bleu", "self-BLEU")) if k in record]
    if record.get("collapse"):
        parts.append("COLLAPSING" if record["collapse"]["collapsing"] else "no collapse")
    return ", ".join(parts)


def summary(states: list[dict]) -> dict:
    steps = sum(s["steps"] for s in states)
    weighted = [(s["train_loss"], s["steps"]) for s in states if s["steps"]]
    return {"steps": steps, "train_loss": sum(l * n for l, n in weighted) / steps if steps else None,
            "train_pairs": sum(s["record"]["pairs"] for s in states),
            "history": [h for s in states for h in s["history"]], "rounds": [s["record"] for s in states]}


# once the stage folder is published (runs.StageRun.finish) the rounds' policies and trainer checkpoints go (the
# model is the last round's); their pairs and states stay. Killed before, the rerun resumes after the last round.
RESUME_ONLY = ("rounds/round-*/policy", "rounds/round-*/checkpoint-*")


def with_output_dir(args, output_dir: Path):
    """The trainer config with another output folder (a later round's checkpoints go in its own folder)."""
    args = copy.copy(args)
    args.output_dir = str(output_dir)
    return args
