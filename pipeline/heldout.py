"""Held-out scoring at the end of a policy stage (sft, dpo, kto, ppo): the verifier accuracy of its input and of the
model it trained, each read back from disk as later stages will read it.

The replies are the eval stage's greedy replies (pipeline/generation.py `generate`) and the verdicts the eval
stage's (pipeline/judges.py), so a stage's `heldout_accuracy_<name>` equals the eval stage's accuracy of the same
checkpoint on the same prompts with the same generation budget and batch size.
"""

from __future__ import annotations

from pipeline import data, judges, log, models, runs
from pipeline.generation import context_length, generate, has_position_table, past_position_table, prompt_ids
from pipeline.reward_model import offered_tools


def heldout_rows(recipe, keys) -> list[dict] | None:
    """The stage's held-out prompts (HeldoutKeys), read and checked as the eval stage reads its prompts (a JSON number
    8.0 is the answer 8, a CSV's text "8.0" stays as written, as there), if some of them carry a reference `answer`
    (a world `skill` names its verifier), else None."""
    if not keys.heldout_prompts:
        return None
    ds = data.load(keys.heldout_prompts, "eval_prompts", recipe)
    rows = ds.select(range(min(len(ds), keys.heldout_max_prompts))).to_list()
    data.warn_unread_completions(rows, keys.heldout_prompts)
    if not any(judges.has_verifier(row) for row in rows):
        log.info("%s has no reference answers: held-out scoring skipped", keys.heldout_prompts)
        return None
    return rows


def verifier_accuracy(model, tokenizer, rows, *, max_new_tokens=48, batch_size=64, desc="scoring") -> dict:
    """Greedy replies to the rows' prompts judged by the verifier: overall and per-skill accuracy, share ended.
    Prompts the model cannot answer (past_position_table) are left out, with a warning: the stage has trained by now,
    and a held-out score must not cost its model."""
    lengths = [len(prompt_ids(tokenizer, r["prompt"], t)) for r, t in zip(rows, offered_tools(rows))] \
        if has_position_table(model.config) else []  # any other model answers them: no prompt rendered twice
    if past := past_position_table(model.config, tokenizer, lengths, max_new_tokens):
        log.warning(f"{desc}: {len(past)} of {len(rows)} held-out prompts (row {past[0] + 1} first: {lengths[past[0]]} "
                    f"tokens) with a reply of up to {max_new_tokens} tokens run past the model's table of "
                    f"{context_length(model, tokenizer)} positions: left out")
        left_out = set(past)
        rows = [r for i, r in enumerate(rows) if i not in left_out]
    replies = [r[0] for r in generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, desc=desc, tools=offered_tools(rows))]
    result = judges.accuracy(rows, [r.text for r in replies])
    result["ended"] = sum(r.ended for r in replies) / len(replies) if replies else None
    return result


def score_checkpoint(recipe, path: str, rows, *, max_new_tokens=48, batch_size=64, label="model") -> dict:
    """Verifier accuracy of the model saved at `path`, read back from disk as later stages will read it."""
    # Called on the main process only, while the others wait: no ZeRO-3 partitioned loading or synced generation.
    with models.single_process():
        tokenizer = models.load_tokenizer(recipe, runs.Checkpoint(label, path, "", "local"))
        model = models.load_causal_lm(recipe, path, tokenizer=tokenizer)
        models.configure_generation(model, tokenizer)
        result = verifier_accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   desc=f"scoring {label}")
    if result["accuracy"] is not None:  # None: no prompt the model could answer was left
        log.info("held-out verifier accuracy of %s: %.3f (n=%d, %s)", label, result["accuracy"], result["n"],
                 ", ".join(f"{s} {a:.2f}" for s, a in result["per_skill"].items()))
    return result


def heldout_comparison(recipe, keys, rows, before: tuple[str, str], after: tuple[str, str]) -> dict:
    """Verifier accuracy of two saved models, `(name, path)` each, as metrics.json entries."""
    result = {"heldout": {"prompts": keys.heldout_prompts}}
    for name, path in (before, after):
        scored = score_checkpoint(recipe, path, rows, max_new_tokens=keys.heldout_max_new_tokens,
                                  batch_size=keys.heldout_batch_size, label=name)
        result["heldout"][name] = scored
        result["heldout"]["n"] = scored["n"]
        result[f"heldout_accuracy_{name}"] = scored["accuracy"]
    return result
