"""The validation-only rule that picks a weight-mix fraction (training/mix_choice.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from training.metrics import paired_difference, roc_auc
from training.mix_choice import Candidate, NoFractionError, choose, parse_fractions, score_candidates


@pytest.fixture
def validation() -> tuple[np.ndarray, np.ndarray]:
    """200 cases the parent ranks well but not perfectly."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    return labels, labels * 2.0 + rng.normal(size=200)


def test_the_largest_fraction_within_the_luck_is_kept(validation: tuple[np.ndarray, np.ndarray]) -> None:
    labels, parent = validation
    rng = np.random.default_rng(1)
    scores = {
        0.25: parent.copy(),  # the same order: no loss at all
        0.5: parent + rng.normal(scale=0.05, size=parent.size),  # a few pairs swapped: within the luck
        1.0: rng.normal(size=parent.size),  # the ranking is gone: a loss beyond any doubt
    }
    candidates = score_candidates(labels, parent, scores, resamples=300)
    assert [c.fraction for c in candidates] == [0.25, 0.5, 1.0]
    same, near, lost = candidates
    assert (same.val_auc_difference, same.low, same.high) == (0.0, 0.0, 0.0)
    assert near.low < 0.0 <= near.high
    assert lost.high < -0.2
    # The numbers are paired_difference's over the same resamples, seed 0, as ensemble_check prints them.
    assert (near.val_auc_difference, near.low, near.high) == paired_difference(
        labels, parent, scores[0.5], roc_auc, resamples=300
    )
    assert choose(candidates).fraction == 0.5


def test_no_fraction_that_loses_validation_is_exported_as_the_least_bad() -> None:
    candidates = [
        Candidate(fraction=0.5, val_auc_difference=-0.002, low=-0.003, high=-0.001),
        Candidate(fraction=1.0, val_auc_difference=-0.004, low=-0.006, high=-0.002),
        Candidate(fraction=0.75, val_auc_difference=float("nan"), low=float("nan"), high=float("nan")),
    ]
    with pytest.raises(NoFractionError, match=r"0\.5: -0\.0020 \(-0\.0030 to -0\.0010\); 1: -0\.0040"):
        choose(candidates)
    kept = Candidate(fraction=0.25, val_auc_difference=-0.0003, low=-0.0007, high=0.0)  # reaches zero exactly
    assert choose([*candidates, kept]) == kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5,x", "not a comma-separated list"),
        ("1.5", "must lie in"),
        ("-0.1,0.5", "must lie in"),
        ("nan", "must lie in"),
    ],
)
def test_fractions_off_the_line_are_refused(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_fractions(text)
    assert parse_fractions("0.5,0.75,1") == [0.5, 0.75, 1.0]
