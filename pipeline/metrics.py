"""Metric functions shared by the stages' evaluations (plain numpy, no model code, tested on hand-made numbers).

Preference metrics take the rewards of the chosen and rejected replies of the same pairs (`r_chosen[i]`,
`r_rejected[i]`): a reward model's scores, or a DPO policy's implicit rewards. Conventions: a tie (equal rewards)
counts as half right, so a constant reward scores 0.5; a statistic that is undefined (no pairs, constant input)
is None, so metrics.json never holds NaN.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from pipeline.world import normalize_answer  # the world's verifier and exact match compare alike


def _arrays(*xs):
    arrays = [np.asarray(x, dtype=float) for x in xs]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"arrays of different shapes: {[a.shape for a in arrays]}")
    return arrays


def _wins(r_chosen, r_rejected) -> np.ndarray:
    """1 where chosen scores higher, 0.5 on a tie, 0 where rejected scores higher."""
    c, r = _arrays(r_chosen, r_rejected)
    return (c > r) + 0.5 * (c == r)


def pairwise_accuracy(r_chosen, r_rejected) -> float | None:
    """Share of pairs where the chosen reply gets the higher reward (ties count half)."""
    wins = _wins(r_chosen, r_rejected)
    return float(wins.mean()) if wins.size else None


def mean_margin(r_chosen, r_rejected) -> float | None:
    c, r = _arrays(r_chosen, r_rejected)
    return float((c - r).mean()) if c.size else None


def accuracy_where(r_chosen, r_rejected, mask) -> tuple[float | None, int]:
    """Pairwise accuracy on the pairs where `mask` is true, and how many pairs that is."""
    mask = np.asarray(mask, dtype=bool)
    wins = _wins(r_chosen, r_rejected)[mask]
    return (float(wins.mean()) if wins.size else None), int(mask.sum())


def group_accuracy(r_chosen, r_rejected, groups) -> dict[str, dict]:
    """{group: {"accuracy", "n"}} for each value of `groups` (e.g. the world's skill of each pair), sorted."""
    wins = _wins(r_chosen, r_rejected)
    groups = np.asarray([str(g) for g in groups])
    return {g: {"accuracy": float(wins[groups == g].mean()), "n": int((groups == g).sum())}
            for g in sorted(set(groups.tolist()))}


def label_agreement(r_chosen, r_rejected, agrees) -> float | None:
    """Accuracy against other labels of the same pairs: `agrees[i]` true when those labels also prefer chosen
    (the world's `clean_agrees`: the noise-free annotator), false when they prefer rejected."""
    c, r = _arrays(r_chosen, r_rejected)
    sign = np.where(np.asarray(agrees, dtype=bool), 1.0, -1.0)
    return pairwise_accuracy(sign * c, sign * r)


def pearson(x, y) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than two points."""
    x, y = _arrays(x, y)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def sigmoid(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def calibration(margins, labels=None, n_bins: int = 10) -> tuple[float | None, list[dict]]:
    """Expected calibration error of P(chosen preferred) = sigmoid(r_chosen - r_rejected), and the bins of its
    reliability diagram.

    Top-label form: the model predicts the reply with the higher reward, with confidence max(p, 1 - p) in
    [0.5, 1]; it is right when that reply is the one `labels` prefer (`labels[i]` true: chosen, the default; false:
    rejected, e.g. clean labels that disagree). A tie (p = 0.5) is half right. Bins split [0.5, 1] evenly;
    ECE = sum over bins of (pairs in bin / pairs) * |accuracy - mean confidence|.
    """
    m = np.asarray(margins, dtype=float)
    y = np.ones_like(m, dtype=bool) if labels is None else np.asarray(labels, dtype=bool)
    if m.shape != y.shape:
        raise ValueError(f"margins and labels differ in shape: {m.shape} vs {y.shape}")
    if not m.size:
        return None, []
    p = sigmoid(m)
    conf = np.maximum(p, 1 - p)
    correct = np.where(m == 0, 0.5, ((m > 0) == y).astype(float))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "confidence": None, "accuracy": None}
        if n:
            row["confidence"], row["accuracy"] = float(conf[sel].mean()), float(correct[sel].mean())
            ece += n / m.size * abs(row["accuracy"] - row["confidence"])
        bins.append(row)
    return float(ece), bins


def preference_metrics(r_chosen, r_rejected, len_chosen, len_rejected, groups=None, clean=None,
                       n_bins: int = 10) -> dict:
    """Everything a preference evaluation reports, from the rewards and reply lengths of held-out pairs.

    accuracy, mean_margin; accuracy_per_group (with `groups`); accuracy_clean, ece_clean, clean_label_share and
    clean_labelled_pairs (with `clean`, see `label_agreement`; over the pairs whose clean label is not None), and
    accuracy_clean_per_group with both;
    length_correlation (reward vs reply length over all replies), margin_length_correlation
    (r_c - r_r vs len_c - len_r), accuracy_chosen_shorter / _longer (a reward that counts tokens fails the first);
    ece with its reliability bins; and, for scale, the accuracy of always preferring the longer reply.
    """
    c, r, lc, lr = _arrays(r_chosen, r_rejected, len_chosen, len_rejected)
    ece, bins = calibration(c - r, n_bins=n_bins)
    shorter, n_shorter = accuracy_where(c, r, lc < lr)
    longer, n_longer = accuracy_where(c, r, lc > lr)
    out = {
        "pairs": int(c.size),
        "accuracy": pairwise_accuracy(c, r),
        "mean_margin": mean_margin(c, r),
        "accuracy_chosen_shorter": shorter, "pairs_chosen_shorter": n_shorter,
        "accuracy_chosen_longer": longer, "pairs_chosen_longer": n_longer,
        "length_correlation": pearson(np.concatenate([c, r]), np.concatenate([lc, lr])),
        "margin_length_correlation": pearson(c - r, lc - lr),
        "longer_reply_accuracy": pairwise_accuracy(lc, lr),
        "ece": ece,
    }
    if groups is not None:
        out["accuracy_per_group"] = group_accuracy(c, r, groups)
    if clean is not None:  # None in it: a pair whose clean label is not known (a dataset without the column)
        known = np.asarray([x is not None for x in clean], dtype=bool)
        agrees = np.asarray([bool(x) for x in clean], dtype=bool)[known]
        out["accuracy_clean"] = label_agreement(c[known], r[known], agrees)
        out["ece_clean"] = calibration((c - r)[known], agrees, n_bins=n_bins)[0]
        out["clean_label_share"] = float(agrees.mean()) if agrees.size else None
        out["clean_labelled_pairs"] = int(known.sum())
        if groups is not None:  # the clean labels' signs turn "chosen wins" into "the clean label's choice wins"
            sign = np.where(agrees, 1.0, -1.0)
            out["accuracy_clean_per_group"] = group_accuracy(
                sign * c[known], sign * r[known], np.asarray([str(g) for g in groups])[known])
    out["calibration_bins"] = bins
    return out


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


# ---------------------------------------------------------------------------------------------- checkpoint evaluation
# Used by pipeline/evaluate.py. Per-prompt values go in, summaries with bootstrap intervals come out; a pairwise
# outcome is +1 (a wins), 0 (tie) or -1 (b wins), and a win rate counts a tie as half a win.


def bootstrap_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, `n_boot` times, seeded).

    None when there are no values."""
    v = np.asarray(values, dtype=float)
    if not v.size:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """{"mean", "ci": [lo, hi] (95% bootstrap), "n"}; None when there are no values."""
    v = np.asarray(values, dtype=float)
    if not v.size:
        return None
    return {"mean": float(v.mean()), "ci": list(bootstrap_ci(v, n_boot=n_boot, seed=seed)), "n": int(v.size)}


def pairwise_outcomes(scores_a, scores_b) -> np.ndarray:
    """+1 where a scores higher, 0 on a tie, -1 where b scores higher (booleans count as 0/1)."""
    a, b = _arrays(scores_a, scores_b)
    return np.sign(a - b).astype(int)


def win_rate(outcomes) -> float | None:
    """Share of comparisons won by a, a tie counting half: (wins + ties / 2) / n. None without comparisons."""
    o = np.asarray(outcomes, dtype=float)
    return float(((o > 0) + 0.5 * (o == 0)).mean()) if o.size else None


def win_rate_summary(outcomes, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """{"win_rate", "ci" (95% bootstrap over prompts), "wins", "ties", "losses", "n"}; None without comparisons."""
    o = np.asarray(outcomes, dtype=float)
    if not o.size:
        return None
    points = (o > 0) + 0.5 * (o == 0)
    return {"win_rate": win_rate(o), "ci": list(bootstrap_ci(points, n_boot=n_boot, seed=seed)),
            "wins": int((o > 0).sum()), "ties": int((o == 0).sum()), "losses": int((o < 0).sum()), "n": int(o.size)}


def sequence_log_ratios(policy_logprobs, reference_logprobs) -> np.ndarray:
    """log pi(y|x) - log ref(y|x) of each sequence: the sums of its tokens' log-probs under the two models.

    Each argument holds one list of token log-probs per sequence (the two may tokenize a sequence differently)."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError(f"{len(policy_logprobs)} policy sequences but {len(reference_logprobs)} reference ones")
    return np.array([float(np.sum(p)) - float(np.sum(q)) for p, q in zip(policy_logprobs, reference_logprobs)])


def sequence_kl(policy_logprobs, reference_logprobs) -> float | None:
    """Monte-Carlo estimate of KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)], from sequences sampled from
    the policy itself (at temperature 1, no top-p/top-k). Per sequence it can be negative, its mean converges to
    the (non-negative) KL. None without sequences."""
    ratios = sequence_log_ratios(policy_logprobs, reference_logprobs)
    return float(ratios.mean()) if ratios.size else None


def distinct_n(texts, n: int) -> float | None:
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams over every text (whitespace words, lowercased).
    None when the texts hold no n-gram."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = []
    for text in texts:
        words = str(text).lower().split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def exact_match(prediction, reference) -> bool:
    """Whether a prediction equals a reference answer after `normalize_answer` (None never matches)."""
    return prediction is not None and normalize_answer(prediction) == normalize_answer(reference)


def perplexity(token_logprobs) -> float | None:
    """exp(mean negative log-likelihood) over all tokens of all sequences; None without tokens."""
    flat = np.concatenate([np.asarray(t, dtype=float) for t in token_logprobs]) if len(token_logprobs) else []
    if not len(flat):
        return None
    return float(math.exp(min(-float(np.mean(flat)), 700.0)))


# ---------------------------------------------------------------------------------------------- best-of-n, diversity


def best_of_n_expected(rewards, values, n: int) -> float | None:
    """The expected value of `values` at the reply with the highest reward among n of one prompt's N replies, over
    every n-subset drawn without replacement (all C(N, n) equally likely), a tie for the highest reward broken
    uniformly at random. Exact, no resampling (the order-statistics estimator).

    With the replies grouped by equal reward, the subset's best lies in the group at reward r with probability
    [C(at or below r, n) - C(below r, n)] / C(N, n); given that, each reply of the group is equally likely to be the
    pick (exchangeability), so the group contributes its mean value. None when n > N or a value is None (a prompt
    without a verifier)."""
    r = np.asarray(rewards, dtype=float)
    if len(values) != r.size:
        raise ValueError(f"{r.size} rewards but {len(values)} values")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > r.size or any(v is None for v in values):
        return None
    v = np.asarray(values, dtype=float)
    total, expected, below = math.comb(r.size, n), 0.0, 0
    for level in np.unique(r):  # ascending
        group = r == level
        at_or_below = below + int(group.sum())
        expected += (math.comb(at_or_below, n) - math.comb(below, n)) / total * float(v[group].mean())
        below = at_or_below
    return expected


def best_of_n_curve(rewards, values, ns, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """[{"n", "mean", "ci", "prompts"}] per n of `ns`: the mean over prompts of best_of_n_expected (rewards[i] and
    values[i]: one prompt's replies) with a bootstrap 95% interval over prompts. Prompts whose values are None are
    left out; an n larger than every prompt's number of replies is left out."""
    curve = []
    for n in ns:
        per_prompt = [e for r, v in zip(rewards, values) if (e := best_of_n_expected(r, v, n)) is not None]
        if per_prompt:
            s = mean_ci(per_prompt, n_boot=n_boot, seed=seed)
            curve.append({"n": int(n), "mean": s["mean"], "ci": s["ci"], "prompts": s["n"]})
    return curve


def _ngram_counts(words, n) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(hypothesis: str, references, max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al., 2002) of one text against references: whitespace words, lowercased; clipped
    n-gram precisions for n = 1..max_n (n > 1 smoothed by adding one to matches and counts, Lin & Och 2004, so
    short replies without a shared 4-gram still score), their geometric mean, times the brevity penalty against the
    reference length closest to the hypothesis'. 0 when no word is shared or the hypothesis is empty."""
    hyp = str(hypothesis).lower().split()
    refs = [str(t).lower().split() for t in references]
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = _ngram_counts(hyp, n)
        ref_counts = [_ngram_counts(ref, n) for ref in refs]
        matches = sum(min(c, max(rc[g] for rc in ref_counts)) for g, c in counts.items())
        if n == 1 and matches == 0:
            return 0.0
        smooth = 1 if n > 1 else 0
        log_p += math.log((matches + smooth) / (sum(counts.values()) + smooth)) / max_n
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    brevity = 1.0 if len(hyp) >= closest else math.exp(1 - closest / len(hyp))
    return brevity * math.exp(log_p)


def self_bleu(texts, max_n: int = 4) -> float | None:
    """Self-BLEU (Zhu et al., 2018): the mean BLEU of each text against all the others. 1 when every text is the
    same, near 0 when they share no words: a spread measure of replies that needs no embedding model. None with
    fewer than two texts."""
    texts = list(texts)
    if len(texts) < 2:
        return None
    return float(np.mean([bleu(t, texts[:i] + texts[i + 1:], max_n) for i, t in enumerate(texts)]))


def diversity(texts_per_prompt) -> dict:
    """Diversity among the sampled replies of each prompt, averaged over prompts: distinct-1, distinct-2 and
    self-BLEU (a key is absent where no prompt has a value)."""
    out = {}
    for n in (1, 2):
        values = [v for texts in texts_per_prompt if (v := distinct_n(texts, n)) is not None]
        if values:
            out[f"distinct_{n}"] = float(np.mean(values))
    values = [v for texts in texts_per_prompt if (v := self_bleu(texts)) is not None]
    if values:
        out["self_bleu"] = float(np.mean(values))
    return out
