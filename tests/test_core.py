"""The shared model/preprocessing core and the weights format."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from app.core import preprocessing as imaging
from app.core.artifacts import ModelLoadError, check_golden, export_model, load_model
from app.core.decision import pneumonia_probability
from app.core.input_guard import GuardStats
from app.core.network import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    Normalization,
    build_model,
    init_like_torchvision,
)
from tests.conftest import TEST_INPUT_SIZE, encode, export_tiny_model, synthetic_xray


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


def test_golden_inputs_are_stored_as_uint8_whatever_dtype_they_come_in(tmp_path: Path) -> None:
    wide = torch.randint(0, 256, (2, 1, TEST_INPUT_SIZE, TEST_INPUT_SIZE), dtype=torch.int64)
    loaded = load_model(export_tiny_model(tmp_path, guard=False, golden=wide))
    assert loaded.golden_inputs is not None and loaded.golden_inputs.dtype == torch.uint8
    assert torch.equal(loaded.golden_inputs, wide.to(torch.uint8))


def test_export_writes_what_it_was_given_readable_by_any_user(tmp_path: Path) -> None:
    given = {
        "threshold": 0.37,
        "threshold_method": "sensitivity>=0.95",
        "temperature": 1.7,
        "metrics": {"val_auc": 0.99},
        "provenance": {"recipe": "cpu64"},
    }
    out = export_tiny_model(tmp_path, guard=False, **given)
    stored = json.loads((out / "model.json").read_text())
    assert {key: stored[key] for key in given} == given
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644  # safetensors itself writes 0600


def test_an_uncalibrated_export_says_so_and_scales_nothing(tmp_path: Path) -> None:
    """Without a fitted temperature and threshold the export stores the identity: T = 1, 0.5, "default"."""
    stored = json.loads((export_tiny_model(tmp_path, guard=False) / "model.json").read_text())
    assert (stored["temperature"], stored["threshold"], stored["threshold_method"]) == (1.0, 0.5, "default")


def test_fp16_export_verifies(tmp_path: Path) -> None:
    loaded = load_model(export_tiny_model(tmp_path, dtype="float16"))
    assert loaded.metadata.dtype == "float16"


def test_fp16_export_stores_half_precision_weights_in_a_new_nested_folder(tmp_path: Path) -> None:
    """The weights file itself holds F16 tensors (read with safetensors, not our loader); the folders are created."""
    out = export_tiny_model(tmp_path / "runs" / "fp16" / "weights", dtype="float16", guard=False)
    with safe_open(out / "model.safetensors", framework="pt") as stored:
        dtypes = {key: stored.get_slice(key).get_dtype() for key in stored.keys()}  # noqa: SIM118
        header = stored.metadata()
    assert header == {"format": "pt"}  # what other safetensors tools (e.g. transformers) look for
    assert dtypes.pop("__golden__.inputs") == "U8"
    assert set(dtypes.values()) == {"F16"}


@pytest.mark.parametrize("wrong", ["mean", "whitener"])
def test_guard_statistics_of_another_dimension_are_refused_at_export(
    tiny_weights: Path, tmp_path: Path, wrong: str
) -> None:
    """Either tensor off by one feature is refused before anything is written: a guard must score what it declares."""
    loaded = load_model(tiny_weights)
    assert loaded.metadata.guard is not None and loaded.guard is not None
    mean, whitener = loaded.guard.mean, loaded.guard.whitener
    stats = GuardStats(mean[:-1], whitener) if wrong == "mean" else GuardStats(mean, whitener[:-1, :-1])
    dim = loaded.metadata.guard.dim
    with pytest.raises(ValueError, match=rf"^guard statistics do not match the declared dimension {dim}$"):
        export_model(
            loaded.network,
            tmp_path,
            version="x",
            golden_inputs=loaded.golden_inputs,
            guard=(loaded.metadata.guard, stats),
        )
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize("missing", ["logits", "inputs"])
def test_a_model_without_golden_outputs_cannot_be_verified(tiny_weights: Path, missing: str) -> None:
    """Either half of the golden pair missing (the JSON's logits or the tensor file's inputs) is refused."""
    loaded = load_model(tiny_weights)
    if missing == "logits":
        bare = dataclasses.replace(loaded, metadata=loaded.metadata.model_copy(update={"golden": None}))
    else:
        bare = dataclasses.replace(loaded, golden_inputs=None)
    with pytest.raises(ModelLoadError) as caught:
        check_golden(bare, bare.network)
    assert str(caught.value) == "model has no golden reference outputs; re-export it with the training package"


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


def test_bf16_equalizing_network_normalises_in_its_own_dtype() -> None:
    """Equalisation returns float32; a bf16 network must still get bf16 input (its convolutions need one dtype)."""
    spec = ModelSpec(architecture="vgg16", input_size=32, normalization=Normalization(equalize=True))
    network = build_model(spec).to(torch.bfloat16)
    pixels = torch.tensor([[[[0, 0], [0, 5]]]], dtype=torch.uint8)  # equalised to [[0, 0], [0, 255]]
    normed = network.normalize(pixels)
    assert normed.dtype == torch.bfloat16 and normed.shape == (1, 3, 2, 2)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    black, white = -mean / std, (1.0 - mean) / std
    expected = torch.stack([black, black, black, white], dim=1).reshape(1, 3, 2, 2)
    torch.testing.assert_close(normed.float(), expected, atol=0.05, rtol=0.0)  # bf16: 8 significant bits


def _layer(module: nn.Module) -> tuple[object, ...]:
    """The hyperparameters that define a layer (a torch-version-independent stand-in for its repr)."""
    if isinstance(module, nn.Conv2d):
        return ("conv", module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding)
    if isinstance(module, nn.BatchNorm2d):
        return ("bn", module.num_features)
    if isinstance(module, nn.ReLU):
        return ("relu", module.inplace)
    if isinstance(module, nn.MaxPool2d):
        return ("maxpool", module.kernel_size, module.stride)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return ("avgpool", module.output_size)
    if isinstance(module, nn.Flatten):
        return ("flatten", module.start_dim)
    if isinstance(module, nn.Dropout):
        return ("dropout", module.p)
    if isinstance(module, nn.Linear):
        return ("linear", module.in_features, module.out_features)
    return (type(module).__name__,)


def _vgg16_d(batch_norm: bool) -> list[tuple[object, ...]]:
    """torchvision's cfgs["D"] (Simonyan & Zisserman's configuration D) expanded by hand, as make_layers does."""
    config = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[tuple[object, ...]] = []
    channels = 3
    for item in config:
        if item == "M":
            layers.append(("maxpool", 2, 2))
            continue
        layers.append(("conv", channels, item, (3, 3), (1, 1), (1, 1)))
        layers += [("bn", item)] if batch_norm else []
        layers.append(("relu", True))
        channels = item
    return layers


def test_compact_vgg16_bn_has_torchvisions_feature_layout() -> None:
    """torchvision's VGG16-BN features and the compact head: what the ImageNet weights and exported models load into."""
    network = build_model(ModelSpec(architecture="vgg16_bn", head="compact", input_size=32, dropout=0.25))
    assert [_layer(m) for m in network.features] == _vgg16_d(batch_norm=True)
    assert _layer(network.avgpool) == ("avgpool", 1)
    assert [_layer(m) for m in network.classifier] == [("flatten", 1), ("dropout", 0.25), ("linear", 512, 2)]
    # The normalisation constants are derived from the spec, not weights: they must stay out of the file.
    assert {name.split(".")[0] for name in network.state_dict()} == {"features", "classifier"}
    assert {name for name, _ in network.named_buffers()} >= {"scale", "shift"}


def test_classic_vgg16_has_torchvisions_layout_and_computes_its_head() -> None:
    """The classic head is torchvision's: 7x7 average pool, fc6/fc7 with ReLU and dropout, a fresh 2-class fc8."""
    torch.manual_seed(0)
    network = build_model(ModelSpec(architecture="vgg16", head="classic", input_size=32, dropout=0.25)).eval()
    assert [_layer(m) for m in network.features] == _vgg16_d(batch_norm=False)
    assert _layer(network.avgpool) == ("avgpool", (7, 7))
    assert [_layer(m) for m in network.classifier] == [
        ("linear", 25088, 4096),
        ("relu", True),
        ("dropout", 0.25),
        ("linear", 4096, 4096),
        ("relu", True),
        ("dropout", 0.25),
        ("linear", 4096, 2),
    ]
    assert {name.split(".")[0] for name in network.state_dict()} == {"features", "classifier"}
    fc6, fc7, fc8 = (m for m in network.classifier if isinstance(m, nn.Linear))
    # fc6 and fc7 get torchvision's N(0, 0.01); fc8 is a fresh nn.Linear, uniform within 1/sqrt(fan_in) = 1/64,
    # as when torchvision's fc8 was replaced by a 2-class layer.
    for layer in (fc6, fc7):
        assert float(layer.weight.detach().std()) == pytest.approx(0.01, rel=0.02) and not layer.bias.any()
    assert float(fc8.weight.detach().abs().max()) <= 1 / 64
    # A 32 px input leaves 1x1 maps, which the 7x7 pool repeats 49 times per channel before fc6.
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        maps = network.feature_maps(x)
        assert maps.shape == (2, 512, 1, 1)
        flat = maps.reshape(2, 512).repeat_interleave(49, dim=1)
        hidden = torch.relu(flat @ fc6.weight.T + fc6.bias)
        hidden = torch.relu(hidden @ fc7.weight.T + fc7.bias)
        expected = hidden @ fc8.weight.T + fc8.bias
        torch.testing.assert_close(network.head(maps), expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(network.forward_normalized(x), expected, rtol=1e-4, atol=1e-6)


def test_initialisation_is_torchvisions_scheme() -> None:
    """He-normal convolutions with fan out, unit batch norms, N(0, 0.01) linears, zero biases (stds by hand)."""
    torch.manual_seed(0)
    modules = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.Linear(600, 200))
    with torch.no_grad():
        for parameter in modules.parameters():
            parameter.uniform_(0.5, 1.5)  # so every value the scheme sets is visibly set
    init_like_torchvision(modules)
    conv, batch_norm, linear = modules
    # fan_out = 64 * 3 * 3 = 576: std = sqrt(2 / 576) (fan_in would give sqrt(2 / 144), twice as large).
    assert float(conv.weight.detach().std()) == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    assert abs(float(conv.weight.detach().mean())) < 0.005 and not conv.bias.any()
    assert bool((batch_norm.weight == 1).all()) and not batch_norm.bias.any()
    assert float(linear.weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    assert abs(float(linear.weight.detach().mean())) < 1e-3 and not linear.bias.any()
