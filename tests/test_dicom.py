"""DICOM input in the shared preprocessing: pixel pipeline, codecs, metadata checks, limits, privacy, hostile files.

Fixtures are built here with pydicom and encoded with imagecodecs or pydicom's own RLE encoder
(nothing is downloaded); expected display pixels come from ``tests.dicom_files``, written from
the standard independently of ``app.core.dicom_pixels``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence

from app.core import dicom
from app.core.artifacts import LoadedModel, load_model
from app.core.decision import pneumonia_probability
from app.core.dicom import DicomPolicy, decode_dicom, is_dicom, read_sop_instance_uid
from app.core.dicom_codecs import PLUGIN
from app.core.image_errors import CorruptImageError, ImageTooLargeError, UnsuitableShapeError, UnsupportedImageError
from app.core.preprocessing import ImageError, prepare_input, preprocess
from tests.conftest import TEST_INPUT_SIZE, encode, synthetic_xray
from tests.dicom_files import (
    PATIENT_ID,
    PATIENT_NAME,
    LutSpec,
    Spec,
    chest_stored,
    dicom_bytes,
    encode_frame,
    expected_display,
    replace_value,
)

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"  # bundled in the wheel; never downloaded
CHECKS_OFF = DicomPolicy(check_modality=False, check_view_position=False, check_presentation_intent=False)
GAMMA_LUT = LutSpec(100, 12, tuple(int(4095 * (i / 3999) ** 0.6) for i in range(4000)))
SIGNED_LUT = LutSpec(-2048, 16, tuple(65535 - 16 * i for i in range(4096)))  # descending: also inverts

VARIANTS: dict[str, Spec] = {
    "mono2_8bit": Spec(bits_stored=8),
    "mono2_12bit": Spec(),
    "mono2_16bit": Spec(bits_stored=16),
    "mono1_8bit": Spec(photometric="MONOCHROME1", bits_stored=8),
    "mono1_12bit": Spec(photometric="MONOCHROME1"),
    "mono1_16bit_window": Spec(photometric="MONOCHROME1", bits_stored=16, window=(30000, 40000)),
    "rescale": Spec(rescale=(0.5, -100.0)),
    "rescale_negative_slope": Spec(rescale=(-1.0, 4095.0)),
    "rescale_window": Spec(rescale=(2.0, -1000.0), window=(2600, 5000)),
    "signed_rescale_window": Spec(signed=True, rescale=(1.0, 2048.0), window=(2000, 3000)),
    "window_linear": Spec(window=(1800, 2500)),
    "window_linear_exact": Spec(window=(1800, 2500), voi_function="LINEAR_EXACT"),
    "window_sigmoid": Spec(window=(1800, 2500), voi_function="SIGMOID"),
    "mono1_window": Spec(photometric="MONOCHROME1", window=(1800, 2500)),
    "voi_lut": Spec(voi_lut=GAMMA_LUT),
    "voi_lut_preferred_to_window": Spec(voi_lut=GAMMA_LUT, window=(100, 200)),
    "voi_lut_ow_implicit": Spec(syntax=uid.ImplicitVRLittleEndian, lut_words=True, voi_lut=GAMMA_LUT),
    "voi_lut_signed_first_value": Spec(signed=True, voi_lut=SIGNED_LUT),
    "mono1_voi_lut": Spec(photometric="MONOCHROME1", voi_lut=GAMMA_LUT),
    "modality_lut": Spec(modality_lut=LutSpec(0, 16, tuple((i * 7919) % 65536 for i in range(4096)))),
    "modality_lut_ow": Spec(
        lut_words=True, modality_lut=LutSpec(0, 16, tuple((i * 7919) % 65536 for i in range(4096)))
    ),
    "voi_lut_one_bit": Spec(voi_lut=LutSpec(0, 1, tuple(int(i >= 2048) for i in range(4096)))),  # black or white
    "presentation_lut_inverse": Spec(presentation_shape="INVERSE"),
    "mono1_with_inverse_shape": Spec(photometric="MONOCHROME1", presentation_shape="INVERSE"),
    "implicit_vr": Spec(syntax=uid.ImplicitVRLittleEndian),
    "big_endian": Spec(syntax=uid.ExplicitVRBigEndian, bits_stored=16),
    "no_preamble_implicit": Spec(preamble=False, syntax=uid.ImplicitVRLittleEndian),
    "no_preamble_explicit": Spec(preamble=False, window=(1800, 2500)),
    "rle_8bit": Spec(syntax=uid.RLELossless, bits_stored=8),
    "rle_12bit_rescale": Spec(syntax=uid.RLELossless, rescale=(1.5, 10.0)),
    "rle_16bit_mono1": Spec(syntax=uid.RLELossless, bits_stored=16, photometric="MONOCHROME1"),
    "jpeg_lossless_sv1_8bit": Spec(syntax=uid.JPEGLosslessSV1, bits_stored=8),
    "jpeg_lossless_sv1_12bit": Spec(syntax=uid.JPEGLosslessSV1),
    "jpeg_lossless_sv1_16bit_window": Spec(syntax=uid.JPEGLosslessSV1, bits_stored=16, window=(30000, 50000)),
    "jpeg_lossless_sv1_mono1": Spec(syntax=uid.JPEGLosslessSV1, photometric="MONOCHROME1"),
    "jpeg_lossless_sv1_signed": Spec(syntax=uid.JPEGLosslessSV1, signed=True),
    "jpeg_lossless_predictor6": Spec(syntax=uid.JPEGLossless, bits_stored=16),
    "jpeg_ls_12bit": Spec(syntax=uid.JPEGLSLossless),
    "jpeg_ls_mono1_voi_lut": Spec(syntax=uid.JPEGLSLossless, photometric="MONOCHROME1", voi_lut=GAMMA_LUT),
    "jpeg_ls_signed": Spec(syntax=uid.JPEGLSLossless, signed=True),
    "jpeg_2000_lossless_12bit": Spec(syntax=uid.JPEG2000Lossless),
    "jpeg_2000_lossless_16bit_mono1": Spec(syntax=uid.JPEG2000Lossless, bits_stored=16, photometric="MONOCHROME1"),
    "jpeg_2000_lossless_signed": Spec(syntax=uid.JPEG2000Lossless, signed=True, rescale=(1.0, 2048.0)),
    "htj2k_lossless": Spec(syntax=uid.HTJ2KLossless),
}
LOSSLESS = sorted(name for name, spec in VARIANTS.items() if uid.UID(spec.syntax).is_compressed)


@pytest.fixture(scope="module")
def model(tiny_weights: Path) -> LoadedModel:
    return load_model(tiny_weights)


def probabilities(model: LoadedModel, inputs: list[torch.Tensor]) -> list[float]:
    with torch.inference_mode():
        logits = model.network(torch.stack(inputs))
    return pneumonia_probability(logits, model.metadata.temperature).tolist()


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels, "L"), "PNG")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_display_pixels_follow_the_standard(name: str) -> None:
    spec = VARIANTS[name]
    stored = chest_stored(spec)
    decoded = decode_dicom(dicom_bytes(spec, stored), max_pixels=10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, spec))


def test_probability_equals_the_png_of_the_same_pixels(model: LoadedModel) -> None:
    """The issue's parity requirement: DICOM in, the same probability as a PNG of the displayed pixels."""
    names = sorted(VARIANTS)
    from_dicom, from_png = [], []
    for name in names:
        spec = VARIANTS[name]
        stored = chest_stored(spec)
        from_dicom.append(preprocess(dicom_bytes(spec, stored), TEST_INPUT_SIZE))
        from_png.append(preprocess(png(expected_display(stored, spec)), TEST_INPUT_SIZE))
        assert torch.equal(from_dicom[-1], from_png[-1]), name
    for name, p_dicom, p_png in zip(
        names, probabilities(model, from_dicom), probabilities(model, from_png), strict=True
    ):
        assert abs(p_dicom - p_png) <= 1e-6, name


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_syntaxes_decode_bit_exactly(name: str) -> None:
    spec = VARIANTS[name]
    stored = chest_stored(spec)
    decoded = pixel_array(io.BytesIO(dicom_bytes(spec, stored)), decoding_plugin=PLUGIN)
    np.testing.assert_array_equal(decoded, stored)


def _reference_decode(frame: bytes, syntax: str) -> np.ndarray:
    """Lossy frames decoded straight by a codec library, without pydicom or the code under test."""
    if syntax == uid.JPEGBaseline8Bit:
        return np.asarray(Image.open(io.BytesIO(frame)))
    if syntax == uid.JPEGLSNearLossless:
        return imagecodecs.jpegls_decode(frame)
    if syntax == uid.JPEG2000:
        return imagecodecs.jpeg2k_decode(frame)
    return imagecodecs.jpeg8_decode(frame)


@pytest.mark.parametrize(
    "spec",
    [
        Spec(syntax=uid.JPEGBaseline8Bit, bits_stored=8),
        Spec(syntax=uid.JPEGBaseline8Bit, bits_stored=8, photometric="MONOCHROME1", window=(120, 200)),
        Spec(syntax=uid.JPEGExtended12Bit),
        Spec(syntax=uid.JPEGLSNearLossless),
        Spec(syntax=uid.JPEG2000, bits_stored=16),
    ],
    ids=["jpeg_baseline", "jpeg_baseline_mono1_window", "jpeg_extended_12bit", "jpeg_ls_near_lossless", "j2k_lossy"],
)
def test_lossy_syntaxes_show_what_the_codec_decodes(spec: Spec) -> None:
    stored = chest_stored(spec)
    frame = encode_frame(stored.astype(np.uint16 if spec.bits_stored > 8 else np.uint8), spec)
    decoded = decode_dicom(dicom_bytes(spec, stored, frame=frame), max_pixels=10**6)
    # Lossy coding may overshoot the stored range (imagecodecs writes JPEG-LS at 16-bit precision): clamped.
    reference = np.clip(_reference_decode(frame, spec.syntax).astype(np.int64), 0, (1 << spec.bits_stored) - 1)
    np.testing.assert_array_equal(decoded.pixels, expected_display(reference, spec))


def test_same_image_in_every_syntax_of_pydicoms_test_files_decodes_identically() -> None:
    """pydicom ships MR_small in seven encodings (native, big endian, RLE, JPEG-LS, JPEG 2000); same pixels."""
    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm"]
    names += ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
    decoded = [decode_dicom((PYDICOM_FILES / name).read_bytes(), 10**6, CHECKS_OFF) for name in names]
    reference = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    stored = reference.pixel_array.astype(np.int64)  # pydicom's own native decoder
    window = Spec(window=(float(reference.WindowCenter), float(reference.WindowWidth)))
    for name, image in zip(names, decoded, strict=True):
        np.testing.assert_array_equal(image.pixels, expected_display(stored, window), err_msg=name)


@pytest.mark.parametrize(("name", "modality"), [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("JPEG2000.dcm", "NM")])
def test_ct_mr_and_nm_files_are_not_radiographs(name: str, modality: str) -> None:
    data = (PYDICOM_FILES / name).read_bytes()
    with pytest.raises(dicom.UnsupportedModalityError, match=f"modality is {modality},"):
        preprocess(data, TEST_INPUT_SIZE)
    if modality == "NM":  # a 256 x 1024 whole-body scan: with the metadata checks off, its shape is refused
        with pytest.raises(UnsuitableShapeError, match=r"the image is 256x1024 px, its sides 4\.00:1"):
            preprocess(data, TEST_INPUT_SIZE, dicom=CHECKS_OFF)
        return
    assert preprocess(data, TEST_INPUT_SIZE, dicom=CHECKS_OFF).shape == (1, TEST_INPUT_SIZE, TEST_INPUT_SIZE)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (Spec(modality="CT"), dicom.UnsupportedModalityError),
        (Spec(modality="OT"), dicom.UnsupportedModalityError),
        (Spec(modality="XYZZY"), dicom.UnsupportedModalityError),
        (Spec(view="LL"), dicom.NotFrontalViewError),
        (Spec(view="RL"), dicom.NotFrontalViewError),
        (Spec(view="LAT"), dicom.NotFrontalViewError),
        (Spec(view="rlo "), dicom.NotFrontalViewError),
        (Spec(intent="FOR PROCESSING"), dicom.NotForPresentationError),
    ],
    ids=["ct", "other", "unknown_modality", "ll", "rl", "lat", "oblique_lowercase", "for_processing"],
)
def test_metadata_checks_refuse_and_each_can_be_switched_off(spec: Spec, error: type[ImageError]) -> None:
    data = dicom_bytes(spec)
    with pytest.raises(error):
        preprocess(data, TEST_INPUT_SIZE)
    switch = {
        dicom.UnsupportedModalityError: "check_modality",
        dicom.NotFrontalViewError: "check_view_position",
        dicom.NotForPresentationError: "check_presentation_intent",
    }[error]
    assert preprocess(data, TEST_INPUT_SIZE, dicom=DicomPolicy(**{switch: False})).shape[0] == 1


@pytest.mark.parametrize(
    "spec",
    [
        Spec(modality=None, view=None, intent=None),
        Spec(modality="CR", view="AP"),
        Spec(modality="DR", view="PA"),
        Spec(view="LLD"),  # decubitus: a frontal projection with the patient on their side
    ],
    ids=["tags_missing", "cr_ap", "dr_pa", "decubitus"],
)
def test_radiographs_pass_and_missing_tags_are_not_errors(spec: Spec) -> None:
    assert preprocess(dicom_bytes(spec), TEST_INPUT_SIZE).shape == (1, TEST_INPUT_SIZE, TEST_INPUT_SIZE)


def test_multi_frame_and_colour_are_refused_with_their_own_codes() -> None:
    frames = np.stack([chest_stored(Spec(), seed=seed) for seed in range(2)])
    with pytest.raises(dicom.MultiFrameError, match="2 frames"):
        preprocess(dicom_bytes(Spec(frames=2), frames), TEST_INPUT_SIZE)
    rgb = np.repeat(chest_stored(Spec(bits_stored=8))[..., None], 3, axis=2).astype(np.uint8)
    with pytest.raises(dicom.NotMonochromeError, match="RGB with 3 samples"):
        preprocess(dicom_bytes(Spec(bits_stored=8, samples=3, photometric="RGB"), rgb.transpose(2, 0, 1)), 32)
    with pytest.raises(dicom.NotMonochromeError, match="PALETTE COLOR"):
        preprocess(dicom_bytes(Spec(bits_stored=8, photometric="PALETTE COLOR")), TEST_INPUT_SIZE)
    with pytest.raises(dicom.MultiFrameError):
        preprocess((PYDICOM_FILES / "rtdose.dcm").read_bytes(), TEST_INPUT_SIZE, dicom=CHECKS_OFF)


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.JPEGLosslessSV1, uid.JPEG2000Lossless])
def test_huge_rows_and_columns_are_refused_before_any_decoding(syntax: str, monkeypatch: pytest.MonkeyPatch) -> None:
    small = chest_stored(Spec())
    data = dicom_bytes(Spec(syntax=syntax, extra={"Rows": 60000, "Columns": 50000}), small)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(dicom, "pixel_array", never)
    with pytest.raises(ImageTooLargeError, match="50000x60000 = 3000000000 pixels"):
        preprocess(data, TEST_INPUT_SIZE, 100_000_000)


def test_pixel_limit_counts_rows_times_columns() -> None:
    data = dicom_bytes(Spec())
    assert preprocess(data, TEST_INPUT_SIZE, max_pixels=96 * 80).shape[0] == 1
    with pytest.raises(ImageTooLargeError):
        preprocess(data, TEST_INPUT_SIZE, max_pixels=96 * 80 - 1)


def test_a_frame_larger_than_its_header_is_refused_before_decoding() -> None:
    """A small DICOM header must not let a codec allocate a bigger image: the frame header is checked first."""
    big = np.zeros((4000, 3000), dtype=np.uint16)
    for syntax, frame in [
        (uid.JPEGLosslessSV1, imagecodecs.jpeg8_encode(big, lossless=True, bitspersample=12)),
        (uid.JPEG2000Lossless, imagecodecs.jpeg2k_encode(big, codecformat="J2K", reversible=True)),
        (uid.JPEGLSLossless, imagecodecs.jpegls_encode(big)),
    ]:
        with pytest.raises(CorruptImageError):
            decode_dicom(dicom_bytes(Spec(syntax=syntax), frame=frame), 10**6)
    with pytest.raises(CorruptImageError):  # pydicom's crafted 3.8-terapixel JPEG 2000 frame
        decode_dicom((PYDICOM_FILES / "JPEG2000-embedded-sequence-delimiter.dcm").read_bytes(), 10**6, CHECKS_OFF)


def _with_syntax_text(data: bytes, old: str, new: bytes) -> bytes:
    assert len(new) == len(old) and data.count(old.encode()) == 1
    return data.replace(old.encode(), new)


def test_unsupported_transfer_syntaxes_are_415_with_their_name() -> None:
    mpeg = dicom_bytes(Spec(syntax=uid.MPEG2MPML), frame=b"\x00\x00\x01\xb3" + bytes(60))
    cases = {
        "MPEG2 Main Profile / Main Level": mpeg,
        "Deflated Explicit VR Little Endian": (PYDICOM_FILES / "image_dfl.dcm").read_bytes(),
        "1.2.840.10008.1.2.4.110": _with_syntax_text(mpeg, uid.MPEG2MPML, b"1.2.840.10008.1.2.4.110"),  # JPEG XL
        "an invalid UID": _with_syntax_text(mpeg, uid.MPEG2MPML, b"=HYPERLINK(0)" + b" " * 10),
    }
    for name, data in cases.items():
        with pytest.raises(UnsupportedImageError) as caught:
            preprocess(data, TEST_INPUT_SIZE, dicom=CHECKS_OFF)
        assert caught.value.code == "unsupported_media_type"
        assert f"transfer syntax {name} is not supported" in caught.value.message
    # Letters make a UID invalid, even where what is left without them is a supported syntax.
    lettered = _with_syntax_text(mpeg, uid.MPEG2MPML, b"1.2.840.10008.1.2.1XXXX")
    with pytest.raises(UnsupportedImageError, match="transfer syntax an invalid UID is not supported"):
        preprocess(lettered, TEST_INPUT_SIZE, dicom=CHECKS_OFF)


def _truncated(spec: Spec, keep: int) -> bytes:
    return dicom_bytes(spec)[:keep]


ENDS_EARLY = "the DICOM file ends before its pixel data: it is truncated or corrupt"
SHORT_PIXELS = "the DICOM pixel data is shorter than Rows x Columns: the file is truncated"
# An explicit-VR sequence of undefined length whose first item claims 16 bytes and holds 4 (after its tag).
OPEN_SEQUENCE = b"SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00xxxx"
# Each damaged file with the message that says what is wrong with it.
CORRUPTIONS: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated_in_header": (lambda: _truncated(Spec(), 200), ENDS_EARLY),
    "truncated_in_pixels": (lambda: _truncated(Spec(), -3000), SHORT_PIXELS),
    "truncated_compressed": (lambda: _truncated(Spec(syntax=uid.JPEGLosslessSV1), -500), ENDS_EARLY),
    "compressed_frame_garbage": (
        lambda: dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1), frame=b"\xff\xd8" + bytes(200)),
        "the DICOM pixel data cannot be decoded: it is corrupt or truncated",
    ),
    "only_preamble": (lambda: bytes(128) + b"DICM", ENDS_EARLY),
    "garbage_after_marker": (lambda: bytes(128) + b"DICM" + b"\xff" * 300, ENDS_EARLY),
    "pydicom_truncated_file": (lambda: (PYDICOM_FILES / "MR_truncated.dcm").read_bytes(), SHORT_PIXELS),
    # found by fuzzing: an unknown VR raised NotImplementedError on first access, not at parse time
    "unknown_vr_in_rows": (
        lambda: dicom_bytes(Spec()).replace(b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00U@", 1),
        "the DICOM data set cannot be parsed; it is corrupt or truncated",
    ),
    "window_width_zero": (
        lambda: dicom_bytes(Spec(window=(2000, 0))),
        "the DICOM Window Width is below 1, which LINEAR windowing does not allow",
    ),
    "window_not_a_number": (
        lambda: replace_value(dicom_bytes(Spec(window=(1234567, 10))), "1234567", b"abcdefg"),
        "the DICOM element WindowCenter is not a number",
    ),
    "unknown_voi_function": (
        lambda: dicom_bytes(Spec(window=(2000, 1000), voi_function="CUBIC")),
        "the DICOM VOI LUT Function is not LINEAR, LINEAR_EXACT or SIGMOID",
    ),
    "lut_shorter_than_descriptor": (
        lambda: dicom_bytes(Spec(voi_lut=LutSpec(0, 12, (1, 2, 3), entries=16))),
        "the LUT Data of the DICOM VOILUTSequence does not match its LUT Descriptor",
    ),
    "rescale_slope_zero": (
        lambda: dicom_bytes(Spec(rescale=(0.0, 5.0))),
        "the DICOM Rescale Slope is 0, which maps every pixel to one value",
    ),
    "missing_rows": (lambda: dicom_bytes(Spec(extra={"Rows": None})), "the DICOM header lacks Rows"),
    "zero_columns": (
        lambda: dicom_bytes(Spec(extra={"Columns": 0})),
        "the DICOM header declares zero Rows or Columns",
    ),
    "bits_stored_over_allocated": (
        lambda: dicom_bytes(Spec(extra={"BitsStored": 20})),
        "the DICOM Bits Stored or Pixel Representation is invalid",
    ),
    # a sequence left open in the file meta, as (0002,0010)
    "meta_sequence_left_open": (
        lambda: bytes(128) + b"DICM\x02\x00\x10\x00" + OPEN_SEQUENCE,
        "the DICOM file meta information cannot be parsed",
    ),
    # the same after the pixel data, as (7FE1,0010): the file meta is read on its own, so this is the data set's damage
    "trailing_sequence_left_open": (
        lambda: dicom_bytes(Spec()) + b"\xe1\x7f\x10\x00" + OPEN_SEQUENCE,
        "the DICOM data set cannot be parsed; it is corrupt or truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_files_are_corrupt_image_never_a_crash(case: str) -> None:
    """Each damage gets the message that says what is wrong with the file, word for word."""
    make, message = CORRUPTIONS[case]
    data = make()
    assert is_dicom(data)
    with pytest.raises(CorruptImageError) as caught:
        preprocess(data, TEST_INPUT_SIZE, dicom=CHECKS_OFF)  # pydicom's truncated file is an MR
    assert caught.value.message == message


@pytest.mark.parametrize("syntax", [uid.ImplicitVRLittleEndian, uid.ExplicitVRLittleEndian, uid.ExplicitVRBigEndian])
def test_a_bare_data_set_is_read_in_the_encoding_it_was_written_in(syntax: uid.UID) -> None:
    """No file meta: the encoding pydicom detects is the syntax reported, and 16-bit pixels read in its byte order."""
    spec = Spec(preamble=False, syntax=syntax, bits_stored=16)
    bare = decode_dicom(dicom_bytes(spec), 10**6)
    with_meta = decode_dicom(dicom_bytes(dataclasses.replace(spec, preamble=True)), 10**6)
    assert bare.details["transfer_syntax"] == syntax.name
    assert np.array_equal(bare.pixels, with_meta.pixels)
    assert len(np.unique(bare.pixels)) > 10  # a real image, not one grey level either way


def test_fuzzed_files_only_ever_raise_image_errors() -> None:
    """Random truncations and byte flips of every encoding: each decodes or raises an ImageError, nothing else."""
    bases = [
        dicom_bytes(spec)
        for spec in (
            Spec(voi_lut=GAMMA_LUT),
            Spec(syntax=uid.RLELossless),
            Spec(syntax=uid.JPEGLosslessSV1),
            Spec(syntax=uid.JPEGLSLossless),
            Spec(syntax=uid.JPEG2000Lossless),
            Spec(preamble=False, syntax=uid.ImplicitVRLittleEndian, window=(2000, 3000)),
        )
    ]
    rng = np.random.default_rng(12)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(360):
        data = bytearray(bases[int(rng.integers(len(bases)))])
        if rng.random() < 0.4:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 12))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        try:
            prepare_input(bytes(data), TEST_INPUT_SIZE, 10**6)
            outcomes["decoded"] += 1
        except ImageError:
            outcomes["refused"] += 1
    assert outcomes["decoded"] and outcomes["refused"]  # both paths were exercised


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x08\x00\x05\x00\x00\x00\x00\x00", True),  # 8 bytes: implicit (0008,0005), empty: the shortest
        (b"\x08\x00\x05\x00\x00\x00\x00", False),  # 7 bytes: no whole element header
        (b"\x08\x00\xff\x00UI\x00\x00", True),  # element 00FF: the last an identifying group starts with
        (b"\x08\x00\x00\x01UI\x00\x00", False),  # element 0100
        (b"\x08\x00\x00\x80UI\x00\x00", False),  # element 8000, read unsigned
        (b"\x10\x00\x10\x00PN\x04\x00", False),  # (0010,0010) Patient's Name: not where a data set starts
        (b"\x02\x00\x10\x00\x00\x00\x00\x00", False),  # file meta is never implicit VR
        (b"\x08\x00\x05\x00\xff\xff\xff\xff", False),  # a length of 4 GiB, read unsigned, does not fit
        (b"\x08\x00\x05\x00\x04\x00\x00\x00ISO_", True),  # a length that fits exactly
        (b"\x08\x00\x05\x00\x05\x00\x00\x00ISO_", False),  # one byte more than the file holds
    ],
)
def test_a_bare_data_set_is_recognised_by_its_first_element_header(head: bytes, expected: bool) -> None:
    """Hand-built element headers (PS3.5 7.1) at each boundary of the sniffing rule."""
    assert is_dicom(head) is expected


def test_detection_is_by_content() -> None:
    assert is_dicom(dicom_bytes(Spec()))
    assert is_dicom(dicom_bytes(Spec(preamble=False, syntax=uid.ImplicitVRLittleEndian)))
    assert is_dicom(dicom_bytes(Spec(preamble=False)))
    for other in (encode(synthetic_xray(), "JPEG"), encode(synthetic_xray(), "PNG"), b"radiology notes\n", b""):
        assert not is_dicom(other)


@settings(max_examples=200, deadline=None)
@given(
    magic=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"%PDF"]),
    rest=st.binary(max_size=300),
)
def test_other_formats_are_never_taken_for_dicom(magic: bytes, rest: bytes) -> None:
    data = magic + rest
    assert not is_dicom(data) or data[128:132] == b"DICM"


def test_source_says_what_was_decoded_and_nothing_about_the_patient() -> None:
    spec = Spec(syntax=uid.JPEGLosslessSV1, photometric="MONOCHROME1", window=(1800, 2500), modality="CR")
    source = prepare_input(dicom_bytes(spec), TEST_INPUT_SIZE).source
    assert (source.format, source.width, source.height) == ("DICOM", 96, 80)
    assert source.details == {
        "transfer_syntax": uid.JPEGLosslessSV1.name,
        "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 12,
        "modality": "CR",
        "view_position": "PA",
        "modality_lut": "none",
        "voi": "window",
        "window_center": 1800.0,
        "window_width": 2500.0,
        "voi_function": "LINEAR",
        "inverted": True,
    }
    hostile = prepare_input(dicom_bytes(Spec(modality=PATIENT_NAME, view=PATIENT_ID)), 32, dicom=CHECKS_OFF).source
    assert "modality" not in hostile.details and "view_position" not in hostile.details
    assert hostile.details["voi"] == "percentile"


def test_policy_and_results_are_plain_picklable_values() -> None:
    policy = DicomPolicy(check_modality=False)
    assert pickle.loads(pickle.dumps(policy)) == policy
    prepared = prepare_input(dicom_bytes(Spec()), TEST_INPUT_SIZE, dicom=policy)
    restored = pickle.loads(pickle.dumps(prepared))
    assert torch.equal(restored.pixels, prepared.pixels) and restored.source == prepared.source


def test_sop_instance_uid_is_read_only_when_valid() -> None:
    data = dicom_bytes(Spec())
    expected = str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert read_sop_instance_uid(data) == expected
    assert read_sop_instance_uid(dicom_bytes(Spec(extra={"SOPInstanceUID": "=cmd|' /C calc'!A0"}))) == ""
    assert read_sop_instance_uid(encode(synthetic_xray(), "JPEG")) == ""
    assert read_sop_instance_uid((PYDICOM_FILES / "image_dfl.dcm").read_bytes()) == ""  # never inflated


def test_sop_instance_uid_padding_length_limit_and_damaged_files() -> None:
    """PS3.5 9.1: a UID is at most 64 characters, padded with NUL; it is read even where the rest is damaged."""
    longest = "1." + "2" * 62
    cases = {"1.2.3\0": "1.2.3", "1.2.3 ": "1.2.3", longest: longest, longest + "3": ""}
    for value, expected in cases.items():
        assert read_sop_instance_uid(dicom_bytes(Spec(extra={"SOPInstanceUID": value}))) == expected
    # only the UID is parsed: a malformed Rows element or truncated pixel data elsewhere does not hide it
    data = dicom_bytes(Spec(extra={"SOPInstanceUID": "1.2.3.4"}))
    assert read_sop_instance_uid(data.replace(b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00U@", 1)) == "1.2.3.4"
    assert read_sop_instance_uid(data[:-3000]) == "1.2.3.4"


def _hostile_files() -> list[bytes]:
    """The patient name planted where a careless decoder would echo it: in the tags it reads and reports."""
    return [
        dicom_bytes(Spec(modality=PATIENT_NAME)),
        dicom_bytes(Spec(view=PATIENT_NAME)),
        dicom_bytes(Spec(intent=PATIENT_NAME)),
        dicom_bytes(Spec(photometric=PATIENT_NAME[:16])),
        dicom_bytes(Spec(window=(2000, 1000), voi_function=PATIENT_NAME[:16])),
        replace_value(dicom_bytes(Spec(window=(123456789012345, 100))), "123456789012345", PATIENT_NAME[:15].encode()),
        replace_value(dicom_bytes(Spec(extra={"NumberOfFrames": 123456789})), "123456789", PATIENT_NAME[:9].encode()),
        dicom_bytes(Spec(extra={"PatientName": PATIENT_NAME * 5})),  # over the PN length limit: pydicom would warn
        dicom_bytes(Spec()),
        dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1))[:-700],
    ]


def test_patient_data_never_reaches_errors_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        for data in _hostile_files():
            try:
                result = prepare_input(data, TEST_INPUT_SIZE)
                messages.append(repr(result.source))
            except ImageError as exc:
                messages.append(exc.message)
    emitted = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records] + messages
    for text in emitted:
        for secret in (PATIENT_NAME[:12], PATIENT_ID, "19470312"):
            assert secret.lower() not in text.lower()
    assert not logging.getLogger("pydicom").isEnabledFor(logging.CRITICAL)


def _with_element(data: bytes, keyword: str, vr: str, value: object) -> bytes:
    """``data`` saved again with ``keyword`` set to ``value`` in ``vr``, maybe a VR the standard does not give it."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.add_new(keyword, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            lambda: dicom_bytes(Spec(modality="XYZZY")),
            "the DICOM modality is an unrecognised modality, not a plain radiograph (CR, DX or DR)",
        ),
        (
            # pydicom refuses "inf" as a decimal string; a binary float (FD) carries it.
            lambda: _with_element(dicom_bytes(Spec(window=(100, 10))), "WindowCenter", "FD", float("-inf")),
            "the DICOM element WindowCenter is not finite",
        ),
        (
            lambda: dicom_bytes(Spec(voi_lut=LutSpec(0, 17, (1, 2)))),
            "the LUT Data of the DICOM VOILUTSequence does not match its LUT Descriptor",
        ),
        (
            lambda: dicom_bytes(Spec(modality_lut=LutSpec(0, 12, (1, 2, 3), entries=16))),
            "the LUT Data of the DICOM ModalityLUTSequence does not match its LUT Descriptor",
        ),
    ],
    ids=[
        "unknown_modality",
        "window_infinite",
        "lut_17_bits",
        "lut_short",
    ],
)
def test_refusals_say_exactly_which_attribute_is_wrong(data: Callable[[], bytes], message: str) -> None:
    """The message is the response's detail: it names the attribute (never its value), word for word.

    The damaged-file refusals (slope 0, an unknown VOI function, a window that is not a number) are in CORRUPTIONS.
    """
    with pytest.raises(ImageError) as caught:
        decode_dicom(data(), 10**6)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("extra", "rescale", "window"),
    [
        ({"RescaleSlope": 2.0}, (2.0, 0.0), (4096.0, 8192.0)),
        ({"RescaleIntercept": -1000.0}, (1.0, -1000.0), (1000.0, 3000.0)),
    ],
    ids=["slope_only", "intercept_only"],
)
def test_a_lone_rescale_slope_or_intercept_takes_the_identity_for_the_other(
    extra: dict[str, object], rescale: tuple[float, float], window: tuple[float, float]
) -> None:
    """PS3.3 C.11.1 requires both; a header with one of them still means slope 1 or intercept 0 for the other."""
    stored = chest_stored(Spec())
    decoded = decode_dicom(dicom_bytes(Spec(window=window, extra=extra), stored), 10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec(rescale=rescale, window=window)))
    assert (decoded.details["rescale_slope"], decoded.details["rescale_intercept"]) == rescale


@pytest.mark.parametrize("vr", ["DS", "LO"])
def test_an_empty_rescale_slope_counts_as_absent(vr: str) -> None:
    """An element without a value is no rescale; pydicom reads it as None (DS) or "" (a text VR some writers use)."""
    stored = chest_stored(Spec())
    data = _with_element(dicom_bytes(Spec(window=(1800, 2500)), stored), "RescaleSlope", vr, "")
    decoded = decode_dicom(data, 10**6)
    assert decoded.details["modality_lut"] == "none"
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec(window=(1800, 2500))))


@pytest.mark.parametrize("extra", [{"WindowCenter": 2000}, {"WindowWidth": 1000}], ids=["center_only", "width_only"])
def test_half_a_window_is_ignored_for_the_percentile_window(extra: dict[str, object]) -> None:
    """A window needs its center and its width (PS3.3 C.11.2.1.2); with one of them the file declares no window."""
    stored = chest_stored(Spec())
    decoded = decode_dicom(dicom_bytes(Spec(extra=extra), stored), 10**6)
    assert decoded.details["voi"] == "percentile"
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec()))


def test_of_several_windows_the_first_is_applied() -> None:
    """PS3.3 C.11.2.1.2: multiple Window Center/Width values are alternative views, the first being the default."""
    stored = chest_stored(Spec())
    spec = Spec(extra={"WindowCenter": [1800, 3000], "WindowWidth": [2500, 100]})
    decoded = decode_dicom(dicom_bytes(spec, stored), 10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec(window=(1800, 2500))))
    assert (decoded.details["window_center"], decoded.details["window_width"]) == (1800.0, 2500.0)


@pytest.mark.parametrize("lut", ["modality_lut", "voi_lut"])
def test_signed_pixels_read_a_first_mapped_value_written_as_us_as_signed(lut: str) -> None:
    """PS3.3 C.11.1.1.1: the first value mapped follows the pixels' sign; written as US 63488 (0xF800) it is -2048."""
    entries = tuple(65535 - 16 * i for i in range(4096))
    written = Spec(signed=True, **{lut: LutSpec(0xF800, 16, entries)})  # type: ignore[arg-type]
    stored = chest_stored(written)
    decoded = decode_dicom(dicom_bytes(written, stored), 10**6)
    meant = Spec(signed=True, **{lut: LutSpec(-2048, 16, entries)})  # type: ignore[arg-type]
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, meant))


def _lut_dataset(descriptor: list[int] | None, data: object = None, vr: str = "US") -> Dataset:
    """A data set whose VOI LUT Sequence holds one item with these LUT Descriptor and LUT Data (None: left out)."""
    item = Dataset()
    if descriptor is not None:
        item.add_new("LUTDescriptor", "US", descriptor)
    if data is not None:
        item.add_new("LUTData", vr, data)
    ds = Dataset()
    ds.VOILUTSequence = Sequence([item])
    return ds


@pytest.mark.parametrize(
    ("written", "signed", "first"),
    [
        (0xF800, True, -2048),
        (0x8000, True, -32768),
        (0xFFFF, True, -1),
        (0x7FFF, True, 32767),  # the largest positive 16-bit value stays as it is
        (0xF800, False, 63488),
    ],
    ids=["minus_2048", "most_negative", "minus_1", "most_positive", "unsigned_pixels"],
)
def test_lut_first_mapped_value_is_a_16_bit_twos_complement_for_signed_pixels(
    written: int, signed: bool, first: int
) -> None:
    lut = dicom._lut(_lut_dataset([2, written, 16], [7, 9]), "VOILUTSequence", True, signed)
    assert lut is not None
    assert (lut.first_mapped, lut.bits, lut.data.tolist(), lut.data.dtype) == (first, 16, [7, 9], np.int64)


@pytest.mark.parametrize(
    ("little_endian", "data", "expected"),
    [
        (True, b"\x01\x02\x03\x04", [0x0201, 0x0403]),
        (False, b"\x01\x02\x03\x04", [0x0102, 0x0304]),
        (True, b"\x01\x02\x03\x04\x05", [0x0201, 0x0403]),  # a stray odd byte is no whole word
    ],
    ids=["little_endian", "big_endian", "odd_length"],
)
def test_ow_lut_data_is_16_bit_words_in_the_data_sets_byte_order(
    little_endian: bool, data: bytes, expected: list[int]
) -> None:
    """PS3.5 7.3: OW values are swapped with the transfer syntax's byte order, unlike OB."""
    lut = dicom._lut(_lut_dataset([2, 0, 16], data, "OW"), "VOILUTSequence", little_endian, False)
    assert lut is not None and lut.data.tolist() == expected


@pytest.mark.parametrize(
    ("descriptor", "entries", "bits"),
    [([0, 0, 16], list(range(65536)), 16), ([2, 0, 1], [0, 1], 1), ([2, 0, 16], [0, 65535], 16)],
    ids=["zero_means_65536_entries", "one_bit", "sixteen_bits"],
)
def test_lut_descriptors_at_the_limits_are_accepted(descriptor: list[int], entries: list[int], bits: int) -> None:
    """PS3.3 C.11.1.1.1: 0 entries means 2^16, and the output depth is 1 to 16 bits."""
    lut = dicom._lut(_lut_dataset(descriptor, entries), "VOILUTSequence", True, False)
    assert lut is not None and (lut.bits, lut.data.tolist()) == (bits, entries)


BAD_DESCRIPTOR = "the LUT Descriptor of the DICOM VOILUTSequence is invalid"
BAD_DATA = "the LUT Data of the DICOM VOILUTSequence does not match its LUT Descriptor"


@pytest.mark.parametrize(
    ("descriptor", "data", "message"),
    [
        (None, [1, 2], BAD_DESCRIPTOR),
        ([2, 0], [1, 2], BAD_DESCRIPTOR),
        ([2, 0, 8, 8], [1, 2], BAD_DESCRIPTOR),
        ([1, 0, 8], None, BAD_DATA),
        ([2, 0, 0], [1, 2], BAD_DATA),
        ([2, 0, 17], [1, 2], BAD_DATA),
        ([3, 0, 8], [1, 2], BAD_DATA),
    ],
    ids=["no_descriptor", "two_values", "four_values", "no_data", "zero_bits", "17_bits", "fewer_entries"],
)
def test_malformed_luts_are_refused_with_their_reason(
    descriptor: list[int] | None, data: list[int] | None, message: str
) -> None:
    with pytest.raises(CorruptImageError) as caught:
        dicom._lut(_lut_dataset(descriptor, data), "VOILUTSequence", True, False)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("vr", "data"),
    [pytest.param("LO", "abc", id="text"), pytest.param("UV", [2**63, 1], id="over-int64")],
)
def test_lut_data_of_a_vr_the_standard_does_not_allow_is_corrupt_not_a_crash(vr: str, data: object) -> None:
    """PS3.3 C.11.2.1.1 allows US or SS (or OW); anything else was a ValueError/OverflowError, a 500 at the API."""
    lut = _lut_dataset([2, 0, 8], data, vr=vr).VOILUTSequence
    uploaded = _edited(dicom_bytes(Spec()), add=(("VOILUTSequence", "SQ", lut),))
    with pytest.raises(CorruptImageError) as caught:
        preprocess(uploaded, 8)
    assert caught.value.message == "the LUT Data of the DICOM VOILUTSequence is not a list of integers"


@pytest.mark.parametrize(("length", "named"), [(64, True), (65, False)])
def test_an_unknown_transfer_syntax_is_named_only_when_its_uid_fits_64_characters(length: int, named: bool) -> None:
    """PS3.5 9.1: a UID is at most 64 characters; anything longer is not a UID and is not echoed."""
    text = "1." + "2" * (length - 2)
    assert dicom._syntax_name(uid.UID(text)) == (text if named else "an invalid UID")


def _edited(data: bytes, drop: tuple[str, ...] = (), add: tuple[tuple[str, str, object], ...] = ()) -> bytes:
    """``data`` saved again without the ``drop`` elements and with ``add`` (keyword, VR, value) elements."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in drop:
        delattr(ds, keyword)
    for keyword, vr, value in add:
        ds.add_new(keyword, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


NOT_MONOCHROME = "with 1 samples per pixel; only grayscale (MONOCHROME1/MONOCHROME2) radiographs are accepted"
FLOATS = bytes(4 * 96 * 80)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (
            lambda: dicom_bytes(Spec(view="LL")),
            dicom.NotFrontalViewError,
            "the DICOM view position is LL; only frontal (PA/AP) views are accepted",
        ),
        (
            lambda: dicom_bytes(Spec(photometric="XYZZY")),
            dicom.NotMonochromeError,
            f"the DICOM image is an unrecognised photometric interpretation {NOT_MONOCHROME}",
        ),
        (
            lambda: dicom_bytes(Spec(photometric="YBR_FULL")),
            dicom.NotMonochromeError,
            f"the DICOM image is YBR_FULL {NOT_MONOCHROME}",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("PhotometricInterpretation",)),
            CorruptImageError,
            "the DICOM header lacks PhotometricInterpretation",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"Rows": 0})),
            CorruptImageError,
            "the DICOM header declares zero Rows or Columns",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"Columns": 0})),
            CorruptImageError,
            "the DICOM header declares zero Rows or Columns",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("PixelData",), add=(("FloatPixelData", "OF", FLOATS),)),
            UnsupportedImageError,
            "DICOM images with floating-point pixel data are not supported",
        ),
        (
            lambda: _edited(
                dicom_bytes(Spec()), drop=("PixelData",), add=(("DoubleFloatPixelData", "OD", FLOATS * 2),)
            ),
            UnsupportedImageError,
            "DICOM images with floating-point pixel data are not supported",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("PixelData", "Columns")),
            CorruptImageError,
            "the DICOM file ends before its pixel data: it is truncated or corrupt",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("PixelData", "Rows")),
            CorruptImageError,
            "the DICOM file ends before its pixel data: it is truncated or corrupt",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("PixelData", "Rows", "Columns", "SOPClassUID")),
            CorruptImageError,
            "the DICOM file ends before its pixel data: it is truncated or corrupt",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("PixelData", "Rows", "Columns")),
            UnsupportedImageError,
            "the DICOM file has no image pixel data (a report or other non-image object)",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), drop=("Rows",)),
            CorruptImageError,
            "the DICOM header lacks Rows",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), add=(("NumberOfFrames", "DS", "1.5"),)),
            CorruptImageError,
            "the DICOM element NumberOfFrames is not an integer",
        ),
        (
            lambda: dicom_bytes(Spec(frames=2), np.zeros((2, 3, 4))),
            dicom.MultiFrameError,
            "the DICOM file holds 2 frames; send a single-frame radiograph",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"Rows": 2000, "Columns": 1000})),
            ImageTooLargeError,
            "image is 1000x2000 = 2000000 pixels, over the limit of 1000000",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"BitsAllocated": 12})),
            UnsupportedImageError,
            "DICOM images with 12 bits allocated are not supported (8 or 16)",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"BitsStored": 17})),
            CorruptImageError,
            "the DICOM Bits Stored or Pixel Representation is invalid",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"BitsStored": 0})),
            CorruptImageError,
            "the DICOM Bits Stored or Pixel Representation is invalid",
        ),
        (
            lambda: dicom_bytes(Spec(extra={"PixelRepresentation": 2})),
            CorruptImageError,
            "the DICOM Bits Stored or Pixel Representation is invalid",
        ),
        (
            lambda: _edited(dicom_bytes(Spec()), add=(("PixelData", "OW", bytes(2 * 96 * 80 - 2)),)),
            CorruptImageError,
            "the DICOM pixel data is shorter than Rows x Columns: the file is truncated",
        ),
        (
            lambda: dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1), frame=b"\xff\xd8" + bytes(200)),
            CorruptImageError,
            "the DICOM pixel data cannot be decoded: it is corrupt or truncated",
        ),
    ],
    ids=[
        "lateral",
        "unknown_photometric",
        "colour_photometric",
        "no_photometric",
        "zero_rows",
        "zero_columns",
        "float_pixels",
        "double_float_pixels",
        "no_pixels_rows_left",
        "no_pixels_columns_left",
        "no_pixels_no_sop_class",
        "no_image_at_all",
        "no_rows",
        "fractional_frames",
        "two_frames",
        "too_many_pixels",
        "12_bits_allocated",
        "bits_stored_over_allocated",
        "zero_bits_stored",
        "pixel_representation_2",
        "one_pixel_short",
        "undecodable_frame",
    ],
)
def test_each_refusal_has_its_own_error_and_exact_message(
    data: Callable[[], bytes], error: type[ImageError], message: str
) -> None:
    """No pixels but Rows, Columns or no SOP Class: the file was cut short; none of them: a report, not an image."""
    with pytest.raises(ImageError) as caught:
        decode_dicom(data(), 10**6)
    assert type(caught.value) is error
    assert caught.value.message == message


@pytest.mark.parametrize(("width", "height"), [(1, 5), (5, 1), (1, 1)], ids=["one_column", "one_row", "one_pixel"])
def test_a_single_row_or_column_is_an_image(width: int, height: int) -> None:
    """Rows and Columns are refused only at 0; one line of pixels is a (tiny) image: by construction, all black here."""
    stored = np.full((height, width), 1000, dtype=np.uint16)
    decoded = decode_dicom(dicom_bytes(Spec(), stored), 10**6)
    assert decoded.pixels.shape == (height, width) and not decoded.pixels.any()


@pytest.mark.parametrize(
    ("keyword", "bits_stored"), [("SamplesPerPixel", 12), ("PixelRepresentation", 12), ("BitsStored", 16)]
)
def test_absent_pixel_description_elements_take_their_only_sensible_value(keyword: str, bits_stored: int) -> None:
    """All are type 1; without them a grayscale image has 1 sample, unsigned pixels, and all its allocated bits."""
    stored = chest_stored(Spec())
    decoded = decode_dicom(_edited(dicom_bytes(Spec(), stored), drop=(keyword,)), 10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec()))  # percentile: same at 12 or 16
    assert decoded.details["bits_stored"] == bits_stored


def test_an_element_the_decoder_does_not_read_is_never_parsed() -> None:
    """Only the listed tags are parsed: an unknown VR in High Bit (0028,0102), which nothing reads, refuses nothing."""
    stored = chest_stored(Spec())
    data = dicom_bytes(Spec(), stored)
    assert data.count(b"\x28\x00\x02\x01US") == 1
    decoded = decode_dicom(data.replace(b"\x28\x00\x02\x01US", b"\x28\x00\x02\x01U@"), 10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec()))


def test_one_bit_stored_is_the_smallest_depth_accepted() -> None:
    """Bits Stored 1 in 8 allocated: window c = 1, w = 2 gives (x - 0.5) / 1 + 0.5, so 0 is black and 1 white."""
    stored = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=np.uint8)
    decoded = decode_dicom(dicom_bytes(Spec(bits_stored=1, window=(1, 2)), stored), 10**6)
    assert decoded.pixels.tolist() == (stored * 255).tolist()
    assert decoded.details["bits_stored"] == 1


@pytest.mark.parametrize(
    "output",
    [np.zeros(shape, dtype) for shape, dtype in [((80, 95), np.uint16), ((79, 96), np.uint16)]]
    + [np.zeros((80, 96), dtype) for dtype in (np.float16, np.int32)],
    ids=["one_column_short", "one_row_short", "float16", "int32"],
)
def test_decoder_output_that_does_not_fit_the_header_is_refused(
    output: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in decoder returning the wrong shape or a non-16-bit-integer type: refused, never displayed."""
    monkeypatch.setattr(dicom, "pixel_array", lambda *args, **kwargs: output)
    with pytest.raises(CorruptImageError) as caught:
        decode_dicom(dicom_bytes(Spec()), 10**6)  # 96 columns x 80 rows
    assert caught.value.message == "the decoded DICOM pixel data does not match Rows and Columns"


@pytest.mark.parametrize(
    "syntax",
    [uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless],
    ids=["jpeg_lossless", "jpeg_ls", "jpeg_2000"],
)
def test_compressed_frames_reach_only_the_hardened_codec_plugin(syntax: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile frames must meet the plugin that checks their header first, never another codec pydicom might pick."""
    calls: list[dict[str, object]] = []

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(kwargs)
        return pixel_array(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom, "pixel_array", spy)
    stored = chest_stored(Spec())
    decoded = decode_dicom(dicom_bytes(Spec(syntax=syntax), stored), 10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec()))
    assert [call["decoding_plugin"] for call in calls] == [PLUGIN]


@pytest.mark.parametrize("written", ["monochrome2", " MONOCHROME2", "monochrome1"])
def test_photometric_interpretation_is_read_as_its_code_whatever_the_case_and_padding(written: str) -> None:
    """Like the view and modality codes, a lower-case or space-padded CS value means its code, down to the decoder."""
    code = written.strip().upper()
    stored = chest_stored(Spec(photometric=code))  # MONOCHROME1 is stored inverted
    decoded = decode_dicom(dicom_bytes(Spec(photometric=written), stored), 10**6)
    np.testing.assert_array_equal(decoded.pixels, expected_display(stored, Spec(photometric=code)))
    assert decoded.details["photometric_interpretation"] == code


@pytest.mark.parametrize(
    ("module", "silenced"),
    [
        pytest.param("pydicom", True, id="pydicom"),
        pytest.param("pydicom.pixels.decoders", True, id="pydicom-submodule"),
        pytest.param("app.core.dicom", True, id="this-module"),
        pytest.param("pydicomx", False, id="name-that-only-starts-like-pydicom"),
        pytest.param("tests.test_dicom", False, id="any-other-module"),
    ],
)
def test_only_warnings_from_pydicom_and_the_dicom_reader_are_silenced(module: str, silenced: bool) -> None:
    """From an empty filter list, one call ignores warnings raised in pydicom or app.core.dicom, and no others."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        dicom._silence_pydicom_warnings()
        warnings.warn_explicit("value quoted here", UserWarning, "somewhere.py", 1, module=module)
    assert [str(w.message) for w in caught] == ([] if silenced else ["value quoted here"])


def test_silencing_again_leaves_the_filter_list_untouched() -> None:
    """Filters already installed are not added again (or moved ahead of filters installed since)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        dicom._silence_pydicom_warnings()
        warnings.filterwarnings("error", message="installed after the DICOM reader's filters")
        before = list(warnings.filters)
        dicom._silence_pydicom_warnings()
        assert warnings.filters == before


def test_file_meta_without_a_preamble_is_read_for_its_transfer_syntax() -> None:
    """A Part 10 file stripped of its 128-byte preamble and DICM (starts at group 0002): its syntax still counts."""
    data = dicom_bytes(Spec(syntax=uid.MPEG2MPML), frame=b"\x00\x00\x01\xb3" + bytes(60))
    assert data[128:132] == b"DICM" and data[132:134] == b"\x02\x00"
    with pytest.raises(UnsupportedImageError) as caught:
        preprocess(data[132:], TEST_INPUT_SIZE, dicom=CHECKS_OFF)
    assert caught.value.message == "the DICOM transfer syntax MPEG2 Main Profile / Main Level is not supported"


@pytest.mark.parametrize(
    ("spec", "voi"),
    [
        pytest.param(Spec(bits_stored=8), "none", id="8-bit"),
        pytest.param(Spec(bits_stored=8, rescale=(1.0, 0.0)), "none", id="8-bit-identity-rescale"),
        pytest.param(Spec(bits_stored=8, rescale=(2.0, 0.0)), "percentile", id="8-bit-rescaled"),
        pytest.param(Spec(bits_stored=8, signed=True), "percentile", id="8-bit-signed"),
        pytest.param(Spec(bits_stored=12), "percentile", id="12-bit"),
    ],
)
def test_eight_bit_levels_without_a_voi_are_shown_as_they_are(spec: Spec, voi: str) -> None:
    """Unsigned 8-bit stored values with no transform are display levels: the same film as the same pixels in a
    PNG. The percentile window stretched them (12 of 80 test films moved by over 0.05, 2 changed label)."""
    pixels = np.asarray(synthetic_xray(96, 80, seed=3))
    data = dicom_bytes(spec, pixels.astype(np.int64) - (128 if spec.signed else 0)) if spec.bits_stored == 8 else None
    decoded = decode_dicom(data or dicom_bytes(spec), 10**6, CHECKS_OFF)
    assert decoded.details["voi"] == voi
    if voi == "none":
        png = preprocess(encode(Image.fromarray(pixels, "L"), "PNG"), TEST_INPUT_SIZE)
        assert preprocess(data, TEST_INPUT_SIZE, dicom=CHECKS_OFF).tolist() == png.tolist()  # type: ignore[arg-type]
        np.testing.assert_array_equal(decoded.pixels, pixels)
