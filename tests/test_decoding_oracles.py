"""Decoding checked against answers known by construction, never against the decoder itself."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from app.core.preprocessing import preprocess
from tests.conftest import encode

SIDE = 32


def quadrant_image() -> np.ndarray:
    """Top-left quadrant white, the rest black: where the white block ends up tells the orientation."""
    pixels = np.zeros((SIDE, SIDE), dtype=np.uint8)
    pixels[: SIDE // 2, : SIDE // 2] = 255
    return pixels


def bright_quadrant(pixels: np.ndarray) -> str:
    half = SIDE // 2
    means = {
        "top-left": pixels[:half, :half].mean(),
        "top-right": pixels[:half, half:].mean(),
        "bottom-left": pixels[half:, :half].mean(),
        "bottom-right": pixels[half:, half:].mean(),
    }
    return max(means, key=lambda name: means[name])


# EXIF orientation -> where the stored top-left block must appear once the image is upright
# (EXIF 2.3, tag 0x0112: 3 = rotate 180, 6 = rotate 90 clockwise to view, 8 = 90 anticlockwise,
# 2 = mirror horizontally).
EXPECTED_CORNER = {1: "top-left", 2: "top-right", 3: "bottom-right", 6: "top-right", 8: "bottom-left"}


@pytest.mark.parametrize("orientation", sorted(EXPECTED_CORNER))
def test_exif_orientation_is_applied(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(quadrant_image(), "L"), "JPEG", quality=100, exif=exif.tobytes())
    pixels = preprocess(data, SIDE)[0].numpy()
    assert bright_quadrant(pixels) == EXPECTED_CORNER[orientation]
    assert pixels.max() > 200 and pixels.min() < 50  # still the same two-tone picture, only moved


def test_twelve_bit_lossless_ramp_becomes_the_hand_computed_eight_bit_ramp() -> None:
    """A 12-bit value v must become round(v / 16), ties to even (4095 -> 255, never clipped to all-white)."""
    ramp = (np.arange(SIDE * SIDE, dtype=np.uint16) * 4).reshape(SIDE, SIDE)  # 0 .. 4092 in steps of 4
    data = imagecodecs.jpeg8_encode(ramp, lossless=True, bitspersample=12)
    assert imagecodecs.jpeg8_decode(data).tolist() == ramp.tolist()  # the fixture itself is lossless
    expected = [[min(255, round(v / 16)) for v in row] for row in ramp.tolist()]
    assert preprocess(data, SIDE)[0].tolist() == expected


def test_sixteen_bit_png_ramp_becomes_the_hand_computed_eight_bit_ramp() -> None:
    ramp = (np.arange(SIDE * SIDE, dtype=np.uint32) * 64).reshape(SIDE, SIDE).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    expected = [[int(v * 255 / 65535 + 0.5) for v in row] for row in ramp.tolist()]  # never a tie: 510v != 65535(2k+1)
    assert preprocess(data, SIDE)[0].tolist() == expected
