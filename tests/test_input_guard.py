"""The input guard: refuses non-chest-X-rays on every path, is part of the verified model, and its math is right."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from sklearn.covariance import LedoitWolf

from app import score
from app.core.artifacts import ModelLoadError, compute_guard_scores, load_model
from app.core.engine import EngineError, load_engine
from app.core.input_guard import (
    GUARD_MEAN_KEY,
    GuardStats,
    InsufficientDetailError,
    NotChestXrayError,
    default_blocks,
    detail,
    features_and_maps,
    fit_detail_floor,
    fit_guard,
    fit_threshold,
    guard_scores,
    judge,
    ledoit_wolf,
    noise_energy,
)
from app.core.network import ModelSpec, build_model
from app.core.preprocessing import preprocess
from tests.conftest import (
    GUARD_MARGIN,
    TEST_INPUT_SIZE,
    add_detail_floor,
    encode,
    export_tiny_model,
    rewrite_model,
    synthetic_chest_pixels,
    synthetic_xray,
)
from tests.live_server import live_server, metric_samples, serving_settings
from training.evaluate import guard_refusals


def not_chest_xrays() -> dict[str, bytes]:
    """Uploads a pneumonia classifier must not label: blank, noise and colour images."""
    rng = np.random.default_rng(0)
    photo = np.zeros((120, 160, 3), dtype=np.uint8)
    photo[:60] = (40, 120, 220)  # sky
    photo[60:] = (60, 160, 40)  # grass
    photo[40:100, 60:100] = (200, 30, 30)  # a red house
    return {
        "white.jpg": encode(Image.new("L", (300, 300), 255)),
        "black.jpg": encode(Image.new("L", (300, 300), 0)),
        "gray.png": encode(Image.new("L", (200, 150), 128), "PNG"),
        "gray-noise.png": encode(Image.fromarray(rng.integers(0, 256, (200, 200), dtype=np.uint8)), "PNG"),
        "colour-noise.jpg": encode(Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), "RGB")),
        "red.jpg": encode(Image.new("RGB", (200, 200), (230, 20, 20))),
        "photo.png": encode(Image.fromarray(photo, "RGB"), "PNG"),
    }


def chest_like() -> dict[str, bytes]:
    """Synthetic chest images the tiny model's guard was not fitted on, at several sizes and encodings."""
    return {
        "a.jpg": encode(synthetic_xray(96, 80, seed=3)),
        "b.png": encode(synthetic_xray(320, 256, seed=11), "PNG"),
        "c.jpg": encode(synthetic_xray(64, 64, seed=5, mode="RGB")),
        "d.jpg": encode(synthetic_xray(400, 380, seed=8), quality=60),
    }


def test_guard_refuses_blank_noise_and_colour_through_a_real_server(tiny_weights: Path) -> None:
    threshold = load_model(tiny_weights).metadata.guard.threshold  # type: ignore[union-attr]
    with live_server(serving_settings(tiny_weights)) as server, server.client() as client:
        for name, data in not_chest_xrays().items():
            response = client.post("/predict", files={"file": (name, data)})
            assert response.status_code == 422, name
            error = response.json()["error"]
            assert error["code"] == "not_chest_xray", name
            numbers = [float(word) for word in error["message"].replace(":", " ").split() if word[0].isdigit()]
            assert numbers[0] > GUARD_MARGIN * threshold and numbers[1] == pytest.approx(threshold, abs=1e-3), error
        for name, data in chest_like().items():
            response = client.post("/predict", files={"file": (name, data)})
            assert response.status_code == 200, (name, response.text)
            body = response.json()
            assert body["input_guard"]["passed"] is True and body["warning"] is None
            assert 0 < body["input_guard"]["score"] <= body["input_guard"]["threshold"] == pytest.approx(threshold)
        refused = metric_samples(client.get("/metrics").text, "cxr_input_guard_failures_total")
    assert refused == {'{action="refused"}': len(not_chest_xrays())}


def test_batch_isolates_a_refused_item(tiny_weights: Path) -> None:
    uploads = [
        ("files", ("good1.jpg", chest_like()["a.jpg"])),
        ("files", ("blank.jpg", not_chest_xrays()["white.jpg"])),
        ("files", ("good2.png", chest_like()["b.png"])),
    ]
    with live_server(serving_settings(tiny_weights)) as server, server.client() as client:
        response = client.post("/predict/batch", files=uploads)
    assert response.status_code == 200
    first, refused, last = response.json()["results"]
    assert refused["filename"] == "blank.jpg" and refused["error"]["code"] == "not_chest_xray"
    assert "threshold" in refused["error"]["message"]
    for item in (first, last):
        assert item["label"] in ("NORMAL", "PNEUMONIA") and item["input_guard"]["passed"] is True


def test_flag_mode_answers_with_a_warning(tiny_weights: Path) -> None:
    with live_server(serving_settings(tiny_weights, input_guard="flag")) as server, server.client() as client:
        flagged = client.post("/predict", files={"file": ("w.jpg", not_chest_xrays()["white.jpg"])})
        fine = client.post("/predict", files={"file": ("a.jpg", chest_like()["a.jpg"])})
        counted = metric_samples(client.get("/metrics").text, "cxr_input_guard_failures_total")
    assert flagged.status_code == 200
    body = flagged.json()
    assert body["input_guard"]["passed"] is False and body["input_guard"]["score"] > body["input_guard"]["threshold"]
    assert body["warning"].startswith("unreliable: input guard score") and body["label"] in ("NORMAL", "PNEUMONIA")
    assert fine.json()["warning"] is None and fine.json()["input_guard"]["passed"] is True
    assert counted == {'{action="flagged"}': 1.0}


def test_off_mode_labels_without_checking(tiny_weights: Path) -> None:
    with live_server(serving_settings(tiny_weights, input_guard="off")) as server, server.client() as client:
        response = client.post("/predict", files={"file": ("w.jpg", not_chest_xrays()["white.jpg"])})
        card = client.get("/model").json()
    assert response.status_code == 200
    assert response.json()["input_guard"] is None and response.json()["warning"] is None
    assert card["input_guard"] == "off" and card["guard"]["method"] == "mahalanobis-block-stats"


def test_a_model_without_a_guard_only_serves_with_the_guard_off(tmp_path: Path) -> None:
    weights = export_tiny_model(tmp_path / "bare", guard=False)
    with pytest.raises(EngineError, match=r"has no input guard.*CXR_INPUT_GUARD=off"):
        load_engine(weights, device="cpu")
    with pytest.raises(EngineError, match="has no input guard"):
        load_engine(weights, device="cpu", input_guard="flag")
    engine = load_engine(weights, device="cpu", input_guard="off")
    (result,) = engine.infer(engine.collate([preprocess(chest_like()["a.jpg"], TEST_INPUT_SIZE)]))
    assert result.guard_score is None and engine.assess(result).guard is None


def test_guard_statistics_are_verified_on_load(tiny_weights: Path, tmp_path: Path) -> None:
    unchanged = shutil.copytree(tiny_weights, tmp_path / "unchanged")
    (unchanged / "model.safetensors").write_bytes((tiny_weights / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model(unchanged)

    shifted = shutil.copytree(tiny_weights, tmp_path / "shifted")
    rewrite_model(shifted, lambda t: t.__setitem__(GUARD_MEAN_KEY, t[GUARD_MEAN_KEY] * 1.05))
    with pytest.raises(ModelLoadError, match="input-guard scores differ"):
        load_model(shifted)


def test_golden_guard_scores_are_reproduced_independently(tiny_weights: Path) -> None:
    """The engine's batched scores equal the exporter's, and a from-scratch numpy Mahalanobis distance."""
    loaded = load_model(tiny_weights)
    spec, stats = loaded.metadata.guard, loaded.guard
    assert spec is not None and stats is not None and loaded.golden_inputs is not None
    engine = load_engine(tiny_weights, device="cpu")
    results = engine.infer(loaded.golden_inputs)
    assert [r.guard_score for r in results] == pytest.approx(spec.golden_scores, rel=1e-4)
    # numpy, from the definition: sqrt((f - mu)^T Sigma^-1 (f - mu) / D) with Sigma^-1 = W W^T.
    with torch.inference_mode():
        x = loaded.network.normalize(loaded.golden_inputs)
        _, vectors = features_and_maps(loaded.network.features, x, spec.mean_blocks, spec.std_blocks)
    f, mu, w = vectors.double().numpy(), stats.mean.double().numpy(), stats.whitener.double().numpy()
    precision = w @ w.T
    expected = [np.sqrt((row - mu) @ precision @ (row - mu) / len(mu)) for row in f]
    assert spec.golden_scores == pytest.approx(expected, rel=1e-3)
    assert compute_guard_scores(loaded.network, loaded.golden_inputs, spec, stats).tolist() == pytest.approx(expected)


def test_tapped_forward_pass_equals_the_plain_one() -> None:
    torch.manual_seed(0)
    network = build_model(ModelSpec(architecture="vgg16_bn", head="compact", input_size=64)).eval()
    x = network.normalize(torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8))
    with torch.inference_mode():
        maps, vector = features_and_maps(network.features, x, (1, 2, 3, 4, 5), (1, 2, 3, 4))
        assert torch.equal(maps, network.feature_maps(x))
        first = network.features[:7](x)  # conv-bn-relu, conv-bn-relu, max-pool: block 1
    assert vector.shape == (3, 64 + 128 + 256 + 512 + 512 + 64 + 128 + 256 + 512)
    assert torch.allclose(vector[:, :64], first.mean((2, 3)))
    assert torch.allclose(vector[:, 1472 : 1472 + 64], first.std((2, 3), correction=0), atol=1e-6)
    # A stored spec need not take deviations from a subset of the mean blocks: block 2's only here.
    with torch.inference_mode():
        _, apart = features_and_maps(network.features, x, (1,), (2,))
        second = network.features[:14](x)  # block 2: two more conv-bn-relu and a max-pool
    assert apart.shape == (3, 64 + 128)
    assert torch.allclose(apart[:, :64], first.mean((2, 3)))
    assert torch.allclose(apart[:, 64:], second.std((2, 3), correction=0), atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.01])  # 0.01: a target distance (delta) below 1, as small features have
def test_ledoit_wolf_matches_scikit_learn(scale: float) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(80, 30)) @ rng.normal(size=(30, 30)) * scale
    mean, covariance, shrinkage = ledoit_wolf(torch.from_numpy(data))
    reference = LedoitWolf().fit(data)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    assert np.allclose(covariance.numpy(), reference.covariance_) and np.allclose(mean.numpy(), data.mean(0))


def test_ledoit_wolf_of_an_isotropic_sample_is_that_sample() -> None:
    """Sample covariance exactly 0.5 I: nothing to shrink (the target distance is 0, no 0/0)."""
    data = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    _, covariance, shrinkage = ledoit_wolf(torch.from_numpy(data))
    assert np.array_equal(covariance.numpy(), [[0.5, 0.0], [0.0, 0.5]])
    assert np.allclose(covariance.numpy(), LedoitWolf().fit(data).covariance_)
    assert shrinkage == 1.0  # all weight on the identity target, which here equals the sample


def test_mahalanobis_score_matches_scipy_definition() -> None:
    from scipy.spatial.distance import mahalanobis

    from app.core.input_guard import fit_stats

    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(size=(200, 6)) * [1, 2, 3, 4, 5, 6])
    stats, _ = fit_stats(train)
    _, covariance, _ = ledoit_wolf(train)
    inverse = np.linalg.inv(covariance.numpy())
    probe = rng.normal(size=(5, 6)) * 4
    expected = [mahalanobis(row, stats.mean.double().numpy(), inverse) / np.sqrt(6) for row in probe]
    assert guard_scores(torch.from_numpy(probe).float(), stats).tolist() == pytest.approx(expected, rel=1e-4)


def test_runtime_noise_is_taken_off_the_squared_score() -> None:
    """Distance 2 in 4 dimensions is score 1.0; noise 0.19 leaves sqrt(1 - 0.19) = 0.9; more noise than score, 0."""
    identity = GuardStats(mean=torch.zeros(4), whitener=torch.eye(4))
    probe = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0]])
    assert guard_scores(probe, identity).tolist() == pytest.approx([1.0, 0.4])
    assert guard_scores(probe, identity, 0.19).tolist() == pytest.approx([0.9, 0.0])


def test_noise_energy_is_the_median_rise_of_squared_scores() -> None:
    exact = torch.tensor([1.0, 2.0, 3.0])
    noisy = torch.tensor([1.1, 2.0, 3.5])  # rises 0.21, 0, 3.25 in squares: median 0.21
    assert noise_energy(exact, noisy) == pytest.approx(0.21)
    assert noise_energy(noisy, exact) == 0.0  # a runtime that lowers scores is not corrected upwards
    with pytest.raises(ValueError, match="the same images scored twice"):
        noise_energy(exact, noisy[:2])
    with pytest.raises(ValueError, match="the same images scored twice"):
        noise_energy(torch.zeros(0), torch.zeros(0))


@pytest.mark.parametrize(("fraction", "refused"), [(0.01, 1), (0.05, 5), (0.0, 0), (0.5, 50), (1.0, 99)])
def test_threshold_refuses_at_most_the_target_fraction(fraction: float, refused: int) -> None:
    scores = torch.arange(100, dtype=torch.float64).flip(0)
    threshold = fit_threshold(scores, fraction)
    assert int((scores > threshold).sum()) == refused


def test_scorer_writes_an_error_row_for_refused_files(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("CXR_")]:
        monkeypatch.delenv(name)
    root = tmp_path / "images"
    root.mkdir()
    (root / "chest.jpg").write_bytes(chest_like()["a.jpg"])
    (root / "white.jpg").write_bytes(not_chest_xrays()["white.jpg"])
    rows = {}
    for mode in ("reject", "flag"):
        out = tmp_path / f"{mode}.csv"
        argv = [str(root), "--out", str(out), "--weights", str(tiny_weights), "--device", "cpu", "--input-guard", mode]
        assert score.main(argv) == 0
        with out.open(newline="") as handle:
            rows[mode] = {row["path"]: row for row in csv.DictReader(handle)}
    refused, chest = rows["reject"]["white.jpg"], rows["reject"]["chest.jpg"]
    assert refused["error_code"] == "not_chest_xray" and refused["label"] == ""
    assert float(refused["guard_score"]) > float(refused["guard_threshold"])
    assert chest["label"] in ("NORMAL", "PNEUMONIA") and chest["error_code"] == "" and chest["warning"] == ""
    assert float(chest["guard_score"]) <= float(chest["guard_threshold"])
    flagged = rows["flag"]["white.jpg"]
    assert flagged["error_code"] == "" and flagged["label"] and flagged["warning"].startswith("unreliable:")


def test_scores_are_finite_and_do_not_depend_on_the_batch(tiny_weights: Path) -> None:
    """Extreme inputs give finite scores, and an image scores the same alone as in any batch."""
    engine = load_engine(tiny_weights, device="cpu")
    size = TEST_INPUT_SIZE
    checker = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 255
    extremes = [torch.zeros(1, size, size), torch.full((1, size, size), 255), checker[None]]
    rng = torch.Generator().manual_seed(0)
    images = [t.to(torch.uint8) for t in extremes] + [
        torch.randint(0, 256, (1, size, size), dtype=torch.uint8, generator=rng) for _ in range(5)
    ]
    together = [r.guard_score for r in engine.infer(engine.collate(images))]
    alone = [engine.infer(engine.collate([image]))[0].guard_score for image in images]
    assert all(score is not None and np.isfinite(score) and score > 0 for score in together)
    assert together == pytest.approx(alone, rel=1e-5)
    spec = engine.guard_spec
    assert spec is not None and all(score > spec.threshold for score in together[:3])  # type: ignore[operator]


def test_three_training_images_are_the_fewest_a_guard_is_fitted_on_and_its_card_counts_them() -> None:
    """With two, Ledoit-Wolf's shrinkage is exactly 0 and the covariance singular; identical images have no spread.

    Both were a LinAlgError from deep inside torch; the card records the counts and names a source only when given.
    """
    torch.manual_seed(0)
    network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=TEST_INPUT_SIZE))
    pixels = torch.randint(0, 256, (6, 1, TEST_INPUT_SIZE, TEST_INPUT_SIZE), dtype=torch.uint8)
    spec, _ = fit_guard(network, pixels[:3], pixels[3:5], input_size=TEST_INPUT_SIZE)
    assert (spec.calibration["train_images"], spec.calibration["val_images"]) == (3, 2)
    assert "source" not in spec.calibration
    # By default at most 1% of validation is refused: of two scores, none, so the threshold is the larger
    # one (a refusal counts scores above it, not at it) and the median, torch's lower middle, the smaller.
    assert spec.calibration["val_refusal_rate"] == 0.0
    assert 0.0 < float(spec.calibration["val_score_median"]) < spec.threshold
    named, _ = fit_guard(network, pixels[:3], pixels[3:5], input_size=TEST_INPUT_SIZE, source="kermany train split")
    assert named.calibration["source"] == "kermany train split"
    with pytest.raises(ValueError, match=r"^the input guard needs at least 3 training images$"):
        fit_guard(network, pixels[:2], pixels[3:5], input_size=TEST_INPUT_SIZE)
    same = torch.zeros((3, 1, TEST_INPUT_SIZE, TEST_INPUT_SIZE), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^the input guard's training features have a singular covariance"):
        fit_guard(network, same, pixels[3:5], input_size=TEST_INPUT_SIZE)


@pytest.mark.parametrize("input_size", [64, 80, 96])
def test_default_blocks_take_deviations_only_where_the_measured_map_is_bigger_than_2x2(input_size: int) -> None:
    """The oracle is the real VGG16 stack's own output sizes, measured after each max-pool."""
    features = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=input_size)).features.eval()
    sides: list[int] = []
    for layer in features:
        if isinstance(layer, torch.nn.MaxPool2d):
            layer.register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
    with torch.inference_mode():
        features(torch.zeros(1, 3, input_size, input_size))
    means, stds = default_blocks(features, input_size)
    assert means == (1, 2, 3, 4, 5) and len(sides) == 5
    assert stds == tuple(block for block, side in enumerate(sides, start=1) if side > 2)
    # 80 and 96 px end on a 2 x 2 and a 3 x 3 map: the boundary on each side of "bigger than 2 x 2".
    assert stds == {64: (1, 2, 3, 4), 80: (1, 2, 3, 4), 96: (1, 2, 3, 4, 5)}[input_size]


def test_whitener_is_stored_as_its_packed_lower_triangle_and_read_back_exactly() -> None:
    whitener = torch.tril(torch.randn(5, 5))
    stats = GuardStats(torch.randn(5), whitener)
    tensors = stats.tensors()
    assert tensors["__guard__.whitener_tril"].shape == (15,)  # 5 * 6 / 2 values, not 25
    restored = GuardStats.pop_from(dict(tensors))
    assert restored is not None and torch.equal(restored.whitener, whitener) and torch.equal(restored.mean, stats.mean)
    with pytest.raises(
        ValueError, match=r"^the guard's whitening matrix must be lower triangular \(a Cholesky factor\)$"
    ):
        GuardStats(torch.randn(5), torch.randn(5, 5) + 1.0).tensors()
    just_above = torch.tril(torch.randn(5, 5))
    just_above[2, 3] = 0.5  # one value on the first superdiagonal would be lost by the packing
    with pytest.raises(ValueError, match="must be lower triangular"):
        GuardStats(torch.randn(5), just_above).tensors()
    # Half a guard is a damaged file, never a model without a guard.
    for half in ({"__guard__.mean": torch.zeros(5)}, {"__guard__.whitener_tril": torch.zeros(15)}):
        with pytest.raises(ValueError, match=r"^the tensor file holds only one of the guard's two tensors$"):
            GuardStats.pop_from(dict(half))
    assert GuardStats.pop_from({"features.0.weight": torch.zeros(1)}) is None
    with pytest.raises(ValueError, match="packed whitening matrix has 14 values"):
        GuardStats.pop_from({"__guard__.mean": torch.zeros(5), "__guard__.whitener_tril": torch.zeros(14)})


# A random-init network's features already refuse heavy blur; at 1.3 below the least training detail
# (measured: sharp films 0.26, this blur 0.19 with the features passing) the floor is what refuses it.
DETAIL_MARGIN = 1.3


def blurred(image: Image.Image) -> bytes:
    return encode(image.filter(ImageFilter.GaussianBlur(15)), "PNG")


def test_detail_is_zero_when_flat_falls_with_blur_and_ignores_exposure() -> None:
    flat = torch.full((1, 1, 64, 64), 128, dtype=torch.uint8)
    assert detail(flat).tolist() == [0.0]
    film = synthetic_xray(512, 512, seed=4)
    sharp = preprocess(encode(film, "PNG"), 128)
    blurred = preprocess(encode(film.filter(ImageFilter.GaussianBlur(8)), "PNG"), 128)
    darker = preprocess(encode(film.point(lambda v: int(v * 0.7)), "PNG"), 128)
    sharp_detail, blurred_detail, darker_detail = detail(torch.stack([sharp, blurred, darker])).tolist()
    assert blurred_detail < 0.5 * sharp_detail
    assert darker_detail == pytest.approx(sharp_detail, rel=0.05)


def test_the_detail_floor_is_a_training_quantile_and_needs_enough_images() -> None:
    values = torch.randperm(1000).double()
    assert fit_detail_floor(values, 0.0025) == 2.0  # 0 and 1 (0.2 %) below it; 3 would put 0.3 % below
    assert fit_detail_floor(values, 0.0) == 0.0 or fit_detail_floor(values, 0.0) is None
    assert fit_detail_floor(values[:399], 0.0025) is None  # 399 x 0.0025 < 1: the floor would be the minimum
    assert fit_detail_floor(values[:400] + 1, 0.0025) == float(torch.sort(values[:400] + 1).values[1])
    assert fit_detail_floor(torch.zeros(1000), 0.0025) is None  # flat images: nothing to put a floor under


def test_a_failed_verdict_names_the_check_that_failed(tiny_weights: Path) -> None:
    spec = load_model(tiny_weights).metadata.guard
    assert spec is not None and spec.detail_floor is None  # 120 training images: too few for a floor
    floored = spec.model_copy(update={"detail_floor": 0.2})
    unlike, blurred = judge(floored, spec.threshold * 2, 0.1), judge(floored, spec.threshold / 2, 0.1)
    assert not unlike.passed and type(unlike.refusal()) is NotChestXrayError
    assert unlike.refusal().code == "not_chest_xray" and "does not resemble" in unlike.reason
    assert not blurred.passed and type(blurred.refusal()) is InsufficientDetailError
    assert blurred.refusal().code == "insufficient_detail"
    assert blurred.reason.startswith("fine detail 0.100 < floor 0.200: the image is blurred")
    fine = judge(floored, spec.threshold / 2, 0.3)
    assert fine.passed and (fine.detail, fine.detail_floor) == (0.3, 0.2) and "detail 0.300 >= floor" in fine.reason
    unchecked = judge(spec, spec.threshold / 2, 0.01)  # a guard without a floor ignores detail
    assert unchecked.passed and unchecked.detail is None and unchecked.detail_floor is None
    assert not judge(floored, spec.threshold / 2, float("nan")).passed
    with pytest.raises(ValueError, match="checks fine detail"):
        judge(floored, spec.threshold / 2)


def test_fit_guard_places_a_detail_floor_when_it_has_enough_training_images() -> None:
    torch.manual_seed(0)
    network = build_model(ModelSpec(architecture="vgg16", head="compact", input_size=TEST_INPUT_SIZE))
    train = synthetic_chest_pixels(120, TEST_INPUT_SIZE, seed=1)
    val = synthetic_chest_pixels(40, TEST_INPUT_SIZE, seed=2)
    spec, _ = fit_guard(network, train, val, input_size=TEST_INPUT_SIZE)
    assert spec.detail_floor is None and spec.detail_floor_method.startswith("none: 120 training images")
    spec, _ = fit_guard(network, train, val, input_size=TEST_INPUT_SIZE, max_low_detail=0.05)
    details = detail(train)
    assert spec.detail_floor == pytest.approx(float(torch.sort(details).values[6]))  # 6 of 120 below it
    assert int((details < spec.detail_floor).sum()) <= 6
    assert spec.detail_floor_method == "training quantile: at most 0.05 of training images below it"
    assert spec.calibration["val_low_detail_rate"] == pytest.approx(
        float((detail(val) < spec.detail_floor).double().mean())
    )


def test_blurred_films_are_refused_for_detail_through_a_real_server(tmp_path: Path) -> None:
    weights = export_tiny_model(tmp_path / "floored")
    floor = add_detail_floor(weights, DETAIL_MARGIN)
    film = synthetic_xray(400, 380, seed=8)
    sharp, thumbnail = encode(film, "PNG"), blurred(film)
    with live_server(serving_settings(weights)) as server, server.client() as client:
        passed = client.post("/predict", files={"file": ("sharp.png", sharp)})
        refused = client.post("/predict", files={"file": ("thumb.png", thumbnail)})
        batch = client.post("/predict/batch", files=[("files", ("s.png", sharp)), ("files", ("t.png", thumbnail))])
        counted = metric_samples(client.get("/metrics").text, "cxr_input_guard_failures_total")
    assert passed.status_code == 200, passed.text
    guard = passed.json()["input_guard"]
    assert guard["passed"] is True and guard["detail"] >= guard["detail_floor"] == pytest.approx(floor)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "insufficient_detail", refused.text
    assert refused.json()["error"]["message"].startswith("refused: fine detail ")
    ok, failed = batch.json()["results"]
    assert ok["input_guard"]["passed"] is True and failed["error"]["code"] == "insufficient_detail"
    assert counted == {'{action="refused"}': 2.0}


def test_flag_mode_marks_an_image_without_detail_unreliable(tmp_path: Path) -> None:
    weights = export_tiny_model(tmp_path / "floored")
    add_detail_floor(weights, DETAIL_MARGIN)
    thumbnail = blurred(synthetic_xray(400, 380, seed=8))
    with live_server(serving_settings(weights, input_guard="flag")) as server, server.client() as client:
        response = client.post("/predict", files={"file": ("thumb.png", thumbnail)})
    body = response.json()
    assert response.status_code == 200 and body["input_guard"]["passed"] is False
    assert body["input_guard"]["score"] <= body["input_guard"]["threshold"]  # the features alone pass it
    assert body["input_guard"]["detail"] < body["input_guard"]["detail_floor"]
    assert body["warning"].startswith("unreliable: fine detail ")


def test_golden_details_guard_the_detail_measure_at_load(tmp_path: Path) -> None:
    weights = export_tiny_model(tmp_path / "floored")
    add_detail_floor(weights)
    assert load_model(weights).metadata.guard.golden_details  # type: ignore[union-attr]
    shutil.copytree(weights, tmp_path / "edited")
    rewrite_model(tmp_path / "edited", edit_meta=lambda m: m["guard"]["golden_details"].__setitem__(0, 0.5))
    with pytest.raises(ModelLoadError, match="fine detail differs from the exported one"):
        load_model(tmp_path / "edited")
    rewrite_model(tmp_path / "edited", edit_meta=lambda m: m["guard"].update(golden_details=[]))
    with pytest.raises(ModelLoadError, match="needs the golden inputs' details: 0 stored for 2 inputs"):
        load_model(tmp_path / "edited")


def test_evaluate_counts_the_refusals_the_service_makes(tmp_path: Path) -> None:
    weights = export_tiny_model(tmp_path / "floored")
    add_detail_floor(weights, DETAIL_MARGIN)
    film = synthetic_xray(400, 380, seed=8)
    uploads = [encode(film, "PNG"), blurred(film), not_chest_xrays()["white.jpg"]]
    pixels = torch.stack([preprocess(data, TEST_INPUT_SIZE) for data in uploads])
    report = guard_refusals(load_model(weights), pixels, batch_size=2)
    engine = load_engine(weights, device="cpu", input_guard="flag")
    served = [engine.assess(result).guard for result in engine.infer(engine.collate(list(pixels)))]
    assert [not verdict.passed for verdict in served if verdict is not None] == [False, True, True]
    assert (report["refused"], report["low_detail"], report["n"]) == (2, 2, 3)  # the white image has no detail
