"""Rules that watch a policy being optimised and say when to worry: over-optimisation (the proxy reward keeps rising
while the gold score falls) and collapse (output diversity falls faster than accuracy rises). Plain functions on
numbers, no model code: the online stages (pipeline/ppo_trainer.py, pipeline/trl_online.py) run them on their
per-step history, the eval stage (pipeline/evaluate.py) on pairs of checkpoints, and an iterated DPO can call
`collapse_check` once per round. Callers log what they return.

Scores are shares in [0, 1] (verifier accuracy, distinct-2), so "faster" compares changes in the same units.
"""

from __future__ import annotations

import numpy as np

GOLD_DROP = 0.05          # over-optimisation: the gold score this far below its best window (absolute accuracy)
COLLAPSE_TOLERANCE = 0.02  # collapse: diversity may fall this much more than accuracy rises (noise between windows)


def _mean(rows, key) -> float:
    return float(np.mean([r[key] for r in rows]))


def overoptimised(history: list[dict], window: int, proxy: str = "reward", gold: str = "verifier",
                  gold_drop: float = GOLD_DROP) -> bool:
    """Whether the proxy reward keeps rising while the gold score falls, at the last row of `history` (the rows that
    have both keys, in order; t of them).

    With B the last `window` rows and A the `window` rows before them (so t >= 2 x window), it fires when
    mean_B(proxy) > mean_A(proxy), mean_B(gold) < mean_A(gold), and mean_B(gold) is at least `gold_drop` below the
    best gold so far: the largest mean of any `window` consecutive rows up to now."""
    rows = [r for r in history if r.get(proxy) is not None and r.get(gold) is not None]
    if window < 1 or len(rows) < 2 * window:
        return False
    a, b = rows[-2 * window:-window], rows[-window:]
    golds = np.array([r[gold] for r in rows], dtype=float)
    moving = np.convolve(golds, np.ones(window) / window, mode="valid")  # mean of every `window` consecutive rows
    return bool(_mean(b, proxy) > _mean(a, proxy) and _mean(b, gold) < _mean(a, gold)
                and _mean(b, gold) <= moving.max() - gold_drop)


def collapse_check(before: tuple[float, float], after: tuple[float, float],
                   tolerance: float = COLLAPSE_TOLERANCE) -> dict:
    """(accuracy, diversity) before and after a round of optimisation (two checkpoints, two training windows, two
    rounds of iterated DPO). Collapsing: diversity fell by more than accuracy rose (a fall in accuracy counts as no
    rise), beyond `tolerance`: diversity_before - diversity_after > max(accuracy_after - accuracy_before, 0) +
    tolerance. Returns the two changes and the verdict."""
    accuracy_change, diversity_change = after[0] - before[0], after[1] - before[1]
    return {"accuracy_change": accuracy_change, "diversity_change": diversity_change,
            "collapsing": bool(-diversity_change > max(accuracy_change, 0.0) + tolerance)}


def online_warnings(history: list[dict], window: int, diversity: str = "distinct_2") -> list[dict]:
    """Every warning the rules give over an online run's history (one row per step; GRPO/RLOO: per logged step),
    as {"step", "rule", "message"}, in order. Over-optimisation is reported at the row where it starts to hold (not
    again while it keeps holding); collapse compares the `window` rows just completed with the `window` rows before
    them, at every multiple of `window` rows, where the rows have a gold score (`verifier`). Run at every step, the
    warnings whose step is the current one are new."""
    out = []
    was = False
    for t in range(1, len(history) + 1):
        now = overoptimised(history[:t], window)
        if now and not was:
            rows = [r for r in history[:t] if r.get("reward") is not None and r.get("verifier") is not None][-window:]
            out.append({"step": history[t - 1]["step"], "rule": "overoptimisation",
                        "message": f"over-optimisation: over the last {window} rows the proxy reward rose to "
                                   f"{_mean(rows, 'reward'):.3g} while the gold score (verifier accuracy) fell to "
                                   f"{_mean(rows, 'verifier'):.3f}, below its best so far"})
        was = now
        if t % window == 0 and t >= 2 * window:
            a, b = history[t - 2 * window:t - window], history[t - window:t]
            if all(r.get("verifier") is not None and r.get(diversity) is not None for r in a + b):
                check = collapse_check((_mean(a, "verifier"), _mean(a, diversity)),
                                       (_mean(b, "verifier"), _mean(b, diversity)))
                if check["collapsing"]:
                    out.append({"step": history[t - 1]["step"], "rule": "collapse",
                                "message": f"collapse: {diversity} of the replies changed by "
                                           f"{check['diversity_change']:+.3f} over the last {window} rows, verifier "
                                           f"accuracy by {check['accuracy_change']:+.3f}"})
    return out
