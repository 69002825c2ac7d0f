"""Draw a heatmap over the image the model saw, at the upload's aspect ratio, as an RGB picture.

Used by ``POST /explain`` and ``python -m app.score --heatmaps``. The model's input is the upload
squashed to a square, so each heatmap cell covers the same fraction of the upload's width and
height: stretching the square input and the map back to the upload's aspect ratio puts every
cell over the region it describes. Colours are signed: red pushed the score towards PNEUMONIA,
blue towards NORMAL, stronger for larger magnitudes relative to the map's largest ``|value|``;
cells near zero stay transparent.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.core.heatmap import Heatmap

MAX_SIDE = 512  # long side of an overlay; uploads smaller than this keep their own size
DEFAULT_OPACITY = 0.5
TOWARD_PNEUMONIA = np.array([220.0, 30.0, 30.0])
TOWARD_NORMAL = np.array([30.0, 90.0, 230.0])


def overlay_size(width: int, height: int, input_size: int) -> tuple[int, int]:
    """Output size with the upload's aspect ratio: long side min(upload's, 512), never below the model's input."""
    long_side = max(min(max(width, height), MAX_SIDE), input_size)
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_scale(heatmap: Heatmap) -> float:
    """The largest ``|value|`` of the map: the magnitude drawn at full colour."""
    return max(abs(value) for value in heatmap.values)


def render_overlay(
    pixels: torch.Tensor, heatmap: Heatmap | None, size: tuple[int, int], opacity: float = DEFAULT_OPACITY
) -> Image.Image:
    """``pixels`` (the ``uint8[1,S,S]`` model input) resized to ``size`` (w, h), the map blended at ``opacity``."""
    width, height = size
    base = Image.fromarray(pixels.reshape(pixels.shape[-2:]).numpy(), "L").resize(size, Image.Resampling.BILINEAR)
    gray = np.asarray(base, dtype=np.float64)[..., None].repeat(3, axis=2)
    if heatmap is None or opacity <= 0:
        return Image.fromarray(gray.astype(np.uint8), "RGB")
    grid = torch.tensor(heatmap.values, dtype=torch.float32).reshape(1, 1, heatmap.rows, heatmap.cols)
    smooth = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    scale = heatmap_scale(heatmap)
    signed = np.clip(smooth / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(smooth)
    color = np.where(signed[..., None] >= 0, TOWARD_PNEUMONIA, TOWARD_NORMAL)
    alpha = (min(opacity, 1.0) * np.abs(signed))[..., None]
    blended = gray * (1.0 - alpha) + color * alpha
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
