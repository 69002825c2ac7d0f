"""The accuracy gate: a backend and precision against fp32 PyTorch, on the validation split and the test folder.

For each evaluation set (``benchmarks.eval_sets``) both engines score the same preprocessed
images; the gate reports ROC AUC of each and their difference, the largest probability
difference, label flips at the model's threshold and, for a model with an input guard, the
images the guard refuses in one and not the other. It passes when, on every set, AUC drops by at
most 0.002 and at most 0.5 % of the images change label or guard verdict.

``--calibrate N`` first measures int8 activation ranges on N images from the *training* side of
the model's split and writes them next to the weights (``model.cpu.json``,
``app.core.fastpath_record``); a full run (no ``--limit``) of OpenVINO bf16 or int8 then records
the gate's results in that file, which is what lets ``CXR_BACKEND=auto`` choose that precision
(only when the validation set passed, for the input-guard mode being served).

    python -m benchmarks.accuracy_gate --weights weights --backend openvino --precision int8 --calibrate 300
    python -m benchmarks.accuracy_gate --weights weights --backend openvino --precision fp32
    python -m benchmarks.accuracy_gate --weights weights --backend torch --precision bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app.core import openvino_backend
from app.core.artifacts import ModelLoadError, load_model, read_metadata
from app.core.backend_choice import BackendChoice
from app.core.decision import is_pneumonia
from app.core.engine import InferenceEngine, int8_guard_noise, load_engine, load_openvino
from app.core.fastpath_record import (
    MAX_AUC_DROP,
    MAX_FLIP_RATE,
    FastPathRecord,
    GateRecord,
    GateResult,
    Int8Ranges,
    RecordError,
    read_record,
    write_record,
)
from app.core.input_guard import noise_energy
from app.core.int8_calibration import measure_ranges
from app.core.onnx_export import export_features
from benchmarks import eval_sets
from training.metrics import roc_auc

BATCH = 32


def score(engine: InferenceEngine, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and input-guard scores (None without a guard) of every image."""
    probabilities: list[float] = []
    guard: list[float] = []
    for start in range(0, len(pixels), BATCH):
        for result in engine.infer(pixels[start : start + BATCH]):
            probabilities.append(result.probability)
            if result.guard_score is not None:
                guard.append(result.guard_score)
    return np.array(probabilities), (np.array(guard) if guard else None)


def compare(images: eval_sets.EvalSet, reference: InferenceEngine, candidate: InferenceEngine) -> GateResult:
    labels, pixels = images.labels, images.pixels
    p_ref, g_ref = score(reference, pixels)
    p, g = score(candidate, pixels)
    threshold = reference.metadata.threshold
    flips = int((is_pneumonia(p, threshold) != is_pneumonia(p_ref, threshold)).sum())
    guard_flips = None
    if g is not None and g_ref is not None and reference.guard_spec is not None:
        limit = reference.guard_spec.threshold
        guard_flips = int(((g > limit) != (g_ref > limit)).sum())
    auc_ref, auc = roc_auc(labels, p_ref), roc_auc(labels, p)
    return GateResult(
        dataset=images.name,
        description=images.description,
        images=len(labels),
        roc_auc_fp32=auc_ref,
        roc_auc=auc,
        max_probability_difference=float(np.abs(p - p_ref).max()),
        label_flips=flips,
        guard_refusal_flips=guard_flips,
    )


def openvino_candidate(weights: Path, precision: str, cache: Path) -> InferenceEngine:
    """The engine the service would build; when it refuses the golden guard scores, an unchecked one.

    A precision whose guard scores miss the golden ones is never served with the guard (its
    startup refuses), but the gate still reports how many refusals it would flip: the same
    OpenVINO graph is compiled without the golden check, for this measurement only.
    """
    record = read_record(weights, read_metadata(weights).sha256)
    try:
        return load_openvino(weights, BackendChoice("openvino", precision, "accuracy gate", record), "flag", cache)
    except ModelLoadError as exc:
        print(f"openvino {precision} with the input guard does not start: {exc}", flush=True)
    loaded = load_model(weights)
    ranges = record.int8 if record is not None else None
    runtime = openvino_backend.compile_features(
        loaded,
        precision,  # type: ignore[arg-type]
        guard=loaded.metadata.guard,
        cache_dir=None,
        threads=torch.get_num_threads(),
        calibration=ranges,
        verify=lambda features: 0.0,  # measurement only: this engine never serves
    )
    cpu, noise = torch.device("cpu"), int8_guard_noise(precision, ranges)
    return InferenceEngine(loaded, cpu, torch.float32, "flag", features=runtime, precision=precision, guard_noise=noise)


def calibrate(weights: Path, data: Path, count: int) -> Int8Ranges:
    """Measure int8 ranges on ``count`` training-side images and write them next to the weights.

    The graph is exported with the input guard's taps, so the ranges cover both served graphs
    (with and without the guard: ``app.core.onnx_export``). Earlier gate results are dropped:
    they judged other ranges.
    """
    loaded = load_model(weights)
    pixels, where = eval_sets.calibration_images(data, loaded.metadata, count)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-calibrate-") as tmp, torch.inference_mode():
        graph = Path(tmp) / "fp32.onnx"
        export_features(loaded.network, graph, loaded.metadata.guard)
        batches = [loaded.network.normalize(pixels[i : i + 16]).numpy() for i in range(0, len(pixels), 16)]
        ranges = measure_ranges(graph, batches)
    int8 = Int8Ranges(images=len(pixels), source=where, exporter=torch.__version__, ranges=ranges)
    record = read_record(weights, loaded.metadata.sha256) or FastPathRecord(
        weights_sha256=loaded.metadata.sha256, input_size=loaded.metadata.spec.input_size
    )
    kept = [gate for gate in record.gate if gate.precision != "int8"]
    path = write_record(record.model_copy(update={"int8": int8, "gate": kept}), weights)
    print(f"calibrated on {where} in {time.perf_counter() - started:.0f} s: {len(ranges)} ranges -> {path}")
    if loaded.metadata.guard is not None:
        int8 = measure_guard_noise(weights, pixels)
    return int8


def measure_guard_noise(weights: Path, pixels: torch.Tensor) -> Int8Ranges:
    """Store how much int8 raises the guard's squared scores, measured on the calibration images.

    The int8 graph built from the stored ranges and fp32 PyTorch score the same images; the median
    difference of squared scores goes into ``model.cpu.json`` and the served int8 engine takes it
    off (``app.core.input_guard.guard_scores``). Any earlier value is ignored while measuring.
    """
    sha256 = read_metadata(weights).sha256
    record = read_record(weights, sha256)
    if record is None or record.int8 is None:
        raise RecordError(f"no int8 ranges next to {weights}: calibrate first")
    raw = record.model_copy(update={"int8": record.int8.model_copy(update={"guard_noise": None})})
    with tempfile.TemporaryDirectory(prefix="cxr-noise-") as cache:
        write_record(raw, weights)
        reference = load_engine(weights, "cpu", "fp32", input_guard="flag", backend="torch")
        quantized = openvino_candidate(weights, "int8", Path(cache))
        exact, noisy = score(reference, pixels)[1], score(quantized, pixels)[1]
    assert exact is not None and noisy is not None  # both engines run the guard ("flag")
    noise = noise_energy(torch.from_numpy(exact), torch.from_numpy(noisy))
    int8 = raw.int8.model_copy(update={"guard_noise": noise})  # type: ignore[union-attr]
    write_record(raw.model_copy(update={"int8": int8}), weights)
    print(f"int8 adds {noise:.4f} to squared guard scores (median of {len(pixels)} calibration images)")
    return int8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--backend", default="openvino", choices=["torch", "openvino"])
    parser.add_argument("--precision", default="int8", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--data", type=Path, default=eval_sets.DEFAULT_DATA, help="folder with train/ (and test/)")
    parser.add_argument("--calibrate", type=int, metavar="N", help="first measure int8 ranges on N training images")
    parser.add_argument("--limit", type=int, help="first N images of each set (smoke runs; never recorded)")
    args = parser.parse_args(argv)
    # int8 ranges are measured for the int8 engine, whose guard noise is measured on this CPU too.
    measured = ({args.precision} if args.backend == "openvino" else set()) | ({"int8"} if args.calibrate else set())
    for precision in sorted(measured - {"fp32"}):
        why = openvino_backend.missing_units(precision)
        if why is not None:
            parser.error(
                f"OpenVINO {precision} cannot be measured on this CPU ({why}): run the gate on a CPU that has it"
            )
    if args.calibrate:
        calibrate(args.weights, args.data, args.calibrate)
    with tempfile.TemporaryDirectory(prefix="cxr-gate-") as cache:
        reference = load_engine(args.weights, "cpu", "fp32", input_guard="flag", backend="torch")
        if args.backend == "torch":
            candidate = load_engine(args.weights, "cpu", args.precision, input_guard="flag", backend="torch")
        else:  # not through backend_choice: the gate measures precisions before anything approves them
            candidate = openvino_candidate(args.weights, args.precision, Path(cache))
    results = []
    for images in eval_sets.evaluation_sets(args.data, reference.metadata, args.limit):
        result = compare(images, reference, candidate)
        results.append(result)
        guard = "" if result.guard_refusal_flips is None else f", guard refusal flips {result.guard_refusal_flips}"
        print(
            f"{images.name}: n={result.images} AUC fp32 {result.roc_auc_fp32:.5f} {args.backend} {args.precision} "
            f"{result.roc_auc:.5f} (diff {result.roc_auc - result.roc_auc_fp32:+.5f}), max |dp| "
            f"{result.max_probability_difference:.4f}, label flips {result.label_flips}{guard}: "
            + f"without the guard {verdict(result.passes(with_guard=False))}, "
            + f"with it {verdict(result.passes(with_guard=True))}"
        )
    passed = all(result.passes(with_guard=False) for result in results)
    guarded = all(result.passes(with_guard=True) for result in results)
    if args.backend == "openvino" and args.precision != "fp32" and args.limit is None:
        sha256 = reference.metadata.sha256
        record = read_record(args.weights, sha256) or FastPathRecord(
            weights_sha256=sha256, input_size=reference.input_size
        )
        gate = GateRecord(precision=args.precision, results=results)
        print(f"gate results recorded in {write_record(record.with_gate(gate), args.weights)}")
    print(
        f"gate (AUC drop <= {MAX_AUC_DROP}, flips <= {MAX_FLIP_RATE:.1%} on every set): "
        f"without the guard {verdict(passed)}, with it {verdict(guarded)}"
    )
    return 0 if passed else 1


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


if __name__ == "__main__":
    sys.exit(main())
