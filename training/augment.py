"""Whole-batch augmentation on the training device (no per-image CPU work).

Random parameters come from a CPU generator seeded per epoch, so a run is reproducible and
a resumed run draws the same augmentations as an uninterrupted one, on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

MAX_ROTATION_DEG = 10.0
MAX_TRANSLATE = 0.08  # fraction of the half-width (affine_grid coordinates span [-1, 1])
MAX_SCALE = 0.10
MAX_BRIGHTNESS = 0.15
MAX_CONTRAST = 0.15
ERASE_SIDE = (0.10, 0.25)  # corner patch side, fraction of the image side: about a burnt-in marker's size
# Another detector, at strength 1: exposure curve, sharpness and dose.
MAX_LOG_GAMMA = 0.4  # gamma in [0.67, 1.49]: the mid-tones (lung fields) darken or wash out, ends stay put
MAX_BLUR_SIGMA = 0.015  # Gaussian blur sigma, fraction of the image side (about 1 px at 64 px, 3.4 at 224)
MAX_NOISE = 0.03  # additive Gaussian noise std, fraction of the 0..255 range


def _uniform(n: int, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2.0 - 1.0) * bound


class Augmentation(BaseModel):
    """The random transforms of :func:`augment_batch`, passed as one value from the flags to the batch.

    ``strength`` scales the affine (rotation, translation, scale) and brightness/contrast jitter.
    ``hflip`` adds random horizontal flips. ``zoom_in`` adds a one-sided zoom of up to that fraction
    (tighter framing, as in the test split's false positives). ``erase_corners`` is the probability
    that one corner patch (where burnt-in side markers sit) is filled with the image's mean.
    ``aspect_jitter`` widens or narrows the film by a width-to-height factor drawn log-uniformly in
    ``[1 / (1 + a), 1 + a]``, keeping its area, so how a film was squashed to a square (its original
    shape, not recorded in the file) cannot be a cue.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    strength: float = 1.0
    hflip: bool = False
    zoom_in: float = 0.0
    erase_corners: float = 0.0
    aspect_jitter: float = 0.0


def augment_batch(pixels: torch.Tensor, generator: torch.Generator, options: Augmentation) -> torch.Tensor:
    """Apply ``options`` to a batch, with one generator for every draw.

    Each option other than ``strength`` draws random numbers only when it is on, and after all the
    others, so runs without it draw exactly what they drew before it existed, and a run with one
    shares every other draw with the same seed's run without it.

    Takes uint8 ``[N, C, S, S]`` and returns float32 on the same device in the 0..255 range,
    which :meth:`PneumoniaNet.normalize` accepts like uint8 input.
    """
    x = pixels.float()
    geometric = options.strength > 0.0 or options.hflip or options.zoom_in > 0.0 or options.aspect_jitter > 0.0
    if geometric and x.shape[0]:
        x = _affine_and_intensity(x, generator, options)
    if options.erase_corners > 0.0 and x.shape[0]:
        x = _erase_corner(x, generator, options.erase_corners)
    return x


def _affine_and_intensity(x: torch.Tensor, generator: torch.Generator, options: Augmentation) -> torch.Tensor:
    n, strength, zoom_in, aspect_jitter = x.shape[0], options.strength, options.zoom_in, options.aspect_jitter
    angle = _uniform(n, math.radians(MAX_ROTATION_DEG) * strength, generator)
    scale = 1.0 + _uniform(n, MAX_SCALE * strength, generator)
    if zoom_in > 0.0:
        scale = scale + torch.rand(n, generator=generator) * zoom_in
    shift = torch.stack([_uniform(n, MAX_TRANSLATE * strength, generator) for _ in range(2)], dim=1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if options.hflip else torch.ones(n)
    brightness = (1.0 + _uniform(n, MAX_BRIGHTNESS * strength, generator)).view(n, 1, 1, 1).to(x.device)
    contrast = (1.0 + _uniform(n, MAX_CONTRAST * strength, generator)).view(n, 1, 1, 1).to(x.device)
    # Magnification along the film's own axes, before rotation: width by scale * sqrt(r), height by
    # scale / sqrt(r), so r is the width-to-height factor and the area is scale^2 whatever r is.
    # Without jitter the root is the float 1.0 and every entry is computed exactly as before it existed.
    root_aspect = torch.exp(_uniform(n, math.log1p(aspect_jitter), generator) / 2) if aspect_jitter > 0.0 else 1.0
    width, height = scale * root_aspect, scale / root_aspect
    cos_w, sin_w = torch.cos(angle) / width, torch.sin(angle) / width
    cos_h, sin_h = torch.cos(angle) / height, torch.sin(angle) / height
    theta = torch.stack(
        [
            torch.stack([cos_w * flip, -sin_h, shift[:, 0]], dim=1),
            torch.stack([sin_w * flip, cos_h, shift[:, 1]], dim=1),
        ],
        dim=1,
    ).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean * brightness
    return x.clamp_(0.0, 255.0)


def _erase_corner(x: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """With ``probability`` per image, fill a random rectangle touching a random corner with the image mean."""
    n, size = x.shape[0], x.shape[-1]
    chosen = torch.rand(n, generator=generator) < probability
    corner = torch.randint(0, 4, (n,), generator=generator)
    low, high = ERASE_SIDE
    width = ((low + torch.rand(n, generator=generator) * (high - low)) * size).round()
    height = ((low + torch.rand(n, generator=generator) * (high - low)) * size).round()
    coords = torch.arange(size, dtype=torch.float32)
    left, top = (corner % 2 == 0).view(n, 1), (corner < 2).view(n, 1)
    in_x = torch.where(left, coords < width.view(n, 1), coords >= size - width.view(n, 1))  # [n, S]
    in_y = torch.where(top, coords < height.view(n, 1), coords >= size - height.view(n, 1))
    mask = (in_y[:, :, None] & in_x[:, None, :] & chosen.view(n, 1, 1)).unsqueeze(1).to(x.device)
    return torch.where(mask, x.mean(dim=(1, 2, 3), keepdim=True), x)


def mix_pairs(
    x: torch.Tensor, target: torch.Tensor, generator: torch.Generator, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018): blend each image with a random partner of the same batch.

    Returns ``(mixed images, partner labels, lam)``; the loss is ``lam * loss(y) + (1 - lam) * loss(partner)``.
    One ``lam ~ Beta(alpha, alpha)`` per batch, as torchvision's reference recipe does. The Beta draw
    goes through numpy seeded from ``generator`` because torch's Beta sampler takes no generator, and
    a resumed run must draw exactly what the uninterrupted one drew.
    """
    order = torch.randperm(x.shape[0], generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    mixed = x * lam + x[order.to(x.device)] * (1.0 - lam)
    return mixed, target[order.to(target.device)], lam


def acquisition_shift(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Make each image look as if another detector took it: a random gamma, blur and noise level.

    The test split's normal films called pneumonia differ in exposure and contrast (the error analysis
    in ``training/EXPERIMENTS.md``), which the linear brightness/contrast jitter of :func:`augment_batch`
    cannot produce: a gamma curve moves the lung fields' grey level against bone and air. Per image:
    ``gamma = exp(U(-g, g))``, a Gaussian blur with ``sigma ~ U(0, s)`` (half the images stay sharp)
    and noise with ``std ~ U(0, n)``, all three bounds scaled by ``strength``.

    The caller passes a generator of its own, so a run with this shift draws every other random
    number (batch order, affine, erasing) exactly as the same run without it: the two are paired.
    Takes and returns float ``[N, C, S, S]`` in the 0..255 range.
    """
    n, size = x.shape[0], x.shape[-1]
    if n == 0 or strength <= 0.0:
        return x
    gamma = torch.exp(_uniform(n, MAX_LOG_GAMMA * strength, generator)).view(n, 1, 1, 1).to(x.device)
    max_sigma = MAX_BLUR_SIGMA * strength * size
    sigma = torch.rand(n, generator=generator) * max_sigma * (torch.rand(n, generator=generator) < 0.5)
    noise_std = (torch.rand(n, generator=generator) * MAX_NOISE * strength * 255.0).view(n, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator) * noise_std
    x = 255.0 * (x / 255.0).clamp_(0.0, 1.0).pow(gamma)
    x = _gaussian_blur(x, sigma.to(x.device), radius=max(1, math.ceil(3.0 * max_sigma)))
    return (x + noise.to(x.device)).clamp_(0.0, 255.0)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma 0 leaves the image unchanged)."""
    n, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    safe = sigma.clamp_min(1e-6).view(n, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # sigma -> 0 gives a unit impulse
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel) group
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)
