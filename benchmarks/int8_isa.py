"""int8 on this CPU: do OpenVINO's int8 kernels reproduce the golden outputs, and how fast are they?

Without int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX) oneDNN multiplies uint8
activations by int8 weights with ``vpmaddubsw``, which adds each pair of products into an int16
and saturates; OpenVINO still lists INT8 on such CPUs. Weights rounded to 7 bits (ONNX Runtime's
``reduce_range``) halve the products, so the pairs fit. For the shipped recipe (8-bit weights) and
the 7-bit variant this prints, on the weights' golden inputs, the largest logit difference (over
the logit scale) and the largest relative input-guard score difference against the exported
golden outputs (the load-time check allows 0.1 and 10 %), then the time per image of each against
OpenVINO fp32, interleaved rounds, as ratios measured in the same run.

    python -m benchmarks.int8_isa --weights weights --rounds 5

Results: benchmarks/NOTES.md, section 11. Needs the weights' model.cpu.json (int8 ranges).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openvino as ov
import torch

from app.core.artifacts import LoadedModel, golden_guard_difference, golden_logit_difference, load_model
from app.core.engine import int8_guard_noise
from app.core.fastpath_record import read_record
from app.core.input_guard import guard_scores
from app.core.int8_calibration import quantize
from app.core.onnx_export import GUARD_NAME, MAPS_NAME, export_features
from app.core.openvino_backend import (
    INT8_DOT_PRODUCT_FLAGS,
    compile_request,
    cpu_flags,
    reported_capabilities,
    usable_capabilities,
)


def golden_errors(loaded: LoadedModel, request: ov.InferRequest, noise: float) -> tuple[float, float]:
    """(largest logit difference / logit scale, largest relative guard-score difference) on the golden inputs."""
    assert loaded.guard is not None and loaded.golden_inputs is not None
    with torch.inference_mode():
        out = request.infer({0: loaded.network.normalize(loaded.golden_inputs).numpy()})
        logits = loaded.network.head(torch.from_numpy(out[MAPS_NAME]))
        scores = guard_scores(torch.from_numpy(out[GUARD_NAME]), loaded.guard, noise)
    diff, scale = golden_logit_difference(loaded, logits)
    guard = golden_guard_difference(loaded, scores)
    assert guard is not None  # main refuses weights without a guard
    return diff / scale, guard


def ms_per_image(request: ov.InferRequest, batch: torch.Tensor, repeats: int) -> float:
    request.infer({0: batch.numpy()})  # warm
    started = time.perf_counter()
    for _ in range(repeats):
        request.infer({0: batch.numpy()})
    return (time.perf_counter() - started) * 1000 / (repeats * len(batch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="batches timed per graph and round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    loaded = load_model(args.weights)
    record = read_record(args.weights, loaded.metadata.sha256)
    if record is None or record.int8 is None or loaded.metadata.guard is None:
        parser.error(f"{args.weights} needs an input guard and int8 ranges in model.cpu.json")
    flags = cpu_flags()
    reported = reported_capabilities()
    dot = sorted(flags & INT8_DOT_PRODUCT_FLAGS) if flags is not None else "unknown (no CPU flags)"
    print(f"OpenVINO reports {sorted(reported)}; int8 dot products: {dot or 'none'}")
    print(f"the service counts as usable: {sorted(usable_capabilities(reported, flags))}")
    noise = int8_guard_noise("int8", record.int8)
    size = loaded.metadata.spec.input_size
    pixels = torch.randint(0, 256, (args.batch_size, 1, size, size), dtype=torch.uint8, generator=torch.Generator())
    with torch.inference_mode():
        batch = loaded.network.normalize(pixels)
    with tempfile.TemporaryDirectory(prefix="cxr-int8-isa-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_features(loaded.network, fp32, loaded.metadata.guard)
        graphs = {"fp32": compile_request(fp32, "fp32", args.threads)}
        for name, reduce_range in (("int8 8-bit weights", False), ("int8 7-bit weights", True)):
            path = Path(tmp) / f"{name.replace(' ', '-')}.onnx"
            quantize(fp32, path, record.int8, reduce_range=reduce_range)
            graphs[name] = compile_request(path, "int8", args.threads)
        for name, request in graphs.items():
            logit, guard = golden_errors(loaded, request, 0.0 if name == "fp32" else noise)
            print(f"{name}: golden logits off by {logit:.3g} of their scale, guard scores by {guard:.3g} (relative)")
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(args.rounds):
            for name, request in graphs.items():
                times[name].append(ms_per_image(request, batch, args.repeats))
    base = statistics.median(times["fp32"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name}: {median:.1f} ms/img (median of {args.rounds}), fp32/this = {base / median:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
