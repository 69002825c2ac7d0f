"""The inference engine shared by the service and the offline scorer."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.core import engine as engine_module
from app.core import openvino_backend
from app.core.artifacts import LoadedModel, ModelLoadError, load_model
from app.core.backend_choice import BackendChoice
from app.core.decision import Decision, pneumonia_probability
from app.core.engine import (
    Assessment,
    BackendInfo,
    EngineError,
    Features,
    ImageResult,
    InferenceEngine,
    default_decode_workers,
    int8_guard_noise,
    load_engine,
    load_openvino,
    resolve_device,
    resolve_dtype,
    target_device,
)
from app.core.fastpath_record import FastPathRecord, Int8Ranges
from app.core.heatmap import ExplainUnsupportedError
from app.core.input_guard import GuardSpec, GuardVerdict, NotChestXrayError, features_and_maps
from app.core.int8_calibration import CalibrationError
from app.core.network import ModelSpec, build_model
from app.core.preprocessing import preprocess
from tests.conftest import export_tiny_model

# The trained model: only its logits are large enough for bf16 rounding to exceed fp32's golden tolerance.
SHIPPED = Path(__file__).resolve().parent.parent / "weights"


def test_cpu_engine_matches_direct_computation(tiny_weights: Path, make_jpeg) -> None:
    engine = load_engine(tiny_weights, device="cpu")
    assert engine.device.type == "cpu" and engine.dtype == torch.float32 and engine.input_size == 32
    images = [preprocess(make_jpeg(seed=seed), 32) for seed in range(3)]
    got = [r.probability for r in engine.infer(engine.collate(images))]
    loaded = load_model(tiny_weights)
    with torch.inference_mode():
        expected = pneumonia_probability(loaded.network(torch.stack(images)), loaded.metadata.temperature)
    assert got == pytest.approx(expected.tolist(), abs=1e-6)


def test_temperature_and_threshold_come_from_the_model_card(tmp_path: Path) -> None:
    engine = load_engine(export_tiny_model(tmp_path, temperature=3.0, threshold=0.25), device="cpu")
    pixels = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        logits = engine.network(pixels)
    assert [r.probability for r in engine.infer(pixels)] == pytest.approx(
        pneumonia_probability(logits, 3.0).tolist(), abs=1e-6
    )
    assert (engine.decide(0.25).label, engine.decide(0.2499).label) == ("PNEUMONIA", "NORMAL")
    assert engine.decide(0.25).probabilities == {"NORMAL": 0.75, "PNEUMONIA": 0.25}
    assert engine.decide(0.25).threshold == 0.25


def test_warmup_and_wrong_input_shape(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = load_engine(tiny_weights, device="cpu")
    seen: list[tuple[int, ...]] = []
    real_infer = engine.infer

    def spy(pixels: torch.Tensor) -> list[ImageResult]:
        seen.append(tuple(pixels.shape))
        return real_infer(pixels)

    monkeypatch.setattr(engine, "infer", spy)
    engine.warmup([3, 1, 3])
    assert seen == [(1, 1, 32, 32), (3, 1, 32, 32)]  # each distinct batch size once, smallest first
    with pytest.raises(ValueError, match="expected uint8"):
        engine.infer(torch.zeros((1, 1, 16, 16), dtype=torch.uint8))


def test_cpu_warns_that_no_gpu_was_found(tiny_weights: Path, caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    engine = load_engine(tiny_weights)
    assert engine.device.type == "cpu"
    assert "no CUDA GPU found" in caplog.text


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_invalid_device_names(device: str) -> None:
    with pytest.raises(EngineError) as error:
        resolve_device(device)
    assert str(error.value) == f"invalid device {device!r}: use auto, cpu, cuda or cuda:N"


def test_cuda_without_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError) as error:
        resolve_device("cuda:0")
    assert str(error.value) == "device 'cuda:0' was requested but no CUDA GPU is available"
    assert resolve_device("auto") == torch.device("cpu")


def test_device_names_resolve_to_the_gpu_they_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the device *names* are resolved here (CUDA's availability queries answered by the test); nothing runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(EngineError) as error:
        resolve_device("cuda:2")
    assert str(error.value) == "device 'cuda:2' was requested but only 2 GPU(s) exist"
    # OpenVINO is the CPU's backend: with device auto it stays there on a GPU host; an explicit device is honoured.
    assert target_device("auto", "openvino") == torch.device("cpu")
    assert target_device("auto", "torch") == torch.device("cuda", 0)
    assert target_device("auto", "auto") == torch.device("cuda", 0)
    assert target_device("cuda:1", "openvino") == torch.device("cuda", 1)


def test_cpu_precision_is_fp32_unless_bf16_is_asked_for() -> None:
    with pytest.raises(EngineError) as error:
        resolve_dtype(torch.device("cpu"), "fp16")
    assert str(error.value) == "precision fp16 needs a CUDA device; on the CPU use fp32 or bf16"
    with pytest.raises(EngineError) as error:
        resolve_dtype(torch.device("cpu"), "int8")  # int8 is OpenVINO's; PyTorch has no such dtype here
    assert str(error.value) == "invalid precision 'int8': use auto, fp16, bf16 or fp32"
    assert resolve_dtype(torch.device("cpu"), "auto") == torch.float32
    assert resolve_dtype(torch.device("cpu"), "fp32") == torch.float32
    assert resolve_dtype(torch.device("cpu"), "bf16") == torch.bfloat16


def test_cpu_bf16_engine_passes_golden_check_and_agrees_with_fp32(tiny_weights: Path) -> None:
    fast = load_engine(tiny_weights, device="cpu", precision="bf16")  # runs the golden check in bf16
    exact = load_engine(tiny_weights, device="cpu", precision="fp32")
    assert fast.dtype == torch.bfloat16 and fast.precision == "bf16"
    pixels = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert [r.probability for r in fast.infer(pixels)] == pytest.approx(
        [r.probability for r in exact.infer(pixels)], abs=0.05
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_runs_reduced_precision_and_agrees(tiny_weights: Path) -> None:
    engine = load_engine(tiny_weights, device="cuda")
    assert engine.dtype in (torch.float16, torch.bfloat16)
    engine.warmup([1, 2])
    pixels = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    reference = [r.probability for r in load_engine(tiny_weights, device="cpu").infer(pixels)]
    assert [r.probability for r in engine.infer(engine.collate(list(pixels)))] == pytest.approx(reference, abs=5e-2)


@pytest.mark.parametrize(
    ("cores", "device", "workers"), [(2, "cpu", 1), (12, "cpu", 1), (16, "cpu", 2), (2, "cuda", 2), (16, "cuda", 4)]
)
def test_default_decode_workers_leave_cpu_cores_to_the_model(
    monkeypatch: pytest.MonkeyPatch, cores: int, device: str, workers: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    got = default_decode_workers(torch.device(device))
    assert got == workers and isinstance(got, int)


def _model_card(weights: Path) -> dict:
    """model.json as written at export, read without the code under test."""
    return json.loads((weights / "model.json").read_text())


def test_results_reproduce_the_exported_golden_outputs(tiny_weights: Path) -> None:
    """Probabilities and guard scores of the golden inputs equal the ones stored at export; off mode has no scores."""
    card = _model_card(tiny_weights)
    temperature = card["temperature"]
    # softmax over two logits, the PNEUMONIA one second: 1 / (1 + exp(-(l1 - l0) / T)).
    expected = [1 / (1 + math.exp(-(l1 - l0) / temperature)) for l0, l1 in card["golden"]["logits"]]
    loaded = load_model(tiny_weights)
    assert loaded.golden_inputs is not None
    guarded = InferenceEngine(loaded, torch.device("cpu"), torch.float32, "flag")
    results = guarded.infer(loaded.golden_inputs)
    assert [r.probability for r in results] == pytest.approx(expected, abs=1e-5)
    assert [r.guard_score for r in results] == pytest.approx(card["guard"]["golden_scores"], rel=1e-4)
    assert [r.heatmap for r in results] == [None, None]
    unguarded = InferenceEngine(loaded, torch.device("cpu"), torch.float32, "off")
    assert unguarded.guard_spec is None
    results = unguarded.infer(loaded.golden_inputs)
    assert [r.probability for r in results] == pytest.approx(expected, abs=1e-5)
    assert [r.guard_score for r in results] == [None, None]


def test_infer_names_the_batch_it_expected(tiny_weights: Path) -> None:
    """A wrong dtype, rank or size is refused before any work, and the message says what was given."""
    engine = InferenceEngine(load_model(tiny_weights), torch.device("cpu"), torch.float32)
    cases = [
        (torch.zeros((1, 1, 32, 32)), "torch.float32[1, 1, 32, 32]"),
        (torch.zeros((1, 32, 32), dtype=torch.uint8), "torch.uint8[1, 32, 32]"),
        (torch.zeros((1, 1, 32, 16), dtype=torch.uint8), "torch.uint8[1, 1, 32, 16]"),
    ]
    for pixels, given in cases:
        with pytest.raises(ValueError, match=r"^expected uint8") as error:
            engine.infer(pixels)
        assert str(error.value) == f"expected uint8[N,1,32,32], got {given}"


def test_collate_stacks_uint8_images_in_order(tiny_weights: Path) -> None:
    engine = InferenceEngine(load_model(tiny_weights), torch.device("cpu"), torch.float32)
    batch = engine.collate([torch.full((1, 32, 32), value, dtype=torch.uint8) for value in (0, 7, 255)])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 1, 32, 32)
    assert [int(image.min()) for image in batch] == [0, 7, 255] and [int(image.max()) for image in batch] == [0, 7, 255]


def test_fp32_stays_contiguous_and_bf16_runs_channels_last(tiny_weights: Path) -> None:
    """CPU fp32 keeps the default layout (batch-independent results); reduced precision uses channels_last."""
    exact = InferenceEngine(load_model(tiny_weights), torch.device("cpu"), torch.float32)
    weight = exact.network.features[0].weight  # [64, 3, 3, 3]: the two layouts have different strides
    assert weight.dtype == torch.float32 and exact.precision == "fp32"
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    fast = InferenceEngine(load_model(tiny_weights), torch.device("cpu"), torch.bfloat16)
    weight = fast.network.features[0].weight
    assert weight.dtype == torch.bfloat16 and fast.precision == "bf16"
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_assess_follows_the_guard_mode(tiny_weights: Path) -> None:
    """reject refuses, flag answers with a warning, off does not judge; a passing score gives its verdict."""
    loaded = load_model(tiny_weights)
    assert loaded.metadata.guard is not None and loaded.metadata.threshold == 0.5
    threshold = loaded.metadata.guard.threshold
    decision = Decision("PNEUMONIA", 0.75, {"NORMAL": 0.25, "PNEUMONIA": 0.75}, 0.5)
    passing = ImageResult(0.75, guard_score=threshold)  # at the threshold still passes
    failing = ImageResult(0.75, guard_score=threshold * 2)
    why = (
        f"input guard score {threshold * 2:.3f} > threshold {threshold:.3f}: "
        "it does not resemble the frontal chest X-rays the model was trained on"
    )
    reject = InferenceEngine(loaded, torch.device("cpu"), torch.float32)  # reject is the default
    assert reject.guard_mode == "reject" and reject.backend == BackendInfo("torch", "requested", {})
    assert reject.assess(passing) == Assessment(decision, GuardVerdict(threshold, threshold, True))
    assert reject.assess(ImageResult(0.75)) == Assessment(decision, None)  # no score: nothing to judge
    with pytest.raises(NotChestXrayError) as error:
        reject.assess(failing)
    assert str(error.value) == f"refused: {why}"
    flag = InferenceEngine(loaded, torch.device("cpu"), torch.float32, "flag")
    verdict = GuardVerdict(threshold * 2, threshold, False)
    assert flag.assess(failing) == Assessment(decision, verdict, f"unreliable: {why}")
    off = InferenceEngine(loaded, torch.device("cpu"), torch.float32, "off")
    assert off.assess(failing) == Assessment(decision, None)


def test_a_model_without_a_guard_is_refused_unless_the_guard_is_off(tiny_weights: Path, tmp_path: Path) -> None:
    """Either half missing (statistics or their spec) counts as no guard; the message says how to proceed."""
    message = (
        "model test-0 has no input guard: re-export it with the training package, "
        "or set CXR_INPUT_GUARD=off to serve it without one"
    )
    unguarded = load_model(export_tiny_model(tmp_path, guard=False))
    stats_lost = dataclasses.replace(load_model(tiny_weights), guard=None)
    for loaded in (unguarded, stats_lost):
        for mode in ("reject", "flag"):
            with pytest.raises(EngineError) as error:
                InferenceEngine(loaded, torch.device("cpu"), torch.float32, mode)  # type: ignore[arg-type]
            assert str(error.value) == message
    engine = InferenceEngine(unguarded, torch.device("cpu"), torch.float32, "off")
    assert [r.guard_score for r in engine.infer(torch.zeros((2, 1, 32, 32), dtype=torch.uint8))] == [None, None]


def test_a_classic_head_model_serves_but_cannot_explain(tiny_weights: Path) -> None:
    """Heatmaps need the compact head; a classic-head model must say so rather than fail inside the batch."""
    spec = ModelSpec(architecture="vgg16", head="classic", input_size=32)
    metadata = load_model(tiny_weights).metadata.model_copy(update={"spec": spec, "guard": None})
    engine = InferenceEngine(LoadedModel(build_model(spec), metadata, None), torch.device("cpu"), torch.float32, "off")
    with pytest.raises(ExplainUnsupportedError):
        engine.check_explainable()
    pixels = torch.zeros((1, 1, 32, 32), dtype=torch.uint8)
    with pytest.raises(ExplainUnsupportedError):
        engine.infer(pixels, [True])
    assert len(engine.infer(pixels, [False])) == 1


def test_decisions_use_the_models_class_names_and_threshold(tiny_weights: Path) -> None:
    loaded = load_model(tiny_weights)
    spec = loaded.metadata.spec.model_copy(update={"class_names": ("clear", "opacity")})
    metadata = loaded.metadata.model_copy(update={"spec": spec, "threshold": 0.3})
    engine = InferenceEngine(dataclasses.replace(loaded, metadata=metadata), torch.device("cpu"), torch.float32, "off")
    assert engine.decide(0.3) == Decision("opacity", 0.3, {"clear": 0.7, "opacity": 0.3}, 0.3)
    assert engine.decide(0.29).label == "clear"


def test_load_engine_asks_the_backend_choice_about_these_weights(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice gets the resolved device, the weights' own sha256 and the guard mode; its reason reaches /model."""
    calls: list[tuple[object, ...]] = []

    def choose(backend: str, device: torch.device, precision: str, **kwargs: object) -> BackendChoice:
        calls.append((backend, device, precision, kwargs))
        return BackendChoice("torch", "bf16", "chosen by the test")

    monkeypatch.setattr(engine_module, "choose", choose)
    flagged = load_engine(tiny_weights, device="cpu", precision="auto", input_guard="flag", backend="auto")
    unguarded = load_engine(tiny_weights, device="cpu", precision="fp32", input_guard="off", backend="torch")
    sha256 = _model_card(tiny_weights)["sha256"]
    assert calls == [
        (
            "auto",
            torch.device("cpu"),
            "auto",
            {"weights": tiny_weights, "sha256": sha256, "guard_on": True, "failed": {}},
        ),
        (
            "torch",
            torch.device("cpu"),
            "fp32",
            {"weights": tiny_weights, "sha256": sha256, "guard_on": False, "failed": {}},
        ),
    ]
    for engine, mode in ((flagged, "flag"), (unguarded, "off")):
        assert engine.backend == BackendInfo("torch", "chosen by the test") and engine.guard_mode == mode
        assert engine.dtype == torch.bfloat16 and engine.precision == "bf16"  # the choice's precision, not the request


def test_load_engine_refusals_are_engine_errors(tiny_weights: Path) -> None:
    with pytest.raises(EngineError) as error:
        load_engine(tiny_weights, device="cpu", precision="fp8")
    assert str(error.value) == "invalid precision 'fp8': use auto, fp16, bf16, fp32 or int8"
    with pytest.raises(EngineError) as error:
        load_engine(tiny_weights, device="cpu", precision="int8")  # a valid name the torch backend refuses
    assert str(error.value) == "precision int8 needs CXR_BACKEND=openvino (or auto on a CPU host)"
    assert load_engine(tiny_weights, device="cpu").guard_mode == "reject"  # the default guard mode


def test_load_engine_hands_an_openvino_choice_to_load_openvino(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    choice = BackendChoice("openvino", "fp32", "chosen by the test")
    calls: list[tuple[object, ...]] = []
    served = object()
    monkeypatch.setattr(engine_module, "choose", lambda *args, **kwargs: choice)
    monkeypatch.setattr(engine_module, "load_openvino", lambda *args: calls.append(args) or served)
    assert load_engine(tiny_weights, "cpu", "fp32", "flag", "openvino", cache_dir=tmp_path) is served
    assert calls == [(tiny_weights, choice, "flag", tmp_path)]


def _engine_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "app.core.engine"]


def test_load_engine_logs_why_it_runs_on_the_cpu_and_golden_checks_reduced_precision(
    tiny_weights: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 was verified by load_model already; bf16 is checked again in bf16 and says by how much it drifts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.INFO, logger="app.core.engine")
    load_engine(tiny_weights, device="auto", precision="fp32")
    assert _engine_log(caplog) == ["no CUDA GPU found: running inference on the CPU in fp32, expect high latency"]
    caplog.clear()
    load_engine(tiny_weights, device="cpu", precision="bf16")
    warning, golden = _engine_log(caplog)
    assert warning == "device=cpu was requested: running inference on the CPU in bf16, expect high latency"
    match = re.fullmatch(r"golden check passed on cpu in bf16 \(max logit difference (\S+)\)", golden)
    assert match is not None and 0 <= float(match.group(1)) <= 0.15 * 2  # within bf16's tolerance


def _subnormals_flushed() -> bool:
    return float(torch.tensor([1e-39]) * 2) == 0.0


@pytest.fixture
def subnormals_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start with subnormal floats kept (the CPU default), so a test can see a loader flush them."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    assert not _subnormals_flushed()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.mark.usefixtures("subnormals_kept")
def test_cpu_engine_flushes_subnormals_and_leaves_cudnn_alone(tiny_weights: Path) -> None:
    """Subnormal activations are many times slower on x86; cuDNN autotuning is the GPU's business only."""
    load_engine(tiny_weights, device="cpu")
    assert _subnormals_flushed()
    assert torch.backends.cudnn.benchmark is False


class FakeRuntime:
    """Stands in for ``OpenVinoFeatures``: PyTorch's own feature stage, and what /model reports about a conversion."""

    def __init__(self, features: Features) -> None:
        self.features = features
        self.converted = SimpleNamespace(status="hit")
        self.convert_seconds = 1.23456
        self.threads = 3
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        return self.features(x)


def _reference_features(loaded: LoadedModel, guard: GuardSpec | None, maps_scale: float = 1.0) -> Features:
    """The feature stage a runtime must reproduce (optionally with its maps scaled, as a drifting runtime would)."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if guard is None:
            return loaded.network.feature_maps(x) * maps_scale, None
        maps, vectors = features_and_maps(loaded.network.features, x, guard.mean_blocks, guard.std_blocks)
        return maps * maps_scale, vectors

    return run


def _outcome(verify: Callable[[Features], float], features: Features) -> float | str:
    try:
        return verify(features)
    except ModelLoadError as exc:
        return str(exc)


@pytest.fixture
def fake_openvino(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Replace the OpenVINO conversion by PyTorch's feature stage; record the call and what ``verify`` says."""
    seen: dict[str, object] = {}

    def compile_features(loaded: LoadedModel, precision: str, **kwargs: object) -> FakeRuntime:
        guard = kwargs["guard"]
        assert guard is None or isinstance(guard, GuardSpec)
        verify = kwargs.pop("verify")
        assert callable(verify)
        seen.update(kwargs, precision=precision, loaded=loaded)
        golden = loaded.metadata.golden
        assert golden is not None
        # Scaling the maps scales the head's logits minus its bias (average pool and linear layer are linear), so
        # this scale moves the golden logits by 1 % of their scale: over fp32's tolerance, within int8's.
        bias = loaded.network.classifier[-1].bias.detach()
        logits = torch.tensor(golden.logits)
        scale = max(1.0, float(logits.abs().max()))
        drift = 1 + 0.01 * scale / float((logits - bias).abs().max())
        seen["exact"] = _outcome(verify, _reference_features(loaded, guard))
        seen["drifted"] = _outcome(verify, _reference_features(loaded, guard, drift))
        seen["drift"] = 0.01 * scale
        if guard is not None:
            exact = _reference_features(loaded, guard)
            seen["guard_tampered"] = _outcome(verify, lambda x: (exact(x)[0], exact(x)[1] * 3))  # type: ignore[operator]
        runtime = FakeRuntime(_reference_features(loaded, guard))
        seen["runtime"] = runtime
        return runtime

    monkeypatch.setattr(openvino_backend, "compile_features", compile_features)
    return seen


@pytest.mark.usefixtures("subnormals_kept")
def test_load_openvino_serves_the_verified_runtime_with_the_guard(
    tiny_weights: Path, tmp_path: Path, fake_openvino: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """fp32 OpenVINO: the runtime is verified at fp32's tolerance, guard scores included, then computes the maps."""
    caplog.set_level(logging.INFO, logger="app.core.engine")
    choice = BackendChoice("openvino", "fp32", "chosen by the test")
    engine = load_openvino(tiny_weights, choice, "flag", tmp_path)
    card = _model_card(tiny_weights)
    seen = fake_openvino
    assert seen["precision"] == "fp32" and seen["cache_dir"] == tmp_path and seen["calibration"] is None
    assert seen["threads"] == torch.get_num_threads()
    guard = seen["guard"]
    assert isinstance(guard, GuardSpec) and guard.golden_scores == card["guard"]["golden_scores"]
    assert isinstance(seen["exact"], float) and seen["exact"] < 1e-5
    assert isinstance(seen["drifted"], str) and seen["drifted"].startswith("golden check failed: logits differ")
    assert isinstance(seen["guard_tampered"], str)
    assert seen["guard_tampered"].startswith("golden check failed: input-guard scores differ")
    assert engine.backend == BackendInfo(
        "openvino", "chosen by the test", {"cache": "hit", "seconds": 1.235, "threads": 3}
    )
    assert (engine.device, engine.dtype, engine.precision, engine.guard_mode) == (
        torch.device("cpu"),
        torch.float32,
        "fp32",
        "flag",
    )
    assert _engine_log(caplog) == ["CPU inference in OpenVINO fp32 (chosen by the test)"]
    assert _subnormals_flushed()
    runtime = seen["runtime"]
    assert isinstance(runtime, FakeRuntime) and runtime.calls == 0
    loaded = load_model(tiny_weights)
    assert loaded.golden_inputs is not None
    results = engine.infer(loaded.golden_inputs)
    assert runtime.calls == 1  # the runtime, not PyTorch, computed the maps
    assert [r.guard_score for r in results] == pytest.approx(card["guard"]["golden_scores"], rel=1e-4)


def test_load_openvino_int8_without_the_guard_uses_the_recorded_ranges(
    tiny_weights: Path, fake_openvino: dict[str, object]
) -> None:
    """int8 gets the activation ranges from model.cpu.json and int8's wider tolerance; guard off: no guard at all."""
    ranges = Int8Ranges(images=1, source="test", exporter="test", ranges={"x": (0.0, 1.0)})
    record = FastPathRecord(weights_sha256=_model_card(tiny_weights)["sha256"], input_size=32, int8=ranges)
    engine = load_openvino(tiny_weights, BackendChoice("openvino", "int8", "chosen", record), "off", None)
    seen = fake_openvino
    assert seen["precision"] == "int8" and seen["guard"] is None and seen["cache_dir"] is None
    assert seen["calibration"] is ranges
    assert seen["drifted"] == pytest.approx(seen["drift"], rel=1e-3)  # 1 % of the logits' scale passes int8
    assert engine.precision == "int8" and engine.guard_spec is None
    assert engine.backend.conversion == {"cache": "hit", "seconds": 1.235, "threads": 3}


def test_openvino_with_device_auto_loads_on_the_cpu_of_a_gpu_host(
    tiny_weights: Path, fake_openvino: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CXR_DEVICE=auto with CXR_BACKEND=openvino on a GPU host serves on its CPU instead of refusing the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only answers the query: nothing runs on it
    engine = load_engine(tiny_weights, "auto", "fp32", input_guard="flag", backend="openvino")
    assert (engine.backend.name, engine.device, engine.precision) == ("openvino", torch.device("cpu"), "fp32")
    assert fake_openvino["precision"] == "fp32"


def test_int8_guard_noise_is_the_recorded_value_for_int8_only() -> None:
    def ranges(noise: float | None) -> Int8Ranges:
        return Int8Ranges(images=1, source="test", exporter="test", ranges={"x": (0.0, 1.0)}, guard_noise=noise)

    assert int8_guard_noise("int8", ranges(0.03)) == 0.03
    for precision, recorded in [("int8", None), ("int8", ranges(None)), ("fp32", ranges(0.03)), ("bf16", ranges(0.03))]:
        noise = int8_guard_noise(precision, recorded)
        assert noise == 0.0 and isinstance(noise, float), (precision, recorded)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_load_openvino_takes_int8_guard_noise_off_the_scores(
    tiny_weights: Path, fake_openvino: dict[str, object], precision: str
) -> None:
    """int8 subtracts the recorded noise from squared guard scores, in serving and in the golden check; fp32 never."""
    golden = _model_card(tiny_weights)["guard"]["golden_scores"]
    small = 0.01 * min(golden) ** 2  # moves the golden scores by under 1 %: within int8's 10 % check
    ranges = Int8Ranges(images=1, source="test", exporter="test", ranges={"x": (0.0, 1.0)}, guard_noise=small)
    record = FastPathRecord(weights_sha256=_model_card(tiny_weights)["sha256"], input_size=32, int8=ranges)
    engine = load_openvino(tiny_weights, BackendChoice("openvino", precision, "chosen", record), "flag", None)
    loaded = load_model(tiny_weights)
    assert loaded.golden_inputs is not None
    scores = [result.guard_score for result in engine.infer(loaded.golden_inputs)]
    expected = [(score**2 - small) ** 0.5 for score in golden] if precision == "int8" else golden
    assert scores == pytest.approx(expected, rel=1e-4)
    assert fake_openvino["exact"] == pytest.approx(0.0, abs=1e-5)  # the logits are exact either way
    big = ranges.model_copy(update={"guard_noise": 0.5 * min(golden) ** 2})  # lowers a golden score by > 10 %
    record = record.model_copy(update={"int8": big})
    load_openvino(tiny_weights, BackendChoice("openvino", precision, "chosen", record), "flag", None)
    if precision == "int8":
        assert str(fake_openvino["exact"]).startswith("golden check failed: input-guard scores differ")
    else:
        assert fake_openvino["exact"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (openvino_backend.OpenVinoUnavailableError("no bf16 units"), "no bf16 units"),
        (CalibrationError("ranges miss a tensor"), "ranges miss a tensor"),
        (RuntimeError("  exporter broke\nstack line  "), "OpenVINO fp32 conversion failed: exporter broke"),
        (ValueError("   "), "OpenVINO fp32 conversion failed: ValueError"),
        (OSError("x" * 400), "OpenVINO fp32 conversion failed: " + "x" * 300),
    ],
)
def test_load_openvino_failures_are_one_line_engine_errors(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception, message: str
) -> None:
    def compile_features(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(openvino_backend, "compile_features", compile_features)
    with pytest.raises(EngineError) as error:
        load_openvino(tiny_weights, BackendChoice("openvino", "fp32", "chosen"), "flag", None)
    assert str(error.value) == message and error.value.__cause__ is failure


def test_load_openvino_passes_a_failed_golden_check_through(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A converted model that misses the golden outputs is a ModelLoadError, as for corrupted weights."""
    failure = ModelLoadError("golden check failed: logits differ from the exported ones by 1 (tolerance 0.001)")

    def compile_features(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(openvino_backend, "compile_features", compile_features)
    with pytest.raises(ModelLoadError) as error:
        load_openvino(tiny_weights, BackendChoice("openvino", "fp32", "chosen"), "flag", None)
    assert error.value is failure


def test_shipped_model_passes_the_bf16_golden_check_it_needs() -> None:
    """torch bf16 on the CPU moves the trained model's golden logits by more than fp32's 1e-3, within bf16's 0.15."""
    engine = load_engine(SHIPPED, "cpu", "bf16", input_guard="reject", backend="torch")  # runs the golden check
    shipped = load_model(SHIPPED)
    assert shipped.golden_inputs is not None and shipped.metadata.golden is not None
    with torch.inference_mode():
        logits = engine.network(shipped.golden_inputs).float()
    expected = torch.tensor(shipped.metadata.golden.logits)
    drift = float((logits - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    assert 1e-3 < drift <= 0.15, drift
