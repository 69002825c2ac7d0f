"""Issue 10, findings 2, 3, 5 and 7 in the core: damaged images are errors, costs are read from headers."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from app.core import preprocessing as imaging
from app.core.dicom import DicomPolicy
from app.core.image_headers import ImageHeader, decode_cost, jpeg_scale, read_header
from app.core.jpeg_header import JPEG_LS_SOF_MARKERS, JpegFrame, jpeg_exif, read_jpeg_frame
from tests.conftest import encode, synthetic_xray
from tests.dicom_files import Spec, chest_stored, dicom_bytes, encode_frame
from tests.hostile_inputs import (
    PNG_SIGNATURE,
    cut_with_eoi,
    gradient16,
    jpeg8,
    lossless_without_huffman_table,
    one_colour_rgba_png,
    patch_frame_size,
    png_chunk,
    png_from_rows,
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


@pytest.mark.parametrize("bits", [8, 12])
def test_a_jpeg_whose_exif_cannot_be_read_is_refused_naming_the_exif(bits: int) -> None:
    """The orientation is read before the pixels: EXIF that is no TIFF structure is corrupt, never guessed upright."""
    exif = Image.Exif()
    exif[0x0112] = 1
    payload = exif.tobytes()
    broken = payload.replace(b"Exif\0\0MM", b"Exif\0\0XX", 1)  # the TIFF byte-order mark
    if bits == 8:
        clean = encode(synthetic_xray(), "JPEG")
    else:
        clean = imagecodecs.jpeg8_encode(
            np.asarray(synthetic_xray()).astype(np.uint16) * 16, lossless=True, bitspersample=12
        )
    for exif_payload, refused in ((payload, False), (broken, True)):
        app1 = b"\xff\xe1" + (len(exif_payload) + 2).to_bytes(2, "big") + exif_payload
        data = clean[:2] + app1 + clean[2:]
        if not refused:
            assert imaging.preprocess(data, 32).shape == (1, 32, 32)
            continue
        with pytest.raises(imaging.CorruptImageError, match=r"^the JPEG's EXIF header is invalid: not a TIFF file"):
            imaging.preprocess(data, 32)


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


def test_four_component_high_precision_jpeg_is_refused_by_name() -> None:
    """A 12-bit CMYK frame: no grey conversion is defined for it, and the message says which frame was refused."""
    cmyk = np.stack([gradient16(32, 32, 4095)] * 4, -1)
    data = imagecodecs.jpeg8_encode(cmyk, lossless=True, bitspersample=12, colorspace="CMYK")
    with pytest.raises(imaging.UnsupportedImageError) as caught:
        imaging.preprocess(data, 32)
    assert caught.value.message == "12-bit JPEGs with 4 components are not supported"


def test_high_precision_jpeg_cut_short_names_the_missing_end() -> None:
    """The completeness proof's reason reaches the user, prefixed with the frame's precision."""
    data = HIGH["lossless-12"]
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(data[: len(data) // 2], 32)
    assert caught.value.message == "the 12-bit JPEG's scan data ends without an end-of-image marker"


def test_high_precision_jpeg_the_codec_refuses_says_so() -> None:
    """A 16-bit lossless JPEG without its Huffman table: libjpeg's own reason, after a stable prefix."""
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(lossless_without_huffman_table(), 32)
    assert caught.value.message.startswith("cannot decode 16-bit JPEG: ")
    assert "Huffman table" in caught.value.message


# Hand-built JPEG marker streams (ITU-T T.81 annex B), for the header parsers that run before any decoder.
SOI, EOI = b"\xff\xd8", b"\xff\xd9"


def segment(marker: int, body: bytes = b"") -> bytes:
    """A marker segment: 0xFF, the marker, a big-endian length that counts itself, then the body (B.1.1.4)."""
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def sof(
    marker: int = 0xC1, precision: int = 12, height: int = 0x0123, width: int = 0x0456, components: int = 3
) -> bytes:
    """A frame header (B.2.2): P, Y, X, Nf, then Nf component specifications (id, 1x1 sampling, table 0)."""
    specs = b"".join(bytes([index + 1, 0x11, 0]) for index in range(components))
    fields = bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components])
    return segment(marker, fields + specs)


JFIF = segment(0xE0, b"JFIF\0\x01\x02\x00\x00\x01\x00\x01\x00\x00")
SOS = segment(0xDA, bytes([1, 1, 0x00, 0, 0x3F, 0]))  # one component, then (here absent) entropy-coded data
EXIF = segment(0xE1, b"Exif\0\0MM\0*\0\0\0\x08\0\0")
XMP = segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>")
LONG_COMMENT = segment(0xFE, b"x" * 300)  # length 302 = 0x012E: both length bytes count
# The frame sof() describes: 12 bits, 0x123 rows, 0x456 columns, 3 components (no field byte equals another).
FRAME = {"precision": 12, "height": 0x0123, "width": 0x0456, "components": 3}

# T.81 table B.1: SOF0-3 Huffman, SOF5-7 differential Huffman, SOF9-11 and SOF13-15 arithmetic.
SOF_PROCESSES = {
    0xC0: (False, False),  # baseline
    0xC1: (False, False),  # extended sequential
    0xC2: (False, True),  # progressive
    0xC3: (True, False),  # lossless
    0xC5: (False, False),
    0xC6: (False, True),
    0xC7: (True, False),
    0xC9: (False, False),
    0xCA: (False, True),
    0xCB: (True, False),
    0xCD: (False, False),
    0xCE: (False, True),
    0xCF: (True, False),
}


@pytest.mark.parametrize("marker", sorted(SOF_PROCESSES), ids=hex)
def test_every_start_of_frame_marker_is_read_with_its_process(marker: int) -> None:
    lossless, progressive = SOF_PROCESSES[marker]
    data = SOI + JFIF + sof(marker) + SOS + EOI
    assert read_jpeg_frame(data) == JpegFrame(**FRAME, lossless=lossless, progressive=progressive)


@pytest.mark.parametrize(
    "before",
    [
        pytest.param(b"\xff", id="fill-byte"),
        pytest.param(b"\xff\x01", id="TEM"),
        pytest.param(b"\xff\xd0", id="RST0"),
        pytest.param(b"\xff\xd7", id="RST7"),
        pytest.param(SOI, id="second-SOI"),
        pytest.param(LONG_COMMENT, id="300-byte-comment"),
        pytest.param(segment(0xE2), id="empty-segment"),
        pytest.param(segment(0xC4, bytes(17)), id="DHT-is-not-a-frame"),
        pytest.param(segment(0xCC, b"\x00\x11"), id="DAC-is-not-a-frame"),
        pytest.param(sof(0xF7, 8, 9, 9, 1), id="JPEG-LS-frame-is-not-a-JPEG-frame"),
    ],
)
def test_what_comes_before_the_frame_is_stepped_over(before: bytes) -> None:
    """Standalone markers and fill bytes carry no length; every other segment is skipped by its own length."""
    data = SOI + JFIF + before + sof() + SOS + EOI
    assert read_jpeg_frame(data) == JpegFrame(**FRAME, lossless=False, progressive=False)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(SOI, id="only-SOI"),
        pytest.param(SOI + JFIF, id="ends-without-a-frame"),
        pytest.param(SOI + JFIF + SOS + sof() + EOI, id="scan-before-the-frame"),
        pytest.param(SOI + JFIF + b"\x00" + sof()[1:], id="no-marker-where-one-must-be"),
        pytest.param(SOI + b"\xff\xe0\x00\x00" + sof(), id="segment-length-0"),
        pytest.param(SOI + sof()[:9], id="frame-header-cut-before-Nf"),
    ],
)
def test_stream_without_a_readable_frame_has_none(data: bytes) -> None:
    assert read_jpeg_frame(data) is None


def test_frame_header_is_read_from_its_first_ten_bytes() -> None:
    """Marker, length, P, Y, X and Nf are all the parser needs: a stream cut right after Nf still has a frame."""
    assert read_jpeg_frame(SOI + sof()[:10]) == JpegFrame(**FRAME, lossless=False, progressive=False)


def test_jpeg_ls_frame_is_found_only_when_asked_for() -> None:
    data = SOI + JFIF + sof(0xF7, 16, 0x0201, 0x0302, 1) + SOS + EOI
    assert read_jpeg_frame(data) is None
    assert read_jpeg_frame(data, JPEG_LS_SOF_MARKERS) == JpegFrame(16, 0x0201, 0x0302, 1, False, False)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(SOI + EXIF + sof() + SOS, True, id="exif-first"),
        pytest.param(SOI + JFIF + EXIF + sof() + SOS, True, id="exif-after-jfif"),
        pytest.param(SOI + LONG_COMMENT + EXIF + SOS, True, id="exif-after-300-byte-comment"),
        pytest.param(SOI + JFIF + b"\xff" + EXIF + SOS, True, id="exif-after-fill-byte"),
        pytest.param(SOI + JFIF + sof() + SOS + EOI, False, id="no-app1"),
        pytest.param(SOI + XMP + sof() + SOS + EOI, False, id="app1-holding-xmp"),
        pytest.param(SOI + JFIF + sof() + SOS + EXIF + EOI, False, id="exif-after-the-scan-starts"),
        pytest.param(SOI + JFIF, False, id="ends-before-any-scan"),
        pytest.param(SOI + b"\x00" + EXIF[1:], False, id="no-marker-where-one-must-be"),
    ],
)
def test_exif_is_seen_only_in_an_app1_exif_segment_before_the_scan(data: bytes, expected: bool) -> None:
    """The EXIF parse is skipped when this finds none: it must find one exactly when Pillow would."""
    found = jpeg_exif(data)
    assert (found is not None) is expected
    assert found is None or found == EXIF[4:]  # the whole payload, its Exif header on


def png_head(colour_type: int = 6, bit_depth: int = 16, chunk: bytes = b"IHDR") -> bytes:
    """Signature and IHDR (PNG spec 11.2.2): width 0x01020304, height 0x05060708, no byte of either repeated."""
    body = (0x01020304).to_bytes(4, "big") + (0x05060708).to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return PNG_SIGNATURE + png_chunk(chunk, body)


def test_png_header_is_read_from_ihdr() -> None:
    assert read_header(png_head()) == ImageHeader("PNG", 0x01020304, 0x05060708, 4, 16)


@pytest.mark.parametrize(("colour_type", "channels"), [(0, 1), (2, 3), (3, 1), (4, 2), (6, 4), (1, None), (5, None)])
def test_png_channels_follow_the_colour_type(colour_type: int, channels: int | None) -> None:
    """Grey, RGB, palette, grey + alpha, RGBA; any other colour type is not a PNG header this reads."""
    header = read_header(png_head(colour_type, 8))
    assert (header.channels if header else None) == channels


@pytest.mark.parametrize(
    ("data", "readable"),
    [
        pytest.param(png_head()[:29], True, id="cut-after-the-ihdr-body"),
        pytest.param(png_head()[:28], False, id="cut-inside-the-ihdr-body"),
        pytest.param(png_head(chunk=b"sRGB"), False, id="first-chunk-not-ihdr"),
        pytest.param(b"\x88" + png_head()[1:], False, id="damaged-signature"),
    ],
)
def test_png_header_needs_the_signature_and_a_whole_ihdr_body(data: bytes, readable: bool) -> None:
    expected = ImageHeader("PNG", 0x01020304, 0x05060708, 4, 16) if readable else None
    assert read_header(data) == expected


def test_jpeg_header_is_read_from_the_frame() -> None:
    frame = JpegFrame(**FRAME, lossless=False, progressive=True)
    assert read_header(SOI + JFIF + sof(0xC2) + SOS + EOI) == ImageHeader("JPEG", 0x0456, 0x0123, 3, 12, frame)
    assert read_header(SOI + JFIF + SOS + EOI) is None


@pytest.mark.parametrize(
    ("width", "height", "target", "scale"),
    [
        (4000, 3000, 224, 8),  # 3000 // 224 = 13
        (1792, 1792, 224, 8),  # exactly 8 x 224
        (1791, 4000, 224, 4),  # 1791 // 224 = 7: the narrow side decides
        (4000, 1791, 224, 4),
        (448, 448, 224, 2),
        (447, 4000, 224, 1),
        (300, 4000, 224, 1),
        (4000, 300, 224, 1),
        (100, 100, 224, 1),  # smaller than the target: never scaled
        (8, 8, 1, 8),
        (8, 8, 0, 8),  # a zero target is treated as 1, not divided by
    ],
)
def test_jpeg_scale_is_the_largest_dct_scale_keeping_both_sides_at_the_target(
    width: int, height: int, target: int, scale: int
) -> None:
    assert jpeg_scale(width, height, target) == scale


def jpeg_header(width: int, height: int, precision: int = 8, components: int = 1, **process: bool) -> ImageHeader:
    frame = JpegFrame(
        precision, height, width, components, process.get("lossless", False), process.get("progressive", False)
    )
    return ImageHeader("JPEG", width, height, components, precision, frame)


@pytest.mark.parametrize(
    ("header", "cost"),
    [
        pytest.param(jpeg_header(4000, 3000, components=4), 500 * 375 * 4, id="8-bit-cmyk-keeps-4-channels"),
        pytest.param(jpeg_header(4000, 3000, components=3), 500 * 375, id="8-bit-rgb-decodes-to-grey"),
        pytest.param(jpeg_header(4001, 3001), 501 * 376, id="8-bit-scaled-sides-round-up"),
        pytest.param(
            jpeg_header(4000, 3000, components=3, progressive=True),
            500 * 375 + 4000 * 3000 * 3 * 2,
            id="8-bit-progressive-rgb-keeps-3-coefficient-planes",
        ),
        pytest.param(jpeg_header(4000, 3000, lossless=True), 4000 * 3000, id="8-bit-lossless-is-not-scaled"),
        pytest.param(jpeg_header(4000, 3000, 9, lossless=True), 4000 * 3000 * 2, id="9-bit-takes-2-bytes"),
        pytest.param(jpeg_header(4000, 3000, 12), 4000 * 3000 * 2, id="12-bit-is-not-scaled"),
        pytest.param(jpeg_header(100, 50, 16, 2, lossless=True), 100 * 50 * 2 * 2, id="16-bit-grey-alpha"),
    ],
)
def test_jpeg_decode_cost_by_process(header: ImageHeader, cost: int) -> None:
    """Only 8-bit DCT frames decode scaled (to one grey channel, four for CMYK); every other frame is full size."""
    assert decode_cost(header, 224) == cost


ENTRY_POINTS = {
    "preprocess": imaging.preprocess,
    "prepare_input": imaging.prepare_input,
    "prepare_array": imaging.prepare_array,
}


def grey_png(width: int, height: int) -> bytes:
    return png_from_rows(width, height, 8, 0, zlib.compress((b"\x00" + b"\x80" * width) * height))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(patch_frame_size(JPEG8["baseline"], 0, 300), id="jpeg-width-0"),
        pytest.param(patch_frame_size(JPEG8["baseline"], 400, 0), id="jpeg-height-0"),
        pytest.param(grey_png(0, 4), id="png-width-0"),
        pytest.param(grey_png(4, 0), id="png-height-0"),
    ],
)
def test_zero_width_or_height_header_is_corrupt(data: bytes) -> None:
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(data, 32)
    assert caught.value.message == "image header declares a zero width or height"


@pytest.mark.parametrize(("width", "height"), [(1, 5), (5, 1)])
def test_one_pixel_wide_or_tall_image_decodes_and_is_refused_as_no_film(width: int, height: int) -> None:
    image, source = imaging.decode_grayscale(grey_png(width, height), 4)
    assert (image.size, source.width, source.height) == ((width, height), width, height)
    with pytest.raises(imaging.UnsuitableShapeError, match=f"the image is {width}x{height} px; its short side must"):
        imaging.preprocess(grey_png(width, height), 4)


@pytest.mark.parametrize(
    ("width", "height", "refused"),
    [
        pytest.param(32, 32, None, id="the-input-size"),
        pytest.param(31, 64, "the image is 31x64 px; its short side must be at least the model's 32 px input", id="31"),
        pytest.param(64, 31, "the image is 64x31 px; its short side must be at least", id="31-tall"),
        pytest.param(96, 32, None, id="three-to-one"),
        pytest.param(32, 96, None, id="one-to-three"),
        pytest.param(97, 32, "the image is 97x32 px, its sides 3.03:1; a chest film's are at most 3:1", id="97"),
        pytest.param(32, 97, "the image is 32x97 px, its sides 3.03:1", id="97-tall"),
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_thumbnail_or_a_strip_is_refused_not_squashed(width: int, height: int, refused: str | None, fmt: str) -> None:
    """24 px thumbnails of NORMAL films came back PNEUMONIA (14 of 20) with the guard passing, and a 10 x 20000
    strip of a normal film PNEUMONIA 0.91: upsampling blur and a squashed strip are nothing the model saw."""
    data = encode(synthetic_xray(width, height), fmt)
    if refused is None:
        assert imaging.preprocess(data, 32).shape == (1, 32, 32)
        return
    with pytest.raises(imaging.UnsuitableShapeError, match=re.escape(refused)) as caught:
        imaging.preprocess(data, 32)
    assert caught.value.code == "unsuitable_shape"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_pixel_limit_is_inclusive_and_names_the_numbers(entry: str) -> None:
    """40 x 30 = 1200 pixels: allowed at a limit of 1200, refused at 1199, whichever entry point is called."""
    decode = ENTRY_POINTS[entry]
    decode(grey_png(40, 30), 16, max_pixels=1200)
    with pytest.raises(imaging.ImageTooLargeError) as caught:
        decode(grey_png(40, 30), 16, max_pixels=1199)
    assert caught.value.message == "image is 40x30 = 1200 pixels, over the limit of 1199"


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_decode_budget_is_inclusive_and_names_the_numbers(entry: str) -> None:
    """100 x 100 RGBA at 8 bits is 40000 bytes: allowed at a budget of 40000, refused at 39999."""
    decode = ENTRY_POINTS[entry]
    decode(one_colour_rgba_png(100, 100), 32, max_decode_bytes=40000)
    with pytest.raises(imaging.ImageTooLargeError) as caught:
        decode(one_colour_rgba_png(100, 100), 32, max_decode_bytes=39999)
    expected = "decoding this 100x100 image (4 channels of 8 bits) needs 40000 bytes, over the limit of 39999"
    assert caught.value.message == expected


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_dicom_policy_reaches_every_entry_point(entry: str) -> None:
    """A lateral view is refused by the default policy and decoded once the view check is off, wherever it enters."""
    decode = ENTRY_POINTS[entry]
    lateral = dicom_bytes(Spec(view="LAT"))
    with pytest.raises(imaging.ImageError):
        decode(lateral, 4)
    decode(lateral, 4, dicom=DicomPolicy(check_view_position=False))


def test_image_of_another_format_is_unsupported_by_its_name() -> None:
    """Pillow reads a GIF, but only JPEG, PNG and DICOM are accepted: the message names what was sent."""
    with pytest.raises(imaging.UnsupportedImageError) as caught:
        imaging.preprocess(encode(Image.new("L", (4, 4)), "GIF"), 4)
    assert caught.value.message == "GIF images are not supported; upload a JPEG, PNG or DICOM"


def test_png_whose_first_chunk_is_not_ihdr_is_corrupt_by_name() -> None:
    """Signature and an intact IEND chunk, but no IHDR: a damaged PNG (corrupt), not an unknown format."""
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(PNG_SIGNATURE + png_chunk(b"IEND", b""), 4)
    assert caught.value.message == "the file starts like a PNG but its header is invalid"


def test_two_component_8bit_jpeg_is_refused_by_name() -> None:
    data = imagecodecs.jpeg8_encode(np.zeros((16, 16, 2), dtype=np.uint8))
    with pytest.raises(imaging.UnsupportedImageError) as caught:
        imaging.preprocess(data, 16)
    assert caught.value.message == "8-bit JPEGs with 2 components are not supported"


def test_damaged_8bit_jpeg_passes_on_libjpegs_reason() -> None:
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(zero_middle(JPEG8["baseline"]), 32)
    assert caught.value.message.startswith("the JPEG data is corrupt or truncated: ")
    assert len(caught.value.message) > len("the JPEG data is corrupt or truncated: ")


def test_png_whose_pixel_data_does_not_inflate_is_corrupt() -> None:
    """Every chunk intact (CRCs right), but IDAT is not a zlib stream: the decoder's error, as corrupt data."""
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(png_from_rows(4, 4, 8, 0, b"not a zlib stream"), 4)
    assert caught.value.message.startswith("the image data is corrupt or truncated: ")


def test_file_that_is_no_image_is_unsupported_by_name() -> None:
    with pytest.raises(imaging.UnsupportedImageError) as caught:
        imaging.preprocess(b"hello, not an image", 4)
    assert caught.value.message == "the file is not a JPEG, PNG or DICOM image"


@pytest.mark.parametrize(
    ("data", "source"),
    [
        pytest.param(JPEG8["baseline"], imaging.SourceInfo("JPEG", 400, 300), id="jpeg"),
        pytest.param(grey_png(48, 36), imaging.SourceInfo("PNG", 48, 36), id="png"),
        pytest.param(HIGH["12-bit"], imaging.SourceInfo("JPEG", 400, 300, {"bits": 12}), id="12-bit"),
        pytest.param(HIGH["lossless-12"], imaging.SourceInfo("JPEG", 400, 300, {"bits": 12}), id="lossless-12"),
        pytest.param(HIGH["lossless-16"], imaging.SourceInfo("JPEG", 400, 300, {"bits": 16}), id="lossless-16"),
    ],
)
def test_source_names_the_format_and_full_size(data: bytes, source: imaging.SourceInfo) -> None:
    """12/16-bit and lossless JPEGs (400 wide, 300 tall) also name their sample precision."""
    assert imaging.prepare_input(data, 32).source == source


def test_dicom_source_names_the_format_full_size_and_encoding() -> None:
    """A 96 x 80 DICOM file (wider than tall, so the sides cannot swap) reports its transfer syntax and photometry."""
    source = imaging.prepare_input(dicom_bytes(Spec()), 32).source
    assert (source.format, source.width, source.height) == ("DICOM", 96, 80)
    assert source.details["transfer_syntax"] == uid.UID(uid.ExplicitVRLittleEndian).name
    assert source.details["photometric_interpretation"] == "MONOCHROME2"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xd8\xff\xd9", id="SOI-then-EOI"),
        pytest.param(b"\xff\xd8\xff\xda\x00\x08" + bytes(6) + b"\xff\xd9", id="scan-without-a-frame"),
    ],
)
def test_jpeg_without_a_frame_header_is_corrupt_by_name(data: bytes) -> None:
    """Starting with SOI and a marker makes it a JPEG (not "unsupported"), but one with no frame to decode."""
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(data, 4)
    assert caught.value.message == "the file starts like a JPEG but has no valid frame header"


def test_regular_file_is_read_and_prepared_with_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "chest.png"
    path.write_bytes(grey_png(40, 30))
    assert imaging.read_image_file(path) == grey_png(40, 30)
    prepared = imaging.preprocess_file(path, 4)
    assert prepared.error is None and prepared.sop_instance_uid == ""
    assert prepared.pixels is not None and prepared.pixels.tolist() == [[[128] * 4] * 4]
    assert prepared.sha256 == hashlib.sha256(grey_png(40, 30)).hexdigest()
    assert prepared.source == imaging.SourceInfo("PNG", 40, 30)


def test_file_that_is_no_image_keeps_its_digest_and_coded_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, not an image")
    prepared = imaging.preprocess_file(path, 4)
    assert prepared.pixels is None and prepared.source is None
    assert prepared.sha256 == hashlib.sha256(b"hello, not an image").hexdigest()
    assert isinstance(prepared.error, imaging.UnsupportedImageError)
    assert prepared.error.message == "the file is not a JPEG, PNG or DICOM image"


def test_limits_and_decoder_reach_preprocess_file(tmp_path: Path) -> None:
    """max_pixels and max_decode_bytes are passed on; a given decoder replaces the in-process one."""
    path = tmp_path / "chest.png"
    path.write_bytes(grey_png(40, 30))
    too_many = imaging.preprocess_file(path, 4, max_pixels=1199).error
    assert too_many is not None and too_many.message == "image is 40x30 = 1200 pixels, over the limit of 1199"
    too_big = imaging.preprocess_file(path, 4, max_decode_bytes=1199).error
    expected = "decoding this 40x30 image (1 channels of 8 bits) needs 1200 bytes, over the limit of 1199"
    assert too_big is not None and too_big.message == expected
    seen: list[bytes] = []

    def decoder(data: bytes) -> imaging.ModelInput:
        seen.append(data)
        return imaging.prepare_input(data, 2)

    prepared = imaging.preprocess_file(path, 4, decoder=decoder)
    assert seen == [grey_png(40, 30)] and prepared.pixels is not None and prepared.pixels.shape == (1, 2, 2)


def test_special_files_are_refused_by_kind_without_blocking(tmp_path: Path) -> None:
    """A FIFO would block a plain open() until a writer came; a socket cannot be opened at all."""
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        for name, kind in [(".", "a directory"), ("fifo", "a FIFO"), ("sock", "a socket")]:
            with pytest.raises(imaging.UnreadableFileError) as caught:
                imaging.read_image_file(tmp_path / name)
            assert caught.value.message == f"skipped: {kind}"
            prepared = imaging.preprocess_file(tmp_path / name, 4)
            assert prepared.sha256 == "" and prepared.error is not None and prepared.error.message == f"skipped: {kind}"
    with pytest.raises(imaging.UnreadableFileError) as caught:
        imaging.read_image_file(Path("/dev/null"))
    assert caught.value.message == "skipped: a character device"


def test_a_file_over_the_decode_budget_is_refused_unread(tmp_path: Path) -> None:
    """An archive left among the images is refused by its size alone: nothing is read into memory."""
    limit = imaging.DEFAULT_MAX_DECODE_BYTES
    archive = tmp_path / "dataset-backup.zip"
    with archive.open("wb") as handle:
        handle.truncate(limit + 1)  # sparse: no disk written, no memory read
    with pytest.raises(imaging.ImageTooLargeError) as caught:
        imaging.read_image_file(archive)
    assert caught.value.message == f"the file is {limit + 1} bytes, over the limit of {limit}"
    prepared = imaging.preprocess_file(archive, 4)
    assert prepared.sha256 == "" and prepared.error is not None and prepared.error.code == "image_too_large"
    png = tmp_path / "film.png"
    png.write_bytes(grey_png(40, 30))
    assert imaging.read_image_file(png, max_bytes=png.stat().st_size) == grey_png(40, 30)
    with pytest.raises(imaging.ImageTooLargeError):
        imaging.read_image_file(png, max_bytes=png.stat().st_size - 1)
    # procfs files say size 0 and hold more: the read itself stops at the limit
    with pytest.raises(imaging.ImageTooLargeError) as caught:
        imaging.read_image_file(Path("/proc/self/maps"), max_bytes=10)
    assert caught.value.message == "the file holds more than 10 bytes (more than its size said)"


def test_missing_file_names_the_os_error(tmp_path: Path) -> None:
    with pytest.raises(imaging.UnreadableFileError) as caught:
        imaging.read_image_file(tmp_path / "absent.png")
    assert caught.value.message == "FileNotFoundError: No such file or directory"


def test_regular_file_that_fails_to_read_names_the_os_error() -> None:
    """/proc/self/mem stats as a regular file but reading offset 0 fails with EIO: the read error, by name."""
    with pytest.raises(imaging.UnreadableFileError) as caught:
        imaging.read_image_file(Path("/proc/self/mem"))
    assert caught.value.message == "OSError: Input/output error"


@pytest.mark.parametrize("view", ["PA", "LAT"])
def test_dicom_uid_is_read_only_when_asked_even_for_a_refused_file(tmp_path: Path, view: str) -> None:
    """The UID pydicom reads is reported with --with-uids, for refused files too; never otherwise."""
    data = dicom_bytes(Spec(view=view))
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    expected = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert imaging.preprocess_file(path, 4).sop_instance_uid == ""
    prepared = imaging.preprocess_file(path, 4, with_uid=True)
    assert prepared.sop_instance_uid == expected
    assert (prepared.error is None) is (view == "PA")
    relaxed = imaging.preprocess_file(path, 4, dicom=DicomPolicy(check_view_position=False))
    assert relaxed.error is None and relaxed.pixels is not None


# Hand-built chunks (PNG spec 5.3: length, type, data, CRC-32 of type and data; IHDR first, IEND last).
GREY_4X4_IHDR = png_chunk(b"IHDR", (4).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0]))
GREY_4X4_IDAT = png_chunk(b"IDAT", zlib.compress((b"\x00" + b"\x80" * 4) * 4))
ENDS_BEFORE_IEND = "the PNG is truncated: it ends before its IEND chunk"
RUNS_PAST_THE_END = "the PNG is truncated: a chunk runs past the end of the file"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(PNG_SIGNATURE + GREY_4X4_IHDR, ENDS_BEFORE_IEND, id="ends-right-after-a-chunk"),
        pytest.param(PNG_SIGNATURE + GREY_4X4_IHDR + GREY_4X4_IDAT[:11], ENDS_BEFORE_IEND, id="ends-in-a-chunk-header"),
        pytest.param(PNG_SIGNATURE + GREY_4X4_IHDR + GREY_4X4_IDAT[:12], RUNS_PAST_THE_END, id="ends-in-chunk-data"),
        pytest.param(PNG_SIGNATURE + GREY_4X4_IHDR + GREY_4X4_IDAT[:-4], RUNS_PAST_THE_END, id="crc-missing"),
        pytest.param(PNG_SIGNATURE + GREY_4X4_IHDR + GREY_4X4_IDAT[:-2], RUNS_PAST_THE_END, id="crc-cut-in-half"),
        pytest.param(
            PNG_SIGNATURE + GREY_4X4_IHDR + GREY_4X4_IDAT[:-1] + b"\x00" + png_chunk(b"IEND", b""),
            "the PNG's 'IDAT' chunk fails its CRC check",
            id="crc-wrong",
        ),
    ],
)
def test_truncated_or_damaged_png_chunk_is_refused_with_its_exact_reason(data: bytes, message: str) -> None:
    """Each way a chunk can be cut short names where the file ends; a cut CRC is truncation, not a CRC mismatch."""
    with pytest.raises(imaging.CorruptImageError) as caught:
        imaging.preprocess(data, 4)
    assert caught.value.message == message


def test_hand_built_png_with_every_chunk_intact_decodes() -> None:
    """The control for the damaged files above: the same chunks, whole and ended by IEND, decode to mid-grey."""
    data = PNG_SIGNATURE + GREY_4X4_IHDR + GREY_4X4_IDAT + png_chunk(b"IEND", b"")
    assert imaging.preprocess(data, 4).tolist() == [[[128] * 4] * 4]
