"""Judges of replies: the verifier, the world's noise-free annotator, and pairwise outcomes between two checkpoints.

One place decides whether a reply is correct, so the held-out accuracy a policy stage reports (pipeline/heldout.py)
and the eval stage's accuracy and win rates (pipeline/evaluate.py) cannot drift apart. The reward model judges
through pipeline/reward_model.py.
"""

from __future__ import annotations

from pipeline import log, metrics as M, world
from pipeline.cli import PipelineError

JUDGES = {"verifier": "verifier", "reward": "reward model", "annotator": "annotator"}


def has_verifier(row) -> bool:
    return row.get("answer") is not None


def is_correct(row, text: str) -> bool | None:
    """A world skill's verifier; without a world skill, exact match of the final answer ("... the answer is X.",
    else the whole reply) with the reference; None when the row has no reference answer."""
    if not has_verifier(row):
        return None
    if row.get("skill") in world.SKILLS:
        return world.verify(row["skill"], text, row["answer"])
    final = world.extract_answer(text)
    return M.exact_match(final if final is not None else text, row["answer"])


def verifier_scores(skills, answers, texts) -> list[float | None]:
    """1.0 / 0.0: the verifier's verdict on each reply to prompts with these skills and reference answers (None where
    a prompt has no answer: a tool task in a mixture). Online RL logs it as the gold score of its rollouts, and adds
    it to the reward only with `verifier_weight`."""
    verdicts = [is_correct({"skill": s, "answer": a}, t) for s, a, t in zip(skills, answers, texts)]
    return [None if v is None else float(v) for v in verdicts]


def annotator_judges(row) -> bool:
    """The world's annotator compares replies to the world's problems only (a skill and its answer)."""
    return row.get("skill") in world.SKILLS and row.get("answer") is not None


def annotator_outcome(row, a: str, b: str) -> int | None:
    """+1 / 0 / -1: the world's noise-free annotator prefers a / neither (equal quality) / b. None off-world."""
    skill, answer = row.get("skill"), row.get("answer")
    if not annotator_judges(row):
        return None
    if world.reply_quality(skill, a, answer) == world.reply_quality(skill, b, answer):
        return 0
    return 1 if world.annotator_prefers(skill, answer, a, b) == 0 else -1


def noisy_annotator_outcome(row, a: str, b: str, rng, noise: float) -> int | None:
    """+1 / 0 / -1 as `annotator_outcome`, with the world's label noise on pairs of different quality: the label is
    flipped with probability `noise` as the world's preference pairs are labelled (world.annotator_prefers); a tie
    (equal quality) stays 0. None off-world."""
    outcome = annotator_outcome(row, a, b)
    if not outcome:
        return outcome
    return 1 if world.annotator_prefers(row["skill"], row["answer"], a, b, rng=rng, noise=noise) == 0 else -1


def last_user_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def with_answers(ds, spec: str, required: bool, needed_for: str = "verifier_weight", own_answers: bool = True,
                 places: list[str] | None = None):
    """Add `skill`/`answer` for the verifier and the annotator (PPO's gold score and verifier_weight, iterated DPO's
    annotator): the dataset's own columns; else a world problem's skill, with the row's own `answer` (text: ppo's
    prompts are read so, preferences.prompt_rows) or else the problem's solution, and where it is no world problem
    the row's own `answer` (checked by exact match, as eval checks a reference without a skill). Not `own_answers`: the
    annotator, which judges world problems only. A row with neither: an error naming it (by its place in `places`,
    e.g. `line 3` or `b.jsonl line 3`: the loaders reorder and drop rows; else its index from 1) when `required`
    (`needed_for` says by what), else left unchecked, logged. Rows that offer tools (a `tools` value) are tool
    tasks, judged by pipeline/tool_world.py: they get no skill/answer, and prompts of tool tasks only keep no
    `answer` column (so verifier_weight's check sees that there is nothing to verify)."""
    if {"skill", "answer"} <= set(ds.column_names):
        return ds
    offers = ds["tools"] if "tools" in ds.column_names else [None] * len(ds)
    given = ds["answer"] if own_answers and "answer" in ds.column_names else [None] * len(ds)
    skills, answers, unchecked = [], [], []
    for i, (prompt, tools, answer) in enumerate(zip(ds["prompt"], offers, given)):
        key = None if tools else world.prompt_key(last_user_text(prompt))
        if key is None and not tools and answer is None:
            place = places[i] if places else f"row {i + 1}"
            if required:
                alone = " (or an `answer` alone)" if own_answers else ""
                raise PipelineError(f"{spec}: {place}: {needed_for} needs `skill` and `answer` columns{alone}, "
                                    f"and this prompt is not a world problem to solve")
            unchecked.append(place)
        skills.append(key[0] if key else None)
        answers.append(None if tools else answer if answer is not None else world.solve(key) if key else None)
    if unchecked:
        log.info(f"{spec}: {len(unchecked)} rows ({unchecked[0]} first) have no answer to check: they get no "
                 f"verifier accuracy")
    if all(a is None for a in answers):  # tool tasks only, or nothing to check
        return ds.remove_columns("answer") if "answer" in ds.column_names else ds
    return ds.remove_columns([c for c in ("skill", "answer") if c in ds.column_names]) \
        .add_column("skill", skills).add_column("answer", answers)


def accuracy(rows, texts) -> dict:
    """Verifier accuracy of one reply per row (rows with a reference answer): overall and per skill."""
    per_skill: dict[str, list[bool]] = {}
    for row, text in zip(rows, texts):
        verdict = is_correct(row, text)
        if verdict is not None:
            per_skill.setdefault(row.get("skill") or "-", []).append(verdict)
    verdicts = [v for vs in per_skill.values() for v in vs]
    return {"accuracy": sum(verdicts) / len(verdicts) if verdicts else None,
            "per_skill": {s: sum(v) / len(v) for s, v in sorted(per_skill.items())},
            "n": len(verdicts)}


def outcomes(rows, judge: str, texts_a, texts_b, scores_a=None, scores_b=None) -> list[int | None]:
    """Per prompt, +1 / 0 / -1 when the judge finds reply a better than / as good as / worse than reply b; None
    where it cannot judge (no verifier, no reward model, a prompt off the world for the annotator). scores: the
    verifier's verdicts or the reward model's scores of each side, by judge."""
    if judge == "annotator":
        return [annotator_outcome(row, x, y) for row, x, y in zip(rows, texts_a, texts_b)]
    if scores_a is None or scores_b is None:
        return [None] * len(rows)
    both = [i for i, (x, y) in enumerate(zip(scores_a, scores_b)) if x is not None and y is not None]
    out: list[int | None] = [None] * len(rows)
    if both:
        for i, o in zip(both, M.pairwise_outcomes([scores_a[i] for i in both], [scores_b[i] for i in both]).tolist()):
            out[i] = o
    return out
