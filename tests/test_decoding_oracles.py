"""Decoding checked against answers known by construction, never against the decoder itself."""

from __future__ import annotations

import io
import zlib
from fractions import Fraction

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from app.core.preprocessing import CorruptImageError, _to_grayscale, decode_grayscale, preprocess
from tests.conftest import encode

SIDE = 32


def quadrant_image() -> np.ndarray:
    """Top-left quadrant white, the rest black: where the white block ends up tells the orientation."""
    pixels = np.zeros((SIDE, SIDE), dtype=np.uint8)
    pixels[: SIDE // 2, : SIDE // 2] = 255
    return pixels


def bright_quadrant(pixels: np.ndarray) -> str:
    half = SIDE // 2
    means = {
        "top-left": pixels[:half, :half].mean(),
        "top-right": pixels[:half, half:].mean(),
        "bottom-left": pixels[half:, :half].mean(),
        "bottom-right": pixels[half:, half:].mean(),
    }
    return max(means, key=lambda name: means[name])


# EXIF orientation -> where the stored top-left block must appear once the image is upright
# (EXIF 2.3, tag 0x0112: 3 = rotate 180, 6 = rotate 90 clockwise to view, 8 = 90 anticlockwise,
# 2 = mirror horizontally).
EXPECTED_CORNER = {1: "top-left", 2: "top-right", 3: "bottom-right", 6: "top-right", 8: "bottom-left"}


def with_orientation(pixels: np.ndarray, orientation: int, fmt: str) -> bytes:
    """``pixels`` stored with EXIF ``orientation``: an 8-bit JPEG, a PNG (eXIf chunk), or a 12-bit lossless JPEG."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if fmt == "JPEG-12":  # imagecodecs writes no EXIF: an APP1 segment goes right after SOI, as cameras put it
        payload = exif.tobytes()
        data = imagecodecs.jpeg8_encode(pixels.astype(np.uint16) * 16, lossless=True, bitspersample=12)
        return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    return encode(Image.fromarray(pixels, "L"), fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))


ORIENTED_FORMATS = ["JPEG", "PNG", "JPEG-12"]


@pytest.mark.parametrize("fmt", ORIENTED_FORMATS)
@pytest.mark.parametrize("orientation", sorted(EXPECTED_CORNER))
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    """PNG and 12/16-bit JPEG too: such a film mirrored in storage with Orientation 2 was scored mirrored, and
    mirroring alone turned 15 of 120 test films to the other label with the guard passing."""
    pixels = preprocess(with_orientation(quadrant_image(), orientation, fmt), SIDE)[0].numpy()
    assert bright_quadrant(pixels) == EXPECTED_CORNER[orientation]
    assert pixels.max() > 200 and pixels.min() < 50  # still the same two-tone picture, only moved


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def test_a_png_whose_exif_is_cut_short_is_corrupt_not_a_server_error() -> None:
    """An eXIf chunk whose IFD entry is cut off raised struct.error past the decoder: a 500, and a crash of
    in-process callers (training evaluate, gpu_service_check). It is a damaged image, as in a JPEG."""
    data = encode(Image.fromarray(quadrant_image(), "L"), "PNG")
    end = data.index(b"IDAT") - 4
    cut = b"MM\0*"  # a TIFF header that ends before its first IFD's offset
    with pytest.raises(CorruptImageError, match=r"^the PNG's EXIF header is invalid: unpack requires a buffer"):
        preprocess(data[:end] + png_chunk(b"eXIf", cut) + data[end:], SIDE)


def test_a_png_orientation_given_only_in_xmp_is_not_applied() -> None:
    """EXIF only, as for a JPEG of the same film and as browsers draw it: Pillow's getexif also took XMP's."""
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    xmp += b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    data = encode(Image.fromarray(quadrant_image(), "L"), "PNG")
    end = data.index(b"IDAT") - 4
    itxt = png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)
    assert bright_quadrant(preprocess(data[:end] + itxt + data[end:], SIDE)[0].numpy()) == "top-left"


@pytest.mark.parametrize("fmt", ORIENTED_FORMATS)
@pytest.mark.parametrize(("orientation", "upright"), [(1, (48, 36)), (3, (48, 36)), (6, (36, 48)), (8, (36, 48))])
def test_the_source_size_is_the_upright_size(orientation: int, upright: tuple[int, int], fmt: str) -> None:
    """Stored 48 wide and 36 tall; a quarter turn makes the film 36 wide (the JPEG decodes DCT-scaled)."""
    data = with_orientation(np.zeros((36, 48), dtype=np.uint8), orientation, fmt)
    image, source = decode_grayscale(data, 16)
    assert (source.width, source.height) == upright
    assert (image.width > image.height) == (upright[0] > upright[1])


def test_twelve_bit_lossless_ramp_becomes_the_hand_computed_eight_bit_ramp() -> None:
    """A 12-bit value v must become round(v x 255 / 4095): full range to full range, as a 16-bit PNG is scaled
    (v / 16 made 4095 a clipped 256 and lifted most levels by one against the same samples in a PNG)."""
    ramp = (np.arange(SIDE * SIDE, dtype=np.uint16) * 4).reshape(SIDE, SIDE)  # 0 .. 4092 in steps of 4
    data = imagecodecs.jpeg8_encode(ramp, lossless=True, bitspersample=12)
    assert imagecodecs.jpeg8_decode(data).tolist() == ramp.tolist()  # the fixture itself is lossless
    expected = [[round(Fraction(255 * v, 4095)) for v in row] for row in ramp.tolist()]
    assert preprocess(data, SIDE)[0].tolist() == expected


@pytest.mark.parametrize("bits", [12, 16])
def test_the_same_samples_as_a_high_precision_jpeg_and_a_sixteen_bit_png_give_the_same_pixels(bits: int) -> None:
    """Samples v of ``bits`` bits in a lossless JPEG, and v scaled to 16 bits in a PNG, are the same film."""
    samples = np.random.default_rng(bits).integers(0, 1 << bits, (SIDE, SIDE)).astype(np.uint16)
    jpeg = imagecodecs.jpeg8_encode(samples, lossless=True, bitspersample=bits)
    assert imagecodecs.jpeg8_decode(jpeg).tolist() == samples.tolist()  # the fixture itself is lossless
    scaled = [[round(Fraction(65535 * v, (1 << bits) - 1)) for v in row] for row in samples.tolist()]
    png = encode(Image.fromarray(np.array(scaled, dtype=np.uint16)), "PNG")
    if bits == 16:
        assert png == encode(Image.fromarray(samples), "PNG")
    assert preprocess(jpeg, SIDE).tolist() == preprocess(png, SIDE).tolist()


def test_sixteen_bit_png_ramp_becomes_the_hand_computed_eight_bit_ramp() -> None:
    ramp = (np.arange(SIDE * SIDE, dtype=np.uint32) * 64).reshape(SIDE, SIDE).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    expected = [[int(v * 255 / 65535 + 0.5) for v in row] for row in ramp.tolist()]  # never a tie: 510v != 65535(2k+1)
    assert preprocess(data, SIDE)[0].tolist() == expected


def twelve_bit_ramp() -> np.ndarray:
    """0 .. 4092 in steps of 4."""
    return (np.arange(SIDE * SIDE, dtype=np.uint16) * 4).reshape(SIDE, SIDE)


def lossless_twelve_bit(pixels: np.ndarray) -> bytes:
    data = imagecodecs.jpeg8_encode(pixels, lossless=True, bitspersample=12)
    assert imagecodecs.jpeg8_decode(data).tolist() == pixels.tolist()  # the fixture itself is lossless
    return data


@pytest.mark.parametrize("alpha", [4095, 2048, 0])
def test_twelve_bit_grey_plus_alpha_is_the_hand_computed_grey_over_black(alpha: int) -> None:
    """Grey v under alpha a (of 4095) becomes round(v x a x 255 / 4095²): opaque is exactly round(v x 255 / 4095)."""
    ramp = twelve_bit_ramp()
    data = lossless_twelve_bit(np.stack([ramp, np.full_like(ramp, alpha)], -1))
    expected = [[round(Fraction(255 * v * alpha, 4095 * 4095)) for v in row] for row in ramp.tolist()]
    assert preprocess(data, SIDE)[0].tolist() == expected


@pytest.mark.parametrize("bits", [12, 16])
def test_white_under_every_alpha_level_shows_that_alpha(bits: int) -> None:
    """White (2**bits - 1) under alpha a is exactly a, so it must become round(a x 255 / (2**bits - 1)).

    Every alpha level is a pixel: the alpha fraction a / (2**bits - 1) times white must give back a's level,
    not a level beside it.
    """
    top = (1 << bits) - 1
    side = 1 << (bits // 2)  # 64 x 64 = 4096 or 256 x 256 = 65536 pixels: one per alpha level
    alpha = np.arange(top + 1, dtype=np.uint16).reshape(side, side)
    pixels = np.stack([np.full_like(alpha, top), alpha], -1)
    data = imagecodecs.jpeg8_encode(pixels, lossless=True, bitspersample=bits)
    assert imagecodecs.jpeg8_decode(data).tolist() == pixels.tolist()  # the fixture itself is lossless
    image, _ = decode_grayscale(data, 1)
    expected = [[round(Fraction(255 * a, top)) for a in row] for row in alpha.tolist()]
    assert np.asarray(image).tolist() == expected


@pytest.mark.parametrize(
    ("channel", "weight"),
    [pytest.param(0, 299, id="red"), pytest.param(1, 587, id="green"), pytest.param(2, 114, id="blue")],
)
def test_every_twelve_bit_level_of_one_primary_becomes_its_hand_computed_luma(channel: int, weight: int) -> None:
    """Level v of one primary (the others 0) becomes round(weight x v x 255 / (1000 x 4095)) (BT.601 weights).

    All 4096 levels are pixels: the weights are 0.299, 0.587 and 0.114, not their nearest float32 values.
    """
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    rgb = np.zeros((64, 64, 3), dtype=np.uint16)
    rgb[:, :, channel] = ramp
    image, _ = decode_grayscale(lossless_twelve_bit(rgb), 1)
    expected = [[round(Fraction(255 * weight * v, 1000 * 4095)) for v in row] for row in ramp.tolist()]
    assert np.asarray(image).tolist() == expected


@pytest.mark.parametrize("bits", [12, 16])
def test_every_neutral_grey_level_keeps_its_value_scaled_with_ties_to_even(bits: int) -> None:
    """R = G = B = v has luma exactly v (the weights sum to 1), so it must become round(v x 255 / (2**bits - 1)).

    Every level is a pixel: float32 weights summing to 1.0000000x pushed some levels up before levels were
    computed in integers.
    """
    side = 1 << (bits // 2)
    grey = np.arange(1 << bits, dtype=np.uint16).reshape(side, side)
    image, _ = decode_grayscale(
        imagecodecs.jpeg8_encode(np.stack([grey] * 3, -1), lossless=True, bitspersample=bits), 1
    )
    expected = [[round(Fraction(255 * v, (1 << bits) - 1)) for v in row] for row in grey.tolist()]
    assert np.asarray(image).tolist() == expected


@pytest.mark.parametrize(
    ("pixel", "level"),
    [
        pytest.param((0, 65454, 0), 149, id="green-149.49999222"),  # 587 * 65454 * 255 / (1000 * 65535)
        pytest.param((59903, 42315), 150, id="grey-under-alpha-150.49999688"),  # 59903 * 42315 * 255 / 65535²
        pytest.param((11062, 63186), 41, id="grey-under-alpha-41.49999938"),
        pytest.param((28943, 43353), 75, id="grey-under-alpha-74.50000009"),
    ],
)
def test_sixteen_bit_near_ties_round_to_the_nearest_level(pixel: tuple[int, ...], level: int) -> None:
    """Within a hundred-thousandth of a half: float32 arithmetic rounds the first three up, one level off."""
    pixels = np.tile(np.array(pixel, dtype=np.uint16), (8, 8, 1))
    image, _ = decode_grayscale(imagecodecs.jpeg8_encode(pixels, lossless=True, bitspersample=16), 1)
    assert np.asarray(image).tolist() == [[level] * 8] * 8


def test_twelve_bit_rgb_becomes_the_hand_computed_luma() -> None:
    """Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), x 255 / 4095: 3-component 12-bit JPEGs are decoded."""
    rgb = np.zeros((SIDE, SIDE, 3), dtype=np.uint16)
    half = SIDE // 2
    rgb[:half, :half, 0] = 4095  # red: 0.299 * 255 = 76.245
    rgb[:half, half:, 1] = 4095  # green: 0.587 * 255 = 149.685
    rgb[half:, :half, 2] = 4095  # blue: 0.114 * 255 = 29.07
    rgb[half:, half:] = 2000  # grey: 2000 * 255 / 4095 = 124.54
    pixels = preprocess(lossless_twelve_bit(rgb), SIDE)[0].numpy()
    assert {int(v) for v in np.unique(pixels[:half, :half])} == {76}
    assert {int(v) for v in np.unique(pixels[:half, half:])} == {150}
    assert {int(v) for v in np.unique(pixels[half:, :half])} == {29}
    assert {int(v) for v in np.unique(pixels[half:, half:])} == {125}


@pytest.mark.parametrize(
    ("pixel", "level"),
    [
        pytest.param((0, 36, 1012), 8, id="8.5-to-8"),  # luma 136500 thousandths: x 255 / 4095000 = 17/2
        pytest.param((0, 108, 3036), 26, id="25.5-to-26"),  # luma 409500 thousandths: 51/2
    ],
)
def test_twelve_bit_rgb_exact_ties_round_to_even(pixel: tuple[int, int, int], level: int) -> None:
    """Colour samples whose luma lands exactly on a half go to the even level, as every other tie does."""
    image, _ = decode_grayscale(lossless_twelve_bit(np.tile(np.array(pixel, dtype=np.uint16), (8, 8, 1))), 1)
    assert np.asarray(image).tolist() == [[level] * 8] * 8


def test_eight_bit_lossless_jpeg_keeps_every_value() -> None:
    """8-bit lossless JPEGs take the high-precision path (Pillow cannot read them) but must not be shifted at all."""
    ramp = (np.arange(SIDE * SIDE) % 256).astype(np.uint8).reshape(SIDE, SIDE)
    data = imagecodecs.jpeg8_encode(ramp, lossless=True)
    assert imagecodecs.jpeg8_decode(data).tolist() == ramp.tolist()
    assert preprocess(data, SIDE)[0].tolist() == ramp.tolist()


def grey_palette_png(greys: list[int], transparency: bytes | None = None) -> bytes:
    """A one-row palette PNG whose pixel i uses palette entry i = (greys[i], greys[i], greys[i])."""
    img = Image.new("P", (len(greys), 1))
    img.putpalette([channel for grey in greys for channel in (grey, grey, grey)])
    img.putdata(list(range(len(greys))))
    return encode(img, "PNG") if transparency is None else encode(img, "PNG", transparency=transparency)


def decoded_row(data: bytes) -> list[int]:
    image, _ = decode_grayscale(data, 1)
    return np.asarray(image)[0].tolist()


def test_palette_png_becomes_its_palette_greys() -> None:
    """Indices are not pixel values: index i shows palette entry i's grey."""
    assert decoded_row(grey_palette_png([250, 10, 128])) == [250, 10, 128]


def test_palette_png_transparency_is_composited_over_black() -> None:
    """tRNS gives palette entries alpha 255, 0 and 128: grey 255 over black becomes 255, 0 and 255 * 128 / 255."""
    assert decoded_row(grey_palette_png([255, 255, 255], transparency=b"\xff\x00\x80")) == [255, 0, 128]


def test_grey_plus_alpha_png_is_composited_over_black() -> None:
    """LA pixels (v, a) become v * a / 255, picked to be exact: 255 * 128, 100 * 51, 250 * 102, alpha 0 and 255."""
    pairs = [(255, 128), (100, 51), (250, 102), (200, 0), (77, 255)]
    data = encode(Image.fromarray(np.array([pairs], dtype=np.uint8), "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    assert decoded_row(data) == [128, 20, 100, 0, 77]


def test_rgb_colour_key_is_not_alpha() -> None:
    """A tRNS colour key on an RGB PNG is ignored, as on a greyscale one: the keyed pixel keeps its luma.

    (10, 200, 30): 0.299 * 10 + 0.587 * 200 + 0.114 * 30 = 123.81, rounded to 124.
    """
    img = Image.fromarray(np.array([[[10, 200, 30], [255, 255, 255]]], dtype=np.uint8), "RGB")
    data = encode(img, "PNG", transparency=(10, 200, 30))
    assert "transparency" in Image.open(io.BytesIO(data)).info
    assert decoded_row(data) == [124, 255]


# Modes no PNG opens as under Pillow 13 but older Pillows did (16-bit grey as "I"): called directly.
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([-1000, 0, 500, 1000, 1500, 2000], [0, 0, 64, 128, 191, 255], id="scaled-by-peak-2000"),
        pytest.param([0, 1], [0, 255], id="peak-1"),
        pytest.param([0, 0], [0, 0], id="all-zero"),
    ],
)
def test_32_bit_integer_image_is_scaled_by_its_peak(values: list[int], expected: list[int]) -> None:
    """Mode I: floor(v * 255 / max(peak, 1) + 0.5), negatives clipped to 0 (500 -> 64.25 -> 64, 1500 -> 191.75)."""
    img = Image.fromarray(np.array([values], dtype=np.int32))
    assert img.mode == "I"
    assert np.asarray(_to_grayscale(img))[0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([-1.0, float("nan"), 1.0, 2.0, 3.0], [0, 64, 128, 191, 255], id="min-max-stretched"),
        pytest.param([7.5, 7.5], [0, 0], id="constant"),
    ],
)
def test_float_image_is_stretched_from_its_minimum_to_its_maximum(values: list[float], expected: list[int]) -> None:
    """Mode F: (v - lo) * 255 / (hi - lo) + 0.5, NaN read as 0 (-1..3: 0 -> 64.25, 2 -> 191.75); a constant is black."""
    img = Image.fromarray(np.array([values], dtype=np.float32))
    assert img.mode == "F"
    assert np.asarray(_to_grayscale(img))[0].tolist() == expected


def test_palette_plus_alpha_image_is_composited_over_black() -> None:
    """Mode PA (no PNG opens as it, but Pillow makes it): white at alpha 255, 128 and 0."""
    img = Image.new("PA", (3, 1))
    img.putpalette([255, 255, 255] * 256)
    img.putdata([(0, 255), (0, 128), (0, 0)])
    assert np.asarray(_to_grayscale(img))[0].tolist() == [255, 128, 0]


def test_colour_jpeg_becomes_its_luma_not_one_channel() -> None:
    """Red, green, blue, white blocks (4:4:4, quality 100) become Y = 0.299 R + 0.587 G + 0.114 B: 76, 150, 29, 255."""
    rgb = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    half = SIDE // 2
    rgb[:half, :half] = (255, 0, 0)
    rgb[:half, half:] = (0, 255, 0)
    rgb[half:, :half] = (0, 0, 255)
    rgb[half:, half:] = (255, 255, 255)
    data = encode(Image.fromarray(rgb, "RGB"), "JPEG", quality=100, subsampling=0)
    pixels = preprocess(data, SIDE)[0].numpy().astype(int)
    for block, luma in [((0, 0), 76), ((0, half), 150), ((half, 0), 29), ((half, half), 255)]:
        row, col = block
        assert np.abs(pixels[row + 2 : row + half - 2, col + 2 : col + half - 2] - luma).max() <= 2, block


def test_cmyk_jpeg_inks_become_the_hand_computed_grey() -> None:
    """Ink 200 of one colour on white paper: 255 - 200 in the channels it covers, then Y = 0.299 R + 0.587 G + 0.114 B.

    K: 55 everywhere. C: (55, 255, 255) -> 195. M: (255, 55, 255) -> 138. Y: (255, 255, 55) -> 232.
    """
    cmyk = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    half = SIDE // 2
    cmyk[:half, :half, 3] = 200
    cmyk[:half, half:, 0] = 200
    cmyk[half:, :half, 1] = 200
    cmyk[half:, half:, 2] = 200
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100)
    pixels = preprocess(data, SIDE)[0].numpy().astype(int)
    for (row, col), grey in [((0, 0), 55), ((0, half), 195), ((half, 0), 138), ((half, half), 232)]:
        assert np.abs(pixels[row + 2 : row + half - 2, col + 2 : col + half - 2] - grey).max() <= 2, (row, col)


# Inks (C, M, Y, K) on white paper, no black: R, G, B are exactly 255 - C, 255 - M, 255 - Y.
FLAT_INKS = [(40, 40, 40, 0), (90, 90, 90, 0), (160, 160, 160, 0), (0, 0, 0, 90), (0, 90, 0, 0), (160, 40, 0, 0)]


def test_flat_cmyk_inks_become_their_exact_luma() -> None:
    """Flat 16 x 16 blocks (exact at quality 100) of one ink mix each become round(Y), Y = 0.299 R + 0.587 G + 0.114 B.

    Equal C, M and Y inks are a neutral grey: 40, 90, 160 -> 215, 165, 95 exactly, as K 90 alone -> 165.
    M 90: (255, 165, 255) -> 202.17 -> 202. C 160, M 40: (95, 215, 255) -> 183.68 -> 184.
    """
    cmyk = np.zeros((16, 16 * len(FLAT_INKS), 4), dtype=np.uint8)
    for block, inks in enumerate(FLAT_INKS):
        cmyk[:, 16 * block : 16 * block + 16] = inks
    data = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100)
    assert np.asarray(Image.open(io.BytesIO(data))).tolist() == cmyk.tolist()  # the fixture itself is exact
    image, _ = decode_grayscale(data, cmyk.shape[1])
    pixels = np.asarray(image)
    for block, (c, m, y, k) in enumerate(FLAT_INKS):
        assert k == 0 or (c, m, y) == (0, 0, 0)  # channels stay whole numbers: no ink under black
        luma = Fraction(299 * (255 - c) + 587 * (255 - m) + 114 * (255 - y), 1000) * (255 - k) / 255
        expected = round(luma)
        assert {int(v) for v in np.unique(pixels[:, 16 * block : 16 * block + 16])} == {expected}, (c, m, y, k)
