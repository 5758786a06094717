"""The reward stage's verdicts and report: plain-language trust checks on its held-out metrics, report.md, and
calibration.png (reliability diagram, margins by whether the label was flipped by noise)."""

from __future__ import annotations

from pathlib import Path

FIGURE = "calibration.png"


def trust_checks(m: dict, category: str) -> list[dict]:
    """Plain-language verdicts on the evaluation: what would make a user distrust this reward model."""
    checks = []

    def add(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    acc = m["accuracy"]
    add("beats chance", acc >= 0.6, f"held-out accuracy {acc:.3f}" + ("" if acc >= 0.6 else
        " is close to chance (0.5): the reward barely separates chosen from rejected"))
    shorter, longer = m["accuracy_chosen_shorter"], m["accuracy_chosen_longer"]
    if shorter is not None and longer is not None and min(m["pairs_chosen_shorter"], m["pairs_chosen_longer"]) >= 10:
        gap = longer - shorter
        add("not length-driven", abs(gap) <= 0.2,
            f"accuracy {shorter:.3f} where chosen is shorter vs {longer:.3f} where it is longer"
            + ("" if abs(gap) <= 0.2 else f": the reward prefers {'longer' if gap > 0 else 'shorter'} replies "
                                          f"beyond what the labels say"))
    else:
        add("not length-driven", True, "too few pairs with a shorter and a longer chosen reply to compare")
    if m["ece"] is not None:
        detail = f"ECE {m['ece']:.3f}"
        for name, lo, hi in (("confidence >= 0.8", 0.8, 1.01), ("confidence < 0.65", 0.5, 0.65)):
            bins = [b for b in m["calibration_bins"] if b["n"] and lo - 1e-9 <= b["lo"] < hi - 1e-9]
            n = sum(b["n"] for b in bins)
            if n:
                won = sum(b["n"] * b["accuracy"] for b in bins) / n
                conf = sum(b["n"] * b["confidence"] for b in bins) / n
                detail += f"; at {name} ({n} pairs) the preferred reply wins {won:.2f} (mean confidence {conf:.2f})"
        add("calibrated", m["ece"] <= 0.1, detail + ("" if m["ece"] <= 0.1 else
            ": treat sigmoid(margin) as a ranking, not a probability"))
    clean = f"accuracy_clean_per_{category}" in m  # judge categories by the clean labels where known
    per = m.get(f"accuracy_clean_per_{category}" if clean else f"accuracy_per_{category}")
    if per is not None:  # without a category column there is nothing to say about categories
        weak = {g: v["accuracy"] for g, v in per.items() if v["n"] >= 10 and v["accuracy"] < 0.6}
        add(f"no weak {category}", not weak, ", ".join(f"{g} {a:.2f}" for g, a in weak.items())
            + " near chance: a policy optimised on this reward can drift there unchecked" if weak
            else f"every {category} with 10+ pairs is at 0.6 or better" + (" (clean labels)" if clean else ""))
    gap = m["train_accuracy"] - acc
    add("generalises", gap <= 0.15, f"training-pair accuracy {m['train_accuracy']:.3f} vs held-out {acc:.3f}"
        + ("" if gap <= 0.15 else ": overfitting; fewer epochs or more data"))
    dropped = m["train_pairs_too_long"] / max(m["train_pairs_too_long"] + m["train_pairs"], 1)
    add("data fits max_length", dropped <= 0.1, f"{m['train_pairs_too_long']} training pairs over max_length "
        f"were left out by the trainer ({dropped:.1%}); {m['eval_pairs_too_long']} held-out pairs over it were "
        f"left out of the evaluation")
    return checks


def write_report(path: Path, m: dict, category: str) -> None:
    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "# Reward model report", "",
        f"Trained on {m['train_pairs']} pairs from `{m['data']['train']['source']}`, evaluated on "
        f"{m['eval_pairs']} held-out pairs from `{m['data']['eval']['source']}`.", "",
        "| metric | value |", "|---|---|",
        f"| accuracy (held-out labels) | {f(m['accuracy'])} |",
    ]
    if "accuracy_clean" in m:
        lines.append(f"| accuracy against clean labels | {f(m['accuracy_clean'])} "
                     f"(labels clean on {f(m['clean_label_share'], '.1%')} of the {m['clean_labelled_pairs']} "
                     f"pairs with a clean label) |")
    lines += [
        f"| mean margin r(chosen) − r(rejected) | {f(m['mean_margin'])} |",
        f"| accuracy where chosen is shorter | {f(m['accuracy_chosen_shorter'])} ({m['pairs_chosen_shorter']} pairs) |",
        f"| accuracy where chosen is longer | {f(m['accuracy_chosen_longer'])} ({m['pairs_chosen_longer']} pairs) |",
        f"| always prefer the longer reply | {f(m['longer_reply_accuracy'])} |",
        f"| correlation reward ~ reply length | {f(m['length_correlation'])} |",
        f"| correlation margin ~ length difference | {f(m['margin_length_correlation'])} |",
        f"| ECE of sigmoid(margin) | {f(m['ece'])} |",
    ]
    if "ece_clean" in m:
        lines.append(f"| ECE against clean labels | {f(m['ece_clean'])} |")
    lines += [f"| accuracy on training pairs | {f(m['train_accuracy'])} |",
              f"| reward mean / std (training pairs, in config.json) | {f(m['reward_mean'])} / "
              f"{f(m['reward_std'])} |", ""]
    groups = m.get(f"accuracy_per_{category}")
    if groups:
        lines += [f"## Accuracy per {category}", "", f"| {category} | pairs | accuracy |"
                  + (" clean accuracy |" if "accuracy_clean_per_" + category in m else ""),
                  "|---|---|---|" + ("---|" if "accuracy_clean_per_" + category in m else "")]
        clean = m.get("accuracy_clean_per_" + category, {})
        for g, v in groups.items():
            lines.append(f"| {g} | {v['n']} | {f(v['accuracy'])} |"
                         + (f" {f(clean[g]['accuracy'])} |" if g in clean else ""))
        lines.append("")
    lines += ["## Can this reward model be trusted?", ""]
    lines += [f"- {'✅' if c['ok'] else '⚠️'} **{c['check']}**: {c['detail']}" for c in m["checks"]]
    lines += ["", f"![reliability diagram and margins]({FIGURE})", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, m: dict, margins, clean) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = m["calibration_bins"]
    centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"]
    ax1.bar(centers, [b["accuracy"] or 0 for b in bins], width=width * 0.9, color="tab:blue", alpha=0.75,
            label="accuracy in bin")
    ax1.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect calibration")
    ax1.plot([c for c, b in zip(centers, bins) if b["n"]], [b["confidence"] for b in bins if b["n"]], "o",
             color="tab:red", ms=4, label="mean confidence")
    for c, b in zip(centers, bins):
        if b["n"]:
            ax1.text(c, 0.02, str(b["n"]), ha="center", fontsize=7, color="white")
    ax1.set(xlim=(0.5, 1), ylim=(0, 1), xlabel="confidence max(p, 1-p), p = sigmoid(r_c − r_r)",
            ylabel="share where the preferred reply won", title=f"reliability diagram (ECE {m['ece']:.3f})")
    ax1.legend(loc="upper left", fontsize=8)
    margins = np.asarray(margins)
    edges = np.histogram_bin_edges(margins, bins=30)
    if clean is not None:  # pairs whose clean label is not known (None) in grey
        agrees, flipped = (np.asarray([c is value for c in clean]) for value in (True, False))
        ax2.hist([margins[agrees], margins[flipped], margins[~(agrees | flipped)]], bins=edges, stacked=True,
                 color=["tab:green", "tab:orange", "tab:gray"],
                 label=["label agrees with clean label", "label flipped by noise", "clean label not known"])
        ax2.legend(fontsize=8)
    else:
        ax2.hist(margins, bins=edges, color="tab:green")
    ax2.axvline(0, color="k", lw=1)
    ax2.set(xlabel="margin r(chosen) − r(rejected)", ylabel="held-out pairs",
            title=f"margins (accuracy {m['accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
