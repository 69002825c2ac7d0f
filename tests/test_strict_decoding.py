"""Issue 10, findings 2, 3, 5 and 7 in the core: damaged images are errors, costs are read from headers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import uid

from app.core import preprocessing as imaging
from app.core.image_headers import decode_cost, read_header
from tests.conftest import encode, synthetic_xray
from tests.dicom_files import Spec, chest_stored, dicom_bytes, encode_frame
from tests.hostile_inputs import (
    cut_with_eoi,
    gradient16,
    jpeg8,
    one_colour_rgba_png,
    patch_frame_size,
    png_with_bad_ihdr_crc,
    two_channel_jpeg,
    zero_middle,
)

JPEG8 = {
    "baseline": jpeg8(),
    "progressive": jpeg8(progressive=True),
    "rgb": jpeg8(mode="RGB"),
    "cmyk": jpeg8(mode="CMYK"),
}


def high_precision() -> dict[str, bytes]:
    import imagecodecs

    grey = gradient16(400, 300, 4095)
    return {
        "12-bit": imagecodecs.jpeg8_encode(grey, bitspersample=12, level=90),
        "lossless-12": imagecodecs.jpeg8_encode(grey, lossless=True, bitspersample=12),
        "lossless-16": imagecodecs.jpeg8_encode(gradient16(400, 300), lossless=True, bitspersample=16),
    }


HIGH = high_precision()


@pytest.mark.parametrize("kind", sorted(JPEG8))
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: cut_with_eoi(d), id="cut-in-half-with-eoi"),
        pytest.param(lambda d: cut_with_eoi(d, 0.95), id="cut-near-end-with-eoi"),
        pytest.param(lambda d: zero_middle(d), id="middle-zeroed"),
        pytest.param(lambda d: patch_frame_size(d, 10000, 10000), id="header-10000x10000"),
        pytest.param(lambda d: patch_frame_size(d, 200, 150), id="header-smaller-than-data"),
    ],
)
def test_damaged_8bit_jpeg_is_corrupt(kind: str, damage) -> None:
    with pytest.raises(imaging.CorruptImageError):
        imaging.preprocess(damage(JPEG8[kind]), 32)


@pytest.mark.parametrize("kind", sorted(HIGH))
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: cut_with_eoi(d), id="cut-in-half-with-eoi"),
        pytest.param(lambda d: cut_with_eoi(d, 0.9), id="cut-near-end-with-eoi"),
        pytest.param(lambda d: d[: len(d) // 2], id="cut-without-eoi"),
        pytest.param(lambda d: patch_frame_size(d, 400, 3000), id="header-taller-than-data"),
    ],
)
def test_damaged_high_precision_jpeg_is_corrupt(kind: str, damage) -> None:
    with pytest.raises(imaging.CorruptImageError):
        imaging.preprocess(damage(HIGH[kind]), 32)


@pytest.mark.parametrize("kind", sorted(HIGH))
def test_intact_high_precision_jpeg_still_decodes(kind: str) -> None:
    assert imaging.preprocess(HIGH[kind], 32).shape == (1, 32, 32)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "rgb", "cmyk"])
@pytest.mark.parametrize("size", [32, 224])
def test_strict_decoder_gives_pillow_draft_pixels(kind: str, size: int) -> None:
    """No train/serve skew from the switch: the same pixels Pillow's draft decode gave (the shipped model's)."""
    data = encode(synthetic_xray(1234, 999, 2, {"rgb": "RGB", "cmyk": "CMYK"}.get(kind, "L")), "JPEG", quality=90)
    img = Image.open(io.BytesIO(data))
    img.draft("L" if img.mode in ("L", "RGB") else img.mode, (size, size))
    expected = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    assert np.array_equal(imaging.preprocess(data, size)[0].numpy(), expected)


def test_exif_orientation_is_applied() -> None:
    img = synthetic_xray(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    rotated = imaging.prepare_input(encode(img, "JPEG", quality=95, exif=exif), 32)
    assert (rotated.source.width, rotated.source.height) == (60, 120)
    upright = imaging.resize_square(img.transpose(Image.Transpose.ROTATE_270), 32).astype(int)
    assert np.abs(rotated.pixels[0].numpy().astype(int) - upright).mean() < 4


@pytest.mark.parametrize("lossless", [False, True])
def test_two_channel_high_precision_jpeg_is_grey_over_black(lossless: bool) -> None:
    """Finding 3: was a 500 (2 channels x 3 colour weights); opaque grey + alpha equals the grey alone."""
    opaque = imaging.preprocess(two_channel_jpeg(12, lossless), 32)
    grey = gradient16(96, 80, 4095)
    expected = imaging.resize_square(Image.fromarray(np.rint(grey / 16.0).clip(0, 255).astype(np.uint8)), 32)
    assert np.abs(opaque[0].numpy().astype(int) - expected.astype(int)).max() <= 2
    half = imaging.preprocess(two_channel_jpeg(12, lossless, alpha=2048), 32)
    assert abs(float(half.float().mean()) - float(opaque.float().mean()) / 2) < 3


def test_png_with_bad_ihdr_checksum_is_corrupt_not_unsupported() -> None:
    """Finding 7: was UnsupportedImageError (415)."""
    with pytest.raises(imaging.CorruptImageError, match="CRC"):
        imaging.preprocess(png_with_bad_ihdr_crc(), 32)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[: len(d) // 2], id="cut-in-half"),
        pytest.param(lambda d: d[:-12], id="no-iend"),
        pytest.param(lambda d: zero_middle(d), id="middle-zeroed"),
    ],
)
def test_damaged_png_is_corrupt(damage) -> None:
    with pytest.raises(imaging.CorruptImageError):
        imaging.preprocess(damage(encode(synthetic_xray(200, 160), "PNG")), 32)


def test_decode_cost_counts_channels_and_bit_depth() -> None:
    """Finding 5: the cost is pixels x channels x bytes per sample, from the header alone."""
    bomb = one_colour_rgba_png(9999, 9999)
    assert len(bomb) < 2_000_000
    header = read_header(bomb)
    assert header is not None and (header.width, header.height, header.channels, header.bits) == (9999, 9999, 4, 8)
    assert decode_cost(header, 224) == 9999 * 9999 * 4
    grey16 = read_header(encode(Image.fromarray(gradient16(300, 200)), "PNG"))
    assert grey16 is not None and decode_cost(grey16, 224) == 300 * 200 * 2
    # An 8-bit JPEG decodes DCT-scaled to one grey channel; a progressive one also keeps its coefficients.
    baseline = read_header(jpeg8(4000, 3000))
    progressive = read_header(jpeg8(4000, 3000, progressive=True))
    assert baseline is not None and decode_cost(baseline, 224) == 500 * 375
    assert progressive is not None and decode_cost(progressive, 224) == 500 * 375 + 4000 * 3000 * 2


def test_bomb_under_the_pixel_limit_is_refused_by_cost_before_decoding() -> None:
    bomb = one_colour_rgba_png(9999, 9999)
    with pytest.raises(imaging.ImageTooLargeError, match="4 channels of 8 bits"):
        imaging.preprocess(bomb, 32, max_pixels=100_000_000, max_decode_bytes=9999 * 9999 * 4 - 1)


def test_rgba_over_black_matches_compositing() -> None:
    rgba = np.dstack([np.asarray(synthetic_xray(64, 64).convert("RGB")), np.linspace(0, 255, 64 * 64).reshape(64, 64)])
    img = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    composited = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img).convert("L")
    ours = imaging.preprocess(encode(img, "PNG"), 64)[0].numpy().astype(int)
    assert np.abs(ours - np.asarray(composited).astype(int)).max() <= 1


@pytest.mark.parametrize("syntax", [uid.JPEGLosslessSV1, uid.JPEGExtended12Bit, uid.JPEGBaseline8Bit])
def test_dicom_jpeg_frame_cut_short_is_corrupt(syntax: str) -> None:
    """The JPEG frames inside DICOM files get the same completeness proof as JPEG uploads."""
    spec = Spec(bits_stored=8 if syntax == uid.JPEGBaseline8Bit else 12, syntax=syntax)
    stored = chest_stored(spec, 200, 160).astype(np.uint8 if spec.bits_stored == 8 else np.uint16)
    frame = encode_frame(stored, spec)
    assert imaging.preprocess(dicom_bytes(spec, stored, frame), 32).shape == (1, 32, 32)
    cut = cut_with_eoi(frame, 0.6)
    with pytest.raises(imaging.CorruptImageError):
        imaging.preprocess(dicom_bytes(spec, stored, cut + b"\0" * (len(cut) % 2)), 32)
