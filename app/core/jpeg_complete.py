"""Decode a JPEG with imagecodecs and prove its scans were complete, which imagecodecs cannot say itself.

libjpeg-turbo answers a scan that runs out of data (a cut file, an end-of-image marker pasted in
early, a frame header claiming more rows than the data holds) with a warning and fills the rest
with grey; imagecodecs drops the warning. But a scan whose data covers every sample never reads
past its end, so decoding again with extra bytes after every entropy-coded segment (before each
restart marker and each scan's closing marker) must give the same samples. A scan cut short
would read those bytes instead of the zeros libjpeg fills in, and the two decodes differ.

Used for 12/16-bit and lossless JPEG uploads and for the JPEG frames inside DICOM files. (8-bit
uploads are decoded by simplejpeg, which raises libjpeg's warnings itself.) Not caught: damage
that leaves every scan at its full length, such as overwritten bytes in the middle.
"""

from __future__ import annotations

import imagecodecs
import numpy as np

# No 0xFF, so they never form a marker; pseudo-random, so a decoder that reads them decodes something.
_PROBE_PADDING = bytes(np.random.default_rng(20240601).integers(0, 255, 64, dtype=np.uint8))


class IncompleteJpegError(ValueError):
    """The JPEG's scan data ends before its last sample, or its marker structure is broken."""


def entropy_segment_ends(data: bytes) -> list[int]:
    """Offsets where an entropy-coded segment ends (before each RSTn and each scan's closing marker)."""
    ends: list[int] = []
    pos, size = 2, len(data)
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            raise IncompleteJpegError(f"marker structure is broken (no marker at offset {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            return ends
        if pos + 4 > size:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            raise IncompleteJpegError(f"marker structure is broken (a segment of length {length})")
        pos += 2 + length
        if marker != 0xDA:
            continue
        while True:  # entropy-coded data: 0xFF is followed by 0x00 (stuffing), RSTn, or the next marker
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= size:
                raise IncompleteJpegError("scan data ends without an end-of-image marker")
            following = data[pos + 1]
            if following == 0x00:
                pos += 2
            elif 0xD0 <= following <= 0xD7:
                ends.append(pos)
                pos += 2
            elif following == 0xFF:
                pos += 1
            else:
                ends.append(pos)
                break
    raise IncompleteJpegError("data ends without an end-of-image marker")


def _with_probe_padding(data: bytes, ends: list[int]) -> bytes:
    parts, start = [], 0
    for end in ends:
        parts += [data[start:end], _PROBE_PADDING]
        start = end
    parts.append(data[start:])
    return b"".join(parts)


def decode_complete_jpeg(data: bytes) -> np.ndarray:
    """``imagecodecs.jpeg8_decode(data)``, or :class:`IncompleteJpegError` when a scan ends before its last sample.

    imagecodecs' own errors (a missing table, a bad header) propagate unchanged.
    """
    ends = entropy_segment_ends(data)
    decoded = np.asarray(imagecodecs.jpeg8_decode(data))
    probe = np.asarray(imagecodecs.jpeg8_decode(_with_probe_padding(data, ends)))
    if probe.shape != decoded.shape or not np.array_equal(probe, decoded):
        raise IncompleteJpegError("scan data ends before its last pixel")
    return decoded
