"""Rules that watch a policy being optimised and say when to worry: over-optimisation (the proxy reward keeps rising
while the gold score falls) and collapse (output diversity falls faster than accuracy rises). Plain functions on
numbers, no model code: the online stages (pipeline/ppo_trainer.py, pipeline/trl_online.py) run them on their
per-step history (`new_warnings` after each step, `online_warnings` over the whole run for metrics.json), the eval
stage (pipeline/eval_metrics.py) on pairs of checkpoints, and an iterated DPO can call `collapse_check` once per
round. Callers log what they return.

Scores are shares in [0, 1] (verifier accuracy, distinct-2), so "faster" compares changes in the same units.
"""

from __future__ import annotations

import numpy as np

GOLD_DROP = 0.05          # over-optimisation: the gold score this far below its best window (absolute accuracy)
COLLAPSE_TOLERANCE = 0.02  # collapse: diversity may fall this much more than accuracy rises (noise between windows)
PROXY, GOLD = "reward", "verifier"  # the history's keys: the proxy reward and the gold score (verifier accuracy)


def _mean(rows, key) -> float:
    return float(np.mean([r[key] for r in rows]))


def _overoptimisation(history, window, gold_drop) -> tuple[list[dict], np.ndarray]:
    """The rows of `history` that have both keys, and whether the rule holds at each (see `overoptimised`), in one
    pass of moving means (a run of thousands of steps checks its whole history at every step)."""
    rows = [r for r in history if r.get(PROXY) is not None and r.get(GOLD) is not None]
    flags = np.zeros(len(rows), dtype=bool)
    if window < 1 or len(rows) < 2 * window:
        return rows, flags
    kernel = np.ones(window) / window
    proxies = np.convolve([r[PROXY] for r in rows], kernel, mode="valid")  # [k]: mean of rows k .. k + window - 1
    golds = np.convolve([r[GOLD] for r in rows], kernel, mode="valid")
    best = np.maximum.accumulate(golds)
    t = np.arange(2 * window - 1, len(rows))  # B: rows t - window + 1 .. t; A: the window before
    b, a = t - window + 1, t - 2 * window + 1
    flags[t] = (proxies[b] > proxies[a]) & (golds[b] < golds[a]) & (golds[b] <= best[b] - gold_drop)
    return rows, flags


def overoptimised(history: list[dict], window: int, gold_drop: float = GOLD_DROP) -> bool:
    """Whether the proxy reward (PROXY) keeps rising while the gold score (GOLD) falls, at the last row of `history`
    (the rows that have both keys, in order; t of them).

    With B the last `window` rows and A the `window` rows before them (so t >= 2 x window), it holds when
    mean_B(proxy) > mean_A(proxy), mean_B(gold) < mean_A(gold), and mean_B(gold) is at least `gold_drop` below the
    best gold so far: the largest mean of any `window` consecutive rows up to now."""
    rows, flags = _overoptimisation(history, window, gold_drop)
    return bool(flags[-1]) if rows else False


def collapse_check(before: tuple[float, float], after: tuple[float, float],
                   tolerance: float = COLLAPSE_TOLERANCE) -> dict:
    """(accuracy, diversity) before and after a round of optimisation (two checkpoints, two training windows, two
    rounds of iterated DPO). Collapsing: diversity fell by more than accuracy rose (a fall in accuracy counts as no
    rise), beyond `tolerance`: diversity_before - diversity_after > max(accuracy_after - accuracy_before, 0) +
    tolerance. Returns the two changes and the verdict."""
    accuracy_change, diversity_change = after[0] - before[0], after[1] - before[1]
    return {"accuracy_change": accuracy_change, "diversity_change": diversity_change,
            "collapsing": bool(-diversity_change > max(accuracy_change, 0.0) + tolerance)}


def _onset(rows, flags, i: int, window: int) -> dict | None:
    """The over-optimisation warning when the rule starts to hold at row i (it did not at row i - 1)."""
    if not flags[i] or (i > 0 and flags[i - 1]):
        return None
    recent = rows[i - window + 1:i + 1]
    return {"step": rows[i]["step"], "rule": "overoptimisation",
            "message": f"over-optimisation: over the last {window} rows the proxy reward rose to "
                       f"{_mean(recent, PROXY):.3g} while the gold score (verifier accuracy) fell to "
                       f"{_mean(recent, GOLD):.3f}, below its best so far"}


def _collapse_at(history, t: int, window: int, diversity: str) -> dict | None:
    """The collapse warning for the `window` rows ending at row t against the `window` rows before them."""
    a, b = history[t - 2 * window:t - window], history[t - window:t]
    if not all(r.get(GOLD) is not None and r.get(diversity) is not None for r in a + b):
        return None
    check = collapse_check((_mean(a, GOLD), _mean(a, diversity)), (_mean(b, GOLD), _mean(b, diversity)))
    if not check["collapsing"]:
        return None
    return {"step": history[t - 1]["step"], "rule": "collapse",
            "message": f"collapse: {diversity} of the replies changed by {check['diversity_change']:+.3f} over the "
                       f"last {window} rows, verifier accuracy by {check['accuracy_change']:+.3f}"}


def online_warnings(history: list[dict], window: int, diversity: str = "distinct_2") -> list[dict]:
    """Every warning the rules give over an online run's history (one row per step; GRPO/RLOO: per logged step),
    as {"step", "rule", "message"}, in order. Over-optimisation is reported at the row where it starts to hold (not
    again while it keeps holding); collapse compares the `window` rows just completed with the `window` rows before
    them, at every multiple of `window` rows, where the rows have a gold score (`verifier`)."""
    rows, flags = _overoptimisation(history, window, GOLD_DROP)
    out = [w for i in range(len(rows)) if (w := _onset(rows, flags, i, window))]
    ends = range(2 * window, len(history) + 1, window)
    out += [w for t in ends if (w := _collapse_at(history, t, window, diversity))]
    return sorted(out, key=lambda w: w["step"])


def new_warnings(history: list[dict], window: int, diversity: str = "distinct_2") -> list[dict]:
    """The warnings of `online_warnings` at the last row of `history` only: what a training loop logs after a step,
    without going over the whole history again."""
    rows, flags = _overoptimisation(history, window, GOLD_DROP)
    out = []
    if rows and rows[-1] is history[-1] and (w := _onset(rows, flags, len(rows) - 1, window)):
        out.append(w)
    t = len(history)
    if t >= 2 * window and t % window == 0 and (w := _collapse_at(history, t, window, diversity)):
        out.append(w)
    return out
