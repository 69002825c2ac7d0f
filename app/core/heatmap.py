"""Class activation maps from the feature maps the forward pass already computed: no backward pass.

The compact head is global average pooling followed by one linear layer, so the calibrated log-odds
of pneumonia are, exactly (Zhou et al., 2016, "Learning Deep Features for Discriminative Localization"):

    (z_pneumonia - z_normal) / T = mean_ij(cam[i, j]) + bias
    cam[i, j] = (w_pneumonia - w_normal) . maps[:, i, j] / T,   bias = (b_pneumonia - b_normal) / T

so each cell says how much its region pushed the reported probability towards PNEUMONIA
(positive) or NORMAL (negative), in the same units as the score: sigmoid(mean + bias) is the
calibrated P(pneumonia). Values stay raw and signed; nothing is rescaled to 0..1, so a NORMAL
image does not grow a fake hot spot. Written here rather than taken from the ``grad-cam`` package,
which registers hooks on the shared model, needs gradients and normalises every map.

The classic fc head (7x7 pooling, three fully connected layers) has no such exact decomposition;
explaining it is refused with :class:`ExplainUnsupportedError` rather than approximated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from app.core.coded_error import CodedError
from app.core.decision import PNEUMONIA_INDEX

METHOD = "cam"
NORMAL_INDEX = 1 - PNEUMONIA_INDEX


class ExplainUnsupportedError(CodedError):
    code = "explain_unsupported"
    default_message = "this model's classic fc head has no exact class activation map; heatmaps need the compact head"


@dataclass(frozen=True)
class Heatmap:
    """One image's map: ``values`` row-major (top row first), ``rows x cols``, in calibrated log-odds units."""

    method: str
    layer: str
    rows: int
    cols: int
    values: tuple[float, ...]
    bias: float

    def log_odds(self) -> float:
        """The calibrated log-odds of PNEUMONIA the map decomposes: mean of the cells plus the bias."""
        return sum(self.values) / len(self.values) + self.bias


@dataclass(frozen=True)
class CamHead:
    """The pneumonia-minus-normal direction of a compact head's linear layer, divided by the temperature."""

    weight: torch.Tensor  # [C]
    bias: float
    layer: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, temperature: float, layer: str) -> CamHead:
        with torch.no_grad():
            weight = (linear.weight[PNEUMONIA_INDEX] - linear.weight[NORMAL_INDEX]).float() / temperature
            bias = 0.0
            if linear.bias is not None:
                bias = float(linear.bias[PNEUMONIA_INDEX] - linear.bias[NORMAL_INDEX]) / temperature
        return cls(weight.detach(), bias, layer)

    def maps(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` feature maps (any dtype, any device) to float32 ``[N, h, w]`` maps."""
        weight = self.weight.to(features.device)
        return torch.einsum("c,nchw->nhw", weight, features.float())

    def heatmaps(self, features: torch.Tensor) -> list[Heatmap]:
        return [
            Heatmap(METHOD, self.layer, cam.shape[0], cam.shape[1], tuple(cam.flatten().tolist()), self.bias)
            for cam in self.maps(features).cpu()
        ]


def cam_head(network: nn.Module, temperature: float) -> CamHead:
    """The CAM of a :class:`~app.core.network.PneumoniaNet`; raises for the classic head."""
    spec = network.spec  # type: ignore[attr-defined]
    if spec.head != "compact":
        raise ExplainUnsupportedError()
    linear = network.classifier[-1]  # type: ignore[index]
    layer = f"features.{len(network.features) - 1}"  # type: ignore[arg-type]  # the last conv block's output
    return CamHead.from_linear(linear, temperature, layer)
