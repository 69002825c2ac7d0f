"""Initialise from torchvision's ImageNet VGG16 weights, read from a local file only (never downloaded)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from app.core.network import PneumoniaNet
from training.user_errors import UsageError

HUB_FILES = {"vgg16": "vgg16-397923af.pth", "vgg16_bn": "vgg16_bn-6c64b313.pth"}
# torchvision's classifier indices of fc6 and fc7, identical in the classic head.
CLASSIC_HEAD_LAYERS = ("classifier.0.", "classifier.3.")
log = logging.getLogger(__name__)


def hub_cache_path(architecture: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILES[architecture]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a .pth loaded with ``weights_only=True`` (no code execution)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many unrelated types
        raise UsageError(f"cannot read ImageNet weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict")
    return state


def load_imagenet(network: PneumoniaNet, weights: Path | None) -> Path:
    """Copy the convolutional features (and fc6/fc7 for the classic head) into ``network``."""
    architecture = network.spec.architecture
    path = weights if weights is not None else hub_cache_path(architecture)
    if not path.is_file():
        raise UsageError(
            f"ImageNet weights for {architecture} not found at {path}; pass --imagenet-weights FILE "
            f"(torchvision {HUB_FILES[architecture]}) or use --init scratch"
        )
    source = read_state_dict(path)
    prefixes = ("features.",) + (CLASSIC_HEAD_LAYERS if network.spec.head == "classic" else ())
    target = network.state_dict()
    wanted = {k for k in target if k.startswith(prefixes)}
    missing = sorted(wanted - source.keys())
    if missing:
        raise UsageError(f"{path} is not torchvision {architecture} ImageNet weights: missing {missing[:3]}")
    wrong = [k for k in wanted if source[k].shape != target[k].shape]
    if wrong:
        raise UsageError(f"{path}: shape mismatch for {sorted(wrong)[:3]} (wrong architecture?)")
    network.load_state_dict({k: source[k].float() for k in wanted}, strict=False)
    log.info("initialised %d tensors from ImageNet weights %s", len(wanted), path)
    return path
