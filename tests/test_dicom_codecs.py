"""The imagecodecs plugin for pydicom, frame by frame, against hand-built frames and pydicom's own runner.

The RLE frames are written byte by byte from PS3.5 Annex G (a 64-byte header of segment offsets,
one PackBits segment per byte plane, most significant plane first), so the expected pixels are
known without any decoder. Each malformed frame must be refused for its own reason: the reason
says which check caught it, so a check that stopped working cannot hide behind a later one.
"""

from __future__ import annotations

import io
import struct

import imagecodecs
import numpy as np
import pytest
from pydicom import uid
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.decoders.base import DecodeRunner

from app.core import dicom_codecs
from app.core.dicom_codecs import FrameError, _j2k_header, decode_frame
from tests.dicom_files import Spec, dicom_bytes


def _runner(syntax: str, rows: int, columns: int, allocated: int, stored: int, **options: int) -> DecodeRunner:
    runner = DecodeRunner(uid.UID(syntax))
    runner.set_options(
        rows=rows,
        columns=columns,
        samples_per_pixel=options.get("samples_per_pixel", 1),
        bits_allocated=allocated,
        bits_stored=stored,
        pixel_representation=options.get("pixel_representation", 0),
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )
    return runner


def _rle_header(*offsets: int, count: int | None = None) -> bytes:
    """The Annex G header: the segment count, then up to 15 offsets, zero-padded to 64 bytes."""
    values = [len(offsets) if count is None else count, *offsets]
    return struct.pack("<16I", *values, *[0] * (16 - len(values)))


def _literal(data: bytes) -> bytes:
    """One PackBits literal run: a header byte n - 1, then the n bytes as they are."""
    return bytes([len(data) - 1]) + data


def test_rle_16_bit_puts_the_first_segment_in_the_high_byte() -> None:
    high, low = bytes([0x01, 0x02, 0x03, 0x04]), bytes([0x10, 0x20, 0x30, 0x40])
    src = _rle_header(64, 69) + _literal(high) + _literal(low)
    out = np.frombuffer(decode_frame(src, _runner(uid.RLELossless, 2, 2, 16, 16)), dtype="<u2")
    assert out.tolist() == [0x0110, 0x0220, 0x0330, 0x0440]


def test_rle_8_bit_uses_replicate_runs_and_drops_the_pad_byte() -> None:
    # 0xFD = -3 as a signed byte: the next byte repeated 4 times; a segment is padded to an even length.
    src = _rle_header(64) + b"\xfd\x07" + _literal(b"\x09\x0a") + b"\x00"
    out = np.frombuffer(decode_frame(src, _runner(uid.RLELossless, 2, 3, 8, 8)), dtype=np.uint8)
    assert out.tolist() == [7, 7, 7, 7, 9, 10]


RLE_REFUSALS = {
    "the RLE frame is shorter than its header": (_rle_header(64)[:63], 8),
    # a whole header and nothing else: the header is complete, its one segment is empty
    "an RLE segment decodes to fewer bytes than Rows x Columns": (_rle_header(64), 8),
    "the RLE frame's segment count does not match the DICOM header": (_rle_header(64, 68) + _literal(bytes(4)) * 2, 8),
    "the RLE frame's segment offsets are invalid": (_rle_header(80) + bytes(16) + _literal(bytes(4)), 8),
}


def _refusal(src: bytes, runner: DecodeRunner) -> str:
    with pytest.raises(FrameError) as caught:
        decode_frame(src, runner)
    return str(caught.value)


@pytest.mark.parametrize("reason", sorted(RLE_REFUSALS))
def test_malformed_rle_frames_are_refused_for_their_own_reason(reason: str) -> None:
    src, bits = RLE_REFUSALS[reason]
    assert _refusal(src, _runner(uid.RLELossless, 2, 2, bits, bits)) == reason


def test_rle_segment_offsets_must_not_run_backwards() -> None:
    """The second segment starting before the first is refused; an empty segment is a short segment."""
    runner = _runner(uid.RLELossless, 2, 2, 16, 16)
    backwards = _refusal(_rle_header(64, 63) + _literal(bytes(4)) * 2, runner)
    assert backwards == "the RLE frame's segment offsets are invalid"
    empty = _refusal(_rle_header(64, 64) + _literal(bytes(4)), runner)
    assert empty == "an RLE segment decodes to fewer bytes than Rows x Columns"


def test_rle_refuses_a_colour_frame_even_with_a_matching_segment_count() -> None:
    src = _rle_header(64) + _literal(bytes(4))
    refusal = _refusal(src, _runner(uid.RLELossless, 2, 2, 8, 8, samples_per_pixel=3))
    assert refusal == "the RLE frame's segment count does not match the DICOM header"


def test_jpeg_ls_samples_over_bits_stored_are_clamped_to_its_top() -> None:
    """An encoder that writes 12-bit data with a 16-bit precision: samples beyond 4095 are clamped, 0 stays 0."""
    stored = np.array([[0, 1, 4094, 4095], [4096, 4097, 8191, 65535]], dtype=np.uint16)
    frame = imagecodecs.jpegls_encode(stored)
    out = np.frombuffer(decode_frame(frame, _runner(uid.JPEGLSLossless, 2, 4, 16, 12)), dtype="<u2")
    assert out.tolist() == [0, 1, 4094, 4095, 4095, 4095, 4095, 4095]


def _siz(width: int, height: int, x_offset: int = 0, y_offset: int = 0, ssiz: int = 11, components: int = 1) -> bytes:
    """SOC, then a SIZ segment (ISO 15444-1 A.5.1) with the first component's record, byte by byte; 45 bytes."""
    sizes = (width, height, x_offset, y_offset, width, height, 0, 0)  # one tile covering the image
    segment = struct.pack(">HH8IH", 38 + 3 * components, 0, *sizes, components) + bytes([ssiz, 1, 1])
    return b"\xff\x4f\xff\x51" + segment


def test_j2k_header_reads_the_siz_segment_field_by_field() -> None:
    assert _j2k_header(_siz(96, 80)) == (80, 96, 1, 12)
    assert _j2k_header(_siz(106, 100, x_offset=10, y_offset=20)) == (80, 96, 1, 12)  # the image area
    assert _j2k_header(_siz(70000, 1000, x_offset=69904, y_offset=920)) == (80, 96, 1, 12)  # multi-byte offsets
    assert _j2k_header(_siz(96, 80, ssiz=0x80 | 15)) == (80, 96, 1, 16)  # the top bit of Ssiz is the sign
    # all four bytes of a size count: a width whose low three bytes say 96 is not 96 wide
    assert _j2k_header(_siz((1 << 24) + 96, 80)) == (80, (1 << 24) + 96, 1, 12)
    assert _j2k_header(_siz(96, 80, components=257)) == (80, 96, 257, 12)  # Csiz is two bytes


def test_j2k_header_is_found_in_the_first_4096_bytes_only_and_the_first_one_counts() -> None:
    assert _j2k_header(bytes(4092) + _siz(96, 80)) == (80, 96, 1, 12)  # the marker ends at byte 4096
    assert _j2k_header(_siz(96, 80) + _siz(4000, 3000)) == (80, 96, 1, 12)
    for src in (bytes(4093) + _siz(96, 80), bytes(100), _siz(96, 80)[:44]):
        with pytest.raises(FrameError) as caught:
            _j2k_header(src)
        assert str(caught.value) == "no JPEG 2000 image header in the frame"


def test_frame_headers_are_checked_against_the_dicom_header_each_for_its_reason() -> None:
    runner = _runner(uid.JPEG2000Lossless, 80, 96, 16, 12)
    refusals = {
        "the compressed frame's size differs from the DICOM Rows and Columns": _siz(96, 81),
        "the compressed frame is not single-channel": _siz(96, 80, components=3),
        "the compressed frame's sample precision is not 1 to 16 bits": _siz(96, 80, ssiz=16),  # 17 bits
    }
    for reason, frame in refusals.items():
        assert _refusal(frame, runner) == reason
    for ssiz in (0, 15):  # 1 and 16 bits pass the check: the bare header then fails in the codec itself
        with pytest.raises(imagecodecs.Jpeg2kError):
            decode_frame(_siz(96, 80, ssiz=ssiz), runner)


def test_a_jpeg_frame_must_start_with_its_start_of_image_marker() -> None:
    frame = imagecodecs.jpeg8_encode(np.zeros((2, 2), np.uint16), lossless=True, bitspersample=12)
    runner = _runner(uid.JPEGLosslessSV1, 2, 2, 16, 12)
    for damaged in (frame[2:], b"\0\0" + frame[2:]):  # SOI missing, or overwritten before intact segments
        assert _refusal(damaged, runner) == "no JPEG frame header in the frame"


@pytest.mark.parametrize(
    "decoded",
    [
        np.zeros((2, 3), np.uint16),  # rows and columns swapped
        np.zeros((3, 2, 2), np.uint16),  # two channels
        np.zeros((3, 2), np.uint32),  # wider than 16 bits
        np.zeros((3, 2), np.float32),  # not integers
    ],
    ids=["transposed", "two-channels", "32-bit", "float"],
)
def test_whatever_a_codec_returns_must_match_the_dicom_header(
    decoded: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth behind the header checks: a codec's surprising output is refused, never reinterpreted."""
    monkeypatch.setattr(dicom_codecs, "_decode", lambda _src, _runner: decoded)
    refusal = _refusal(b"", _runner(uid.JPEGLosslessSV1, 3, 2, 16, 12))
    assert refusal == "the decoded frame does not match the DICOM header"


def test_a_single_channel_axis_from_a_codec_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = np.arange(6, dtype=np.uint16).reshape(3, 2, 1)
    monkeypatch.setattr(dicom_codecs, "_decode", lambda _src, _runner: decoded)
    out = np.frombuffer(decode_frame(b"", _runner(uid.JPEGLosslessSV1, 3, 2, 16, 12)), dtype="<u2")
    assert out.tolist() == [0, 1, 2, 3, 4, 5]


def test_an_8_bit_jpeg_in_16_bit_bits_allocated_is_read_as_8_bit_samples() -> None:
    """Common in the wild: pydicom must read the decoded bytes at the codec's width, not the header's."""
    stored = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    frame = imagecodecs.jpeg8_encode(stored, level=95)
    spec = Spec(bits_stored=8, bits_allocated=16, syntax=uid.JPEGBaseline8Bit)
    data = dicom_bytes(spec, stored=stored.astype(np.uint16), frame=frame)
    pixels = pixel_array(io.BytesIO(data), decoding_plugin=dicom_codecs.PLUGIN)
    assert pixels.tolist() == imagecodecs.jpeg8_decode(frame).tolist()


def test_is_available_names_exactly_the_plugins_syntaxes() -> None:
    assert all(dicom_codecs.is_available(syntax) for syntax in dicom_codecs.SYNTAXES)
    assert not dicom_codecs.is_available(uid.ExplicitVRLittleEndian)
    assert not dicom_codecs.is_available(uid.MPEG2MPML)


def test_register_adds_the_plugin_to_every_syntax_once_and_pydicom_decodes_with_it() -> None:
    decoders = [get_decoder(syntax) for syntax in sorted(dicom_codecs.SYNTAXES)]
    try:
        for decoder in decoders:
            decoder.remove_plugin(dicom_codecs.PLUGIN)
        assert not any(dicom_codecs.PLUGIN in decoder.available_plugins for decoder in decoders)
        dicom_codecs.register()
        dicom_codecs.register()  # a second call must not try to add it again (pydicom raises on a duplicate)
        assert all(decoder.available_plugins.count(dicom_codecs.PLUGIN) == 1 for decoder in decoders)
        # pydicom now reaches this module's decode_frame by the plugin's name
        frame = _rle_header(64) + _literal(bytes([5, 6, 7, 8]))
        data = dicom_bytes(Spec(bits_stored=8, syntax=uid.RLELossless), stored=np.zeros((2, 2)), frame=frame)
        pixels = pixel_array(io.BytesIO(data), decoding_plugin=dicom_codecs.PLUGIN)
        assert pixels.tolist() == [[5, 6], [7, 8]]
    finally:
        for decoder in decoders:  # leave pydicom as the import left it, whatever happened above
            if dicom_codecs.PLUGIN not in decoder.available_plugins:
                decoder.add_plugin(dicom_codecs.PLUGIN, (dicom_codecs.__name__, "decode_frame"))
