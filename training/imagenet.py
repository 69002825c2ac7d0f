"""Initialise from torchvision's ImageNet VGG16 weights, read from a local file only (never downloaded)."""

from __future__ import annotations

import logging
import pickle
import warnings
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
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's note on pickle protocols is no news to the user
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"{path} is a pickle that holds more than tensors: loading it would run its code, so it is refused; "
            'convert it to safetensors where you trust it (python -c "import sys, torch, safetensors.torch as s; '
            's.save_file(torch.load(sys.argv[1], weights_only=False), sys.argv[2])" IN.pth OUT.safetensors) '
            "and pass OUT.safetensors"
        ) from exc
    except Exception as exc:  # torch.load and safetensors raise many unrelated types
        detail = str(exc).splitlines()[0] if str(exc) else ("empty file" if _empty(path) else type(exc).__name__)
        raise UsageError(f"cannot read ImageNet weights {path}: {detail}") from exc
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict")
    other = next(((k, v) for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise UsageError(
            f"{path} is not a state dict of weights: {other[0]!s} holds a {type(other[1]).__name__}, not a tensor"
        )
    return state


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


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
    broken = sorted(k for k in wanted if source[k].is_floating_point() and not bool(source[k].isfinite().all()))
    if broken:  # else the first step's loss is NaN, and the run is reported as diverged with advice on the lr
        raise UsageError(f"{path} holds values that are not finite (NaN or infinity) in {broken[:3]}: a damaged file")
    network.load_state_dict({k: source[k].float() for k in wanted}, strict=False)
    log.info("initialised %d tensors from ImageNet weights %s", len(wanted), path)
    return path
