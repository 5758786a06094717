"""What the eval stage writes for a person: samples.jsonl (every reply with its verdicts), report.md (tables, plots,
example replies side by side), the plots (accuracy.png, win_rate.png, reward.png) and the summary lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import judges, log


def write_samples(path: Path, rows, targets, versus: dict) -> None:
    """One line per prompt: the prompt, its reference, and each checkpoint's greedy reply with its verdict, reward
    and outcome against the baseline per judge (`versus[checkpoint][judge]`: one outcome per prompt), and its
    samples (verdict, reward, log-ratio to the reference)."""
    words = {1: "win", 0: "tie", -1: "loss"}
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            replies = {}
            for t in targets:
                r = t.greedy[i]
                entry = {"text": r.text, "ended": r.ended, "tokens": r.n_tokens}
                if t.correct[i] is not None:
                    entry["correct"] = t.correct[i]
                if t.rewards is not None:
                    entry["reward"] = round(float(t.rewards[i]), 4)
                vs = {j: words[o[i]] for j, o in versus.get(t.name, {}).items() if o[i] is not None}
                if vs:
                    entry["vs_baseline"] = vs
                if t.samples is not None:
                    entry["samples"] = []
                    for k, sample in enumerate(t.samples[i]):
                        item = {"text": sample.text, "ended": sample.ended}
                        if t.sample_correct[i][k] is not None:
                            item["correct"] = t.sample_correct[i][k]
                        if t.sample_rewards is not None:
                            item["reward"] = round(float(t.sample_rewards[i, k]), 4)
                        if t.log_ratios is not None:
                            item["log_ratio"] = round(float(t.log_ratios[i, k]), 4)
                        entry["samples"].append(item)
                replies[t.name] = entry
            out = {k: row[k] for k in ("id", "prompt", "skill", "hard", "answer") if row.get(k) is not None}
            f.write(json.dumps({**out, "replies": replies}, ensure_ascii=False) + "\n")


def _fmt(value, ci=None, digits=3) -> str:
    if value is None:
        return "—"
    text = f"{value:.{digits}f}"
    return f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(f"{m['role']}: {m.get('content') or ''}" for m in prompt)


def write_report(path: Path, recipe, keys, setup, rows, targets, per: dict, matrix: dict, plots, collapse,
                 sections=()) -> None:
    """report.md: the settings, one row per checkpoint, accuracy by skill, the win-rate matrices, best-of-n,
    diversity and the collapse checks, `sections` (lines: tool use), the plots and example replies side by side."""
    baseline = setup.baseline
    lines = [f"# Evaluation: run `{recipe.run.name}`", "",
             f"- prompts: `{keys.prompts}` ({len(rows)} prompts, "
             + (f"{setup.verified} with a verifier or reference answer)" if setup.verified else
                "none with a reference answer: no accuracy, no verifier or annotator judgements)"),
             f"- replies: greedy, plus {keys.num_samples} samples per prompt at temperature {keys.temperature}, "
             f"top_p {keys.top_p}; at most {keys.max_new_tokens} new tokens; seed {setup.seed}",
             f"- baseline for win rates: `{baseline}`; KL reference: "
             + (f"`{setup.reference}`" if setup.kl else f"none ({setup.kl_note or 'not set'})"),
             "- reward model: " + (f"`{keys.reward_model}`" + (" (scores standardised with its training "
                                                                "reward_mean / reward_std)"
                                                                if setup.reward_standardised else "")
                                    if keys.reward_model else "none"),
             "- intervals: bootstrap 95% over prompts; win rate = (wins + ties / 2) / comparisons", ""]

    columns = [("accuracy", lambda m: _fmt(m.get("accuracy"), m.get("accuracy_ci"))),
               (f"pass@{keys.num_samples}", lambda m: _fmt(m.get("pass_at_n"))),
               *[(f"win vs {baseline}: {judges.JUDGES[j]}",
                  (lambda j: lambda m: _fmt(m.get("win_rate", {}).get(j, {}).get("win_rate"),
                                            m.get("win_rate", {}).get(j, {}).get("ci")))(j)) for j in matrix],
               ("reward", lambda m: _fmt(m.get("reward"), m.get("reward_ci"))),
               ("KL to reference", lambda m: _fmt(m.get("kl"), m.get("kl_ci"), digits=2)),
               ("words", lambda m: _fmt(m.get("reply_words"), digits=1)),
               ("ended", lambda m: _fmt(m.get("ended"), digits=2)),
               ("distinct-1 / 2 of samples", lambda m: f"{_fmt(m.get('distinct_1'), digits=2)} / "
                                            f"{_fmt(m.get('distinct_2'), digits=2)}"),
               ("self-BLEU of samples", lambda m: _fmt(m.get("self_bleu"), digits=2)),
               ("entropy (nats/token)", lambda m: _fmt(m.get("sample_entropy"), digits=2)),
               ("perplexity", lambda m: _fmt(m.get("perplexity"), digits=2))]
    columns = [(title, get) for title, get in columns
               if any(get(m).strip("— /") for m in per.values())]  # drop columns no checkpoint has
    lines += ["## Checkpoints", "", "| checkpoint | " + " | ".join(t for t, _ in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for t in targets:
        lines.append(f"| `{t.name}` | " + " | ".join(get(per[t.name]) for _, get in columns) + " |")
    lines.append("")
    if "perplexity" in [c for c, _ in columns]:
        lines += [f"Perplexity on `{keys.perplexity_data}` (at most {keys.perplexity_max_rows} rows).", ""]

    skills = sorted({s for m in per.values() for s in m.get("accuracy_per_skill", {})})
    levels = [lv for lv in ("easy", "hard") if any(lv in m.get("accuracy_by_difficulty", {}) for m in per.values())]
    if skills or levels:
        lines += ["## Accuracy by skill", "", "| checkpoint | " + " | ".join(skills + levels) + " |",
                  "|---|" + "---|" * (len(skills) + len(levels))]
        for t in targets:
            m = per[t.name]
            cells = [m.get("accuracy_per_skill", {}).get(s) for s in skills] + \
                    [m.get("accuracy_by_difficulty", {}).get(lv) for lv in levels]
            lines.append(f"| `{t.name}` | " + " | ".join(_fmt(c["mean"], c["ci"]) if c else "—" for c in cells)
                         + " |")
        lines.append("")

    if matrix:
        lines += ["## Win rates", "", "Row against column: the share of prompts where the row's greedy reply is "
                  "judged better (ties count half), with its 95% interval.", ""]
        for judge, table in matrix.items():
            lines += [f"### {judges.JUDGES[judge]}", "", "| | " + " | ".join(f"`{t.name}`" for t in targets) + " |",
                      "|---|" + "---|" * len(targets)]
            for a in targets:
                cells = ["—" if a is b or table[a.name][b.name] is None else
                         _fmt(table[a.name][b.name]["win_rate"], table[a.name][b.name]["ci"], digits=2)
                         for b in targets]
                lines.append(f"| `{a.name}` | " + " | ".join(cells) + " |")
            lines.append("")

    lines += best_of_n_section(targets, per, setup.best_of, keys.num_samples)
    if collapse:
        lines += ["## Collapse checks", "", "Each checkpoint against the one it was trained from, on its samples: "
                  "collapsing when distinct-2 fell by more than verifier accuracy rose, beyond 0.02 "
                  "(pipeline/monitors.py).", "", "| from | to | accuracy change | distinct-2 change | collapsing |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{c['from']}` | `{c['to']}` | {c['accuracy_change']:+.3f} | {c['diversity_change']:+.3f} | "
                  f"{'**yes**' if c['collapsing'] else 'no'} |" for c in collapse] + [""]

    lines += list(sections)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]

    examples = pick_examples(rows, targets, keys.report_examples)
    if examples:
        lines += ["## Example replies", "", "| prompt | reference | " + " | ".join(f"`{t.name}`" for t in targets)
                  + " |", "|---|---|" + "---|" * len(targets)]
        for i in examples:
            row = rows[i]
            cells = []
            for t in targets:
                ok = t.correct[i]
                mark = "" if ok is None else ("✓ " if ok else "✗ ")
                cells.append(mark + _cell(t.greedy[i].text) + ("" if t.greedy[i].ended else " *(cut)*"))
            lines.append(f"| {_cell(_prompt_text(row['prompt']))} | {_cell(row.get('answer') or '—')} | "
                         + " | ".join(cells) + " |")
        verdicts = any(rows[i].get("answer") is not None for i in examples)
        legend = ["✓ / ✗: the verifier's verdict"] if verdicts else []
        legend += ["*(cut)*: the reply hit max_new_tokens", "every reply is in samples.jsonl"]
        lines += ["", "; ".join(legend) + ".", ""]
    path.write_text("\n".join(lines))


BEST_OF_N = {"accuracy": "verifier accuracy of the pick",
             "annotator_win_rate_vs_greedy": "annotator win rate of the pick against the checkpoint's greedy reply",
             "reward": "reward of the pick (the proxy it maximises)"}


def best_of_n_section(targets, per, ns, num_samples) -> list[str]:
    """report.md's best-of-n tables: one per judge, a row per checkpoint, a column per n."""
    curves = {t.name: {p["n"]: p for p in per[t.name].get("best_of_n", [])} for t in targets}
    if not any(curves.values()):
        return []
    lines = ["## Best-of-n", "", f"The reward model picks the highest-scoring of n samples (of the {num_samples} "
             "per prompt; exact expectation over every n-subset, ties broken at random), with 95% bootstrap "
             "intervals over prompts. n = 1 is a random sample.", ""]
    for judge, title in BEST_OF_N.items():
        named = [t.name for t in targets if any(judge in p for p in curves[t.name].values())]
        if not named:
            continue
        lines += [f"### {title}", "", "| checkpoint | " + " | ".join(f"n = {n}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for name in named:
            cells = [_fmt(c["mean"], c["ci"]) if (c := curves[name].get(n, {}).get(judge)) else "—" for n in ns]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def pick_examples(rows, targets, k: int) -> list[int]:
    """Prompts where the checkpoints disagree most (verdicts, then reply texts) first, then in file order."""
    def spread(i):
        verdicts = {t.correct[i] for t in targets}
        return (-len(verdicts), -len({t.greedy[i].text for t in targets}), i)
    return sorted(range(len(rows)), key=spread)[:k]


def plot_all(out: Path, targets, per: dict, matrix: dict, baseline: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    names = [t.name for t in targets]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def bars(ax, groups, series, values):
        """Grouped bars: values[s][g] = (value, (lo, hi)) or None."""
        width = 0.8 / max(len(series), 1)
        for k, s in enumerate(series):
            xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
            vals = [values[s][g] for g in range(len(groups))]
            ys = [v[0] if v else np.nan for v in vals]
            err = np.array([[max(v[0] - v[1][0], 0), max(v[1][1] - v[0], 0)] if v and v[1] else [0, 0]
                            for v in vals]).T
            ax.bar(xs, ys, width, yerr=err, capsize=3, label=s, color=colors[k % len(colors)])
        ax.set_xticks(range(len(groups)), groups)

    def save(fig, ax, name):
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    accuracy = [t for t in names if "accuracy" in per[t]]
    if accuracy:
        skills = sorted({s for t in accuracy for s in per[t].get("accuracy_per_skill", {})})
        groups = ["all"] + skills
        values = {t: [(per[t]["accuracy"], per[t]["accuracy_ci"])] +
                  [(c["mean"], c["ci"]) if (c := per[t].get("accuracy_per_skill", {}).get(s)) else None
                   for s in skills] for t in accuracy}
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(accuracy) / 2)), 4))
        bars(ax, groups, accuracy, values)
        ax.set_ylim(0, 1)
        ax.set_ylabel("verifier accuracy (greedy)")
        ax.set_title("verifier accuracy per checkpoint, 95% bootstrap intervals", fontsize=10)
        save(fig, ax, "accuracy.png")

    others = [t for t in names if t != baseline]
    if matrix and others:
        used = list(matrix)
        values = {judges.JUDGES[j]: [(s["win_rate"], s["ci"]) if (s := matrix[j][t][baseline]) else None
                                     for t in others] for j in used}
        fig, ax = plt.subplots(figsize=(max(6, 2 + 1.2 * len(others) * len(used)), 4))
        bars(ax, others, [judges.JUDGES[j] for j in used], values)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate (ties count half)")
        ax.set_title(f"win rate against {baseline}, 95% bootstrap intervals", fontsize=10)
        save(fig, ax, "win_rate.png")

    curves = {t: per[t]["best_of_n"] for t in names if per[t].get("best_of_n")}
    if curves:
        judged = [j for j in BEST_OF_N if any(j in p for c in curves.values() for p in c)]
        fig, axes = plt.subplots(1, len(judged), figsize=(4.6 * len(judged), 3.8), squeeze=False)
        for ax, judge in zip(axes[0], judged):
            for k, (name, curve) in enumerate(curves.items()):
                points = [(p["n"], p[judge]) for p in curve if judge in p]
                if points:
                    ns, stats = zip(*points)
                    ys = np.array([s["mean"] for s in stats])
                    err = np.array([[y - s["ci"][0], s["ci"][1] - y] for y, s in zip(ys, stats)]).T.clip(min=0)
                    ax.errorbar(ns, ys, yerr=err, marker="o", capsize=3, label=name, color=colors[k % len(colors)])
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({p["n"] for c in curves.values() for p in c}))
            ax.get_xaxis().set_major_formatter(ScalarFormatter())
            if judge != "reward":  # shares: on their whole scale; a pick as good as the greedy reply wins half
                ax.set_ylim(0, 1)
            if judge == "annotator_win_rate_vs_greedy":
                ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
            ax.set(xlabel="n (samples the reward model picks from)", title=BEST_OF_N[judge])
            ax.title.set_fontsize(9)
        fig.suptitle("best-of-n, 95% bootstrap intervals over prompts", fontsize=10)
        save(fig, axes[0][0], "best_of_n.png")

    scored = [t for t in targets if t.rewards is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(scored) + 2), 4))
        ax.violinplot([t.rewards for t in scored], showmedians=True)
        ax.scatter(range(1, len(scored) + 1), [np.mean(t.rewards) for t in scored], color="black", zorder=3,
                   label="mean")
        ax.set_xticks(range(1, len(scored) + 1), [t.name for t in scored])
        ax.set_ylabel("reward of the greedy reply")
        ax.set_title("reward-model score of each greedy reply", fontsize=10)
        save(fig, ax, "reward.png")
    return written


def log_summary(targets, per, baseline) -> None:
    for t in targets:
        m = per[t.name]
        parts = []
        if "accuracy" in m:
            parts.append(f"accuracy {_fmt(m['accuracy'], m['accuracy_ci'])}")
        for judge, s in m.get("win_rate", {}).items():
            parts.append(f"win vs {baseline} ({judges.JUDGES[judge]}) {_fmt(s['win_rate'], s['ci'], digits=2)}")
        if "reward" in m:
            parts.append(f"reward {m['reward']:.3f}")
        if "kl" in m:
            parts.append(f"KL {m['kl']:.2f}")
        parts.append(f"ended {m['ended']:.2f}")
        log.info(f"{t.name}: " + ", ".join(parts))


def to_trackers(report_to, out: Path, per: dict) -> None:
    """Each checkpoint's scalar metrics to the trackers of `report_to` (one step per checkpoint, in report order)."""
    trackers = [t for t in ([report_to] if isinstance(report_to, str) else report_to) if t != "none"]
    if not trackers:
        return
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=trackers, project_dir=str(out / "runs"))
    accelerator.init_trackers("eval")
    for step, (name, m) in enumerate(per.items()):
        accelerator.log({f"{name}/{k}": v for k, v in m.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=step)
    for tracker in accelerator.trackers:  # not end_training(): it also destroys the process group
        tracker.finish()


def display_names(recipe, checkpoints) -> dict[str, str]:
    """Path -> the name a checkpoint goes by in the report: a stage or hub id as written, a folder by the shortest
    tail of its path (at least two parts, e.g. `small/sft`) that no other checkpoint shares."""
    names = {cp.path: cp.ref for cp in checkpoints if cp.source != "local"}
    folders = [cp for cp in checkpoints if cp.source == "local"]
    for cp in folders:
        parts = Path(cp.path).parts
        for k in range(min(2, len(parts)), len(parts) + 1):
            name = "/".join(parts[-k:])
            clash = [o for o in folders if o is not cp and Path(o.path).parts[-k:] == parts[-k:]]
            if not clash and name not in names.values():
                break
        else:
            name = cp.path
        names[cp.path] = name
    return names
