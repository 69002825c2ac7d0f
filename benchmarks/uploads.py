"""The upload set every benchmark part shares, so decode, naive and service numbers are comparable.

Real large X-rays come from a read-only shared folder (never committed); synthetic ones are
generated at run time at realistic upload sizes (1-3 MP, 200-800 KB) because phone photos
and scanner exports, not the 224 px training crops, are what a clinic actually uploads.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "large-uploads"
TARGET_BYTES = (200_000, 800_000)


@dataclass(frozen=True)
class Upload:
    """One encoded image as a client would send it."""

    name: str
    data: bytes
    width: int
    height: int


def xray_like(width: int, height: int, seed: int) -> np.ndarray:
    """Grayscale chest-like structure (two lung fields, ribs, spine) plus film-grain noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = yy / height, xx / width
    img = 70 + 50 * np.sin(y * (18.0 + seed % 5)) ** 2  # rib-like bands
    for cx in (0.3, 0.7):
        img += 90 * np.exp(-(((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2))  # lung fields
    img += 60 * np.exp(-(((x - 0.5) / 0.04) ** 2))  # spine
    img += rng.normal(0, 9.0, size=(height, width)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_to_size(pixels: np.ndarray, target: int) -> bytes:
    """JPEG-encode at the quality whose size lands closest to ``target`` bytes (binary search)."""
    img = Image.fromarray(pixels, "L")
    lo, hi, best = 30, 98, b""
    while lo <= hi:
        quality = (lo + hi) // 2
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        data = buffer.getvalue()
        if not best or abs(len(data) - target) < abs(len(best) - target):
            best = data
        if len(data) < target:
            lo = quality + 1
        else:
            hi = quality - 1
    return best


def synthetic_uploads(count: int, seed: int = 0) -> list[Upload]:
    """``count`` JPEGs of 1-3 megapixels aimed at 200-800 KB each, deterministic per seed."""
    rng = np.random.default_rng(seed)
    uploads = []
    for index in range(count):
        megapixels = rng.uniform(1.0, 3.0)
        aspect = rng.uniform(0.75, 1.35)
        width = int((megapixels * 1e6 * aspect) ** 0.5)
        height = int(megapixels * 1e6 / width)
        target = int(rng.uniform(*TARGET_BYTES))
        data = encode_to_size(xray_like(width, height, seed * 1000 + index), target)
        uploads.append(Upload(f"synthetic-{index}.jpeg", data, width, height))
    return uploads


def real_uploads(root: Path = DEFAULT_REAL_DIR) -> list[Upload]:
    """The large real-looking X-rays under ``root`` (empty list when the folder is absent)."""
    uploads = []
    for path in sorted(root.glob("**/*.jpeg")) if root.is_dir() else []:
        with Image.open(path) as img:
            uploads.append(Upload(path.name, path.read_bytes(), img.width, img.height))
    return uploads
