"""The shared model/preprocessing core and the weights format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.core import preprocessing as imaging
from app.core.artifacts import ModelLoadError, check_golden, load_model
from app.core.decision import pneumonia_probability
from app.core.network import ModelSpec, Normalization, build_model, equalize_histogram
from tests.conftest import encode, export_tiny_model, synthetic_xray


def test_preprocess_squashes_to_square_grayscale(make_jpeg) -> None:
    pixels = imaging.preprocess(make_jpeg(200, 100), 32)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 32, 32)


def test_draft_decode_matches_full_decode_closely() -> None:
    img = synthetic_xray(2000, 1600, seed=3)
    data = encode(img, "JPEG", quality=95)
    fast = imaging.preprocess(data, 64).float()
    full = torch.from_numpy(imaging.resize_square(img, 64)).float()
    assert (fast[0] - full).abs().mean() < 3.0


def test_rgb_and_grayscale_give_same_input() -> None:
    img = synthetic_xray(300, 300, seed=1)
    gray = imaging.preprocess(encode(img, "PNG"), 32)
    rgb = imaging.preprocess(encode(img.convert("RGB"), "PNG"), 32)
    assert torch.equal(gray, rgb)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    out = imaging.preprocess(data, 64)
    assert int(out.max()) >= 250 and int(out.min()) <= 5


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", imaging.EmptyImageError),
        (b"hello, not an image", imaging.UnsupportedImageError),
        (encode(synthetic_xray(), "GIF"), imaging.UnsupportedImageError),
    ],
)
def test_bad_inputs_raise_typed_errors(data: bytes, error: type[imaging.ImageError]) -> None:
    with pytest.raises(error):
        imaging.preprocess(data, 32)


def test_truncated_jpeg_is_corrupt(make_jpeg) -> None:
    data = make_jpeg(400, 400)
    with pytest.raises(imaging.CorruptImageError):
        imaging.preprocess(data[: len(data) // 2], 32)


def test_pixel_limit_checked_from_header(make_jpeg) -> None:
    with pytest.raises(imaging.ImageTooLargeError):
        imaging.preprocess(make_jpeg(400, 400), 32, max_pixels=400 * 399)


def test_export_load_roundtrip_reproduces_logits(tiny_weights: Path) -> None:
    loaded = load_model(tiny_weights)
    assert loaded.golden_inputs is not None
    assert check_golden(loaded, loaded.network) < 1e-4
    probs = pneumonia_probability(loaded.network(loaded.golden_inputs), loaded.metadata.temperature)
    assert probs.shape == (2,) and bool(((probs >= 0) & (probs <= 1)).all())


def test_fp16_export_verifies(tmp_path: Path) -> None:
    loaded = load_model(export_tiny_model(tmp_path, dtype="float16"))
    assert loaded.metadata.dtype == "float16"


def test_sha256_mismatch_refuses(tiny_weights: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_weights, tmp_path / "w"))
    meta = json.loads((copy / "model.json").read_text())
    meta["sha256"] = "0" * 64
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model(copy)


def test_wrong_architecture_refuses(tiny_weights: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_weights, tmp_path / "w"))
    meta = json.loads((copy / "model.json").read_text())
    meta["spec"]["head"] = "classic"
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(copy)


def test_missing_files_refuse(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path)


def test_uint8_input_normalised_inside_network() -> None:
    spec = ModelSpec(architecture="vgg16", head="compact", input_size=32)
    net = build_model(spec)
    x = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
    normed = net.normalize(x)
    expected = (1.0 - torch.tensor(spec.normalization.mean)) / torch.tensor(spec.normalization.std)
    assert torch.allclose(normed[0, :, 0, 0], expected, atol=1e-5)


def test_sixteen_bit_lossless_jpeg_is_decoded_and_scaled() -> None:
    import imagecodecs

    arr = np.linspace(0, 65535, 96 * 80).reshape(80, 96).astype(np.uint16)
    data = imagecodecs.ljpeg_encode(arr, bitspersample=16)
    frame = imaging.read_jpeg_frame(data)
    assert frame is not None and frame.precision == 16 and frame.lossless
    out = imaging.preprocess(data, 32)
    assert int(out.min()) <= 5 and int(out.max()) >= 250  # the full 16-bit range maps onto 0..255
    expected = imaging.resize_square(
        Image.fromarray(((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)), 32
    )
    assert (out[0].int() - torch.from_numpy(expected).int()).abs().max() <= 1


def test_sixteen_bit_jpeg_pixel_limit_checked_before_decoding() -> None:
    import imagecodecs

    data = imagecodecs.ljpeg_encode(np.zeros((80, 96), np.uint16), bitspersample=16)
    with pytest.raises(imaging.ImageTooLargeError):
        imaging.preprocess(data, 32, max_pixels=80 * 96 - 1)


def _textbook_equalization(image: np.ndarray) -> np.ndarray:
    """round((cdf(v) - cdf_min) / (n - cdf_min) * 255), written out in numpy as an independent oracle."""
    cdf = np.bincount(image.ravel(), minlength=256).cumsum()
    lowest = cdf[image.min()]
    return np.round((cdf[image] - lowest) / (image.size - lowest) * 255)


def test_histogram_equalisation_matches_the_textbook_mapping() -> None:
    rng = np.random.default_rng(3)
    batch = (rng.beta(2, 5, (3, 1, 24, 20)) * 180 + 30).astype(np.uint8)
    got = equalize_histogram(torch.from_numpy(batch)).numpy()
    for image, equalized in zip(batch, got, strict=True):
        np.testing.assert_array_equal(equalized[0], _textbook_equalization(image[0]))
    assert equalize_histogram(torch.full((1, 1, 4, 4), 9, dtype=torch.uint8)).eq(0).all()


def test_equalizing_network_ignores_exposure_changes_that_keep_grey_levels_apart() -> None:
    torch.manual_seed(0)
    spec = ModelSpec(architecture="vgg16", input_size=32, normalization=Normalization(equalize=True))
    network = build_model(spec).eval()
    dark = torch.randint(0, 120, (2, 1, 32, 32), dtype=torch.uint8)
    brighter = dark * 2 + 10  # strictly increasing on 0..119: every grey level keeps its rank
    with torch.inference_mode():
        assert torch.allclose(network(dark), network(brighter))
        plain = build_model(spec.model_copy(update={"normalization": Normalization()})).eval()
        assert not torch.allclose(plain(dark), plain(brighter))
