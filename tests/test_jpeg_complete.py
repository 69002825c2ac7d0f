"""The scan-completeness probe (app/core/jpeg_complete.py) against hand-built marker streams and real JPEGs.

The offsets below are counted by hand from the byte strings, not computed by the code under test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.core.jpeg_complete import (
    _PROBE_PADDING,
    IncompleteJpegError,
    _with_probe_padding,
    decode_complete_jpeg,
    entropy_segment_ends,
)
from tests.conftest import encode, synthetic_xray

# offset:  0 1  2 3  4 5  6 7  8 9 10 11 12   13  14 15  16   17 18  19   20 21 22   23   24 25
# bytes:   SOI   DQT(len 4)   SOS (len 3)    data FF00 data  RST0 data   fill RST1 data   EOI
ONE_SCAN = bytes.fromhex("FFD8 FFDB0004AABB FFDA0003CC 12 FF00 34 FFD0 56 FFFFD1 78 FFD9".replace(" ", ""))

# Two scans, as in a progressive file: the first ends at the DHT marker (offset 11), the second at EOI (23).
# offset:  0 1  2 3 4 5 6   7   8 9  10  11 12 13 14  15 16 17 18 19  20  21 22  23 24
TWO_SCANS = bytes.fromhex("FFD8 FFDA0003CC 11 FF00 22 FFC40002 FFDA0003CC 33 FF00 FFD9".replace(" ", ""))


def test_segment_ends_before_restart_markers_and_the_closing_marker() -> None:
    # Stuffed FF00 is data, fill bytes (FF FF) move to the marker's own FF, and every RSTn ends a segment.
    assert entropy_segment_ends(ONE_SCAN) == [17, 21, 24]


def test_segment_ends_of_every_scan() -> None:
    assert entropy_segment_ends(TWO_SCANS) == [11, 23]


def test_fill_bytes_between_segments_are_skipped() -> None:
    assert entropy_segment_ends(bytes.fromhex("FFD8FFFFD9")) == []  # one fill byte
    assert entropy_segment_ends(bytes.fromhex("FFD8FFFFFFD9")) == []  # two


def test_the_last_restart_marker_and_an_empty_interval() -> None:
    # offset: 0 1  2 3 4 5 6  7   8 9    10 11: RST7 (the last RSTn) right before EOI.
    assert entropy_segment_ends(bytes.fromhex("FFD8FFDA0003CC11FFD7FFD9")) == [8, 10]


def test_a_segment_longer_than_255_bytes() -> None:
    """Both bytes of the big-endian length count: a 258-byte comment segment, then EOI."""
    data = bytes.fromhex("FFD8FFFE0102") + bytes(256) + bytes.fromhex("FFD9")
    assert entropy_segment_ends(data) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex("FFD800FFD9"), "marker structure is broken (no marker at offset 2)"),
        (bytes.fromhex("FFD8FFDB0001FFD9"), "marker structure is broken (a segment of length 1)"),
        (bytes.fromhex("FFD8FFDA0003CC1234"), "scan data ends without an end-of-image marker"),
        (bytes.fromhex("FFD8FFDA0003CC12FF"), "scan data ends without an end-of-image marker"),
        (bytes.fromhex("FFD8FFDB00"), "data ends without an end-of-image marker"),
        (bytes.fromhex("FFD8FFDB0004AABB"), "data ends without an end-of-image marker"),
        # A start-of-image marker inside scan data is no restart marker: the scan ends there, and what
        # follows is no valid segment.
        (bytes.fromhex("FFD8FFDA0003CC11FFD8FFD9"), "data ends without an end-of-image marker"),
    ],
    ids=["no_marker", "short_length", "cut_in_scan", "cut_after_ff", "cut_in_header", "no_eoi", "soi_in_scan"],
)
def test_broken_structures_are_refused_with_their_reason(data: bytes, message: str) -> None:
    with pytest.raises(IncompleteJpegError) as raised:
        entropy_segment_ends(data)
    assert str(raised.value) == message


def test_padding_goes_in_front_of_every_segment_end() -> None:
    pad = _PROBE_PADDING
    assert b"\xff" not in pad and len(pad) == 64
    assert _with_probe_padding(ONE_SCAN, [17, 21, 24]) == (
        ONE_SCAN[:17] + pad + ONE_SCAN[17:21] + pad + ONE_SCAN[21:24] + pad + ONE_SCAN[24:]
    )


def test_a_complete_progressive_jpeg_decodes_to_what_pillow_decodes() -> None:
    """Several scans, so the probe pads several segments; complete data must decode unchanged."""
    data = encode(synthetic_xray(64, 48, seed=5), "JPEG", progressive=True, quality=90)
    assert len(entropy_segment_ends(data)) > 2
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    np.testing.assert_array_equal(np.squeeze(decode_complete_jpeg(data)), expected)


def test_a_progressive_jpeg_cut_short_is_refused() -> None:
    """The last scan loses its tail and an end-of-image marker is pasted on: libjpeg would fill grey."""
    data = encode(synthetic_xray(64, 48, seed=5), "JPEG", progressive=True, quality=90)
    last_end = entropy_segment_ends(data)[-1]
    cut = data[: last_end - 40] + b"\xff\xd9"
    with pytest.raises(IncompleteJpegError) as raised:
        decode_complete_jpeg(cut)
    assert str(raised.value) == "scan data ends before its last pixel"
