"""DICOM input in the shared preprocessing: pixel pipeline, codecs, metadata checks, limits, privacy, hostile files.

Fixtures are built here with pydicom and encoded with imagecodecs or pydicom's own RLE encoder
(nothing is downloaded); expected display pixels come from ``tests.dicom_files``, written from
the standard independently of ``app.core.dicom_pixels``.
"""

from __future__ import annotations

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
from pydicom.pixels import pixel_array

from app.core import dicom
from app.core.artifacts import LoadedModel, load_model
from app.core.decision import pneumonia_probability
from app.core.dicom import DicomPolicy, decode_dicom, is_dicom, read_sop_instance_uid
from app.core.dicom_codecs import PLUGIN
from app.core.image_errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError
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


def _truncated(spec: Spec, keep: int) -> bytes:
    return dicom_bytes(spec)[:keep]


CORRUPTIONS: dict[str, Callable[[], bytes]] = {
    "truncated_in_header": lambda: _truncated(Spec(), 200),
    "truncated_in_pixels": lambda: _truncated(Spec(), -3000),
    "truncated_compressed": lambda: _truncated(Spec(syntax=uid.JPEGLosslessSV1), -500),
    "compressed_frame_garbage": lambda: dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1), frame=b"\xff\xd8" + bytes(200)),
    "only_preamble": lambda: bytes(128) + b"DICM",
    "garbage_after_marker": lambda: bytes(128) + b"DICM" + b"\xff" * 300,
    "pydicom_truncated_file": lambda: (PYDICOM_FILES / "MR_truncated.dcm").read_bytes(),
    # found by fuzzing: an unknown VR raised NotImplementedError on first access, not at parse time
    "unknown_vr_in_rows": lambda: dicom_bytes(Spec()).replace(b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00U@", 1),
    "window_width_zero": lambda: dicom_bytes(Spec(window=(2000, 0))),
    "window_not_a_number": lambda: replace_value(dicom_bytes(Spec(window=(1234567, 10))), "1234567", b"abcdefg"),
    "unknown_voi_function": lambda: dicom_bytes(Spec(window=(2000, 1000), voi_function="CUBIC")),
    "lut_shorter_than_descriptor": lambda: dicom_bytes(Spec(voi_lut=LutSpec(0, 12, (1, 2, 3), entries=16))),
    "rescale_slope_zero": lambda: dicom_bytes(Spec(rescale=(0.0, 5.0))),
    "missing_rows": lambda: dicom_bytes(Spec(extra={"Rows": None})),
    "zero_columns": lambda: dicom_bytes(Spec(extra={"Columns": 0})),
    "bits_stored_over_allocated": lambda: dicom_bytes(Spec(extra={"BitsStored": 20})),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_files_are_corrupt_image_never_a_crash(case: str) -> None:
    data = CORRUPTIONS[case]()
    assert is_dicom(data)
    with pytest.raises(CorruptImageError):
        preprocess(data, TEST_INPUT_SIZE, dicom=CHECKS_OFF)  # pydicom's truncated file is an MR


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
