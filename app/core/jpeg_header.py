"""Read a JPEG start-of-frame header without decoding: the size and precision decide how (and whether) to decode.

Used for plain JPEG uploads and for the JPEG and JPEG-LS frames inside DICOM files, whose
size must be checked against the DICOM header before a decoder allocates anything.
"""

from __future__ import annotations

from dataclasses import dataclass

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic).
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# JPEG-LS (ISO 14495-1) start of frame; same field layout as the markers above.
JPEG_LS_SOF_MARKERS = frozenset({0xF7})
_LOSSLESS_SOF = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


@dataclass(frozen=True)
class JpegFrame:
    """The fields of a JPEG start-of-frame header that decide how to decode it."""

    precision: int
    height: int
    width: int
    components: int
    lossless: bool
    progressive: bool = False  # keeps every DCT coefficient of the full image until its last scan


def read_jpeg_frame(data: bytes, markers: frozenset[int] = SOF_MARKERS) -> JpegFrame | None:
    """Parse the first start-of-frame header among ``markers``; ``None`` when there is none."""
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
        if marker in markers:
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
