"""OpenVINO vs ONNX Runtime vs PyTorch on this CPU, fp32 / bf16 / int8, side by side in one run.

The measurement behind the choice of the CPU backend (benchmarks/NOTES.md, section 9). Every
variant runs the same exported feature extractor (``app.core.onnx_export``) on the same batch;
rounds are interleaved so a change in machine load hits every variant alike, and each is
reported as a ratio to eager PyTorch fp32 measured in the same rounds. int8 is calibrated on
training images (``benchmarks.eval_sets``) with ONNX Runtime's quantizer (the QDQ graph both
runtimes then execute) and, when ``nncf`` is installed (``pip install nncf==3.4.0``), with
NNCF for OpenVINO. With ``--weights`` the probabilities are also compared with PyTorch fp32 on
``--agreement`` validation images.

    python -m benchmarks.cpu_backends --input-size 224                  # random-init VGG16, speed
    python -m benchmarks.cpu_backends --weights weights --agreement 784  # the shipped model, + agreement
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from app.core.fastpath_record import Int8Ranges
from app.core.int8_calibration import measure_ranges, quantize
from app.core.onnx_export import export_features
from benchmarks import eval_sets
from benchmarks.serve_bench import export_random_model

Features = Callable[[np.ndarray], np.ndarray]  # normalised float32 batch -> maps


def openvino_variant(core: ov.Core, model: ov.Model, hint: str, threads: int) -> Features:
    config = {
        "INFERENCE_PRECISION_HINT": hint,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "CPU_DENORMALS_OPTIMIZATION": True,  # every variant flushes subnormals (torch: set_flush_denormal)
    }
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x})[0]


def onnxruntime_variant(path: Path, threads: int) -> Features:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def torch_variant(network: torch.nn.Module, dtype: torch.dtype) -> Features:
    channels_last = dtype != torch.float32
    features = network.features.to(dtype)
    if channels_last:
        features = features.to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(x).to(dtype)
        if channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return features(tensor).float().numpy()

    return run


def build_variants(args: argparse.Namespace, weights: Path, calibration: np.ndarray, tmp: Path) -> dict[str, Features]:
    loaded = load_model(weights)
    fp32_onnx, int8_onnx = tmp / "fp32.onnx", tmp / "int8.onnx"
    export_features(loaded.network, fp32_onnx)
    batches = [calibration[i : i + 8] for i in range(0, len(calibration), 8)]
    started = time.perf_counter()
    ranges = measure_ranges(fp32_onnx, batches)
    recipe = Int8Ranges(images=len(calibration), source="benchmark", exporter=torch.__version__, ranges=ranges)
    quantize(fp32_onnx, int8_onnx, recipe)
    print(f"onnxruntime quantizer: {time.perf_counter() - started:.1f} s on {len(calibration)} images", flush=True)
    core = ov.Core()
    fp32_model, int8_model = core.read_model(str(fp32_onnx)), core.read_model(str(int8_onnx))
    variants: dict[str, Features] = {"torch fp32": torch_variant(load_model(weights).network, torch.float32)}
    capabilities = set(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" in capabilities:
        variants["torch bf16"] = torch_variant(load_model(weights).network, torch.bfloat16)
    variants["onnxruntime fp32"] = onnxruntime_variant(fp32_onnx, args.threads)
    variants["onnxruntime int8"] = onnxruntime_variant(int8_onnx, args.threads)
    variants["openvino fp32"] = openvino_variant(core, fp32_model, "f32", args.threads)
    if "BF16" in capabilities:
        variants["openvino bf16"] = openvino_variant(core, fp32_model, "bf16", args.threads)
    variants["openvino int8 (onnxruntime quantizer)"] = openvino_variant(core, int8_model, "f32", args.threads)
    try:
        import nncf
    except ImportError:
        print("openvino int8 (nncf): not measured, nncf is not installed (pip install nncf==3.4.0)", flush=True)
    else:
        started = time.perf_counter()
        data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
        quantized = nncf.quantize(core.read_model(str(fp32_onnx)), data, subset_size=len(calibration))
        print(f"nncf quantizer: {time.perf_counter() - started:.1f} s on {len(calibration)} images", flush=True)
        variants["openvino int8 (nncf)"] = openvino_variant(core, quantized, "f32", args.threads)
    return variants


def time_variants(
    variants: dict[str, Features], calibration: np.ndarray, sizes: list[int], rounds: int, seconds: float
) -> dict[tuple[str, int], list[float]]:
    """Images/s per (variant, batch size) per round; each round runs every pair once, interleaved."""
    batches = {size: np.ascontiguousarray(np.resize(calibration, (size, *calibration.shape[1:]))) for size in sizes}
    jobs = [(name, size) for size in sizes for name in variants]
    for name, size in jobs:
        variants[name](batches[size])  # warm-up: allocation, kernel selection
    rates: dict[tuple[str, int], list[float]] = {job: [] for job in jobs}
    for _ in range(rounds):
        for name, size in jobs:
            run, x = variants[name], batches[size]
            calls, started = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - started < seconds:
                run(x)
                calls += 1
            rates[name, size].append(size * calls / (time.perf_counter() - started))
    return rates


def agreement(variants: dict[str, Features], weights: Path, images: eval_sets.EvalSet) -> None:
    """Max |p - p_torch_fp32| and label flips at the model's threshold, per variant."""
    loaded = load_model(weights)
    network, meta = loaded.network, loaded.metadata
    with torch.inference_mode():
        x = network.normalize(images.pixels).numpy()

    def probabilities(run: Features) -> np.ndarray:
        maps = np.concatenate([run(np.ascontiguousarray(x[i : i + 32])) for i in range(0, len(x), 32)])
        with torch.inference_mode():
            return pneumonia_probability(network.head(torch.from_numpy(maps).float()), meta.temperature).numpy()

    reference = probabilities(variants["torch fp32"])
    for name, run in variants.items():
        p = probabilities(run)
        flips = int(((p >= meta.threshold) != (reference >= meta.threshold)).sum())
        print(
            f"  {name:40s} max |dp| {np.abs(p - reference).max():.4f}  "
            f"mean {np.abs(p - reference).mean():.5f}  flips {flips}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="exported model (default: random-init VGG16 at --input-size)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="each timed (interleaved)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5, help="per variant per round")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--agreement", type=int, default=0, help="validation images to compare (needs --weights)")
    parser.add_argument("--data", type=Path, default=eval_sets.DEFAULT_DATA)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="cxr-backends-") as tmp:
        weights = args.weights or export_random_model(Path(tmp) / "weights", args.input_size)
        loaded = load_model(weights)
        metadata = loaded.metadata
        if args.weights is None:  # a random model has no provenance: draw calibration images from the usual split
            metadata = metadata.model_copy(update={"provenance": {"args": {"val_fraction": 0.15, "seed": 0}}})
        pixels, where = eval_sets.calibration_images(args.data, metadata, args.calibration_images)
        with torch.inference_mode():
            calibration = loaded.network.normalize(pixels).numpy()
        print(
            f"input {metadata.spec.input_size} px, batches {args.batch_sizes}, {args.threads} threads; "
            f"calibration: {where}"
        )
        variants = build_variants(args, weights, calibration, Path(tmp))
        rates = time_variants(variants, calibration, args.batch_sizes, args.rounds, args.seconds)
        base = statistics.median(rates["torch fp32", args.batch_sizes[0]])
        print(f"\n{'variant':40s} {'batch':>5s} {'img/s':>8s} {'x torch fp32':>13s}  rounds")
        for (name, size), values in sorted(
            rates.items(), key=lambda item: (list(variants).index(item[0][0]), item[0][1])
        ):
            median = statistics.median(values)
            rounds = " ".join(f"{v:.2f}" for v in values)
            print(f"{name:40s} {size:5d} {median:8.2f} {median / base:13.2f}  {rounds}")
        if args.agreement and args.weights:
            val = eval_sets.validation_set(args.data, metadata, limit=args.agreement)
            print(f"\nagreement with torch fp32 on {len(val.labels)} {val.description}")
            agreement(variants, weights, val)


if __name__ == "__main__":
    main()
