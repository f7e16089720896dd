"""How well a scorer ranks and how honest its probabilities are. Pure numpy; no I/O."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from workers.config import TIER_NAMES

ECE_BINS = 10
# What a scorer's 0-100 means: a trained model's is a calibrated probability; the rules' (blended
# with the LLM's propensity live) a points scale, which Brier and ECE were not made to judge.
PROBABILITY, POINTS = "probability", "points"


def calibration_bins(
    y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width probability bin (each holding its lower edge, the last also 1.0, so a
    score of 50 sits with 50-59): its share of leads, mean predicted probability and observed rate.
    ECE and the calibration plot both bin here, so they judge the same leads together."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    index = np.minimum((p * bins).astype(int), bins - 1)
    leads = np.bincount(index, minlength=bins)
    filled = leads > 0
    predicted = np.bincount(index, weights=p, minlength=bins)[filled] / leads[filled]
    observed = np.bincount(index, weights=y, minlength=bins)[filled] / leads[filled]
    return leads[filled] / len(p), predicted, observed


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |predicted - observed| over equal-width probability bins, weighted by bin size."""
    share, predicted, observed = calibration_bins(y, p, bins)
    return float(np.sum(share * np.abs(predicted - observed)))


def classification_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "roc_auc": round(float(roc_auc_score(y, p)), 4),
        "pr_auc": round(float(average_precision_score(y, p)), 4),
        "brier": round(float(brier_score_loss(y, p)), 4),
        "ece": round(expected_calibration_error(y, p), 4),
    }


def tier_table(y: np.ndarray, tiers: list[str], order: tuple[str, ...] = TIER_NAMES) -> list[dict]:
    """Share of leads, conversion rate and lift over the overall rate, per tier; the conversions and
    the rate's 95% Wilson interval say how far a small tier's rate can be trusted."""
    y = np.asarray(y, dtype=float)
    tiers_arr = np.asarray(tiers)
    base = float(y.mean()) if len(y) else 0.0
    rows = []
    for tier in order:
        inside = tiers_arr == tier
        n = int(inside.sum())
        converted = int(y[inside].sum())
        rate = converted / n if n else float("nan")
        rows.append({
            "tier": tier,
            "leads": n,
            "share": round(n / len(y), 4) if len(y) else 0.0,
            "conversion_rate": round(rate, 4) if n else None,
            "lift": round(rate / base, 2) if n and base else None,
            "converted": converted,
            "ci95": [round(bound, 4) for bound in wilson_interval(converted, n)] if n else None,
        })  # fmt: skip
    return rows


def cumulative_gains(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of all conversions captured when calling the top x% of leads by score. One point per
    distinct score, after all the leads tied on it (as sklearn's roc_curve treats ties): a score
    cannot order the leads it ties, so the curve runs straight across them whatever the row order."""
    scores = np.asarray(p)
    order = np.argsort(-scores, kind="stable")
    captured = np.cumsum(np.asarray(y)[order]) / max(1, int(np.sum(y)))
    called = np.arange(1, len(order) + 1) / len(order)
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores[order])), len(order) - 1]
    return np.r_[0.0, called[last_of_each_score]], np.r_[0.0, captured[last_of_each_score]]


GAINS_SHARES = (0.1, 0.2, 0.3)  # shares of leads called, best scores first, that the report tabulates


def conversions_reached(
    y: np.ndarray, p: np.ndarray, shares: tuple[float, ...] = GAINS_SHARES
) -> list[float]:
    """Share of all conversions reached by calling each share of leads, best scores first: read off
    the gains curve as plotted, so a share that falls among leads tied on a score gets the straight
    line's value across them (what calling them in any order gives on average)."""
    called, captured = cumulative_gains(y, p)
    return [round(float(np.interp(share, called, captured)), 4) for share in shares]


def said_of_tier_a(tiers: list[dict], base_rate: float) -> str:
    """Tier A's share, conversion and lift (of `tier_table`'s rows) in words, as the terminal and the
    report both say it."""
    a = tiers[0]
    if not a["leads"]:
        return "tier A empty (no lead reaches its cut-off)"
    return (f"tier A {a['share']:.0%} of leads converting at {a['conversion_rate']:.0%} "
            f"({a['lift']:.2f}× the {base_rate:.0%} base rate)")  # fmt: skip


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval for a proportion: sound for small n and for rates of 0 or 1."""
    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


def rate_difference(converted_a: int, leads_a: int, converted_b: int, leads_b: int) -> dict | None:
    """Conversion rate of group a minus group b, in percentage points, with Newcombe's 95% interval
    (hybrid score, from the two Wilson intervals); None while either group is empty."""
    if not leads_a or not leads_b:
        return None
    p_a, p_b = converted_a / leads_a, converted_b / leads_b
    low_a, high_a = wilson_interval(converted_a, leads_a)
    low_b, high_b = wilson_interval(converted_b, leads_b)
    difference = p_a - p_b
    low = difference - math.sqrt((p_a - low_a) ** 2 + (high_b - p_b) ** 2)
    high = difference + math.sqrt((high_a - p_a) ** 2 + (p_b - low_b) ** 2)
    return {"points": round(100 * difference, 1), "ci95": [round(100 * low, 1), round(100 * high, 1)]}


BOOTSTRAP_RESAMPLES = 500
_DRAWN_CELLS = 20_000_000  # resamples x kinds of lead held at once: 160 MB


def _auc_of_counts(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """ROC AUC from how many converted and unconverted leads hold each score, scores ascending along
    the last axis; a tie counts a half, as in roc_auc_score."""
    below = np.cumsum(negatives, axis=-1) - negatives
    pairs = positives.sum(-1) * negatives.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positives * (below + negatives / 2)).sum(-1) / pairs


def paired_auc_difference(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict:
    """ROC AUC of scorer a minus scorer b on the same leads, with a 95% interval from a paired
    bootstrap: resampling leads, each with both its scores, so what the two share (which leads are
    easy) cancels and a small difference on many leads can be told from noise. Stratified: each
    resample draws as many converted and unconverted leads as there are, so none lacks an outcome.
    Leads alike in outcome and both scores are one kind, and a resample draws how many of each kind
    (a multinomial), which is resampling the leads: the cost grows with the kinds (at most 2 x 101 x
    101 for two 0-100 scores), not with the leads."""
    y = np.asarray(y).astype(int)
    _, code_a = np.unique(np.asarray(p_a, dtype=float), return_inverse=True)
    _, code_b = np.unique(np.asarray(p_b, dtype=float), return_inverse=True)
    k_a, k_b = int(code_a.max()) + 1, int(code_b.max()) + 1
    kinds, leads = np.unique((y * k_a + code_a) * k_b + code_b, return_counts=True)
    converted = kinds // (k_a * k_b) == 1
    holds_a = (kinds // k_b % k_a)[:, None] == np.arange(k_a)  # kind x score of a
    holds_b = (kinds % k_b)[:, None] == np.arange(k_b)

    def differences(counts: np.ndarray) -> np.ndarray:
        """AUC of a minus b for each row of counts of each kind."""
        pos, neg = counts * converted, counts * ~converted
        return _auc_of_counts(pos @ holds_a, neg @ holds_a) - _auc_of_counts(pos @ holds_b, neg @ holds_b)

    rng = np.random.default_rng(seed)
    chunk = max(1, _DRAWN_CELLS // len(kinds))
    drawn = []
    for done in range(0, resamples, chunk):
        size = min(chunk, resamples - done)
        counts = np.zeros((size, len(kinds)))
        for outcome in (converted, ~converted):
            of_outcome = leads[outcome]
            counts[:, outcome] = rng.multinomial(of_outcome.sum(), of_outcome / of_outcome.sum(), size=size)
        drawn.append(differences(counts))
    low, high = np.percentile(np.concatenate(drawn), [2.5, 97.5])
    [difference] = differences(leads[None, :].astype(float))
    return {"roc_auc": round(float(difference), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}
