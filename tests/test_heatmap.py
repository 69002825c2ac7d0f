"""Class activation maps: exact decomposition of the score, Grad-CAM agreement, sanity and localisation."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.core.artifacts import load_model
from app.core.decision import PNEUMONIA_INDEX
from app.core.engine import InferenceEngine, load_engine
from app.core.heatmap import CamHead, ExplainUnsupportedError, Heatmap, cam_head
from app.core.network import ModelSpec, PneumoniaNet
from app.core.overlay import overlay_size, render_overlay
from tests.conftest import export_tiny_model

SIZE = 96  # a 3x3 map: VGG16 halves the input five times


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("cam"), seed=3, input_size=SIZE, temperature=0.7)


@pytest.fixture(scope="module")
def engine(weights: Path) -> InferenceEngine:
    return load_engine(weights, device="cpu")


@pytest.fixture(scope="module")
def network(weights: Path) -> PneumoniaNet:
    """The exported network as plain PyTorch, without the engine."""
    return load_model(weights).network.eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randint(0, 256, (4, 1, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_map_mean_plus_bias_is_the_calibrated_log_odds(
    engine: InferenceEngine, network: PneumoniaNet, pixels: torch.Tensor
) -> None:
    results = engine.infer(pixels, [True] * len(pixels))
    # Independently: the plain network's logits and the temperature written at export.
    with torch.inference_mode():
        logits = network(pixels).double()
    expected = ((logits[:, 1] - logits[:, 0]) / 0.7).tolist()
    for result, log_odds in zip(results, expected, strict=True):
        heatmap = result.heatmap
        assert heatmap is not None and (heatmap.rows, heatmap.cols) == (3, 3) and len(heatmap.values) == 9
        assert heatmap.method == "cam" and heatmap.layer == "features.30"
        assert np.mean(heatmap.values) + heatmap.bias == pytest.approx(log_odds, abs=1e-4)
        assert 1 / (1 + math.exp(-heatmap.log_odds())) == pytest.approx(result.probability, abs=1e-5)


def test_only_the_images_that_asked_get_a_map_and_probabilities_do_not_change(
    engine: InferenceEngine, pixels: torch.Tensor
) -> None:
    plain = engine.infer(pixels)
    mixed = engine.infer(pixels, [True, False, False, True])
    assert [r.heatmap is not None for r in mixed] == [True, False, False, True]
    assert all(r.heatmap is None for r in plain)
    assert [r.probability for r in mixed] == [r.probability for r in plain]


def autograd_grad_cam(network: PneumoniaNet, pixels: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.) of the pneumonia-minus-normal logit at the same layer, by autograd, unrectified."""
    maps = network.feature_maps(network.normalize(pixels)).detach().requires_grad_(True)
    logits = network.head(maps)
    (logits[:, 1] - logits[:, 0]).sum().backward()
    assert maps.grad is not None
    alpha = maps.grad.mean(dim=(2, 3), keepdim=True)
    return (alpha * maps).sum(dim=1).detach()


def test_map_equals_autograd_grad_cam_up_to_scale(network: PneumoniaNet, pixels: torch.Tensor) -> None:
    grad_cam = autograd_grad_cam(network, pixels)
    with torch.no_grad():
        cam = cam_head(network, temperature=1.0).maps(network.feature_maps(network.normalize(pixels)))
    for ours, theirs in zip(cam, grad_cam, strict=True):
        ratio = (ours.flatten() @ theirs.flatten()) / (theirs.flatten() @ theirs.flatten())
        assert ratio > 0
        torch.testing.assert_close(ours, ratio * theirs, rtol=1e-4, atol=1e-5)
        assert float(ratio) == pytest.approx(9.0, rel=1e-4)  # Grad-CAM's spatial mean of the gradient: 1 / (h*w)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_randomising_the_weights_changes_the_map(network: PneumoniaNet, pixels: torch.Tensor) -> None:
    """Adebayo et al.'s model-randomisation check, top layer first: a map that survived it would explain nothing."""

    def maps_of(net: PneumoniaNet) -> torch.Tensor:
        with torch.no_grad():
            return cam_head(net, 1.0).maps(net.feature_maps(net.normalize(pixels)))

    original = maps_of(network)
    torch.manual_seed(123)
    head_randomised = copy.deepcopy(network)
    head_randomised.classifier[-1].reset_parameters()
    cascade = copy.deepcopy(head_randomised)
    last_conv = [m for m in cascade.features if isinstance(m, nn.Conv2d)][-1]
    last_conv.reset_parameters()
    for randomised in (maps_of(head_randomised), maps_of(cascade)):
        similarities = [cosine(a, b) for a, b in zip(original, randomised, strict=True)]
        assert max(similarities) < 0.9, similarities
        assert not torch.allclose(original, randomised)


def test_grid_is_rows_by_cols_row_major_for_a_non_square_map() -> None:
    """Hand-made features on a 2 x 3 grid: rows and cols come from the map's own height and width (a
    square model input hides a swap), and the values run along the top row first."""
    head = CamHead(weight=torch.tensor([1.0, -2.0]), bias=0.5, layer="features.43")
    features = torch.zeros(1, 2, 2, 3)
    features[0, 0] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # weight +1
    features[0, 1, 1, 2] = 1.0  # weight -2: the bottom-right cell only
    (heatmap,) = head.heatmaps(features)
    assert (heatmap.rows, heatmap.cols) == (2, 3)
    assert heatmap.values == (1.0, 2.0, 3.0, 4.0, 5.0, 4.0)
    assert heatmap.log_odds() == pytest.approx(19.0 / 6.0 + 0.5)


def test_a_head_without_bias_decomposes_with_zero_bias() -> None:
    """A bias-free linear head (not what training builds, but a valid compact head): bias 0, and the
    cells' mean alone is the calibrated log-odds of the pooled features."""
    torch.manual_seed(0)
    linear = nn.Linear(3, 2, bias=False)
    temperature = 1.7
    head = CamHead.from_linear(linear, temperature, "features.43")
    assert head.bias == 0.0
    features = torch.rand(1, 3, 2, 2)
    with torch.no_grad():
        logits = linear(features.mean(dim=(2, 3)))[0]
    (heatmap,) = head.heatmaps(features)
    log_odds = float(logits[PNEUMONIA_INDEX] - logits[1 - PNEUMONIA_INDEX]) / temperature
    assert heatmap.log_odds() == pytest.approx(log_odds, abs=1e-6)


def test_classic_head_is_refused() -> None:
    network = PneumoniaNet(ModelSpec(architecture="vgg16", head="classic", input_size=32))
    with pytest.raises(ExplainUnsupportedError) as refused:
        cam_head(network, 1.0)
    assert refused.value.code == "explain_unsupported"


# --- localisation on a model trained here --------------------------------------------------------


class TinyCamNet(nn.Module):
    """The compact head's structure (conv features, global average pooling, one linear layer), small enough to train
    in a test: 32 px in, a 16x16 map out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.linear = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x).mean(dim=(2, 3)))


def blob_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy 32-px images; label 1 exactly when a bright blob (radius 3) is present. Returns images, labels, centres."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = 0.3 + 0.1 * torch.randn(count, 1, 32, 32, generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    centres = torch.randint(4, 28, (count, 2), generator=generator)
    for index in range(count):
        if labels[index]:
            cy, cx = centres[index].tolist()
            images[index, 0] += 0.8 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2))
    return images, labels, centres


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Kernels this small run faster on one thread than on two contended ones (measured: 5.7 s vs 30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_the_hottest_cell_covers_the_blob_that_decides_the_label() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = TinyCamNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(100):
        images, labels, _ = blob_images(32, generator)
        loss = nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels, centres = blob_images(200, generator)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(images).argmax(1) == labels).float().mean())
        maps = CamHead.from_linear(net.linear, temperature=1.0, layer="features.5").maps(net.features(images))
    assert accuracy > 0.9, f"the tiny model did not learn the task (accuracy {accuracy:.2f})"
    positives = labels.nonzero().flatten()
    hits = 0
    for index in positives.tolist():
        cam = maps[index]
        row, col = divmod(int(cam.argmax()), cam.shape[1])
        cy, cx = (centres[index] // 2).tolist()  # the map is at half resolution
        hits += abs(row - cy) <= 1 and abs(col - cx) <= 1
    assert hits / len(positives) > 0.8, f"hottest cell on the blob in {hits}/{len(positives)} images"


# --- overlay ----------------------------------------------------------------------------------------


def test_overlay_keeps_the_upload_aspect_and_draws_signed_colours() -> None:
    assert overlay_size(3000, 1500, 64) == (512, 256)
    assert overlay_size(96, 80, 32) == (96, 80)
    assert overlay_size(20, 10, 64) == (64, 32)
    heatmap = Heatmap("cam", "features.30", 1, 2, (-2.0, 4.0), 0.0)  # left pushes NORMAL, right PNEUMONIA
    pixels = torch.full((1, SIZE, SIZE), 128, dtype=torch.uint8)
    image = np.asarray(render_overlay(pixels, heatmap, (200, 100), opacity=1.0)).astype(int)
    assert image.shape == (100, 200, 3)
    left, right = image[50, 5], image[50, 195]
    assert left[2] > left[0]  # blue
    assert right[0] > right[2]  # red, full strength at the largest |value|
    plain = np.asarray(render_overlay(pixels, heatmap, (200, 100), opacity=0.0))
    assert (plain == 128).all()
