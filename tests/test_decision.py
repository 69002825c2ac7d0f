"""The decision rule with numbers written out by hand: calibration by temperature, label at the threshold."""

from __future__ import annotations

import pytest
import torch

from app.core.decision import decide, pneumonia_probability


def test_temperature_divides_the_logit_gap() -> None:
    # logits (0, 2): softmax gives 1 / (1 + e^-2) = 0.8807970779778823; at T = 2 the gap is 1:
    # 1 / (1 + e^-1) = 0.7310585786300049; at T = 0.5 the gap is 4: 0.9820137900379085.
    logits = torch.tensor([[0.0, 2.0]])
    assert float(pneumonia_probability(logits)) == pytest.approx(0.8807970779778823, abs=1e-7)
    assert float(pneumonia_probability(logits, 2.0)) == pytest.approx(0.7310585786300049, abs=1e-7)
    assert float(pneumonia_probability(logits, 0.5)) == pytest.approx(0.9820137900379085, abs=1e-7)


def test_the_class_axis_is_the_last_whatever_the_leading_shape() -> None:
    # One image's logits (shape (2,)) and a (2, 1, 2) stack: each P(pneumonia) is 1 / (1 + e^-(gap / T)).
    assert float(pneumonia_probability(torch.tensor([0.0, 2.0]))) == pytest.approx(0.8807970779778823, abs=1e-7)
    stacked = pneumonia_probability(torch.tensor([[[1.0, 1.0]], [[3.0, 1.0]]]), 2.0)
    assert stacked.shape == (2, 1)
    assert stacked.flatten().tolist() == pytest.approx([0.5, 0.2689414213699951], abs=1e-7)


def test_probability_is_float32_whatever_the_logit_dtype() -> None:
    assert pneumonia_probability(torch.tensor([[0.0, 2.0]], dtype=torch.bfloat16)).dtype == torch.float32


def test_label_at_threshold_inclusive_and_both_class_probabilities() -> None:
    at = decide(0.42, 0.42)
    assert (at.label, at.threshold, at.pneumonia_probability) == ("PNEUMONIA", 0.42, 0.42)
    assert at.probabilities == {"NORMAL": pytest.approx(0.58), "PNEUMONIA": 0.42}
    assert decide(0.4199, 0.42).label == "NORMAL"
    assert decide(0.9, 0.5, ("neg", "pos")).label == "pos"
