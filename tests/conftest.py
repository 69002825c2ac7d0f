"""Shared fixtures: synthetic X-ray-like JPEGs and tiny random-init exported models."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from app.core.artifacts import GOLDEN_KEY, export_model
from app.core.input_guard import GuardSpec, GuardStats, detail, fit_guard
from app.core.network import ModelSpec, PneumoniaNet, build_model
from app.core.preprocessing import decode_grayscale, resize_square

TEST_INPUT_SIZE = 32
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_tool(name: str) -> str | None:
    """A system program on PATH or in the sbin folders Debian installs servers into."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_tool(name): the test drives this system program for real")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``make mutation``, run each mutant's tests fastest first, timing only their bodies.

    mutmut runs a mutant's tests with ``-x`` in whatever order its set yields them, so a mutant that a
    0.1 s test kills could first wait for a 6 s one. The durations are mutmut's own, recorded in the
    stats file it keeps beside the mutated tree (the working directory of a mutant's run).
    """
    stats = Path("mutmut-stats.json")
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.is_file():
        return
    durations: dict[str, float] = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
    # A timeout counts as a kill. Session fixtures (a tiny model export) take seconds on a busy
    # machine, so time only the test body; mutmut's own limit still ends a mutant that hangs a fixture.
    for item in items:
        item.add_marker(pytest.mark.timeout(func_only=True))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A missing tool skips locally, but fails under CI, where .ci/run installs it: no silent skips there."""
    for marker in item.iter_markers("needs_tool"):
        name = marker.args[0]
        if find_tool(name) is None:
            message = f"{name} is not installed (.ci/run installs it with apt-get)"
            if IN_CI:
                pytest.fail(f"{message}; CI must run this test", pytrace=False)
            pytest.skip(message)


def synthetic_xray(width: int = 96, height: int = 80, seed: int = 0, mode: str = "L") -> Image.Image:
    """A grayscale image with chest-like structure (bright ribs over a dark field) plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    field = 60 + 40 * np.sin(yy / max(height, 1) * 12.0 + seed) ** 2
    lungs = 80 * np.exp(-(((xx - width * 0.3) / (width * 0.15)) ** 2 + ((yy - height * 0.5) / (height * 0.3)) ** 2))
    lungs += 80 * np.exp(-(((xx - width * 0.7) / (width * 0.15)) ** 2 + ((yy - height * 0.5) / (height * 0.3)) ** 2))
    pixels = np.clip(field + lungs + rng.normal(0, 12, size=(height, width)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "L")
    return img if mode == "L" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def make_jpeg() -> Callable[..., bytes]:
    """Factory for real JPEG bytes of a synthetic X-ray."""

    def factory(width: int = 96, height: int = 80, seed: int = 0, mode: str = "L", **save: object) -> bytes:
        return encode(synthetic_xray(width, height, seed, mode), "JPEG", **save)

    return factory


# CPUs the OpenVINO fast path meets, as (what OpenVINO reports, the kernel's flags). OpenVINO reports
# INT8 on all of them; only the first two have int8 dot products (app.core.openvino_backend).
SAPPHIRE_RAPIDS = (frozenset({"FP32", "BF16", "INT8"}), frozenset({"avx2", "avx512f", "avx512_vnni", "amx_int8"}))
CASCADE_LAKE = (frozenset({"FP32", "INT8"}), frozenset({"avx2", "avx512f", "avx512_vnni"}))
AVX2_EPYC = (frozenset({"FP32", "INT8"}), frozenset({"avx2", "fma"}))


Cpu = tuple[frozenset[str], frozenset[str] | None]


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, cpu: Cpu) -> None:
    """Pretend to run on another CPU: the backend choice's inputs, for tests of the choice, never of numbers."""
    from app.core import openvino_backend

    reported, flags = cpu
    monkeypatch.setattr(openvino_backend, "reported_capabilities", lambda: reported)
    monkeypatch.setattr(openvino_backend, "cpu_flags", lambda: flags)


@pytest.fixture
def simulate_cpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[Cpu], None]:
    return lambda cpu: pretend_cpu(monkeypatch, cpu)


# The tiny models' guards accept synthetic chest images of any size from 32 to 400 px; blank, noise
# and colour images score 8x or more above their threshold (tests/test_input_guard.py shows both).
GUARD_MARGIN = 2.0


def synthetic_chest_pixels(count: int, input_size: int, seed: int) -> torch.Tensor:
    """``count`` synthetic chest images of random sizes, JPEG-encoded and preprocessed as uploads are."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(32, 401, 2))
        # Decoded and squashed as uploads are, without the shape gate: strips and small images widen the spread.
        image, _ = decode_grayscale(encode(synthetic_xray(width, height, seed=seed * 10_000 + index)), input_size)
        images.append(torch.from_numpy(resize_square(image, input_size)).unsqueeze(0))
    return torch.stack(images)


def tiny_guard(network: PneumoniaNet, input_size: int, seed: int) -> tuple[GuardSpec, GuardStats]:
    """A guard for a random-init test model, fitted like training fits one, on synthetic chest images.

    The threshold is the largest validation score times ``GUARD_MARGIN``: random features are
    noisier than trained ones, and tests must not depend on which synthetic image is the 1%.
    """
    train = synthetic_chest_pixels(120, input_size, seed=2 * seed + 1)
    val = synthetic_chest_pixels(40, input_size, seed=2 * seed + 2)
    spec, stats = fit_guard(network, train, val, input_size=input_size, max_false_refusal=0.0, source="synthetic")
    return spec.model_copy(update={"threshold": spec.threshold * GUARD_MARGIN}), stats


def add_detail_floor(weights: Path, margin: float = GUARD_MARGIN) -> float:
    """Give an exported tiny model's guard a fine-detail floor; returns it.

    Its 120 synthetic training images are too few for the quantile rule (``fit_detail_floor``
    returns None), so the floor is their least detail divided by ``margin``, as the tiny guard's
    threshold is widened: synthetic chest images pass it, ones enlarged from a few pixels do not.
    """
    meta = json.loads((weights / "model.json").read_text())
    seed = int(meta["version"].removeprefix("test-"))
    size = meta["spec"]["input_size"]
    floor = float(detail(synthetic_chest_pixels(120, size, seed=2 * seed + 1)).min()) / margin
    golden = load_file(str(weights / "model.safetensors"))[GOLDEN_KEY]

    def edit(meta: dict[str, Any]) -> None:
        meta["guard"].update(detail_floor=floor, detail_floor_method="test", golden_details=detail(golden).tolist())

    rewrite_model(weights, edit_meta=edit)
    return floor


def export_tiny_model(
    out_dir: Path,
    seed: int = 0,
    input_size: int = TEST_INPUT_SIZE,
    guard: bool = True,
    golden: torch.Tensor | None = None,
    **kwargs: object,
) -> Path:
    """Export a random-init compact VGG16 at a small input size, with an input guard, exactly as training exports.

    The golden inputs default to two noise images; training uses validation images instead.
    """
    torch.manual_seed(seed)
    spec = ModelSpec(architecture="vgg16", head="compact", input_size=input_size)
    network = build_model(spec)
    if golden is None:
        golden = torch.randint(0, 256, (2, 1, input_size, input_size), dtype=torch.uint8)
    fitted = tiny_guard(network, input_size, seed) if guard else None
    export_model(network, out_dir, version=f"test-{seed}", golden_inputs=golden, guard=fitted, **kwargs)  # type: ignore[arg-type]
    return out_dir


def rewrite_model(
    weights: Path,
    edit_tensors: Callable[[dict[str, torch.Tensor]], object] | None = None,
    edit_meta: Callable[[dict[str, Any]], object] | None = None,
) -> None:
    """Change exported model files the way an attacker or a bad copy would, keeping the recorded sha256 consistent."""
    tensors_path, meta_path = weights / "model.safetensors", weights / "model.json"
    if edit_tensors is not None:
        tensors = load_file(str(tensors_path))
        edit_tensors(tensors)
        save_file(tensors, str(tensors_path))
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(tensors_path.read_bytes()).hexdigest()
    if edit_meta is not None:
        edit_meta(meta)
    meta_path.write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding model.safetensors + model.json for a tiny random model."""
    return export_tiny_model(tmp_path_factory.mktemp("weights"))
