"""Binary classification metrics in plain numpy (no scikit-learn at run time).

Convention everywhere: label 1 = PNEUMONIA (positive), a case is predicted positive when
``probability >= threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from app.core.decision import is_pneumonia

ECE_BINS = 15


def _as_arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    bad = int(np.count_nonzero(~np.isfinite(s)))
    if bad:  # NaN sorts anywhere: an AUC of such scores is a number that means nothing (it read 1.0)
        raise ValueError(f"{bad} of {s.size} scores are NaN or infinite")
    return y, s


def _distinct_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (tp, fp) counts at each distinct score, scores descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s_sorted[last]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    y, s = _as_arrays(labels, scores)
    tps, fps, thresholds = _distinct_thresholds(y, s)
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    n_pos, n_neg = tps[-1], fps[-1]
    tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    return fpr, tpr, np.r_[np.inf, thresholds]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half); NaN with one class."""
    y, s = _as_arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(y.size, dtype=np.float64)
    s_sorted = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], y.size]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct score, recall ascending, ending at (1, 0)."""
    y, s = _as_arrays(labels, scores)
    tps, fps, thresholds = _distinct_thresholds(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] else np.full_like(tps, np.nan)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR AUC as the step-wise sum over recall increments of precision (no interpolation)."""
    precision, recall, _ = pr_curve(labels, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    y, p = _as_arrays(labels, probabilities)
    return float(np.mean((p - y) ** 2))


def reliability_bins(
    labels: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of P(pneumonia): (mean probability, observed positive rate, count)."""
    y, p = _as_arrays(labels, probabilities)
    index = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / counts
        observed = np.bincount(index, weights=y.astype(np.float64), minlength=n_bins) / counts
    return confidence, observed, counts


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Count-weighted mean |mean P(pneumonia) - positive rate| over equal-width bins."""
    confidence, observed, counts = reliability_bins(labels, probabilities, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(confidence[filled] - observed[filled])) / counts.sum())


def confusion(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, int]:
    y, p = _as_arrays(labels, probabilities)
    predicted = is_pneumonia(p, threshold)
    positive = y == 1
    return {
        "tp": int(np.sum(predicted & positive)),
        "fp": int(np.sum(predicted & ~positive)),
        "tn": int(np.sum(~predicted & ~positive)),
        "fn": int(np.sum(~predicted & positive)),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def threshold_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float]:
    """Metrics that depend on the decision threshold."""
    c = confusion(labels, probabilities, threshold)
    sensitivity = _ratio(c["tp"], c["tp"] + c["fn"])
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
        "sensitivity": sensitivity,
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "precision": precision,
        "f1": _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
    }


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, float | int]:
    """The full report: threshold metrics, ranking metrics, calibration and the confusion counts."""
    y, p = _as_arrays(labels, probabilities)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "threshold": float(threshold),
        **threshold_metrics(y, p, threshold),
        "roc_auc": roc_auc(y, p),
        "pr_auc": average_precision(y, p),
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p),
        **confusion(y, p, threshold),
    }


def bootstrap_resamples(n: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """``count`` case-resampling index arrays over ``n`` cases, reproducible from ``seed``.

    The one resampling scheme of every bootstrap here (metric intervals, the threshold's interval).
    """
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.integers(0, n, n)


def paired_difference(
    labels: np.ndarray,
    first: np.ndarray,
    other: np.ndarray,
    measure: Callable[[np.ndarray, np.ndarray], float],
    *,
    resamples: int,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``measure(other) - measure(first)`` on these cases, and its 95% interval with both scored on the same
    resamples (paired): what tells a real difference between two models from the luck of one sample."""
    diffs = [
        measure(labels[i], other[i]) - measure(labels[i], first[i])
        for i in bootstrap_resamples(labels.size, resamples, seed)
    ]
    low, high = np.nanpercentile(diffs, [2.5, 97.5])
    return measure(labels, other) - measure(labels, first), float(low), float(high)


def bootstrap_ci(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """Percentile 95% intervals for roc_auc, sensitivity, specificity and accuracy (case resampling)."""
    y, p = _as_arrays(labels, probabilities)
    names = ("roc_auc", "sensitivity", "specificity", "accuracy")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in bootstrap_resamples(y.size, n_boot, seed):
        yb, pb = y[index], p[index]
        values = threshold_metrics(yb, pb, threshold)
        values["roc_auc"] = roc_auc(yb, pb)
        for name in names:
            samples[name].append(values[name])
    return {
        name: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
        if np.isfinite(v).any()
        else [float("nan"), float("nan")]
        for name, v in ((n, np.asarray(samples[n])) for n in names)
    }
