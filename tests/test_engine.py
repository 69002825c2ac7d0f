"""The inference engine shared by the service and the offline scorer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from app.core.engine import EngineError, ImageResult, default_decode_workers, load_engine, resolve_device, resolve_dtype
from app.core.preprocessing import preprocess
from tests.conftest import export_tiny_model


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
    with pytest.raises(EngineError, match="invalid device"):
        resolve_device(device)


def test_cuda_without_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match="no CUDA GPU is available"):
        resolve_device("cuda")


def test_cpu_precision_is_fp32_unless_bf16_is_asked_for() -> None:
    with pytest.raises(EngineError, match="needs a CUDA device"):
        resolve_dtype(torch.device("cpu"), "fp16")
    assert resolve_dtype(torch.device("cpu"), "auto") == torch.float32
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
    ("cores", "device", "workers"), [(2, "cpu", 1), (16, "cpu", 2), (2, "cuda", 2), (16, "cuda", 4)]
)
def test_default_decode_workers_leave_cpu_cores_to_the_model(
    monkeypatch: pytest.MonkeyPatch, cores: int, device: str, workers: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_decode_workers(torch.device(device)) == workers
