"""Can the input guard survive int8? Guard verdicts of OpenVINO int8 features, raw and realigned to fp32.

int8 moves the guard's 2,432 block statistics a few percent each (benchmarks/NOTES.md, section
10), and the Mahalanobis whitening magnifies that in the low-variance directions, so the guard
refuses nearly everything. This measures two cheap repairs fitted on the int8 calibration images
(training side only) and judged on the validation split and the test folder:

- ``shift``: add the per-dimension mean difference fp32 - int8;
- ``affine``: per-dimension least squares ``fp32 ~ a * int8 + b``.

Both would fit in ``model.cpu.json`` (two vectors). A guard refitted on int8 features would need a
second 2,432 x 2,432 whitening matrix (12 MB) next to the weights.

    python -m benchmarks.int8_guard_alignment --weights weights --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from app.core.artifacts import read_metadata
from app.core.engine import InferenceEngine, load_engine
from app.core.input_guard import guard_scores
from benchmarks import eval_sets
from benchmarks.accuracy_gate import openvino_candidate

BATCH = 32


def vectors(engine: InferenceEngine, pixels: torch.Tensor) -> torch.Tensor:
    """The guard's feature vectors of ``pixels`` as ``engine`` computes them."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), BATCH):
            _, vector = engine._features(engine.network.normalize(pixels[start : start + BATCH]))
            assert vector is not None
            out.append(vector.float())
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    parser.add_argument("--calibration-images", type=int, default=300)
    args = parser.parse_args(argv)
    metadata = read_metadata(args.weights)
    reference = load_engine(args.weights, "cpu", "fp32", "flag", "torch", None)
    with tempfile.TemporaryDirectory(prefix="cxr-int8-guard-") as cache:
        candidate = openvino_candidate(args.weights, "int8", Path(cache))
        calibration, where = eval_sets.calibration_images(args.data, metadata, args.calibration_images)
        fp32, int8 = vectors(reference, calibration), vectors(candidate, calibration)
        centred = int8 - int8.mean(0)
        variance = (centred**2).mean(0)
        slope = torch.where(variance > 0, (centred * (fp32 - fp32.mean(0))).mean(0) / variance.clamp_min(1e-12), 1.0)
        repairs = {
            "raw": lambda v: v,
            "shift": lambda v: v + (fp32.mean(0) - int8.mean(0)),
            "affine": lambda v: slope * v + (fp32.mean(0) - slope * int8.mean(0)),
        }
        assert reference._guard is not None and reference.guard_spec is not None
        limit = reference.guard_spec.threshold
        print(f"fitted on {where}; guard threshold {limit:.3f}")
        print("| set | int8 features | refused (fp32) | refused (int8) | flips | median score change |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for images in eval_sets.evaluation_sets(args.data, metadata):
            exact = guard_scores(vectors(reference, images.pixels), reference._guard)
            quantized = vectors(candidate, images.pixels)
            for name, repair in repairs.items():
                scores = guard_scores(repair(quantized), reference._guard)
                flips = int(((scores > limit) != (exact > limit)).sum())
                change = float(((scores - exact).abs() / exact).median())
                refused, refused_fp32 = int((scores > limit).sum()), int((exact > limit).sum())
                print(f"| {images.name} | {name} | {refused_fp32} | {refused} | {flips}/{len(exact)} | {change:.2f} |")


if __name__ == "__main__":
    main()
