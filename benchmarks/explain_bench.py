"""What explaining costs: the engine's batched forward pass with no, some and all images asking for heatmaps.

Shows that requests which do not ask for a heatmap do not pay for it, and what those that do pay:
the three configurations are timed interleaved in the same run on the same engine and batch, and
printed as ratios against the plain pass (``none``). Exports a random-init VGG16 with the compact
head (the CAM needs nothing trained) unless ``--weights`` is given.

    python -m benchmarks.explain_bench [--input-size 224] [--batch-size 16] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.core.artifacts import export_model
from app.core.engine import InferenceEngine, load_engine
from app.core.heatmap import cam_head
from app.core.network import ModelSpec, build_model


def random_model(folder: Path, input_size: int) -> Path:
    torch.manual_seed(0)
    network = build_model(ModelSpec(input_size=input_size))
    golden = torch.randint(0, 256, (1, 1, input_size, input_size), dtype=torch.uint8)
    export_model(network, folder, version="explain-bench", golden_inputs=golden)
    return folder


def seconds(engine: InferenceEngine, pixels: torch.Tensor, explain: list[bool]) -> float:
    started = time.perf_counter()
    results = engine.infer(pixels, explain)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    elapsed = time.perf_counter() - started
    assert [r.heatmap is not None for r in results] == explain
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.explain_bench", description=__doc__)
    parser.add_argument("--weights", type=Path, help="model folder (default: a random-init export)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per configuration, interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights or random_model(Path(scratch), args.input_size)
        # Heatmap cost only: the guard would add the same work to both arms (benchmarks/guard_overhead.py).
        engine = load_engine(weights, args.device, args.precision, input_guard="off")
    size, n = engine.input_size, args.batch_size
    pixels = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8)
    configurations = {"none": [False] * n, "one": [True] + [False] * (n - 1), "all": [True] * n}
    for explain in configurations.values():
        seconds(engine, pixels, explain)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configurations}
    for _ in range(args.rounds):
        for name, explain in configurations.items():
            times[name].append(seconds(engine, pixels, explain))
    # The map step alone, on the feature maps of the same batch: what "all" adds, free of the pass's noise.
    cam = cam_head(engine.network, engine.metadata.temperature)
    with torch.inference_mode():
        maps = engine.network.feature_maps(engine.network.normalize(pixels.to(engine.device)))
        cam_times = []
        for _ in range(max(args.rounds, 20)):
            started = time.perf_counter()
            cam.heatmaps(maps)
            cam_times.append(time.perf_counter() - started)
    base = statistics.median(times["none"])
    print(f"device {engine.device} {engine.precision}, input {size} px, batch {n}, {args.rounds} rounds (median)")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"  explain {name:4s}: {1000 * median:9.1f} ms per batch   ratio to none: {median / base:.3f}")
    cam_median = statistics.median(cam_times)
    print(f"  map step alone (all {n} images): {1000 * cam_median:.3f} ms = {cam_median / base:.5f} of the plain pass")


if __name__ == "__main__":
    main()
