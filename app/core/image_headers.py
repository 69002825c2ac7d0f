"""Read what an image will cost to decode from its header alone, in pure Python.

The decode pool reads this in the serving process (no native code touches the upload there) to
route large decodes through a bounded lane, and preprocessing checks it before any decoder
allocates: the cost is what the decoder will allocate (pixels x channels x bytes per sample),
not only width x height, so a small file cannot ask for gigabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.core.jpeg_header import JpegFrame, read_jpeg_frame

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> samples per pixel (grey, RGB, palette, grey+alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# libjpeg's DCT scaling factors that Pillow's draft mode uses; preprocessing decodes with the same ones.
JPEG_SCALES = (8, 4, 2, 1)


@dataclass(frozen=True)
class ImageHeader:
    """Size and sample layout as declared by the file, before any decoding."""

    format: str  # "JPEG" or "PNG"
    width: int
    height: int
    channels: int
    bits: int
    jpeg: JpegFrame | None = None


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
