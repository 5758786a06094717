"""The eval stage's numbers per checkpoint, from what each checkpoint produced (pipeline/evaluate.py's `Target`: its
greedy replies and their verdicts, its samples with their verdicts, rewards and log-probs): accuracy, win rates,
reward, KL, diversity, best-of-n, and the collapse check between a checkpoint and the one it was trained from; and
which of them the settings allow (EvalSetup).
No model code: metric functions from pipeline/metrics.py and judges from pipeline/judges.py on stored results.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline import judges, log, metrics as M, monitors


def outcomes(rows, a, b, judge: str) -> list[int | None]:
    """Per prompt, +1 / 0 / -1 when the judge finds a's greedy reply better than / as good as / worse than b's."""
    scores = {"verifier": (a.correct, b.correct), "reward": (a.rewards, b.rewards)}.get(judge, (None, None))
    return judges.outcomes(rows, judge, [r.text for r in a.greedy], [r.text for r in b.greedy], *scores)


def judged(values: list[int | None]) -> list[int]:
    return [o for o in values if o is not None]


def win_matrix(rows, targets, boot) -> dict:
    """{judge: {a: {b: win-rate summary of a over b}}} for every judge that can compare anything."""
    matrix = {}
    for judge in judges.JUDGES:
        table = {a.name: {b.name: M.win_rate_summary(judged(outcomes(rows, a, b, judge)), **boot)
                          for b in targets if b is not a} for a in targets}
        if any(s is not None for row in table.values() for s in row.values()):
            matrix[judge] = table
    return matrix


def checkpoint_metrics(rows, t, baseline: str, matrix: dict, boot: dict, best_of: list[int]) -> dict:
    """Everything metrics.json holds for one checkpoint; `best_of`: the n of the best-of-n curve."""
    m: dict = {"ref": t.checkpoint.ref, "path": t.checkpoint.path}
    verified = [(row, c) for row, c in zip(rows, t.correct) if c is not None]
    if verified:
        acc = M.mean_ci([c for _, c in verified], **boot)
        m.update(accuracy=acc["mean"], accuracy_ci=acc["ci"], verified=acc["n"])
        skills = sorted({row["skill"] for row, _ in verified if row.get("skill")})
        if skills:
            m["accuracy_per_skill"] = {s: M.mean_ci([c for row, c in verified if row.get("skill") == s], **boot)
                                       for s in skills}
        levels = {"easy": [c for row, c in verified if row.get("hard") is False],
                  "hard": [c for row, c in verified if row.get("hard") is True]}
        if any(levels.values()):
            m["accuracy_by_difficulty"] = {level: M.mean_ci(v, **boot) for level, v in levels.items() if v}
        if t.samples is not None:
            per_row = [verdicts for row, verdicts in zip(rows, t.sample_correct) if judges.has_verifier(row)]
            m["sample_accuracy"] = float(np.mean(per_row))
            m["pass_at_n"] = float(np.mean([any(x) for x in per_row]))
    if t.rewards is not None:
        reward = M.mean_ci(t.rewards, **boot)
        m.update(reward=reward["mean"], reward_ci=reward["ci"])
    if t.name != baseline:
        wins = {judge: matrix[judge][t.name][baseline] for judge in matrix
                if matrix[judge][t.name][baseline] is not None}
        if wins:
            m["win_rate"] = wins
    if t.log_ratios is not None:
        kl = M.mean_ci(t.log_ratios.mean(axis=1), **boot)  # per prompt, then a bootstrap over prompts
        m.update(kl=kl["mean"], kl_ci=kl["ci"])
    m["reply_tokens"] = float(np.mean([r.n_tokens for r in t.greedy]))
    m["reply_words"] = float(np.mean([len(r.text.split()) for r in t.greedy]))
    m["ended"] = float(np.mean([r.ended for r in t.greedy]))
    if t.samples is not None:  # diversity among the samples of one prompt, averaged over prompts
        m.update(M.diversity([[s.text for s in samples] for samples in t.samples]))
        m["sample_ended"] = float(np.mean([s.ended for samples in t.samples for s in samples]))
    if t.sample_logprobs is not None:
        # -log pi(y|x) of the model's own samples estimates its entropy; per token: over all samples' tokens (the
        # end-of-turn token included, as it was sampled)
        tokens = sum(s.n_tokens + s.ended for samples in t.samples for s in samples)
        m["sample_entropy"] = float(-t.sample_logprobs.sum() / max(tokens, 1))
    if best_of and t.sample_rewards is not None:
        m["best_of_n"] = best_of_n(rows, t, best_of, boot)
    if t.perplexity is not None:
        m["perplexity"], m["perplexity_tokens"] = t.perplexity, t.perplexity_tokens
    m["seconds"] = round(t.seconds, 1)
    return m




def best_of_n(rows, t, ns: list[int], boot: dict) -> list[dict]:
    """The reply the reward model picks among n of a checkpoint's samples, for each n of `ns` (metrics.py
    best_of_n_expected: exact over all n-subsets of the samples, ties broken at random; bootstrap over prompts):
    its verifier accuracy, its win rate against the checkpoint's own greedy reply by the world's annotator (a tie
    counting half: what picking among n samples buys over answering once greedily), and its reward (the proxy the
    pick maximises). [{"n", "accuracy": {"mean", "ci", "prompts"}, "annotator_win_rate_vs_greedy": ..., "reward":
    ...}], a judge absent where it cannot judge."""
    win_points = [[None if (o := judges.annotator_outcome(row, s.text, greedy.text)) is None else (o + 1) / 2
                   for s in samples] for row, samples, greedy in zip(rows, t.samples, t.greedy)]
    per_sample = {"accuracy": t.sample_correct, "annotator_win_rate_vs_greedy": win_points,
                  "reward": t.sample_rewards.tolist()}
    curves = {name: {c["n"]: c for c in M.best_of_n_curve(t.sample_rewards, values, ns, **boot)}
              for name, values in per_sample.items()}
    out = []
    for n in ns:
        point = {name: {k: curve[n][k] for k in ("mean", "ci", "prompts")} for name, curve in curves.items()
                 if n in curve}
        if point:
            out.append({"n": n, **point})
    return out


def collapse_checks(targets, per: dict) -> list[dict]:
    """pipeline/monitors.py's collapse rule between each checkpoint and the one it was trained from (when both are
    evaluated): accuracy and distinct-2 of the same samples. [{"from", "to", "accuracy_change",
    "diversity_change", "collapsing"}]"""
    by_path = {t.checkpoint.path: t.name for t in targets}
    checks = []
    for t in targets:
        parent = by_path.get(t.parent)
        if parent is None:
            continue
        a, b = per[parent], per[t.name]
        if all(k in m for m in (a, b) for k in ("sample_accuracy", "distinct_2")):
            check = monitors.collapse_check((a["sample_accuracy"], a["distinct_2"]),
                                            (b["sample_accuracy"], b["distinct_2"]))
            checks.append({"from": parent, "to": t.name, **check})
    return checks


# ---------------------------------------------------------------------------------------------- which apply


@dataclasses.dataclass
class EvalSetup:
    """What this evaluation compares against and how, as the report states it."""

    baseline: str                     # every win rate is against this checkpoint
    seed: int                         # sampling and bootstrap seed
    verified: int                     # prompts with a reference answer (a verifier)
    own_samples: bool = False         # samples from each model's own distribution: entropy, and KL with a reference
    kl: bool = False                  # the sequence KL to `reference` is measured
    kl_note: str | None = None        # why it is not, when a reference was named
    best_of: list = dataclasses.field(default_factory=list)  # n of the best-of-n curve (at most num_samples)
    reference: str | None = None      # the KL reference's name in the report
    reward_standardised: bool = False  # reward scores are standardised with the reward stage's mean and std


def samples_setup(setup: EvalSetup, keys, reference, reward, targets) -> None:
    """The sequence KL and the entropy need samples from each model's own distribution (temperature 1, top_p 1);
    best-of-n needs a reward model and as many samples as n. `reference`, `reward`: runs.Checkpoints, or None."""
    if not keys.num_samples:
        setup.kl_note = "no samples (num_samples: 0)"
    elif keys.temperature != 1.0 or keys.top_p != 1.0:
        setup.kl_note = "samples not from the model's own distribution (temperature or top_p not 1)"
    setup.own_samples = setup.kl_note is None
    setup.kl = reference is not None and setup.own_samples
    setup.best_of = sorted({n for n in keys.best_of_n if n <= keys.num_samples}) if reward is not None else []
    if keys.best_of_n and not setup.best_of:
        log.info("no best-of-n: " + ("no reward model to pick with" if reward is None else
                                     f"num_samples {keys.num_samples} is below every n of best_of_n"))
    elif len(setup.best_of) < len(set(keys.best_of_n)):
        log.info(f"best-of-n up to num_samples ({keys.num_samples}): n = "
                 f"{', '.join(str(n) for n in sorted(set(keys.best_of_n)) if n > keys.num_samples)} left out")
    if reference is not None:
        if not setup.kl:
            log.info(f"sequence KL skipped: {setup.kl_note}")
        setup.reference = next((t.name for t in targets if t.checkpoint.path == reference.path), keys.reference)
