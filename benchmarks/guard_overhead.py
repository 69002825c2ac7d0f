"""What the input guard costs: the engine's batched forward pass with the guard on vs off, same run.

``python -m benchmarks.guard_overhead --weights weights --device cpu --batch-sizes 1 32``

Both engines load the same model; passes alternate so drift on a shared machine hits both
equally. Prints the median time of each and their ratio (on / off).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from app.core.engine import InferenceEngine, load_engine


def medians(engines: dict[str, InferenceEngine], pixels: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per pass of each engine, passes interleaved so drift on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.infer(pixels)
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guard_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    on = load_engine(args.weights, args.device, args.precision, input_guard="reject")
    off = load_engine(args.weights, args.device, args.precision, input_guard="off")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        size = on.input_size
        pixels = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=generator)
        medians({"on": on, "off": off}, pixels, 3)  # warm-up
        measured = medians({"on": on, "off": off}, pixels, args.repeats)
        with_guard, without = measured["on"], measured["off"]
        print(
            f"batch {batch}: guard on {with_guard * 1000:.1f} ms, off {without * 1000:.1f} ms, "
            f"ratio {with_guard / without:.3f} ({on.device}, {on.precision})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
