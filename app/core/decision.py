"""The decision: calibrated P(pneumonia) and the label at the model's threshold.

Training's calibration and reports, the offline scorer and the HTTP service all go through
these functions, so one probability can never be labelled two ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from app.core.network import CLASS_NAMES, ClassNames

PNEUMONIA_INDEX = 1
Probability = TypeVar("Probability", float, np.ndarray)


def pneumonia_probability(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Calibrated P(pneumonia) from 2-class logits, in float32 whatever the logits' dtype."""
    scaled = logits.float() / temperature
    return torch.softmax(scaled, dim=-1)[..., PNEUMONIA_INDEX]


def is_pneumonia(probability: Probability, threshold: float) -> bool | np.ndarray:
    """The rule at the threshold, for one probability or an array of them (then elementwise)."""
    return probability >= threshold


@dataclass(frozen=True)
class Decision:
    """What a client is told about one image: the label, both class probabilities, the threshold."""

    label: str
    pneumonia_probability: float
    probabilities: dict[str, float]
    threshold: float


def decide(probability: float, threshold: float, class_names: ClassNames = CLASS_NAMES) -> Decision:
    """PNEUMONIA when ``probability >= threshold``, else NORMAL (class names from the model spec)."""
    normal, pneumonia = class_names
    return Decision(
        label=pneumonia if is_pneumonia(probability, threshold) else normal,
        pneumonia_probability=probability,
        probabilities={normal: 1.0 - probability, pneumonia: probability},
        threshold=threshold,
    )
