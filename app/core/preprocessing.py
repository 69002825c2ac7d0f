"""Decode an uploaded X-ray and turn it into the network's uint8 input.

Training and serving both call :func:`preprocess`, so an image is decoded, oriented,
converted to grayscale and squashed to the model's square input in exactly one way.
Large JPEGs are decoded with libjpeg's DCT scaling (Pillow's draft mode) to no less
than the target size, which is what makes 9-megapixel uploads cheap. DICOM files, detected by
content, are turned into 8-bit display pixels by ``app.core.dicom`` and then take the same
resize as every other input.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from app.core.dicom import DEFAULT_DICOM_POLICY, DicomPolicy, decode_dicom, is_dicom, read_sop_instance_uid
from app.core.image_errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UnreadableFileError,
    UnsupportedImageError,
)
from app.core.jpeg_header import JpegFrame, read_jpeg_frame

# Formats accepted by content, whatever the file name or declared content type says.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG"})
DEFAULT_MAX_PIXELS = 100_000_000
RESAMPLE = Image.Resampling.BILINEAR
# The pixel limit is enforced here from the header, before any decoding, with a
# configurable bound; Pillow's own global guess would reject valid large X-rays.
Image.MAX_IMAGE_PIXELS = None

_JPEG_MAGIC = b"\xff\xd8\xff"


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError("image header declares a zero width or height")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def _to_grayscale(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit grayscale, scaling high bit depths instead of clipping."""
    if img.mode == "L":
        return img
    if img.mode.startswith("I;16"):
        # Integer rounding of v * 255 / 65535; uint32 keeps big X-rays at 4 bytes per pixel.
        arr = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        peak = max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((scaled + 0.5).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
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


def _decode_high_precision_jpeg(data: bytes, frame: JpegFrame) -> Image.Image:
    """Decode 12/16-bit and lossless JPEGs, which Pillow cannot, with libjpeg-turbo via imagecodecs."""
    import imagecodecs

    try:
        arr = imagecodecs.jpeg8_decode(data)
    except Exception as exc:  # imagecodecs raises its own error types per codec
        try:
            arr = imagecodecs.ljpeg_decode(data)
        except Exception:
            raise CorruptImageError(f"cannot decode {frame.precision}-bit JPEG: {exc}") from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3:
        arr = arr[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    shift = max(frame.precision - 8, 0)
    gray = np.clip(np.rint(arr / float(1 << shift)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L")


def decode_grayscale(
    data: bytes,
    target_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
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
    frame = read_jpeg_frame(data) if data.startswith(_JPEG_MAGIC) else None
    if frame is not None:
        _check_pixels(frame.width, frame.height, max_pixels)
        if frame.precision != 8 or frame.lossless:
            source = SourceInfo("JPEG", frame.width, frame.height, {"bits": frame.precision})
            return _decode_high_precision_jpeg(data, frame), source
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in SUPPORTED_FORMATS:
            raise UnsupportedImageError(f"{img.format} images are not supported; upload a JPEG, PNG or DICOM")
        _check_pixels(img.width, img.height, max_pixels)
        width, height = img.size
        if img.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
            width, height = height, width
        source = SourceInfo("PNG" if img.format == "PNG" else "JPEG", width, height)
        if img.format in ("JPEG", "MPO"):
            img.draft("L" if img.mode in ("L", "RGB") else img.mode, (target_size, target_size))
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        if data.startswith(_JPEG_MAGIC):
            raise CorruptImageError("the file starts like a JPEG but its header is invalid") from exc
        raise UnsupportedImageError("the file is not a JPEG, PNG or DICOM image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"the image data is corrupt or truncated: {exc}") from exc
    return _to_grayscale(img), source


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Squash to ``size`` x ``size`` (aspect ratio not kept), as the training images were made."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.array(img, dtype=np.uint8)


def prepare_input(
    data: bytes, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, *, dicom: DicomPolicy = DEFAULT_DICOM_POLICY
) -> ModelInput:
    """Encoded image bytes to the network input ``uint8[1, S, S]`` plus what was decoded.

    ``dicom`` says which DICOM metadata checks refuse an upload (all by default).
    """
    image, source = decode_grayscale(data, input_size, max_pixels, dicom=dicom)
    return ModelInput(torch.from_numpy(resize_square(image, input_size)).unsqueeze(0), source)


def preprocess(
    data: bytes, input_size: int, max_pixels: int = DEFAULT_MAX_PIXELS, *, dicom: DicomPolicy = DEFAULT_DICOM_POLICY
) -> torch.Tensor:
    """Encoded image bytes to the network input ``uint8[1, S, S]`` (one grayscale channel)."""
    return prepare_input(data, input_size, max_pixels, dicom=dicom).pixels


@dataclass(frozen=True)
class PreparedFile:
    """One file after :func:`preprocess_file`: the network input, or the coded reason there is none."""

    pixels: torch.Tensor | None
    sha256: str = ""
    error: ImageError | None = None
    sop_instance_uid: str = ""  # only when asked for, and only for DICOM files that carry a valid one
    source: SourceInfo | None = None


def preprocess_file(
    path: Path,
    input_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
    with_uid: bool = False,
) -> PreparedFile:
    """Read and preprocess a file from disk exactly as the service does an upload; never raises ImageError.

    ``with_uid`` also reads a DICOM file's SOP Instance UID (the offline scorer's ``--with-uids``);
    it is kept out of :class:`SourceInfo` so that it can never reach an HTTP response.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return PreparedFile(None, error=UnreadableFileError(f"{type(exc).__name__}: {exc.strerror or exc}"))
    digest = hashlib.sha256(data).hexdigest()
    uid = read_sop_instance_uid(data) if with_uid else ""
    try:
        prepared = prepare_input(data, input_size, max_pixels, dicom=dicom)
    except ImageError as exc:
        return PreparedFile(None, digest, exc, sop_instance_uid=uid)
    return PreparedFile(prepared.pixels, digest, sop_instance_uid=uid, source=prepared.source)
