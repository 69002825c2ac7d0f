"""Decode compressed DICOM frames with imagecodecs (BSD), plugged into pydicom's decoders.

pydicom finds the frame inside the encapsulated pixel data (offset tables, fragments) and
corrects signedness and unused bits afterwards; this plugin does only the codec step. Out of
the box pydicom has no decoder for JPEG Lossless (the usual CR/DX syntax), JPEG-LS or 12-bit
JPEG, and its pure-Python RLE decoder takes seconds for a large radiograph, so all of them go
through imagecodecs here: libjpeg-turbo (JPEG baseline, extended and lossless process 14),
CharLS (JPEG-LS), OpenJPEG (JPEG 2000, HTJ2K) and its PackBits decoder (RLE segments). No GPL
code is involved.

Every frame header is checked against the DICOM Rows x Columns before decoding, so a small
file cannot make a decoder allocate an image larger than the one the pixel limit allowed.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.pixels import get_decoder

from app.core.jpeg_complete import decode_complete_jpeg
from app.core.jpeg_header import JPEG_LS_SOF_MARKERS, SOF_MARKERS, read_jpeg_frame

if TYPE_CHECKING:
    from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN = "cxr-imagecodecs"
MAX_BITS = 16

JPEG_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({uid.JPEGLSLossless, uid.JPEGLSNearLossless})
JPEG_2000_SYNTAXES = frozenset(
    {uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K}
)
RLE_SYNTAXES = frozenset({uid.RLELossless})
SYNTAXES = JPEG_SYNTAXES | JPEG_LS_SYNTAXES | JPEG_2000_SYNTAXES | RLE_SYNTAXES

# pydicom's plugin protocol: which syntaxes this module decodes and what it needs.
DECODER_DEPENDENCIES = dict.fromkeys(SYNTAXES, ("numpy", "imagecodecs"))

_J2K_SIZ = b"\xff\x4f\xff\x51"  # start of codestream followed by the image and tile size marker
_RLE_HEADER = 64


class FrameError(ValueError):
    """The compressed frame does not match the DICOM header or cannot be decoded."""


def is_available(syntax: str) -> bool:
    """pydicom's plugin protocol: imagecodecs is a pinned dependency, so every listed syntax is available."""
    return syntax in SYNTAXES


def _check_frame(height: int, width: int, components: int, precision: int, runner: DecodeRunner) -> None:
    if (height, width) != (runner.rows, runner.columns):
        raise FrameError("the compressed frame's size differs from the DICOM Rows and Columns")
    if components != 1:
        raise FrameError("the compressed frame is not single-channel")
    if not 1 <= precision <= MAX_BITS:
        raise FrameError("the compressed frame's sample precision is not 1 to 16 bits")


def _j2k_header(src: bytes) -> tuple[int, int, int, int]:
    """(height, width, components, precision) from the SIZ marker of a JPEG 2000 codestream (ISO 15444-1 A.5.1)."""
    pos = src.find(_J2K_SIZ, 0, 4096)  # a raw codestream starts with it; a JP2 wrapper has it in its jp2c box
    if pos < 0 or pos + 45 > len(src):
        raise FrameError("no JPEG 2000 image header in the frame")
    siz = pos + 4
    x_size, y_size, x_offset, y_offset = (
        int.from_bytes(src[siz + 4 + 4 * i : siz + 8 + 4 * i], "big") for i in range(4)
    )
    components = int.from_bytes(src[siz + 36 : siz + 38], "big")
    precision = (src[siz + 38] & 0x7F) + 1
    return y_size - y_offset, x_size - x_offset, components, precision


def _decode_rle(src: bytes, runner: DecodeRunner) -> np.ndarray:
    """DICOM RLE (PS3.5 Annex G): a header of segment offsets, one PackBits segment per byte plane, MSB first."""
    pixels = runner.rows * runner.columns
    planes = runner.bits_allocated // 8
    if len(src) < _RLE_HEADER:
        raise FrameError("the RLE frame is shorter than its header")
    header = np.frombuffer(src[:_RLE_HEADER], dtype="<u4")
    count = int(header[0])
    if count != planes or runner.samples_per_pixel != 1:
        raise FrameError("the RLE frame's segment count does not match the DICOM header")
    bounds = [int(offset) for offset in header[1 : 1 + count]] + [len(src)]
    if bounds[0] != _RLE_HEADER or any(end < start for start, end in itertools.pairwise(bounds)):
        raise FrameError("the RLE frame's segment offsets are invalid")
    segments = []
    for start, end in itertools.pairwise(bounds):
        # PackBits expands at most 64-fold, so the output is bounded by the upload's size.
        plane = np.frombuffer(imagecodecs.packbits_decode(src[start:end]), dtype=np.uint8)
        if plane.size < pixels:
            raise FrameError("an RLE segment decodes to fewer bytes than Rows x Columns")
        segments.append(plane[:pixels])
    samples = segments[0] if planes == 1 else (segments[0].astype("<u2") << 8) | segments[1]
    return samples.reshape(runner.rows, runner.columns)


def _decode(src: bytes, runner: DecodeRunner) -> np.ndarray:
    syntax = runner.transfer_syntax
    if syntax in RLE_SYNTAXES:
        return _decode_rle(src, runner)
    if syntax in JPEG_2000_SYNTAXES:
        _check_frame(*_j2k_header(src), runner)
        return np.asarray(imagecodecs.jpeg2k_decode(src))
    markers = JPEG_LS_SOF_MARKERS if syntax in JPEG_LS_SYNTAXES else SOF_MARKERS
    frame = read_jpeg_frame(src, markers) if src[:2] == b"\xff\xd8" else None
    if frame is None:
        raise FrameError("no JPEG frame header in the frame")
    _check_frame(frame.height, frame.width, frame.components, frame.precision, runner)
    if syntax in JPEG_LS_SYNTAXES:
        return np.asarray(imagecodecs.jpegls_decode(src))
    return decode_complete_jpeg(src)  # a frame cut short is an error, never grey-filled


def _to_bits_stored(arr: np.ndarray, runner: DecodeRunner) -> np.ndarray:
    """Bring JPEG-LS and JPEG 2000 samples to Bits Stored.

    pydicom corrects their signedness by the codestream's precision, but some encoders write a
    precision of 16 for 12-bit data: signed samples then arrive as unsigned bit patterns, and
    lossy coding can overshoot the top of the stored range. Sign-extend signed samples from Bits
    Stored and clamp unsigned ones to it; both are no-ops for a codestream that matches its header.
    """
    bits = runner.bits_stored
    if runner.pixel_representation == 1:
        shift = 8 * arr.dtype.itemsize - bits
        signed = arr.view(np.dtype(f"i{arr.dtype.itemsize}"))
        return np.right_shift(np.left_shift(signed, shift), shift)
    return np.clip(arr, 0, (1 << bits) - 1).astype(arr.dtype, copy=False)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom's plugin protocol: one encoded frame in, its samples as little-endian bytes out."""
    arr = _decode(src, runner)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.shape != (runner.rows, runner.columns) or arr.dtype.itemsize > 2 or arr.dtype.kind not in "ui":
        raise FrameError("the decoded frame does not match the DICOM header")
    if runner.transfer_syntax in JPEG_LS_SYNTAXES | JPEG_2000_SYNTAXES:
        arr = _to_bits_stored(arr, runner)
    # pydicom reads the bytes with this width (an 8-bit JPEG inside 16-bit Bits Allocated is common).
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def register() -> None:
    """Add the plugin to pydicom's decoders once per process (pydicom's registry is not thread-safe: call at import)."""
    for syntax in sorted(SYNTAXES):
        decoder = get_decoder(syntax)
        if PLUGIN not in decoder.available_plugins:
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
