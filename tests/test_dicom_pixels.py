"""The VOI window and LUT lookup of ``app.core.dicom_pixels`` at their edges, with numbers from the standard.

``tests/test_dicom.py`` checks whole files against an independent implementation; these check the
two formulas where files rarely go: below and above the window, a window one unit wide, widths
just under the limits, LUT indices outside the table. Every expected value is worked out by hand
from PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT, SIGMOID) and C.11.1 (LUTs).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from app.core import dicom_pixels
from app.core.dicom_pixels import Display, Lut, Window, _lookup, _weighted_percentiles, _window, to_display
from app.core.image_errors import CorruptImageError
from tests.dicom_files import Spec, chest_stored, expected_display


def _levels(center: float, width: float, function: str, values: list[float]) -> list[float]:
    return _window(np.array(values, dtype=np.float64), Window(center, width, function)).tolist()  # type: ignore[arg-type]


def test_linear_window_follows_the_standard_and_stays_in_0_1() -> None:
    # c = 100, w = 11: black at or below 94.5, white above 104.5, ((x - 99.5) / 10 + 0.5) between.
    got = _levels(100, 11, "LINEAR", [-5000, 94, 95, 99.5, 104, 105, 70000])
    assert got == pytest.approx([0.0, 0.0, 0.05, 0.5, 0.95, 1.0, 1.0])


def test_linear_window_one_unit_wide_is_a_threshold_at_center_minus_half() -> None:
    assert _levels(100, 1, "LINEAR", [98.5, 99, 99.5, 99.6, 100, 101]) == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_linear_window_between_one_and_two_units_is_a_steep_ramp() -> None:
    # w = 1.5: (x - 99.5) / 0.5 + 0.5
    assert _levels(100, 1.5, "LINEAR", [99, 99.5, 99.7, 100]) == pytest.approx([0.0, 0.5, 0.9, 1.0])


def test_linear_exact_window_follows_the_standard_and_allows_widths_under_one() -> None:
    # c = 10, w = 0.5: (x - 10) / 0.5 + 0.5
    assert _levels(10, 0.5, "LINEAR_EXACT", [-100, 9.75, 9.9, 10, 10.2, 100]) == pytest.approx(
        [0.0, 0.0, 0.3, 0.5, 0.9, 1.0]
    )


def test_sigmoid_window_saturates_far_from_the_centre_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp overflows far below the centre: that must stay silent
        got = _levels(0, 10, "SIGMOID", [-1e5, -10, 0, 10, 1e5])
    assert got == pytest.approx([0.0, 1 / (1 + np.exp(4)), 0.5, 1 / (1 + np.exp(-4)), 1.0])


@pytest.mark.parametrize(
    ("width", "function", "message"),
    [
        (0.5, "LINEAR", "the DICOM Window Width is below 1, which LINEAR windowing does not allow"),
        (0.0, "LINEAR_EXACT", "the DICOM Window Width must be positive"),
        (-3.0, "SIGMOID", "the DICOM Window Width must be positive"),
    ],
)
def test_impossible_window_widths_are_refused_with_their_reason(width: float, function: str, message: str) -> None:
    with pytest.raises(CorruptImageError) as caught:
        _levels(100, width, function, [100])
    assert caught.value.message == message


def test_lut_lookup_clamps_below_and_above_the_table() -> None:
    lut = Lut(first_mapped=100, bits=8, data=np.array([10, 20, 30, 40]))
    got = _lookup(np.array([-7.0, 99.0, 100.0, 101.5, 103.0, 104.0, 5000.0]), lut)
    assert got.dtype == np.float64
    assert got.tolist() == [10.0, 10.0, 10.0, 20.0, 40.0, 40.0, 40.0]


def test_a_one_unit_window_on_stored_values_gives_black_and_white_only() -> None:
    stored = np.array([[98, 99, 100, 101]], dtype=np.uint16)
    pixels, details = to_display(stored, Display(None, None, None, Window(100, 1, "LINEAR"), inverted=False))
    assert pixels.tolist() == [[0, 0, 255, 255]]
    assert details["voi"] == "window"


@pytest.mark.parametrize(
    ("values", "counts", "q"),
    [
        ([3401, 25557, 53076, 65947], [3, 1, 3, 3], 37.3),  # t < 0.5: low + diff * t and high - diff * (1 - t) differ
        ([1119, 6389, 10453, 21715, 35893, 53056, 62909], [4, 2, 1, 2, 4, 3, 1], 99.5),  # t >= 0.5: the other way
        ([70.93, 2702.782], [1, 1], 50.0),  # t exactly 0.5 (rescaled values): numpy takes the t >= 0.5 branch
    ],
)
def test_weighted_percentile_equals_numpys_to_the_last_bit(values: list[float], counts: list[int], q: float) -> None:
    """The histogram percentile must be np.percentile of the expanded values exactly, rounding included."""
    expected = float(np.percentile(np.repeat(np.array(values, dtype=np.float64), counts), q))
    assert _weighted_percentiles(np.array(values, dtype=np.float64), np.array(counts), (q,)) == [expected]


NO_TRANSFORMS = Display(None, None, None, None, inverted=False)


def test_chunked_lookup_and_histogram_cover_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Radiographs are processed in row chunks: with chunks of a few rows, every row is still counted and mapped."""
    stored = chest_stored(Spec(), width=7, height=23)  # more rows than columns, so rows and columns cannot swap
    whole, _ = to_display(stored, NO_TRANSFORMS)
    monkeypatch.setattr(dicom_pixels, "_CHUNK_PIXELS", 20)  # 20 // 7 = 2 rows per chunk, 12 chunks
    chunked, _ = to_display(stored, NO_TRANSFORMS)
    assert chunked.tolist() == whole.tolist() == expected_display(stored, Spec()).tolist()


def test_percentile_window_of_a_tiny_image_is_numpys() -> None:
    """Four values: the 99.5th percentile lies between the two largest (985.3), not at the third."""
    stored = np.array([[0, 10], [20, 1000]], dtype=np.uint16)
    _, details = to_display(stored, NO_TRANSFORMS)
    expected = np.percentile(stored.astype(np.float64), [0.5, 99.5])
    assert [details["window_low"], details["window_high"]] == pytest.approx(expected.tolist(), rel=1e-12)


def test_a_single_pixel_image_is_black_not_an_error() -> None:
    pixels, details = to_display(np.array([[1234]], dtype=np.uint16), NO_TRANSFORMS)
    assert pixels.tolist() == [[0]]
    assert details["window_low"] == details["window_high"] == 1234.0


def test_a_modality_lut_is_reported_as_applied() -> None:
    lut = Lut(first_mapped=0, bits=8, data=np.array([0, 100, 200]))
    _, details = to_display(np.array([[0, 1, 2]], dtype=np.uint16), Display(None, lut, None, None, inverted=False))
    assert details["modality_lut"] == "lut"


@pytest.mark.parametrize(
    ("bits", "data", "top"),
    [
        (12, [0, 2047], 127),  # the descriptor's 12 bits set the range: 2047 / 4095 * 255 = 127.47
        (8, [0, 1000], 249),  # data beyond the declared 8 bits widen it to 10: 1000 / 1023 * 255 = 249.3
        (1, [0, 1], 255),  # the smallest depth dicom.py accepts: 1 / (2^1 - 1) = white
    ],
)
def test_voi_lut_output_range_is_the_wider_of_its_descriptor_and_its_data(bits: int, data: list[int], top: int) -> None:
    lut = Lut(first_mapped=0, bits=bits, data=np.array(data))
    pixels, details = to_display(np.array([[0, 1]], dtype=np.uint16), Display(None, None, lut, None, inverted=False))
    assert pixels.tolist() == [[0, top]]
    assert details["voi"] == "voi_lut"


def test_a_voi_lut_of_zeros_declaring_no_bits_is_black_without_dividing_by_zero() -> None:
    """Files cannot declare 0 bits (dicom.py refuses them), but the transform must not divide 0 by 0 for a caller."""
    lut = Lut(first_mapped=0, bits=0, data=np.array([0, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, _ = to_display(np.array([[0, 1]], dtype=np.uint16), Display(None, None, lut, None, inverted=True))
    assert pixels.tolist() == [[255, 255]]


def test_rescale_is_reported_with_its_slope_and_intercept() -> None:
    _, details = to_display(np.array([[0, 1]], dtype=np.uint16), Display((2.5, -1024.0), None, None, None, False))
    assert (details["modality_lut"], details["rescale_slope"], details["rescale_intercept"]) == (
        "rescale",
        2.5,
        -1024.0,
    )


def test_a_percentile_window_of_zero_width_is_black_without_dividing_by_zero() -> None:
    """A flat image with one outlier: both percentiles are the flat value, so nothing has contrast, the outlier too."""
    stored = np.full((4, 250), 500, dtype=np.uint16)
    stored[2, 7] = 900  # 1 pixel in 1000: beyond the 99.5th percentile, which stays 500
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, details = to_display(stored, NO_TRANSFORMS)
    assert details["window_low"] == details["window_high"] == 500.0
    assert not pixels.any()


@pytest.mark.parametrize(
    ("inverted", "expected"), [(False, [0, 0, 255]), (True, [255, 255, 0])], ids=["plain", "inverted"]
)
def test_voi_lut_entries_below_zero_are_clamped_not_wrapped_around(inverted: bool, expected: list[int]) -> None:
    """dicom.py refuses negative LUT entries, but a caller's -10 must show as black (white inverted), not 246 or 9."""
    lut = Lut(first_mapped=0, bits=8, data=np.array([-10, 0, 255]))  # -10 / 255 * 255 = -10, below black
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels, _ = to_display(np.array([[0, 1, 2]], dtype=np.uint16), Display(None, None, lut, None, inverted))
    assert pixels.tolist() == [expected]
