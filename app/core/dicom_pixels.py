"""DICOM stored values to the 8-bit grayscale a radiologist would see (PS3.3 C.11, PS3.4 N.2).

The order is the standard's and it matters: Modality LUT or rescale slope/intercept, then the
VOI LUT or window (when the file has neither: 8-bit levels as they are, wider values through a robust
percentile window), then MONOCHROME1 /
Presentation LUT Shape INVERSE inversion, then 8 bits. Inverting before the VOI transform
(a known bug of several viewers) flips the window onto the wrong end of the range.

Stored values are integers of at most 16 bits, so the whole chain is evaluated once per value
in the image's range (at most 65,536 entries, in float64) and applied as one table lookup:
exact, and light on memory even for a 30-megapixel radiograph. Pure numpy and plain values:
nothing here reads a file or sees a tag that is not needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.core.image_errors import CorruptImageError

# The robust window used when a file carries no VOI: these percentiles of the modality values
# map to black and white, so collimator edges, markers and dead pixels do not set the contrast.
PERCENTILE_WINDOW = (0.5, 99.5)
_CHUNK_PIXELS = 1 << 20  # rows processed at a time by the lookups, to bound temporary memory

VoiFunction = Literal["LINEAR", "LINEAR_EXACT", "SIGMOID"]


@dataclass(frozen=True)
class Lut:
    """A Modality or VOI LUT: ``data[v - first_mapped]`` for v in range, clamped at both ends."""

    first_mapped: int
    bits: int  # nominal output depth from the LUT Descriptor
    data: np.ndarray  # integer entries


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: VoiFunction


@dataclass(frozen=True)
class Display:
    """The grayscale transforms a DICOM file declares; ``None`` where it declares none."""

    rescale: tuple[float, float] | None  # (slope, intercept)
    modality_lut: Lut | None
    voi_lut: Lut | None
    window: Window | None
    inverted: bool  # MONOCHROME1, or Presentation LUT Shape INVERSE
    # Unsigned 8-bit stored values and no modality transform: already display levels. Without a VOI they are
    # shown as they are, as the same pixels in a JPEG or PNG would be (a percentile window stretched them:
    # 12 of 80 films moved by over 0.05, 2 changed label against the same pixels as a PNG).
    eight_bit_levels: bool = False


def _lookup(values: np.ndarray, lut: Lut) -> np.ndarray:
    index = np.clip(np.floor(values) - lut.first_mapped, 0, len(lut.data) - 1).astype(np.intp)
    return lut.data[index].astype(np.float64)


def _window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3, with output range [0, 1]."""
    center, width = window.center, window.width
    if window.function == "LINEAR":
        if width < 1:
            raise CorruptImageError("the DICOM Window Width is below 1, which LINEAR windowing does not allow")
        if width == 1:  # a threshold at center - 0.5
            return (values > center - 0.5).astype(np.float64)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise CorruptImageError("the DICOM Window Width must be positive")
    if window.function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    with np.errstate(over="ignore"):  # exp overflows to inf far below the centre, which correctly gives 0
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))


def _lerp(low: float, high: float, t: float) -> float:
    """numpy's percentile interpolation, term for term, so the window matches ``np.percentile`` exactly."""
    diff = high - low
    return high - diff * (1 - t) if t >= 0.5 else low + diff * t


def _weighted_percentiles(values: np.ndarray, counts: np.ndarray, quantiles: tuple[float, ...]) -> list[float]:
    """``np.percentile`` (linear method) of the multiset where ``values[i]`` occurs ``counts[i]`` times."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    cumulative = np.cumsum(counts[order])
    total = int(cumulative[-1])
    out = []
    for q in quantiles:
        position = q / 100 * (total - 1)
        rank = math.floor(position)
        below = sorted_values[np.searchsorted(cumulative, rank, side="right")]
        above = sorted_values[np.searchsorted(cumulative, min(rank + 1, total - 1), side="right")]
        out.append(_lerp(float(below), float(above), position - rank))
    return out


def _chunks(stored: np.ndarray) -> range:
    return range(0, stored.shape[0], max(1, _CHUNK_PIXELS // max(stored.shape[1], 1)))


def _histogram(stored: np.ndarray, low: int, size: int) -> np.ndarray:
    step = _chunks(stored).step
    counts = np.zeros(size, dtype=np.int64)
    for row in _chunks(stored):
        counts += np.bincount((stored[row : row + step].astype(np.int32) - low).ravel(), minlength=size)
    return counts


def to_display(stored: np.ndarray, display: Display) -> tuple[np.ndarray, dict[str, str | int | float | bool]]:
    """2-D integer stored values to uint8 display pixels, and what was applied (for the response)."""
    low, high = int(stored.min()), int(stored.max())
    size = high - low + 1
    values = np.arange(low, high + 1, dtype=np.float64)  # every stored value the image can contain
    details: dict[str, str | int | float | bool] = {}

    if display.modality_lut is not None:
        values = _lookup(values, display.modality_lut)
        details["modality_lut"] = "lut"
    elif display.rescale is not None:
        slope, intercept = display.rescale
        values = values * slope + intercept
        details.update(modality_lut="rescale", rescale_slope=slope, rescale_intercept=intercept)
    else:
        details["modality_lut"] = "none"

    if display.voi_lut is not None:
        lut = display.voi_lut
        # The descriptor's depth sets the output range; some files declare fewer bits than their data use.
        peak = max((1 << lut.bits) - 1, (1 << int(lut.data.max()).bit_length()) - 1, 1)
        levels = _lookup(values, lut) / peak
        details["voi"] = "voi_lut"
    elif display.window is not None:
        levels = _window(values, display.window)
        details.update(
            voi="window",
            window_center=display.window.center,
            window_width=display.window.width,
            voi_function=display.window.function,
        )
    elif display.eight_bit_levels:
        levels = values / 255.0
        details["voi"] = "none"
    else:
        lo, hi = _weighted_percentiles(values, _histogram(stored, low, size), PERCENTILE_WINDOW)
        levels = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
        details.update(voi="percentile", window_low=lo, window_high=hi)

    if display.inverted:
        levels = 1.0 - levels
    details["inverted"] = display.inverted
    table = np.floor(levels * 255.0 + 0.5).clip(0, 255).astype(np.uint8)

    out = np.empty(stored.shape, dtype=np.uint8)
    step = _chunks(stored).step
    for row in _chunks(stored):
        out[row : row + step] = table[stored[row : row + step].astype(np.int32) - low]
    return out, details
