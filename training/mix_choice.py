"""Which point between a model and its fine-tune to keep: the rule, on validation only.

Along the line from a parent to a fine-tune that trains a cue away (EXPERIMENTS.md, E25-E34), the
validation AUC falls step by step, because the validation films share the cue, while the shifted test
split gains. The rule, written down before it was applied (E27) and kept since (E31, E34): take the
largest candidate fraction whose loss of validation AUC against the parent is within the luck of one
validation split, i.e. whose paired bootstrap 95% interval of (mix - parent) still reaches zero. Both
are scored on the same resamples of the same images (``training.metrics.paired_difference``, seed 0,
the resampling of ``ensemble_check``), so a run of it reproduces the tables of EXPERIMENTS.md. When no
candidate keeps it there is no answer, and the caller refuses rather than export the least bad one.
"""

from __future__ import annotations

import argparse

import numpy as np
from pydantic import BaseModel

from training.metrics import paired_difference, roc_auc

RESAMPLES = 1000  # as in EXPERIMENTS.md's paired intervals (E27-E34)
RULE = "the largest candidate whose paired bootstrap 95% interval of validation AUC minus the parent's reaches zero"


class Candidate(BaseModel):
    """One fraction's validation AUC against the parent's: the difference and its paired 95% interval."""

    fraction: float
    val_auc_difference: float
    low: float
    high: float

    @property
    def keeps_validation(self) -> bool:
        return self.high >= 0.0  # NaN (no resample had both classes) never keeps it


class NoFractionError(ValueError):
    """Every candidate loses validation AUC beyond one split's luck."""


def parse_fractions(text: str) -> list[float]:
    """``0.5,0.75,1``: fractions of the way from a parent to its fine-tune, each in [0, 1] (argparse type)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from exc
    if not all(0.0 <= value <= 1.0 for value in values):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"each fraction must lie in [0, 1]: {text!r}")
    return values


def score_candidates(
    labels: np.ndarray, parent_scores: np.ndarray, scores: dict[float, np.ndarray], resamples: int = RESAMPLES
) -> list[Candidate]:
    """Each fraction's validation AUC minus the parent's, paired over the same ``resamples``.

    ``scores`` are any increasing function of P(pneumonia) (AUC reads the order only); log-odds avoid the
    ties a saturated probability would add.
    """
    candidates = []
    for fraction, values in sorted(scores.items()):
        difference, low, high = paired_difference(labels, parent_scores, values, roc_auc, resamples=resamples)
        candidates.append(Candidate(fraction=fraction, val_auc_difference=difference, low=low, high=high))
    return candidates


def choose(candidates: list[Candidate]) -> Candidate:
    """The largest fraction that keeps the parent's validation AUC within its paired interval."""
    kept = [candidate for candidate in candidates if candidate.keeps_validation]
    if not kept:
        shown = "; ".join(
            f"{c.fraction:g}: {c.val_auc_difference:+.4f} ({c.low:+.4f} to {c.high:+.4f})" for c in candidates
        )
        raise NoFractionError(f"no fraction keeps the parent's validation AUC within its paired 95% interval ({shown})")
    return max(kept, key=lambda candidate: candidate.fraction)
