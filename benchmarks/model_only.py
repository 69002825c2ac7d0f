"""Model-only throughput: the serving forward path with no HTTP, decode or batching queue.

It calls ``app.core.engine`` exactly as the service does, so ``ours / model_only`` is the share of
the accelerator (or CPU) the service manages to keep busy. On CUDA it can also try variants
the engine may not use yet (fp16/bf16, channels_last, torch.compile, CUDA graphs) to show
what each would buy before anyone changes the service.

Standalone: ``python -m benchmarks.model_only --weights DIR --device cuda --batch-sizes 1 32 128 --variants 128``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from app.core.artifacts import load_model
from app.core.engine import load_engine
from app.core.input_guard import GuardMode


def timed_throughput(step: Callable[[], object], batch_size: int, device: str, min_seconds: float) -> dict[str, float]:
    """Images/s for ``step`` (one batch) after a warm-up call, timed for at least ``min_seconds``."""
    step()  # warm-up: allocator, cuDNN autotuning, lazy init
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    iterations, started = 0, time.perf_counter()
    while iterations < 2 or time.perf_counter() - started < min_seconds:
        step()
        iterations += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"throughput_ips": batch_size * iterations / elapsed, "batch_ms": 1000.0 * elapsed / iterations}


def measure_engine(
    weights: Path,
    device: str,
    precision: str,
    batch_sizes: Sequence[int],
    min_seconds: float,
    *,
    backend: str = "torch",
    input_guard: GuardMode = "reject",
    cache_dir: Path | None = None,
) -> dict[str, object]:
    """Engine throughput per batch size; peak GPU memory is taken at the largest batch."""
    engine = load_engine(weights, device, precision, input_guard, backend, cache_dir)
    size = engine.input_size
    per_batch: dict[str, dict[str, float]] = {}
    peak_gpu_mb: float | None = None
    for batch_size in sorted(batch_sizes):
        pixels = torch.randint(0, 256, (batch_size, 1, size, size), dtype=torch.uint8)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        per_batch[str(batch_size)] = timed_throughput(
            lambda pixels=pixels: [r.probability for r in engine.infer(pixels)], batch_size, device, min_seconds
        )
        if device.startswith("cuda"):
            peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    best = max(per_batch.values(), key=lambda item: item["throughput_ips"])
    return {
        "precision": engine.precision,
        "per_batch_size": per_batch,
        "throughput_ips": best["throughput_ips"],
        "peak_gpu_memory_mb": peak_gpu_mb,
    }


def variant_step(
    weights: Path, batch_size: int, dtype: torch.dtype, channels_last: bool, mode: str
) -> Callable[[], object]:
    """One CUDA forward of the bare network in a given configuration: eager, compiled or graphed."""
    network = load_model(weights, verify_golden=False).network.to("cuda", dtype).eval()
    size = network.spec.input_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=fmt)
    pixels = torch.randint(0, 256, (batch_size, 1, size, size), dtype=torch.uint8, device="cuda")
    if mode == "compile":
        network = torch.compile(network)
    if mode == "cudagraph":
        static_in = pixels.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                network(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            network(static_in)
        return graph.replay

    def step() -> object:
        with torch.inference_mode():
            return network(pixels)

    return step


def measure_variants(weights: Path, batch_size: int, min_seconds: float) -> list[dict[str, object]]:
    """GPU-only sweep over dtype x channels_last x {eager, compile, cudagraph} at one (large) batch.

    One batch size keeps the 18 configurations (compiles included) within a few minutes.
    """
    torch.backends.cudnn.benchmark = True
    results = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for mode in ("eager", "compile", "cudagraph"):
                entry: dict[str, object] = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "channels_last": channels_last,
                    "mode": mode,
                    "batch_size": batch_size,
                }
                try:
                    step = variant_step(weights, batch_size, dtype, channels_last, mode)
                    entry.update(timed_throughput(step, batch_size, "cuda", min_seconds))
                except Exception as exc:  # one failing variant (e.g. compile) must not end the sweep
                    entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
                results.append(entry)
                print(json.dumps(entry), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument(
        "--variants", type=int, metavar="BATCH", help="CUDA only: also sweep dtype/layout/compile at BATCH"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {
        "engine": measure_engine(args.weights, args.device, args.precision, args.batch_sizes, args.min_seconds)
    }
    print(json.dumps(result["engine"], indent=2), flush=True)
    if args.variants:
        result["variants"] = measure_variants(args.weights, args.variants, args.min_seconds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
