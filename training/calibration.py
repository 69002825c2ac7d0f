"""Operating point chosen on validation data: temperature scaling and a decision threshold."""

from __future__ import annotations

import math
from typing import Literal, cast

import numpy as np
import torch

from app.core.decision import pneumonia_probability
from training.metrics import bootstrap_resamples, roc_curve

ThresholdMethod = Literal["sensitivity", "youden"]
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _nll(logits: torch.Tensor, labels: torch.Tensor, inverse_temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits * inverse_temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, iterations: int = 80) -> float:
    """T minimising the NLL of softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in log(1/T): a golden-section search there over
    1/T in [0.02, 50] finds the global minimum without a learning rate to tune.
    """
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    lo, hi = math.log(0.02), math.log(50.0)
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _nll(z, y, math.exp(c)), _nll(z, y, math.exp(d))
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll(z, y, math.exp(d))
    return 1.0 / math.exp((a + b) / 2.0)


def select_threshold(
    labels: np.ndarray, probabilities: np.ndarray, method: ThresholdMethod, target_sensitivity: float = 0.95
) -> float:
    """Threshold on P(pneumonia) (positive when ``p >= threshold``).

    ``sensitivity``: the highest threshold whose sensitivity is at least the target, i.e. the
    best specificity that still catches the target share of pneumonia cases.
    ``youden``: the threshold maximising sensitivity + specificity - 1.
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.min() == y.max():
        raise ValueError("threshold selection needs both classes in the validation data")
    if method not in ("sensitivity", "youden"):  # a typo must not silently become Youden's J
        raise ValueError(f"unknown threshold method {method!r}: sensitivity or youden")
    if method == "sensitivity":
        positives = np.sort(p[y == 1])[::-1]
        needed = max(1, math.ceil(target_sensitivity * positives.size - 1e-9))
        return float(positives[needed - 1])
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax((tpr - fpr)[1:])) + 1  # skip the +inf start point
    return float(min(thresholds[best], 1.0))


def threshold_interval(
    labels: np.ndarray,
    probabilities: np.ndarray,
    method: ThresholdMethod,
    target_sensitivity: float = 0.95,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile 95% interval of :func:`select_threshold` over bootstrap resamples of the validation images.

    The sensitivity rule's threshold is one order statistic (the lowest 5 % of validation positives), so
    another draw of validation images would put it elsewhere; on a saturated validation split nothing
    else pins it. This says how far, so a report can show what that uncertainty does to specificity.
    Resamples holding one class are skipped.
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    draws = []
    for index in bootstrap_resamples(y.size, resamples, seed):
        if y[index].min() != y[index].max():
            draws.append(select_threshold(y[index], p[index], method, target_sensitivity))
    if not draws:
        raise ValueError("no bootstrap resample held both classes")
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def operating_point(
    logits: torch.Tensor, labels: torch.Tensor, method: ThresholdMethod, target_sensitivity: float = 0.95
) -> tuple[float, float, np.ndarray]:
    """(temperature, threshold, calibrated probabilities) fitted on validation ``logits``: what a run exports.

    Training's export and every script that re-fits an operating point on validation call this, so they
    cannot drift apart.
    """
    temperature = fit_temperature(logits, labels)
    probs = pneumonia_probability(logits, temperature).numpy().astype(np.float64)
    threshold = select_threshold(labels.numpy(), probs, method, target_sensitivity)
    return temperature, threshold, probs


def rule_name(method: ThresholdMethod, target_sensitivity: float) -> str:
    """The operating-point rule as ``model.json`` records it: ``youden`` or ``sensitivity>=T``."""
    return method if method == "youden" else f"sensitivity>={target_sensitivity}"


def parse_rule(name: str) -> tuple[ThresholdMethod, float]:
    """(method, target sensitivity) from a recorded rule name; the inverse of :func:`rule_name`."""
    method, _, target = name.partition(">=")
    if method not in ("sensitivity", "youden"):
        raise ValueError(f"unknown threshold rule {name!r}")
    return cast(ThresholdMethod, method), float(target) if target else 0.95
