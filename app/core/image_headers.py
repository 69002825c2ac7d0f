"""Read what an image will cost to decode from its header alone, in pure Python.

The decode pool reads this in the serving process (no native code touches the upload there) to
route large decodes through a bounded lane, and preprocessing checks it before any decoder
allocates: the cost is what the decoder will allocate (pixels x channels x bytes per sample),
not only width x height, so a small file cannot ask for gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_LOSSLESS_SOF = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
# PNG colour type -> samples per pixel (grey, RGB, palette, grey+alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# libjpeg's DCT scaling factors that Pillow's draft mode uses; preprocessing decodes with the same ones.
JPEG_SCALES = (8, 4, 2, 1)


@dataclass(frozen=True)
class JpegFrame:
    """The fields of a JPEG start-of-frame header that decide how to decode it."""

    precision: int
    height: int
    width: int
    components: int
    lossless: bool
    progressive: bool = False


@dataclass(frozen=True)
class ImageHeader:
    """Size and sample layout as declared by the file, before any decoding."""

    format: str  # "JPEG" or "PNG"
    width: int
    height: int
    channels: int
    bits: int
    jpeg: JpegFrame | None = None


def read_jpeg_frame(data: bytes) -> JpegFrame | None:
    """Parse the first SOF header without decoding; ``None`` when there is none."""
    pos = 2
    size = len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS:
            if pos + 10 > size:
                return None
            return JpegFrame(
                precision=data[pos + 4],
                height=int.from_bytes(data[pos + 5 : pos + 7], "big"),
                width=int.from_bytes(data[pos + 7 : pos + 9], "big"),
                components=data[pos + 9],
                lossless=marker in _LOSSLESS_SOF,
                progressive=marker in _PROGRESSIVE_SOF,
            )
        if marker == 0xDA or length < 2:  # start of scan before any frame: malformed
            return None
        pos += 2 + length
    return None


def jpeg_has_exif(data: bytes) -> bool:
    """Whether an APP1 Exif segment comes before the first scan (most X-ray JPEGs have none)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xDA:
            return False
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            return True
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def read_header(data: bytes) -> ImageHeader | None:
    """The JPEG frame or PNG IHDR of ``data``; ``None`` for other formats or an unreadable header."""
    if data.startswith(JPEG_MAGIC):
        frame = read_jpeg_frame(data)
        if frame is None:
            return None
        return ImageHeader("JPEG", frame.width, frame.height, frame.components, frame.precision, frame)
    if data.startswith(PNG_MAGIC) and len(data) >= 29 and data[12:16] == b"IHDR":
        channels = _PNG_CHANNELS.get(data[25])
        if channels is None:
            return None
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return ImageHeader("PNG", width, height, channels, data[24])
    return None


def jpeg_scale(width: int, height: int, target_size: int) -> int:
    """The DCT scale denominator Pillow's draft mode picks: the largest of 8/4/2/1 keeping both sides >= target."""
    fits = max(1, min(width // max(target_size, 1), height // max(target_size, 1)))
    return next(scale for scale in JPEG_SCALES if scale <= fits)


def decode_cost(header: ImageHeader, target_size: int) -> int:
    """Bytes the decoder allocates for the decoded samples of this image.

    8-bit JPEGs are decoded scaled down by DCT scaling to one grey channel (four for CMYK), but
    progressive ones keep every DCT coefficient of the full image (2 bytes each) until the last
    scan. Everything else is decoded at full size: pixels x channels x bytes per sample.
    """
    width, height = header.width, header.height
    sample_bytes = 2 if header.bits > 8 else 1
    frame = header.jpeg
    if frame is not None and frame.precision == 8 and not frame.lossless:
        scale = jpeg_scale(width, height, target_size)
        out_channels = 4 if frame.components == 4 else 1
        cost = math.ceil(width / scale) * math.ceil(height / scale) * out_channels
        if frame.progressive:
            cost += width * height * frame.components * 2
        return cost
    return width * height * header.channels * sample_bytes
