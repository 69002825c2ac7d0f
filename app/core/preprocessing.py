"""Decode an uploaded X-ray and turn it into the network's uint8 input.

Training and serving both call :func:`preprocess`, so an image is decoded, oriented,
converted to grayscale and squashed to the model's square input in exactly one way.
Large JPEGs are decoded with libjpeg's DCT scaling (the scale Pillow's draft mode picks) to no
less than the target size, which is what makes 9-megapixel uploads cheap. DICOM files, detected by
content, are turned into 8-bit display pixels by ``app.core.dicom`` and then take the same
resize as every other input.

Decoding is strict: a damaged image is an error, never filled in. 8-bit JPEGs go through
libjpeg-turbo (simplejpeg) with its warnings ("premature end of data", "extraneous bytes",
"bad Huffman code") raised as errors; 12/16-bit and lossless JPEGs must decode identically with
and without extra bytes after every entropy-coded segment (a scan that runs out of data would
read them); PNG chunks must all be present with valid CRCs. The decode cost (pixels x channels x
bytes per sample, from the header) is checked before any decoder allocates.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from app.core.dicom import DEFAULT_DICOM_POLICY, DicomPolicy, decode_dicom, is_dicom, read_sop_instance_uid
from app.core.image_errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnreadableFileError,
    UnsuitableShapeError,
    UnsupportedImageError,
)
from app.core.image_headers import JPEG_MAGIC, PNG_MAGIC, ImageHeader, decode_cost, jpeg_scale, read_header
from app.core.jpeg_complete import IncompleteJpegError, decode_complete_jpeg
from app.core.jpeg_header import JpegFrame, jpeg_exif, read_jpeg_frame

__all__ = ["JpegFrame", "read_jpeg_frame"]  # re-exported: the header parser lives in jpeg_header

# Formats accepted by content, whatever the file name or declared content type says.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG"})
DEFAULT_MAX_PIXELS = 100_000_000
# 100 M pixels at 4 bytes each (8-bit RGBA, 16-bit grey + alpha): what the decoder may allocate for one image.
DEFAULT_MAX_DECODE_BYTES = 400_000_000
# Long side over short side beyond which an upload is no chest film (detector and cassette formats run
# from 1:1 to 17:14 in.); squashed to the square input, a strip gets confident answers on nothing.
MAX_ASPECT_RATIO = 3.0
RESAMPLE = Image.Resampling.BILINEAR
# The pixel limit is enforced here from the header, before any decoding, with a
# configurable bound; Pillow's own global guess would reject valid large X-rays.
Image.MAX_IMAGE_PIXELS = None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError("image header declares a zero width or height")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def check_decode_budget(header: ImageHeader, target_size: int, max_pixels: int, max_decode_bytes: int) -> None:
    """Refuse, from the header alone, an image whose pixels or decoded samples are over the limits."""
    _check_pixels(header.width, header.height, max_pixels)
    cost = decode_cost(header, target_size)
    if cost > max_decode_bytes:
        raise ImageTooLargeError(
            f"decoding this {header.width}x{header.height} image ({header.channels} channels of {header.bits} bits) "
            f"needs {cost} bytes, over the limit of {max_decode_bytes}"
        )


def _to_grayscale(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit grayscale, scaling high bit depths instead of clipping."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I;16"):  # the scaling of 16-bit JPEG samples, so both give the same pixels
        return Image.fromarray(_eight_bit_image(np.asarray(img), 16), "L")
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        peak = max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((scaled + 0.5).astype(np.uint8), "L")
    if img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        # Over a black background, channel by channel at one byte per pixel: a full-size RGBA
        # compositing copy would cost 4 bytes per pixel twice more.
        return Image.composite(img.convert("L"), Image.new("L", img.size, 0), img.getchannel("A"))
    return img.convert("L")


@dataclass(frozen=True)
class SourceInfo:
    """What was decoded, for responses and overlays: format facts only, never patient data."""

    format: str  # "JPEG", "PNG", "DICOM"
    width: int  # upright (after EXIF orientation), full resolution
    height: int
    details: dict[str, str | int | float | bool] = field(default_factory=dict)  # format-specific, JSON-safe


@dataclass(frozen=True)
class ModelInput:
    """The network input for one upload and what it was made from."""

    pixels: torch.Tensor  # uint8[1, S, S]
    source: SourceInfo


_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
# EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image, orientation: object, width: int, height: int) -> tuple[Image.Image, int, int]:
    """The image turned as its EXIF orientation says, and its full-resolution size once upright."""
    if orientation not in _UPRIGHT:
        return img, width, height
    img = img.transpose(_UPRIGHT[orientation])
    return (img, height, width) if orientation in _QUARTER_TURNS else (img, width, height)


def check_shape(width: int, height: int, input_size: int) -> None:
    """Refuse what the square input would invent or distort: a short side under the model's input (a
    thumbnail, upsampled into blur the model never saw: 24 px NORMAL films came back PNEUMONIA 0.96 with
    the guard passed), or sides further apart than :data:`MAX_ASPECT_RATIO`."""
    if min(width, height) < input_size:
        raise UnsuitableShapeError(
            f"the image is {width}x{height} px; its short side must be at least the model's {input_size} px input "
            "(a thumbnail lacks the detail the model reads: send the original film)"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnsuitableShapeError(
            f"the image is {width}x{height} px, its sides {max(width, height) / min(width, height):.2f}:1; a chest "
            f"film's are at most {MAX_ASPECT_RATIO:g}:1 (send the whole film, not a strip or a montage)"
        )


def _decode_high_precision_jpeg(data: bytes, frame: JpegFrame) -> tuple[Image.Image, SourceInfo]:
    """Decode 12/16-bit and lossless JPEGs, which Pillow cannot, with libjpeg-turbo via imagecodecs.

    Completeness is proven by :func:`app.core.jpeg_complete.decode_complete_jpeg` (imagecodecs
    ignores libjpeg's warnings).
    """
    if frame.components not in (1, 2, 3):
        raise UnsupportedImageError(f"{frame.precision}-bit JPEGs with {frame.components} components are not supported")
    try:
        arr = decode_complete_jpeg(data)
    except IncompleteJpegError as exc:
        raise CorruptImageError(f"the {frame.precision}-bit JPEG's {exc}") from exc
    except Exception as exc:  # imagecodecs raises its own error types per codec
        raise CorruptImageError(f"cannot decode {frame.precision}-bit JPEG: {exc}") from exc
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    orientation = _jpeg_orientation(data)
    if arr.ndim not in (2, 3) or arr.shape[:2] != (frame.height, frame.width):
        raise CorruptImageError(f"the JPEG decoded to {arr.shape}, not the {frame.width}x{frame.height} of its header")
    levels = _eight_bit_image(arr, frame.precision)
    img, width, height = _upright(Image.fromarray(levels, "L"), orientation, frame.width, frame.height)
    return img, SourceInfo("JPEG", width, height, {"bits": frame.precision})


_LEVEL_CHUNK_PIXELS = 1 << 20


def _eight_bit_image(samples: np.ndarray, precision: int) -> np.ndarray:
    """:func:`_eight_bit_levels` of a whole image, in row strips: uint64 temporaries of the whole image
    would not fit a decoder's memory cap at the pixel limit."""
    levels = np.empty(samples.shape[:2], np.uint8)
    rows = max(1, _LEVEL_CHUNK_PIXELS // max(samples.shape[1], 1))
    for top in range(0, samples.shape[0], rows):
        levels[top : top + rows] = _eight_bit_levels(samples[top : top + rows], precision)
    return levels


def _eight_bit_levels(samples: np.ndarray, precision: int) -> np.ndarray:
    """``precision``-bit samples (grey, grey + alpha or RGB) to 8-bit grey levels.

    Full range to full range, v x 255 / (2^p - 1), as a 16-bit PNG is scaled, so the same samples in
    either give the same pixels (v / 2^(p-8) made 65535 a clipped 256 and lifted most levels by one).
    Each level is an exact ratio of integers rounded half to even: float32 arithmetic misrounds some
    exact ties (a neutral grey's weights sum to 1.0000000x) and 16-bit near-ties.
    """
    peak = (1 << precision) - 1
    if samples.ndim == 3 and samples.shape[2] == 2:  # grey + alpha: over black, as 8-bit PNGs with alpha are
        numerator = samples[:, :, 0].astype(np.uint64) * samples[:, :, 1] * 255
        denominator = peak * peak
    elif samples.ndim == 3:  # ITU-R BT.601 luma, in thousandths
        red, green, blue = (samples[:, :, channel].astype(np.uint64) for channel in range(3))
        numerator = (299 * red + 587 * green + 114 * blue) * 255
        denominator = 1000 * peak
    else:
        numerator = samples.astype(np.uint64) * 255
        denominator = peak
    return _round_half_even(numerator, denominator).astype(np.uint8)


def _round_half_even(numerator: np.ndarray, denominator: int) -> np.ndarray:
    """``numerator / denominator`` rounded to the nearest integer, ties to even, in integers."""
    quotient, remainder = np.divmod(numerator, denominator)
    return quotient + ((2 * remainder > denominator) | ((2 * remainder == denominator) & (quotient % 2 == 1)))


def _exif_orientation(payload: bytes | None, kind: str) -> int | None:
    """The Orientation tag of an EXIF block (its ``Exif`` header on); None without one (most X-rays: no parse).

    EXIF alone, for JPEG (APP1) and PNG (eXIf) alike: Pillow's ``getexif`` would also take a PNG's XMP
    ``tiff:Orientation``, which the same film as a JPEG, and browsers, ignore.
    """
    if not payload:
        return None
    try:
        exif = Image.Exif()
        exif.load(payload)
        return exif.get(ExifTags.Base.Orientation)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:  # struct: a cut-off IFD entry
        raise CorruptImageError(f"the {kind}'s EXIF header is invalid: {exc}") from exc


def _jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation of any JPEG, 8-bit or not, found by the marker walk (Pillow opens 8-bit JPEGs only)."""
    return _exif_orientation(jpeg_exif(data), "JPEG")


def _decode_jpeg(data: bytes, frame: JpegFrame, target_size: int) -> tuple[Image.Image, SourceInfo]:
    """8-bit JPEG: libjpeg-turbo decodes strictly at the draft scale; the EXIF orientation, if any, is applied."""
    if frame.components not in (1, 3, 4):
        raise UnsupportedImageError(f"8-bit JPEGs with {frame.components} components are not supported")
    orientation = _jpeg_orientation(data)
    scale = jpeg_scale(frame.width, frame.height, target_size)
    size = {"min_width": math.ceil(frame.width / scale), "min_height": math.ceil(frame.height / scale)}
    try:
        if frame.components == 4:  # CMYK/YCCK: Adobe's inverted convention, as Pillow reads it
            cmyk = simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True, **size)
            img = Image.fromarray(255 - cmyk, "CMYK").convert("L")
        else:
            img = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True, **size)[:, :, 0], "L")
    except ValueError as exc:  # simplejpeg reports every libjpeg error and warning as ValueError
        raise CorruptImageError(f"the JPEG data is corrupt or truncated: {exc}") from exc
    img, width, height = _upright(img, orientation, frame.width, frame.height)
    return img, SourceInfo("JPEG", width, height)


def _check_png_chunks(data: bytes) -> None:
    """Every chunk up to IEND present and intact (CRC), so damage is an error rather than a guess."""
    pos, size = len(PNG_MAGIC), len(data)
    while True:
        if pos + 12 > size:
            raise CorruptImageError("the PNG is truncated: it ends before its IEND chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if length > 0x7FFFFFFF or end + 4 > size:
            raise CorruptImageError("the PNG is truncated: a chunk runs past the end of the file")
        kind = data[pos + 4 : pos + 8]
        if zlib.crc32(data[pos + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            raise CorruptImageError(f"the PNG's {kind.decode('latin-1')!r} chunk fails its CRC check")
        if kind == b"IEND":
            return
        pos = end + 4


def decode_grayscale(
    data: bytes,
    target_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    *,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
) -> tuple[Image.Image, SourceInfo]:
    """Decode ``data`` to an upright 8-bit grayscale image no smaller than ``target_size``.

    Raises an :class:`ImageError` subclass for every input that is not a usable image.
    """
    if not data:
        raise EmptyImageError()
    if is_dicom(data):
        decoded = decode_dicom(data, max_pixels, dicom)
        height, width = decoded.pixels.shape
        return Image.fromarray(decoded.pixels, "L"), SourceInfo("DICOM", width, height, decoded.details)
    header = read_header(data)
    if data.startswith(JPEG_MAGIC) and header is None:
        raise CorruptImageError("the file starts like a JPEG but has no valid frame header")
    if header is not None:
        check_decode_budget(header, target_size, max_pixels, max_decode_bytes)
        frame = header.jpeg
        if frame is not None and (frame.precision != 8 or frame.lossless):
            return _decode_high_precision_jpeg(data, frame)
        if frame is not None:
            return _decode_jpeg(data, frame, target_size)
    if data.startswith(PNG_MAGIC):
        _check_png_chunks(data)
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in SUPPORTED_FORMATS:
            raise UnsupportedImageError(f"{img.format} images are not supported; upload a JPEG, PNG or DICOM")
        _check_pixels(img.width, img.height, max_pixels)
        img.load()  # reads an eXIf chunk after the image data too
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        if data.startswith(PNG_MAGIC):
            raise CorruptImageError("the file starts like a PNG but its header is invalid") from exc
        raise UnsupportedImageError("the file is not a JPEG, PNG or DICOM image") from exc
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise CorruptImageError(f"the image data is corrupt or truncated: {exc}") from exc
    orientation = _exif_orientation(img.info.get("exif"), "PNG")  # an eXIf chunk, as cameras and phones write
    upright, width, height = _upright(_to_grayscale(img), orientation, img.width, img.height)
    return upright, SourceInfo("PNG", width, height)


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` (aspect ratio not kept), as the training images were made."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.array(img, dtype=np.uint8)


def prepare_array(
    data: bytes,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    *,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
) -> tuple[np.ndarray, SourceInfo]:
    """Encoded image bytes to ``uint8[S, S]`` pixels and what was decoded: the part decoder workers run."""
    image, source = decode_grayscale(data, input_size, max_pixels, max_decode_bytes, dicom=dicom)
    check_shape(source.width, source.height, input_size)
    return resize_square(image, input_size), source


def prepare_input(
    data: bytes,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    *,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
) -> ModelInput:
    """Encoded image bytes to the network input ``uint8[1, S, S]`` plus what was decoded.

    ``dicom`` says which DICOM metadata checks refuse an upload (all by default).
    """
    pixels, source = prepare_array(data, input_size, max_pixels, max_decode_bytes, dicom=dicom)
    return ModelInput(torch.from_numpy(pixels).unsqueeze(0), source)


def preprocess(
    data: bytes,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    *,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
) -> torch.Tensor:
    """Encoded image bytes to the network input ``uint8[1, S, S]`` (one grayscale channel)."""
    return prepare_input(data, input_size, max_pixels, max_decode_bytes, dicom=dicom).pixels


@dataclass(frozen=True)
class PreparedFile:
    """One file after :func:`preprocess_file`: the network input, or the coded reason there is none."""

    pixels: torch.Tensor | None
    sha256: str = ""
    error: ImageError | None = None
    sop_instance_uid: str = ""  # only when asked for, and only for DICOM files that carry a valid one
    source: SourceInfo | None = None


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise UnreadableFileError(f"skipped: {_FILE_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}")


def read_image_file(path: Path, max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> bytes:
    """The bytes of a regular file; FIFOs, sockets and devices are refused without blocking on them.

    Opened non-blocking and checked with ``fstat`` on the open descriptor, so neither a FIFO (whose
    plain ``open`` waits for a writer forever) nor a file swapped for one in between can hang a run.
    A file over ``max_bytes`` (by default the decode budget, which no usable image's file exceeds) is
    refused unread: an archive or video left in a scored or training folder must not fill the memory.
    """
    try:
        _require_regular(os.stat(path).st_mode)  # sockets cannot even be opened: name them first
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableFileError(f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        _require_regular(info.st_mode)
        if info.st_size > max_bytes:
            raise ImageTooLargeError(f"the file is {info.st_size} bytes, over the limit of {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)  # a file that grew since fstat is cut off here
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"the file holds more than {max_bytes} bytes (more than its size said)")
        return data
    except OSError as exc:
        raise UnreadableFileError(f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def preprocess_file(
    path: Path,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    *,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
    with_uid: bool = False,
    decoder: Callable[[bytes], ModelInput] | None = None,
) -> PreparedFile:
    """Read and preprocess a file from disk exactly as the service does an upload; never raises ImageError.

    ``with_uid`` also reads a DICOM file's SOP Instance UID (the offline scorer's ``--with-uids``);
    it is kept out of :class:`SourceInfo` so that it can never reach an HTTP response. ``decoder``
    replaces the in-process :func:`prepare_input` (the scorer passes its isolated decode pool).
    """
    try:
        data = read_image_file(path, max_decode_bytes)
    except ImageError as exc:
        return PreparedFile(None, error=exc)
    digest = hashlib.sha256(data).hexdigest()
    uid = read_sop_instance_uid(data) if with_uid else ""
    try:
        if decoder is not None:
            prepared = decoder(data)
        else:
            prepared = prepare_input(data, input_size, max_pixels, max_decode_bytes, dicom=dicom)
    except ImageError as exc:
        return PreparedFile(None, digest, exc, sop_instance_uid=uid)
    return PreparedFile(prepared.pixels, digest, sop_instance_uid=uid, source=prepared.source)
