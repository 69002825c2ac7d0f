"""The network's convolutional part as an ONNX graph, for runtimes other than PyTorch.

The graph takes the *normalised* float32 input ``x [N, 3, S, S]`` (normalisation, and histogram
equalisation where the model uses it, stay in ``PneumoniaNet.normalize`` in PyTorch) and returns
the last block's feature maps ``maps [N, 512, h, w]`` and, for a model served with its input
guard, the guard's feature vector ``guard [N, D]`` read on the way by the very function the
PyTorch path uses (``input_guard.features_and_maps``). Everything the service derives from a
forward pass (logits, calibrated probability, class activation maps, guard score) is computed
from those two outputs by the same PyTorch code on every backend, so a runtime only ever
replaces the convolutions.

Exported with PyTorch's TorchScript-based exporter: for a given torch version and weights its
output is byte-for-byte the same on every run (the torch.export-based exporter numbers its nodes
per process, so two exports of one model differ), which is what makes a converted model
reproducible and the int8 calibration ranges, keyed by tensor name, reusable. Nothing is
downloaded; batch-norm is folded into the convolutions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from app.core.input_guard import GuardSpec, features_and_maps
from app.core.network import PneumoniaNet

OPSET = 17
INPUT_NAME = "x"
MAPS_NAME = "maps"
GUARD_NAME = "guard"


class FeatureGraph(nn.Module):
    """What is exported: normalised input to the last block's feature maps (and the guard's vector)."""

    def __init__(self, network: PneumoniaNet, guard: GuardSpec | None) -> None:
        super().__init__()
        self.features = network.features
        self.blocks = None if guard is None else (guard.mean_blocks, guard.std_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.blocks is not None:
            return features_and_maps(self.features, x, *self.blocks)
        # Layer by layer, as features_and_maps runs them, so both graphs name their tensors alike and
        # one set of int8 ranges (measured with the guard's taps) serves the graph without them too.
        for layer in self.features:
            x = layer(x)
        return x


def guard_key(guard: GuardSpec | None) -> str:
    """What of the guard shapes the graph (its taps), for cache keys: ``none`` without one."""
    if guard is None:
        return "none"
    return f"means{list(guard.mean_blocks)}-stds{list(guard.std_blocks)}"


def export_features(network: PneumoniaNet, path: Path, guard: GuardSpec | None = None) -> None:
    """Write ``network``'s feature extractor (with ``guard``'s taps) to ``path``: float32, dynamic batch."""
    graph = FeatureGraph(network, guard).float().eval()
    outputs = [MAPS_NAME] if guard is None else [MAPS_NAME, GUARD_NAME]
    size = network.spec.input_size
    example = torch.zeros((1, 3, size, size), dtype=torch.float32)
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; it is chosen for its deterministic output.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
