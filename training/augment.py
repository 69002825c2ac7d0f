"""Whole-batch augmentation on the training device (no per-image CPU work).

Random parameters come from a CPU generator seeded per epoch, so a run is reproducible and
a resumed run draws the same augmentations as an uninterrupted one, on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 10.0
MAX_TRANSLATE = 0.08  # fraction of the half-width (affine_grid coordinates span [-1, 1])
MAX_SCALE = 0.10
MAX_BRIGHTNESS = 0.15
MAX_CONTRAST = 0.15


def _uniform(n: int, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2.0 - 1.0) * bound


def augment_batch(
    pixels: torch.Tensor, generator: torch.Generator, *, strength: float = 1.0, hflip: bool = False
) -> torch.Tensor:
    """Random affine (rotation, translation, scale), optional flip and brightness/contrast.

    Takes uint8 ``[N, C, S, S]`` and returns float32 on the same device in the 0..255 range,
    which :meth:`PneumoniaNet.normalize` accepts like uint8 input.
    """
    x = pixels.float()
    n = x.shape[0]
    if strength <= 0.0 and not hflip:
        return x
    angle = _uniform(n, math.radians(MAX_ROTATION_DEG) * strength, generator)
    scale = 1.0 + _uniform(n, MAX_SCALE * strength, generator)
    shift = torch.stack([_uniform(n, MAX_TRANSLATE * strength, generator) for _ in range(2)], dim=1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], dim=1), torch.stack([sin * flip, cos, shift[:, 1]], dim=1)],
        dim=1,
    ).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = (1.0 + _uniform(n, MAX_BRIGHTNESS * strength, generator)).view(n, 1, 1, 1).to(x.device)
    contrast = (1.0 + _uniform(n, MAX_CONTRAST * strength, generator)).view(n, 1, 1, 1).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean * brightness
    return x.clamp_(0.0, 255.0)
