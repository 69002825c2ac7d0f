"""Per-image contrast normalisations that run inside the network, so every caller applies them alike.

Both take ``[N, C, H, W]`` batches of 0..255 values (uint8, or float from batch augmentation, rounded
to the nearest level and clamped first) and return float32 levels in 0..255, computed with
scatter/gather on whatever device the batch is on.
"""

from __future__ import annotations

import torch

LEVELS = 256


def _levels(pixels: torch.Tensor) -> torch.Tensor:
    """Integer grey levels 0..255 of uint8 or float pixels (augmented floats leave the range)."""
    return pixels.float().round().clamp(0, LEVELS - 1).long()


def equalize_histogram(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalisation.

    The classic mapping ``round((cdf(v) - cdf_min) / (n - cdf_min) * 255)`` on 256 levels. A
    constant image maps to 0.
    """
    n, channels, height, width = pixels.shape
    levels = _levels(pixels).reshape(n * channels, height * width)
    counts = torch.zeros((n * channels, LEVELS), dtype=torch.float32, device=pixels.device)
    counts.scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float32))
    cdf = counts.cumsum(1)
    cdf_min = cdf.gather(1, levels.min(dim=1, keepdim=True).values)
    total = float(height * width)
    mapped = ((cdf - cdf_min) / (total - cdf_min).clamp_min(1.0) * 255.0).round().clamp(0, 255)
    return mapped.gather(1, levels).reshape(n, channels, height, width)


def clahe(pixels: torch.Tensor, clip_limit: float, tiles: int) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation (Zuiderveld 1994, as OpenCV's ``createCLAHE``).

    Algorithm, per image and channel:

    1. Cut the image into ``tiles x tiles`` equal tiles and take each tile's 256-bin histogram.
    2. Clip every bin at ``clip_limit`` times the tile's mean bin height (at least 1 count) and
       spread the clipped counts evenly over all 256 bins. This bounds the slope of the mapping,
       and so how much noise in a flat region can be amplified: the lower the limit, the flatter
       the histogram and the gentler the mapping; a limit no bin reaches gives each tile plain
       equalisation.
    3. Each tile's mapping is its clipped cumulative histogram scaled to 0..255 (``cdf(v) * 255 / n``).
    4. Each pixel's output is the bilinear blend of the mappings of the four tiles whose centres
       surround it (pixels beyond the outer centres use the nearest tiles), so there are no seams
       at tile borders. The result is rounded to the nearest level.

    Unlike :func:`equalize_histogram`, dark and bright regions of one film are each stretched on
    their own, so local texture stays visible in an over- or under-exposed area.

    Differences from OpenCV, whose output this reproduces within one grey level once its two
    conventions are imitated (checked against opencv-python-headless 5.1, which is not a
    dependency): OpenCV spreads the clipped counts as whole counts and puts the remainder on every
    k-th bin from the darkest, which on the small tiles of a 64-128 px input biases the mapping
    towards dark levels by 10-20 grey levels on average, so here they are spread as an even
    fraction; OpenCV places tile centres at ``y / tile - 0.5``, here at pixel centres,
    ``(y + 0.5) / tile - 0.5``; and the image must split into whole tiles (OpenCV pads it).
    """
    if clip_limit < 1.0:
        raise ValueError(f"clip_limit must be at least 1 (the flat histogram), got {clip_limit}")
    n, channels, height, width = pixels.shape
    if tiles < 1 or height % tiles or width % tiles:
        raise ValueError(f"a {height}x{width} image does not split into {tiles}x{tiles} whole tiles")
    device = pixels.device
    images = n * channels
    tile_h, tile_w = height // tiles, width // tiles
    tile_pixels = float(tile_h * tile_w)
    levels = _levels(pixels).reshape(images, height, width)

    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    tile_of = (rows // tile_h)[:, None] * tiles + (cols // tile_w)[None, :]  # [H, W]
    bins = (torch.arange(images, device=device)[:, None, None] * tiles * tiles + tile_of) * LEVELS + levels
    counts = torch.zeros(images * tiles * tiles * LEVELS, dtype=torch.float32, device=device)
    counts.scatter_add_(0, bins.reshape(-1), torch.ones(bins.numel(), dtype=torch.float32, device=device))
    counts = counts.reshape(images, tiles * tiles, LEVELS)

    limit = max(clip_limit * tile_pixels / LEVELS, 1.0)
    excess = (counts - limit).clamp_min(0).sum(-1, keepdim=True)
    counts = counts.clamp_max(limit) + excess / LEVELS
    mappings = (counts.cumsum(-1) * (255.0 / tile_pixels)).reshape(images, -1)  # [images, tiles*tiles*256]

    def neighbours(size: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two tile indices whose centres bracket each pixel along one axis, and the far one's weight."""
        position = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / tile - 0.5
        low = position.floor()
        weight = position - low
        low_index = low.long().clamp(0, tiles - 1)
        high_index = (low.long() + 1).clamp(0, tiles - 1)
        return low_index, high_index, weight

    top, bottom, down = neighbours(height, tile_h)
    left, right, across = neighbours(width, tile_w)

    def mapped(tile_rows: torch.Tensor, tile_cols: torch.Tensor) -> torch.Tensor:
        tile = tile_rows[:, None] * tiles + tile_cols[None, :]  # [H, W]
        index = (tile * LEVELS + levels).reshape(images, -1)
        return mappings.gather(1, index).reshape(images, height, width)

    across = across[None, None, :]
    down = down[None, :, None]
    upper = mapped(top, left) * (1 - across) + mapped(top, right) * across
    lower = mapped(bottom, left) * (1 - across) + mapped(bottom, right) * across
    out = (upper * (1 - down) + lower * down).round().clamp(0, 255)
    return out.reshape(n, channels, height, width)
