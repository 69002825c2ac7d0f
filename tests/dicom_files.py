"""Build DICOM Part 10 files in memory with pydicom, and the 8-bit pixels they should display, by hand.

The expected display pixels are computed here with plain numpy formulas written from the
standard (PS3.3 C.11), independently of ``app.core.dicom_pixels``, so the tests compare two
implementations rather than one with itself. The patient name below is planted in every file
so that tests can prove it never leaves the decoder.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import imagecodecs
import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from tests.conftest import synthetic_xray

PATIENT_NAME = "Quixotefenwick^Marguerite"  # unusual on purpose: it must never appear in a log or response
PATIENT_ID = "PID-7731-QXF"


@dataclass(frozen=True)
class LutSpec:
    first_mapped: int
    bits: int
    data: tuple[int, ...]
    entries: int | None = None  # what the LUT Descriptor claims; default len(data)


@dataclass
class Spec:
    """What to put in a fixture; ``None`` leaves the element out."""

    bits_stored: int = 12
    bits_allocated: int | None = None  # default: 8 for bits_stored 8, else 16
    signed: bool = False
    photometric: str = "MONOCHROME2"
    syntax: str = uid.ExplicitVRLittleEndian
    modality: str | None = "DX"
    view: str | None = "PA"
    intent: str | None = "FOR PRESENTATION"
    rescale: tuple[float, float] | None = None
    window: tuple[float, float] | None = None
    voi_function: str | None = None
    voi_lut: LutSpec | None = None
    modality_lut: LutSpec | None = None
    presentation_shape: str | None = None
    frames: int = 1
    samples: int = 1
    preamble: bool = True
    lut_words: bool = False  # LUT Data as OW bytes rather than a US list
    extra: dict[str, object] = field(default_factory=dict)


def chest_stored(spec: Spec, width: int = 96, height: int = 80, seed: int = 3) -> np.ndarray:
    """A synthetic chest scaled to the stored bit depth; MONOCHROME1 stores it inverted, as a CR plate reader does."""
    base = np.asarray(synthetic_xray(width, height, seed), dtype=np.int64)
    top = (1 << spec.bits_stored) - 1
    stored = base * top // 255
    if spec.photometric == "MONOCHROME1":
        stored = top - stored
    if spec.signed:
        stored = stored - (1 << (spec.bits_stored - 1))
    return stored


def _dtype(spec: Spec) -> np.dtype:
    allocated = spec.bits_allocated or (8 if spec.bits_stored <= 8 else 16)
    return np.dtype(f"{'i' if spec.signed else 'u'}{allocated // 8}")


def _lut_item(lut: LutSpec, words: bool) -> Dataset:
    """A LUT item; ``words`` writes LUT Data as OW bytes instead of a US list (both occur in the wild)."""
    item = Dataset()
    item.LUTDescriptor = [(lut.entries or len(lut.data)) % 65536, lut.first_mapped, lut.bits]
    item["LUTDescriptor"].VR = "SS" if lut.first_mapped < 0 else "US"
    if words:
        item.LUTData = np.asarray(lut.data, dtype="<u2").tobytes()
        item["LUTData"].VR = "OW"
    else:
        item.LUTData = list(lut.data)
        item["LUTData"].VR = "US"
    return item


def encode_frame(stored: np.ndarray, spec: Spec) -> bytes:
    """One compressed frame, encoded by imagecodecs (the decoder under test is a different code path)."""
    syntax = spec.syntax
    if spec.signed and syntax not in (uid.JPEG2000Lossless, uid.JPEG2000):
        # JPEG and JPEG-LS code signed samples as their two's complement bit pattern (PS3.5 8.2.1).
        stored = (stored.astype(np.int64) & ((1 << spec.bits_stored) - 1)).astype(np.uint16)
    if syntax in (uid.JPEGLosslessSV1, uid.JPEGLossless):
        predictor = 1 if syntax == uid.JPEGLosslessSV1 else 6
        return imagecodecs.jpeg8_encode(stored, lossless=True, predictor=predictor, bitspersample=spec.bits_stored)
    if syntax == uid.JPEGBaseline8Bit:
        return imagecodecs.jpeg8_encode(stored, level=90)
    if syntax == uid.JPEGExtended12Bit:
        return imagecodecs.jpeg8_encode(stored, level=90, bitspersample=12)
    if syntax in (uid.JPEGLSLossless, uid.JPEGLSNearLossless):
        return imagecodecs.jpegls_encode(stored, level=0 if syntax == uid.JPEGLSLossless else 2)
    if syntax == uid.JPEG2000Lossless:
        return imagecodecs.jpeg2k_encode(stored, codecformat="J2K", reversible=True, bitspersample=spec.bits_stored)
    if syntax == uid.JPEG2000:
        return imagecodecs.jpeg2k_encode(stored, level=40, codecformat="J2K", reversible=False)
    if syntax == uid.HTJ2KLossless:
        return imagecodecs.htj2k_encode(stored, reversible=True)
    raise ValueError(f"no encoder for {syntax}")


def dicom_bytes(spec: Spec, stored: np.ndarray | None = None, frame: bytes | None = None) -> bytes:
    """A DICOM Part 10 file (or a bare data set, ``preamble=False``) holding ``stored``.

    ``frame`` puts those bytes in the encapsulated pixel data instead of encoding ``stored``
    (for transfer syntaxes nothing here encodes, and for hostile frames).
    """
    if stored is None:
        stored = chest_stored(spec)
    stored = np.asarray(stored).astype(_dtype(spec))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19470312"
    ds.StudyDescription = f"CHEST PA for {PATIENT_NAME}"
    for keyword, value in (("Modality", spec.modality), ("ViewPosition", spec.view)):
        if value is not None:
            setattr(ds, keyword, value)
    if spec.intent is not None:
        ds.PresentationIntentType = spec.intent
    rows, columns = stored.shape[-2:]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = spec.samples
    ds.PhotometricInterpretation = spec.photometric
    if spec.samples > 1:
        ds.PlanarConfiguration = 1  # colour fixtures are passed plane by plane
    if spec.frames > 1:
        ds.NumberOfFrames = spec.frames
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = int(spec.signed)
    if spec.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = spec.rescale
    if spec.window is not None:
        ds.WindowCenter, ds.WindowWidth = spec.window
    if spec.voi_function is not None:
        ds.VOILUTFunction = spec.voi_function
    if spec.voi_lut is not None:
        ds.VOILUTSequence = Sequence([_lut_item(spec.voi_lut, spec.lut_words)])
    if spec.modality_lut is not None:
        ds.ModalityLUTSequence = Sequence([_lut_item(spec.modality_lut, spec.lut_words)])
    if spec.presentation_shape is not None:
        ds.PresentationLUTShape = spec.presentation_shape
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)

    syntax = uid.UID(spec.syntax)
    ds.file_meta = FileMetaDataset()
    pydicom_rle = syntax == uid.RLELossless and frame is None
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian if pydicom_rle else syntax
    if pydicom_rle:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        ds.compress(uid.RLELossless, encoding_plugin="pydicom")  # pydicom's own encoder, not imagecodecs
    elif frame is not None or syntax.is_compressed:
        ds.PixelData = encapsulate([frame if frame is not None else encode_frame(stored, spec)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        order = ">" if syntax == uid.ExplicitVRBigEndian else "<"
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(order)).tobytes()
        ds["PixelData"].VR = "OW" if stored.dtype.itemsize == 2 else "OB"

    buffer = io.BytesIO()
    if spec.preamble:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare data set in the syntax's encoding, as old archives and some gateways write
        ds.file_meta = FileMetaDataset()
        ds.save_as(buffer, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    return buffer.getvalue()


def expected_display(stored: np.ndarray, spec: Spec) -> np.ndarray:
    """The 8-bit image a conformant viewer shows, by the standard's formulas (PS3.3 C.11.1, C.11.2, C.11.6)."""
    x = stored.astype(np.float64)
    if spec.modality_lut is not None:
        lut = np.asarray(spec.modality_lut.data, dtype=np.float64)
        x = lut[np.clip(x - spec.modality_lut.first_mapped, 0, len(lut) - 1).astype(int)]
    elif spec.rescale is not None:
        x = x * spec.rescale[0] + spec.rescale[1]
    if spec.voi_lut is not None:
        lut = np.asarray(spec.voi_lut.data, dtype=np.float64)
        y = lut[np.clip(np.floor(x) - spec.voi_lut.first_mapped, 0, len(lut) - 1).astype(int)]
        y = y / ((1 << spec.voi_lut.bits) - 1)
    elif spec.window is not None:
        c, w = spec.window
        function = spec.voi_function or "LINEAR"
        if function == "LINEAR":  # C.11.2.1.2.1, written out piecewise as in the standard
            y = np.where(
                x <= c - 0.5 - (w - 1) / 2,
                0.0,
                np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5),
            )
        elif function == "LINEAR_EXACT":
            y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
        else:
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif spec.bits_stored == 8 and not spec.signed and spec.modality_lut is None and spec.rescale in (None, (1, 0)):
        y = x / 255.0  # display levels already: as the same pixels in a PNG
    else:
        lo, hi = np.percentile(x, [0.5, 99.5])
        y = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    if spec.photometric == "MONOCHROME1" or spec.presentation_shape == "INVERSE":
        y = 1.0 - y
    return np.floor(y * 255.0 + 0.5).astype(np.uint8)


def replace_value(data: bytes, placeholder: str, value: bytes) -> bytes:
    """Swap a placeholder element value for raw bytes pydicom would not write (invalid numbers, free text)."""
    assert len(value) == len(placeholder) and data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), value)
