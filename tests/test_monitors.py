"""pipeline/monitors.py's rules on hand-made histories: over-optimisation (proxy up, gold down) and collapse
(diversity falling faster than accuracy rises)."""

import pytest

from pipeline import monitors


def history(proxy, gold, diversity=None):
    return [{"step": i + 1, "reward": p, "verifier": g, **({} if diversity is None else {"distinct_2": diversity[i]})}
            for i, (p, g) in enumerate(zip(proxy, gold))]


RISING = [0.1 * i for i in range(12)]


def test_overoptimised_when_the_proxy_rises_and_the_gold_falls_below_its_best():
    gold = [0.5, 0.6, 0.7, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # peaks, then falls
    rows = history(RISING, gold)
    fired = [t for t in range(1, 13) if monitors.overoptimised(rows[:t], window=3)]
    # at t rows: B = the last 3 rows, A = the 3 before. Best mean of 3 consecutive golds: rows 3-5 or 4-6, 0.767.
    # t=7: B = rows 5-7 (.8 .7 .6) = .7, A = rows 2-4 (.6 .7 .8) = .7: gold did not fall.
    # t=8: B = rows 6-8 (.7 .6 .5) = .6 < A = rows 3-5 = .767, and .6 <= .767 - .05; the proxy rose: fires.
    assert fired == [8, 9, 10, 11, 12]


@pytest.mark.parametrize("proxy, gold, why", [
    (RISING, [0.1 * i for i in range(12)], "gold rises with the proxy"),
    (RISING[::-1], [0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], "the proxy falls too"),
    (RISING, [0.80, 0.80, 0.80, 0.80, 0.80, 0.80, 0.79, 0.79, 0.78, 0.78, 0.77, 0.77], "gold within gold_drop of best"),
])
def test_not_overoptimised(proxy, gold, why):
    rows = history(proxy, gold)
    assert not any(monitors.overoptimised(rows[:t], window=3) for t in range(1, 13)), why


def test_overoptimisation_needs_two_windows_of_rows_with_a_gold_score():
    falling = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert not monitors.overoptimised(history(RISING[:5], falling), window=3)  # 5 rows < 2 x 3
    assert monitors.overoptimised(history(RISING[:6], [0.9, 0.9, 0.9, 0.5, 0.4, 0.3]), window=3)
    no_gold = [{"step": i + 1, "reward": p} for i, p in enumerate(RISING)]  # prompts without answers
    assert not monitors.overoptimised(no_gold, window=3)


@pytest.mark.parametrize("before, after, collapsing", [
    ((0.50, 0.60), (0.55, 0.50), True),    # diversity -0.10, accuracy +0.05
    ((0.50, 0.60), (0.55, 0.54), False),   # -0.06 vs +0.05: within the tolerance 0.02
    ((0.50, 0.60), (0.40, 0.57), True),    # accuracy fell: any fall of diversity beyond the tolerance
    ((0.50, 0.60), (0.40, 0.59), False),
    ((0.50, 0.60), (0.90, 0.30), False),   # -0.30 vs +0.40: accuracy rose faster
    ((0.50, 0.60), (0.50, 0.80), False),   # more diverse
])
def test_collapse_check(before, after, collapsing):
    check = monitors.collapse_check(before, after)
    assert check["collapsing"] is collapsing
    assert check["accuracy_change"] == pytest.approx(after[0] - before[0])
    assert check["diversity_change"] == pytest.approx(after[1] - before[1])


def test_online_warnings_report_each_rule_once_where_it_starts():
    gold = [0.5, 0.6, 0.7, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    diversity = [0.8] * 6 + [0.5] * 6  # falls by 0.3 between the windows of rows 4-6 and 7-9
    warnings = monitors.online_warnings(history(RISING, gold, diversity), window=3)
    assert [(w["rule"], w["step"]) for w in warnings] == [("overoptimisation", 8), ("collapse", 9)]
    assert "over-optimisation" in warnings[0]["message"] and "distinct_2" in warnings[1]["message"]
    assert monitors.online_warnings(history(RISING, [0.1 * i for i in range(12)], [0.8] * 12), window=3) == []


def test_new_warnings_are_those_of_the_whole_history_at_its_last_row():
    gold = [0.5, 0.6, 0.7, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    rows = history(RISING, gold, [0.8] * 6 + [0.5] * 6)
    for t in range(1, 13):
        expected = [w for w in monitors.online_warnings(rows[:t], window=3) if w["step"] == t]
        assert monitors.new_warnings(rows[:t], window=3) == expected, t
    assert sum(len(monitors.new_warnings(rows[:t], window=3)) for t in range(1, 13)) == 2
