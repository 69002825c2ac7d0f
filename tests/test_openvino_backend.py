"""The OpenVINO CPU backend: golden-checked, agrees with PyTorch, cached by sha256, serves every feature.

Every comparison is against the PyTorch engine on the same tiny model and the same preprocessed
images. Tolerances: fp32 to float rounding (1e-5 on probabilities, 1e-4 of the largest heatmap
cell: OpenVINO's AVX2 convolutions sum in another order and were measured 1.1e-5 away, PyTorch fp32
itself 2.7e-6 from float64); bf16 and int8 to 10 % of the largest heatmap value and 0.01 in
probability (the tiny random models give probabilities near 0.5 from logits near 0, so relative
drift shows in the heatmaps).

A precision this CPU lacks is never a silent skip: the same test then asserts the one-line refusal.
Tests of int8's plumbing (caching, refusals before conversion) run on every CPU, on one simulated
to have int8 dot products where it has none; what they check does not depend on the numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from app.core.artifacts import ModelLoadError, load_model
from app.core.conversion_cache import MANIFEST
from app.core.engine import EngineError, ImageResult, InferenceEngine, load_engine
from app.core.fastpath_record import FastPathRecord, GateRecord, GateResult, Int8Ranges, read_record, write_record
from app.core.int8_calibration import measure_ranges, quantize
from app.core.onnx_export import export_features
from app.core.openvino_backend import INT8_DOT_PRODUCT_FLAGS, cpu_capabilities, cpu_flags, usable_capabilities
from benchmarks.accuracy_gate import measure_guard_noise
from tests.conftest import (
    AVX2_EPYC,
    CASCADE_LAKE,
    SAPPHIRE_RAPIDS,
    encode,
    export_tiny_model,
    pretend_cpu,
    synthetic_chest_pixels,
    synthetic_xray,
)
from tests.live_server import live_server, serving_settings

SIZE = 64  # a 2x2 heatmap: the smallest grid with more than one cell
HAS_INT8 = "INT8" in cpu_capabilities()
NO_INT8 = "precision int8 is not supported by this CPU"


@pytest.fixture
def int8_plumbing(simulate_cpu) -> None:  # type: ignore[no-untyped-def]
    """Let int8 convert and compile here even without int8 dot products (numbers not under test)."""
    if not HAS_INT8:
        simulate_cpu(CASCADE_LAKE)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with its guard, int8 ranges and guard noise measured on synthetic chest images (no gate run)."""
    # Golden inputs like the training images, as training picks them (noise images would sit far
    # outside the int8 ranges measured on chest images, which no real export does).
    golden = synthetic_chest_pixels(4, SIZE, seed=5)
    out = export_tiny_model(tmp_path_factory.mktemp("ov"), seed=3, input_size=SIZE, golden=golden)
    loaded = load_model(out)
    graph = tmp_path_factory.mktemp("graph") / "fp32.onnx"
    export_features(loaded.network, graph, loaded.metadata.guard)
    pixels = synthetic_chest_pixels(48, SIZE, seed=21)
    with torch.inference_mode():
        batches = [loaded.network.normalize(pixels[i : i + 8]).numpy() for i in range(0, len(pixels), 8)]
    ranges = Int8Ranges(
        images=len(pixels), source="synthetic", exporter=torch.__version__, ranges=measure_ranges(graph, batches)
    )
    write_record(FastPathRecord(weights_sha256=loaded.metadata.sha256, input_size=SIZE, int8=ranges), out)
    with pytest.MonkeyPatch.context() as patch:
        if not HAS_INT8:  # the noise is a fixture value here; the tests that serve int8 refuse on such a CPU
            pretend_cpu(patch, CASCADE_LAKE)
        measure_guard_noise(out, pixels)
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return synthetic_chest_pixels(16, SIZE, seed=77)


@pytest.fixture(scope="module")
def reference(weights: Path, images: torch.Tensor) -> list[ImageResult]:
    engine = load_engine(weights, "cpu", "fp32", input_guard="flag", backend="torch")
    return engine.infer(images, [True] * len(images))


def openvino(weights: Path, precision: str, cache: Path, guard: str = "flag") -> InferenceEngine:
    return load_engine(weights, "cpu", precision, input_guard=guard, backend="openvino", cache_dir=cache)  # type: ignore[arg-type]


def approved_int8_copy(weights: Path, folder: Path) -> Path:
    """A copy of ``weights`` whose model.cpu.json says the gate approved int8 with the guard (not measured)."""
    approved = shutil.copytree(weights, folder)
    record = read_record(approved, load_model(approved).metadata.sha256)
    assert record is not None
    gate = GateResult(
        dataset="validation",
        description="fixture: the gate's verdict, not measured here",
        images=100,
        roc_auc_fp32=1.0,
        roc_auc=1.0,
        max_probability_difference=0.0,
        label_flips=0,
        guard_refusal_flips=0,
    )
    write_record(record.with_gate(GateRecord(precision="int8", results=[gate])), approved)
    return approved


def assert_agrees(results: list[ImageResult], reference: list[ImageResult], tolerance: float, guard: bool) -> None:
    largest = max(abs(value) for result in reference for value in result.heatmap.values)  # type: ignore[union-attr]
    for got, want in zip(results, reference, strict=True):
        assert got.probability == pytest.approx(want.probability, abs=0.01 if tolerance > 1e-4 else 1e-5)
        assert got.heatmap is not None and want.heatmap is not None
        assert (got.heatmap.rows, got.heatmap.cols, got.heatmap.layer) == (
            want.heatmap.rows,
            want.heatmap.cols,
            want.heatmap.layer,
        )
        assert got.heatmap.values == pytest.approx(want.heatmap.values, abs=tolerance * largest)
        assert got.heatmap.bias == want.heatmap.bias  # the head is PyTorch's on every backend
        if guard:
            assert got.guard_score == pytest.approx(want.guard_score, rel=max(tolerance, 1e-4))
        else:
            assert got.guard_score is None


def test_fp32_computes_what_pytorch_computes(
    weights: Path, images: torch.Tensor, reference: list[ImageResult], tmp_path: Path
) -> None:
    engine = openvino(weights, "fp32", tmp_path)
    assert (engine.backend.name, engine.precision) == ("openvino", "fp32")
    assert_agrees(engine.infer(images, [True] * len(images)), reference, 1e-4, guard=True)


def test_int8_agrees_within_tolerance_without_the_guard(
    weights: Path, images: torch.Tensor, reference: list[ImageResult], tmp_path: Path
) -> None:
    if not HAS_INT8:
        with pytest.raises(EngineError, match=NO_INT8):
            openvino(weights, "int8", tmp_path, guard="off")
        return
    engine = openvino(weights, "int8", tmp_path, guard="off")
    assert (engine.backend.name, engine.precision, engine.guard_spec) == ("openvino", "int8", None)
    assert_agrees(engine.infer(images, [True] * len(images)), reference, 0.1, guard=False)


@pytest.mark.usefixtures("int8_plumbing")
def test_int8_with_the_guard_is_refused_before_conversion(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="not been through the accuracy gate with the input guard"):
        openvino(weights, "int8", tmp_path, guard="reject")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_int8_approved_with_the_guard_keeps_the_guard_scores(
    weights: Path, images: torch.Tensor, reference: list[ImageResult], tmp_path: Path
) -> None:
    """The guard's block statistics stay float in the int8 graph, so its scores follow fp32's.

    Quantizing the guard's reductions and its concatenated vector (ONNX Runtime's default op list)
    moved the shipped model's golden guard scores about 3x: the load-time golden check refused the
    engine, and the gate saw 776 of 784 validation verdicts flip.
    """
    approved = approved_int8_copy(weights, tmp_path / "weights")
    if not HAS_INT8:
        with pytest.raises(EngineError, match=NO_INT8):
            openvino(approved, "int8", tmp_path / "cache", guard="flag")
        return
    engine = openvino(approved, "int8", tmp_path / "cache", guard="flag")
    assert (engine.backend.name, engine.precision, engine.guard_spec is not None) == ("openvino", "int8", True)
    got = [result.guard_score for result in engine.infer(images, [True] * len(images))]
    want = [result.guard_score for result in reference]
    assert got == pytest.approx(want, rel=0.1)


def test_int8_quantizes_the_vgg_stack_and_leaves_the_guard_statistics_float(weights: Path, tmp_path: Path) -> None:
    """Only the VGG stack's activations are rounded to uint8; the guard's statistics never are."""
    import onnx

    loaded = load_model(weights)
    record = read_record(weights, loaded.metadata.sha256)
    assert record is not None and record.int8 is not None
    export_features(loaded.network, tmp_path / "fp32.onnx", loaded.metadata.guard)
    quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", record.int8)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    produced_by = {output: node.op_type for node in graph.node for output in node.output}
    rounded = {produced_by.get(node.input[0], "input") for node in graph.node if node.op_type == "QuantizeLinear"}
    # Conv carries its fused ReLU; Cast is the exporter's no-op float() whose output feeds the next
    # block's convolution. The guard's ReduceMean, Sub, Mul, Sqrt and Concat outputs stay float.
    assert rounded == {"input", "Conv", "MaxPool", "Cast"}
    guard_ops = {node.op_type for node in graph.node} & {"ReduceMean", "Sub", "Mul", "Sqrt", "Concat"}
    assert guard_ops == {"ReduceMean", "Sub", "Mul", "Sqrt", "Concat"}  # the guard's taps are in this graph


def test_bf16_agrees_within_tolerance_or_is_refused_without_bf16_units(
    weights: Path, images: torch.Tensor, reference: list[ImageResult], tmp_path: Path
) -> None:
    if "BF16" not in cpu_capabilities():  # never a silent skip: such a CPU must refuse bf16 in one line
        with pytest.raises(EngineError, match="precision bf16 is not supported by this CPU"):
            openvino(weights, "bf16", tmp_path)
        return
    assert_agrees(openvino(weights, "bf16", tmp_path).infer(images, [True] * len(images)), reference, 0.1, guard=True)


@pytest.mark.usefixtures("int8_plumbing")
def test_a_second_start_reuses_the_conversion(weights: Path, tmp_path: Path) -> None:
    first = openvino(weights, "int8", tmp_path, guard="off")
    second = openvino(weights, "int8", tmp_path, guard="off")
    assert (first.backend.conversion["cache"], second.backend.conversion["cache"]) == ("built", "hit")
    assert len(list(tmp_path.iterdir())) == 1


def entry(cache: Path) -> Path:
    (folder,) = cache.iterdir()
    return folder


def test_a_tampered_file_is_rejected_and_converted_again(weights: Path, tmp_path: Path) -> None:
    openvino(weights, "fp32", tmp_path)
    model = entry(tmp_path) / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
    again = openvino(weights, "fp32", tmp_path)
    assert again.backend.conversion["cache"] == "rebuilt"
    assert openvino(weights, "fp32", tmp_path).backend.conversion["cache"] == "hit"


def test_a_consistent_but_wrong_cache_entry_fails_the_golden_check_and_is_rebuilt(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another model's graph under this key, with a matching manifest: only the golden check can tell."""
    openvino(weights, "fp32", tmp_path)
    folder = entry(tmp_path)
    impostor = load_model(export_tiny_model(tmp_path.parent / "impostor", seed=11, input_size=SIZE))
    export_features(impostor.network, folder / "model.onnx", impostor.metadata.guard)
    manifest = json.loads((folder / MANIFEST).read_text())
    from app.core.artifacts import file_sha256

    manifest["sha256"] = file_sha256(folder / "model.onnx")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        engine = openvino(weights, "fp32", tmp_path)
    assert "golden check failed" in caplog.text and engine.backend.conversion["cache"] == "built"


def test_without_a_cache_folder_every_start_converts(weights: Path) -> None:
    assert openvino(weights, "fp32", None).backend.conversion["cache"] == "uncached"  # type: ignore[arg-type]


def test_live_server_answers_like_the_pytorch_one(weights: Path, tmp_path: Path) -> None:
    """/predict?explain=true through both servers: same fields, same guard verdict, same heatmap."""
    upload = encode(synthetic_xray(120, 100, seed=4))
    answers = {}
    for backend in ("torch", "openvino"):
        settings = serving_settings(weights, backend=backend, precision="fp32", cache_dir=tmp_path / "cache")
        with live_server(settings) as server, server.client() as client:
            response = client.post("/predict", params={"explain": "true"}, files={"file": ("x.jpg", upload)})
            assert response.status_code == 200, response.text
            answers[backend] = response.json()
            card = client.get("/model").json()
            health = client.get("/health").json()
            assert card["backend"]["name"] == health["backend"] == backend
    torch_answer, ov_answer = answers["torch"], answers["openvino"]
    assert set(ov_answer) == set(torch_answer) and {"input_guard", "heatmap"} <= set(ov_answer)
    assert ov_answer["label"] == torch_answer["label"]
    assert ov_answer["pneumonia_probability"] == pytest.approx(torch_answer["pneumonia_probability"], abs=1e-5)
    assert ov_answer["input_guard"]["passed"] == torch_answer["input_guard"]["passed"]
    assert ov_answer["input_guard"]["score"] == pytest.approx(torch_answer["input_guard"]["score"], rel=1e-4)
    assert ov_answer["heatmap"]["values"] == pytest.approx(torch_answer["heatmap"]["values"], abs=1e-5)


@pytest.mark.usefixtures("int8_plumbing")
def test_int8_ranges_that_do_not_cover_the_graph_refuse_in_one_line(weights: Path, tmp_path: Path) -> None:
    """A model.cpu.json whose ranges miss tensors of the exported graph: refused, never served half-quantized."""
    copy = tmp_path / "weights"
    shutil.copytree(weights, copy)
    record = read_record(copy, load_model(copy).metadata.sha256)
    assert record is not None and record.int8 is not None
    kept = dict(list(record.int8.ranges.items())[:3])
    write_record(record.model_copy(update={"int8": record.int8.model_copy(update={"ranges": kept})}), copy)
    with pytest.raises(EngineError) as info:
        openvino(copy, "int8", tmp_path / "cache", guard="off")
    message = str(info.value)
    assert "\n" not in message and "int8 calibration does not" in message, message


def test_cpu_flags_are_read_from_the_kernels_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n")
    assert cpu_flags(x86) == frozenset({"fpu", "sse2", "avx2", "fma"})
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(arm) is None and cpu_flags(tmp_path / "absent") is None
    assert cpu_flags() is None or "sse2" in cpu_flags()  # type: ignore[operator]  # this machine's own


@pytest.mark.parametrize(
    ("cpu", "usable"),
    [
        (SAPPHIRE_RAPIDS, {"FP32", "BF16", "INT8"}),
        (CASCADE_LAKE, {"FP32", "INT8"}),
        (AVX2_EPYC, {"FP32"}),  # OpenVINO reports INT8; without VNNI/AMX it saturates
        ((AVX2_EPYC[0], frozenset({"avx2", "avx_vnni"})), {"FP32", "INT8"}),  # Alder Lake's AVX-VNNI
        ((AVX2_EPYC[0], None), {"FP32", "INT8"}),  # flags unknown: OpenVINO's word, then the golden check
    ],
)
def test_int8_is_usable_only_with_int8_dot_products(cpu: tuple, usable: set[str]) -> None:  # type: ignore[type-arg]
    assert usable_capabilities(*cpu) == usable


@pytest.mark.usefixtures("int8_plumbing")
def test_auto_falls_back_when_the_precision_it_picked_fails_its_golden_check(weights: Path, tmp_path: Path) -> None:
    """int8 ranges a hundred times too narrow clip every activation: the golden check refuses int8 on any CPU.

    Named explicitly, int8 is refused with the check's numbers; picked by ``auto``, it is passed
    over for fp32 and the reason (logged, shown by /model) says what failed.
    """
    broken = approved_int8_copy(weights, tmp_path / "weights")
    record = read_record(broken, load_model(broken).metadata.sha256)
    assert record is not None and record.int8 is not None
    narrow = {name: (low / 100, high / 100) for name, (low, high) in record.int8.ranges.items()}
    write_record(record.model_copy(update={"int8": record.int8.model_copy(update={"ranges": narrow})}), broken)
    engine = load_engine(broken, "cpu", "auto", input_guard="reject", backend="auto", cache_dir=tmp_path / "cache")
    assert (engine.backend.name, engine.precision) == ("openvino", "fp32")
    assert "int8 did not load on this CPU: golden check failed" in engine.backend.reason
    with pytest.raises(ModelLoadError, match="golden check failed"):
        openvino(broken, "int8", tmp_path / "cache", guard="reject")


def test_int8_isa_benchmark_measures_both_weight_widths_against_the_golden_outputs(
    weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m benchmarks.int8_isa`` end to end on the tiny model; it builds int8 where the service would not."""
    from benchmarks import int8_isa

    assert int8_isa.main(["--weights", str(weights), "--rounds", "1", "--repeats", "1", "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    golden = {line.split(":")[0]: line for line in lines if "golden logits off by" in line}
    assert set(golden) == {"fp32", "int8 8-bit weights", "int8 7-bit weights"}
    fp32_logit = float(golden["fp32"].split("off by ")[1].split(" ")[0])
    assert fp32_logit < 1e-3  # the load-time check's fp32 tolerance
    assert any(line.startswith("fp32:") and line.endswith("fp32/this = 1.00x") for line in lines)
    flags = cpu_flags()
    assert ("int8 dot products: none" in lines[0]) == (flags is not None and not flags & INT8_DOT_PRODUCT_FLAGS)
