"""Read a DICOM Part 10 upload: detect it by content, check what it is, decode its one frame to 8 bits.

Privacy: a DICOM file carries the patient's name, IDs and dates. Only the tags below are parsed
(``dcmread(specific_tags=...)``); no dataset, repr or tag value ever reaches a log line, an
error message or a metric. Errors name the attribute, never its value; the response details
echo only values from fixed vocabularies (modality and view codes, photometric interpretation,
transfer syntax names) and numbers of the grayscale transform. pydicom's own warnings and log
records quote values, so they are silenced for the whole process when this module loads.

Bounded work: the transfer syntax is read from the file meta before the dataset (deflated
datasets, which would have to be inflated without bound, are refused), and Rows x Columns is
checked against the pixel limit before any pixel data is decoded.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom.config
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.tag import BaseTag

from app.core import dicom_codecs
from app.core.dicom_pixels import Display, Lut, Window, to_display
from app.core.image_errors import CorruptImageError, ImageError, ImageTooLargeError, UnsupportedImageError

# pydicom quotes element values in its warnings and log records (e.g. an invalid PN value): no value
# validation while reading, and its logger neither prints nor passes records on to ours.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.setLevel(logging.CRITICAL + 1)
_pydicom_log.propagate = False
dicom_codecs.register()


_QUIET_MODULES = (r"pydicom(\.|$)", r"app\.core\.dicom")  # warnings raised in pydicom, or attributed to its callers


def _silence_pydicom_warnings() -> None:
    """Ignore warnings from pydicom, checked on every call rather than set once at import.

    Code that wraps the import in ``warnings.catch_warnings()`` (test runners do) would otherwise
    drop the filters again. A filter is added only when missing: ``filterwarnings`` re-inserts an
    existing one at the front, which would move ours ahead of filters a caller added since.
    """
    installed = {(action, getattr(module, "pattern", module)) for action, _, _, module, _ in warnings.filters}
    for module in _QUIET_MODULES:
        if ("ignore", module) not in installed:
            warnings.filterwarnings("ignore", module=module)


RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
NON_FRONTAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLO", "RLO"})
NATIVE_SYNTAXES = frozenset({uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian})
SUPPORTED_SYNTAXES = NATIVE_SYNTAXES | dicom_codecs.SYNTAXES

# Values echoed in responses and messages only when they are one of these codes (PS3.3 C.7.3.1.1.1,
# C.8.11.5.1.1); anything else in a tag could be free text.
_KNOWN_MODALITIES = frozenset(
    {
        "AR",
        "ASMT",
        "AU",
        "BDUS",
        "BI",
        "BMD",
        "CFM",
        "CR",
        "CT",
        "CTPROTOCOL",
        "DG",
        "DMS",
        "DOC",
        "DR",
        "DX",
        "ECG",
        "EEG",
        "EMG",
        "EOG",
        "EPS",
        "ES",
        "FID",
        "GM",
        "HC",
        "HD",
        "IO",
        "IOL",
        "IVOCT",
        "IVUS",
        "KER",
        "KO",
        "LEN",
        "LS",
        "M3D",
        "MG",
        "MR",
        "NM",
        "OAM",
        "OCT",
        "OP",
        "OPM",
        "OPT",
        "OPTBSV",
        "OPTENF",
        "OPV",
        "OSS",
        "OT",
        "PA",
        "PLAN",
        "POS",
        "PR",
        "PT",
        "PX",
        "REG",
        "RESP",
        "RF",
        "RG",
        "RTDOSE",
        "RTIMAGE",
        "RTINTENT",
        "RTPLAN",
        "RTRAD",
        "RTRECORD",
        "RTSEGANN",
        "RTSTRUCT",
        "RWV",
        "SC",
        "SEG",
        "SM",
        "SMR",
        "SR",
        "SRF",
        "STAIN",
        "TEXTUREMAP",
        "TG",
        "US",
        "VA",
        "XA",
        "XAPROTOCOL",
        "XC",
    }
)
_KNOWN_VIEWS = NON_FRONTAL_VIEWS | {"AP", "PA", "LLD", "RLD"}
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_KNOWN_PHOTOMETRIC = _MONOCHROME | frozenset(
    {"PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK"}
)
_VOI_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})
_UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)

# Everything the pipeline reads; every other element is skipped unparsed.
TAGS = [
    "SOPClassUID",
    "Modality",
    "PresentationIntentType",
    "ViewPosition",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleIntercept",
    "RescaleSlope",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PresentationLUTShape",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PixelData",
]


class UnsupportedModalityError(ImageError):
    code = "unsupported_modality"
    default_message = "the DICOM modality is not a plain radiograph (CR, DX or DR are accepted)"


class NotFrontalViewError(ImageError):
    code = "not_frontal_view"
    default_message = "the DICOM view position is lateral or oblique; only frontal (PA/AP) views are accepted"


class NotForPresentationError(ImageError):
    code = "not_for_presentation"
    default_message = (
        "the DICOM image is FOR PROCESSING (raw detector data, not the processed image a reader sees); "
        "send the FOR PRESENTATION image"
    )


class MultiFrameError(ImageError):
    code = "multi_frame"


class NotMonochromeError(ImageError):
    code = "not_monochrome"


@dataclass(frozen=True)
class DicomPolicy:
    """Which metadata checks refuse a DICOM upload; all on by default. Plain values, so it pickles."""

    check_modality: bool = True
    check_view_position: bool = True
    check_presentation_intent: bool = True


DEFAULT_DICOM_POLICY = DicomPolicy()


@dataclass(frozen=True)
class DicomImage:
    """One decoded radiograph: 8-bit display pixels and what was decoded and applied (no patient data)."""

    pixels: np.ndarray  # uint8[rows, columns]
    details: dict[str, str | int | float | bool]


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 (``DICM`` at offset 128), or a dataset without preamble whose first element is plausible.

    Only a few header bytes are looked at, so no other upload is slowed down; JPEG and PNG
    signatures can never match (their first bytes are not a group 0002/0008 tag).
    """
    if data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group, element = struct.unpack_from("<HH", data)
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    if data[4:6] in _EXPLICIT_VRS:  # explicit VR little endian, as file meta always is
        return True
    # Implicit VR little endian starts with an identifying-group element whose 4-byte length fits the file.
    return group == 0x0008 and struct.unpack_from("<I", data, 4)[0] <= len(data) - 8


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def _transfer_syntax(data: bytes) -> uid.UID | None:
    """The Transfer Syntax UID of the file meta, read before the dataset; ``None`` when there is no meta."""
    fp = io.BytesIO(data)
    read_preamble(fp, True)
    if fp.tell() == 0 and data[:2] != b"\x02\x00":  # no preamble and no file meta: a bare dataset
        return None
    meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta)
    value = meta.get("TransferSyntaxUID")
    return uid.UID(str(value).strip("\0 ")) if value else None


def _syntax_name(syntax: uid.UID) -> str:
    """The standard name of a transfer syntax, or the UID itself when it is one (never free text)."""
    if syntax.is_transfer_syntax:
        return syntax.name
    text = str(syntax)
    return text if len(text) <= 64 and _UID_SYNTAX.fullmatch(text) else "an invalid UID"


def _read(data: bytes, *, stop_before_pixels: bool, tags: list[str]) -> tuple[Dataset, uid.UID]:
    """The listed elements of the dataset and its transfer syntax; only a supported syntax is parsed."""
    _silence_pydicom_warnings()
    try:
        syntax = _transfer_syntax(data)
    except Exception as exc:  # pydicom raises many types on hostile bytes; none may escape as a 500
        raise CorruptImageError("the DICOM file meta information cannot be parsed") from exc
    if syntax is not None and syntax not in SUPPORTED_SYNTAXES:
        raise UnsupportedImageError(f"the DICOM transfer syntax {_syntax_name(syntax)} is not supported")
    try:
        ds = dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels, specific_tags=tags)
        if syntax is None:  # a bare dataset: pydicom worked out the encoding from the first element
            implicit, little = ds.original_encoding
            if implicit is None:
                raise ValueError("no encoding")
            syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian
            syntax = syntax if little else uid.ExplicitVRBigEndian
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
        # pydicom converts element values lazily, on first access; convert them all here, so that a malformed
        # value (an unknown VR, a bad length) is a parse error now rather than an exception anywhere later.
        ds.walk(lambda _dataset, _element: None)
    except Exception as exc:
        raise CorruptImageError("the DICOM data set cannot be parsed; it is corrupt or truncated") from exc
    return ds, syntax


def _code(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def _number(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """A numeric element (first value when multi-valued), checked finite; ``default`` when absent or empty."""
    if keyword not in ds or ds[keyword].value in (None, "", b""):
        return default
    try:
        value = ds[keyword].value
        number = float(value[0] if isinstance(value, MultiValue | list | tuple) else value)
    except (TypeError, ValueError, IndexError, OverflowError) as exc:
        raise CorruptImageError(f"the DICOM element {keyword} is not a number") from exc
    if not np.isfinite(number):
        raise CorruptImageError(f"the DICOM element {keyword} is not finite")
    return number


def _integer(ds: Dataset, keyword: str, default: int | None = None) -> int:
    number = _number(ds, keyword, None if default is None else float(default))
    if number is None:
        raise CorruptImageError(f"the DICOM header lacks {keyword}")
    if number != int(number):
        raise CorruptImageError(f"the DICOM element {keyword} is not an integer")
    return int(number)


def _check_policy(ds: Dataset, policy: DicomPolicy) -> None:
    """The metadata checks; an absent tag is never an error."""
    modality = _code(ds, "Modality")
    if policy.check_modality and modality and modality not in RADIOGRAPH_MODALITIES:
        shown = modality if modality in _KNOWN_MODALITIES else "an unrecognised modality"
        raise UnsupportedModalityError(f"the DICOM modality is {shown}, not a plain radiograph (CR, DX or DR)")
    view = _code(ds, "ViewPosition")
    if policy.check_view_position and view in NON_FRONTAL_VIEWS:
        raise NotFrontalViewError(f"the DICOM view position is {view}; only frontal (PA/AP) views are accepted")
    if policy.check_presentation_intent and _code(ds, "PresentationIntentType") == "FOR PROCESSING":
        raise NotForPresentationError()


def _lut(ds: Dataset, keyword: str, little_endian: bool, signed_input: bool) -> Lut | None:
    """Item 0 of a Modality or VOI LUT Sequence (PS3.3 C.11.1, C.11.2); ``None`` when absent or empty."""
    sequence = ds.get(keyword)
    if not sequence:
        return None
    item = sequence[0]
    descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
    try:
        entries, first, bits = (int(value) for value in descriptor)
    except (TypeError, ValueError) as exc:
        raise CorruptImageError(f"the LUT Descriptor of the DICOM {keyword} is invalid") from exc
    entries = entries or 65536  # 0 means 2^16 entries
    if signed_input and first > 0x7FFF:  # the first mapped value is SS when the input is signed
        first -= 0x10000
    if isinstance(data, bytes | bytearray):  # OW: 16-bit words in the data set's byte order
        table = np.frombuffer(bytes(data[: len(data) // 2 * 2]), dtype="<u2" if little_endian else ">u2")
    elif data is not None:
        try:  # US/SS give ints; a VR the standard does not allow can give text or 64-bit values
            table = np.atleast_1d(np.asarray(data, dtype=np.int64))
        except (TypeError, ValueError, OverflowError) as exc:
            raise CorruptImageError(f"the LUT Data of the DICOM {keyword} is not a list of integers") from exc
    else:
        table = np.empty(0)
    if not 1 <= bits <= 16 or table.size != entries or table.min() < 0:
        raise CorruptImageError(f"the LUT Data of the DICOM {keyword} does not match its LUT Descriptor")
    return Lut(first_mapped=first, bits=bits, data=table.astype(np.int64))


def _display(ds: Dataset, syntax: uid.UID, photometric: str, signed: bool, bits_stored: int) -> Display:
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    rescale = None
    if slope is not None or intercept is not None:
        rescale = (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)
        if rescale[0] == 0:
            raise CorruptImageError("the DICOM Rescale Slope is 0, which maps every pixel to one value")
    little = syntax.is_little_endian
    window = None
    center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if center is not None and width is not None:
        function = _code(ds, "VOILUTFunction") or "LINEAR"
        if function not in _VOI_FUNCTIONS:
            raise CorruptImageError("the DICOM VOI LUT Function is not LINEAR, LINEAR_EXACT or SIGMOID")
        window = Window(center, width, function)  # type: ignore[arg-type]
    modality_lut = _lut(ds, "ModalityLUTSequence", little, signed)
    return Display(
        rescale=rescale,
        modality_lut=modality_lut,
        voi_lut=_lut(ds, "VOILUTSequence", little, signed),
        window=window,
        inverted=photometric == "MONOCHROME1" or _code(ds, "PresentationLUTShape") == "INVERSE",
        eight_bit_levels=bits_stored == 8 and not signed and modality_lut is None and rescale in (None, (1.0, 0.0)),
    )


def decode_dicom(data: bytes, max_pixels: int, policy: DicomPolicy = DEFAULT_DICOM_POLICY) -> DicomImage:
    """Check and decode a single-frame grayscale radiograph to display pixels; every failure is an ImageError."""
    ds, syntax = _read(data, stop_before_pixels=False, tags=TAGS)
    _check_policy(ds, policy)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedImageError("DICOM images with floating-point pixel data are not supported")
    if "PixelData" not in ds:
        if "Rows" in ds or "Columns" in ds or "SOPClassUID" not in ds:
            raise CorruptImageError("the DICOM file ends before its pixel data: it is truncated or corrupt")
        raise UnsupportedImageError("the DICOM file has no image pixel data (a report or other non-image object)")

    photometric = _code(ds, "PhotometricInterpretation")
    if not photometric:
        raise CorruptImageError("the DICOM header lacks PhotometricInterpretation")
    samples = _integer(ds, "SamplesPerPixel", 1)
    if samples != 1 or photometric not in _MONOCHROME:
        shown = photometric if photometric in _KNOWN_PHOTOMETRIC else "an unrecognised photometric interpretation"
        raise NotMonochromeError(
            f"the DICOM image is {shown} with {samples} samples per pixel; only grayscale "
            "(MONOCHROME1/MONOCHROME2) radiographs are accepted"
        )
    frames = _integer(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise MultiFrameError(f"the DICOM file holds {frames} frames; send a single-frame radiograph")
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    if rows <= 0 or columns <= 0:
        raise CorruptImageError("the DICOM header declares zero Rows or Columns")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(f"image is {columns}x{rows} = {rows * columns} pixels, over the limit of {max_pixels}")
    bits_allocated = _integer(ds, "BitsAllocated")
    if bits_allocated not in (8, 16):
        raise UnsupportedImageError(f"DICOM images with {bits_allocated} bits allocated are not supported (8 or 16)")
    bits_stored = _integer(ds, "BitsStored", bits_allocated)
    representation = _integer(ds, "PixelRepresentation", 0)
    if not 1 <= bits_stored <= bits_allocated or representation not in (0, 1):
        raise CorruptImageError("the DICOM Bits Stored or Pixel Representation is invalid")
    display = _display(ds, syntax, photometric, representation == 1, bits_stored)
    if syntax in NATIVE_SYNTAXES and len(ds.PixelData) < rows * columns * bits_allocated // 8:
        raise CorruptImageError("the DICOM pixel data is shorter than Rows x Columns: the file is truncated")

    options: dict[str, Any] = {
        "rows": rows,
        "columns": columns,
        "samples_per_pixel": 1,
        "number_of_frames": 1,
        "bits_allocated": bits_allocated,
        "bits_stored": bits_stored,
        "pixel_representation": representation,
        "photometric_interpretation": photometric,
    }
    plugin = dicom_codecs.PLUGIN if syntax in dicom_codecs.SYNTAXES else ""
    try:
        stored = np.asarray(pixel_array(ds, index=0, decoding_plugin=plugin, **options))
    except Exception as exc:  # any decoder failure on hostile bytes is the upload's fault, not a 500
        raise CorruptImageError("the DICOM pixel data cannot be decoded: it is corrupt or truncated") from exc
    if stored.shape != (rows, columns) or stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2:
        raise CorruptImageError("the decoded DICOM pixel data does not match Rows and Columns")

    pixels, applied = to_display(stored, display)
    details: dict[str, str | int | float | bool] = {
        "transfer_syntax": _syntax_name(syntax),
        "photometric_interpretation": photometric,
        "bits_stored": bits_stored,
    }
    modality, view = _code(ds, "Modality"), _code(ds, "ViewPosition")
    if modality in _KNOWN_MODALITIES:
        details["modality"] = modality
    if view in _KNOWN_VIEWS:
        details["view_position"] = view
    return DicomImage(pixels, details | applied)


def read_sop_instance_uid(data: bytes) -> str:
    """The SOP Instance UID of a DICOM file, for the scorer's ``--with-uids``; "" when absent or not a valid UID."""
    if not is_dicom(data):
        return ""
    try:
        ds, _ = _read(data, stop_before_pixels=True, tags=["SOPInstanceUID"])
    except ImageError:
        return ""
    value = str(ds.get("SOPInstanceUID") or "").strip("\0 ")
    return value if len(value) <= 64 and _UID_SYNTAX.fullmatch(value) else ""
