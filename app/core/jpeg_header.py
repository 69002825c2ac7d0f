"""Read a JPEG start-of-frame header without decoding: the size and precision decide how (and whether) to decode.

Used for plain JPEG uploads and for the JPEG and JPEG-LS frames inside DICOM files, whose
size must be checked against the DICOM header before a decoder allocates anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# JPEG-LS (ISO 14495-1) start of frame; same field layout as the markers above.
JPEG_LS_SOF_MARKERS = frozenset({0xF7})
_LOSSLESS_SOF = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Markers without a length: SOI, TEM and the restart markers RST0-7.
_STANDALONE = frozenset({0xD8, 0x01, *range(0xD0, 0xD8)})
_FILL = re.compile(rb"\xff*")
# Bounds on the walk to the frame header; real files stay far below both (an ICC profile, the longest
# run of segments in practice, is split into at most 255), so a header past them is treated as unreadable.
MAX_SEGMENTS = 1024  # markers before the frame header
MAX_FILL = 64 * 1024  # fill bytes (0xFF) before markers, all together


@dataclass(frozen=True)
class JpegFrame:
    """The fields of a JPEG start-of-frame header that decide how to decode it."""

    precision: int
    height: int
    width: int
    components: int
    lossless: bool
    progressive: bool = False  # keeps every DCT coefficient of the full image until its last scan


def _markers(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset, marker) of each marker after SOI, in order, up to the first scan.

    Fill bytes (0xFF) and standalone markers are stepped over, every other segment by its length;
    the walk stops at a byte that is no marker, a length under 2, a scan, or the end. It runs on the
    serving process's event loop (the decode pool routes by it), so a crafted header must cost
    microseconds however it is padded: a run of fill bytes is skipped by one C-level match, and the
    walk gives up (no frame) past ``MAX_SEGMENTS`` markers or ``MAX_FILL`` fill bytes.
    """
    pos, size, fill_left = 2, len(data), MAX_FILL
    for _ in range(MAX_SEGMENTS):
        if pos + 4 > size or data[pos] != 0xFF:
            return
        if data[pos + 1] == 0xFF:  # fill bytes: the marker's own 0xFF is the last of the run
            fill = _FILL.match(data, pos + 1, pos + 2 + fill_left).end() - pos - 1
            if fill > fill_left:
                return
            pos, fill_left = pos + fill, fill_left - fill
            if pos + 4 > size:
                return
        marker = data[pos + 1]
        yield pos, marker
        if marker in _STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA or length < 2:  # a scan, or a malformed segment: no header follows
            return
        pos += 2 + length


def read_jpeg_frame(data: bytes, markers: frozenset[int] = SOF_MARKERS) -> JpegFrame | None:
    """Parse the first start-of-frame header among ``markers``; ``None`` when there is none."""
    for pos, marker in _markers(data):
        if marker in markers:
            if pos + 10 > len(data):
                return None
            return JpegFrame(
                precision=data[pos + 4],
                height=int.from_bytes(data[pos + 5 : pos + 7], "big"),
                width=int.from_bytes(data[pos + 7 : pos + 9], "big"),
                components=data[pos + 9],
                lossless=marker in _LOSSLESS_SOF,
                progressive=marker in _PROGRESSIVE_SOF,
            )
    return None


def jpeg_exif(data: bytes) -> bytes | None:
    """The first APP1 Exif segment's payload (its ``Exif`` header on) before the first scan; most X-ray JPEGs have none.

    Found by the marker walk rather than by Pillow, which cannot open 12/16-bit or lossless JPEGs.
    """
    for pos, marker in _markers(data):
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            return data[pos + 4 : pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")]
    return None
