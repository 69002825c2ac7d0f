"""The network's convolutional part as an ONNX graph, for runtimes other than PyTorch.

The graph takes the *normalised* float32 input ``x [N, 3, S, S]`` (normalisation, and histogram
equalisation where the model uses it, stay in ``PneumoniaNet.normalize`` in PyTorch) and returns
the last block's feature maps ``maps [N, 512, h, w]``. Everything the service derives from a
forward pass (the head's logits, class activation maps) is computed from those maps by the same
PyTorch code on every backend, so a runtime only ever replaces the convolutions.

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

from app.core.network import PneumoniaNet

OPSET = 17
INPUT_NAME = "x"
MAPS_NAME = "maps"


class FeatureGraph(nn.Module):
    """What is exported: normalised input to the last block's feature maps."""

    def __init__(self, network: PneumoniaNet) -> None:
        super().__init__()
        self.features = network.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def export_features(network: PneumoniaNet, path: Path) -> None:
    """Write ``network``'s feature extractor to ``path`` (float32, dynamic batch), deterministically."""
    graph = FeatureGraph(network).float().eval()
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
            output_names=[MAPS_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, MAPS_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
