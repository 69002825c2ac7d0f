"""What loss of detail does to the model, and what the input guard's fine-detail floor refuses.

``python -m benchmarks.detail_check weights ../shared/data/chest_xray/test``

Every NORMAL film under ``FOLDER/NORMAL`` is degraded in each of several ways, encoded as a
lossless PNG and sent through the service's own path (``preprocess``, then the engine with the
guard in ``flag`` mode, so every image gets a label and a verdict). For each way the table gives
how many of the films the model calls PNEUMONIA (a normal child called ill), how many fall under
the detail floor, and how many the whole guard refuses. Blur and enlargement from a thumbnail are
what the floor is for; the benign rows (rotation, JPEG, enlargement of the whole film, exposure,
gamma) are what it must let through. Normal films only: they are where blur does harm, since it
reads as opacity. Nothing is fitted here: the floor is the model's own (``model.json``).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageFilter

from app.core.engine import load_engine
from app.core.image_errors import ImageError
from app.core.preprocessing import preprocess

Degrade = Callable[[Image.Image], Image.Image]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _enlarged_from(side: int) -> Degrade:
    def degrade(image: Image.Image) -> Image.Image:
        small = image.resize((side, side), Image.Resampling.BILINEAR)
        return small.resize(image.size, Image.Resampling.BICUBIC)

    return degrade


def _blur(fraction: float) -> Degrade:
    """A Gaussian blur whose radius is ``fraction`` of the film's long side (r = 2.24 px on a 224-px film)."""
    return lambda image: image.filter(ImageFilter.GaussianBlur(fraction * max(image.size)))


DEGRADATIONS: dict[str, Degrade] = {
    "none": lambda image: image,
    "blur 0.5%": _blur(0.005),
    "blur 1%": _blur(0.01),
    "blur 2%": _blur(0.02),
    "blur 3%": _blur(0.03),
    "enlarged from 64 px": _enlarged_from(64),
    "enlarged from 32 px": _enlarged_from(32),
    "benign: rotated 5 deg": lambda image: image.rotate(5, resample=Image.Resampling.BILINEAR),
    "benign: JPEG quality 20": lambda image: _jpeg(image, 20),
    "benign: whole film enlarged 4 x": lambda image: image.resize(
        (image.width * 4, image.height * 4), Image.Resampling.BICUBIC
    ),
    "benign: exposure x 0.7": lambda image: image.point(lambda v: int(v * 0.7)),
    "benign: gamma 0.6": lambda image: image.point(lambda v: round(255 * (v / 255) ** 0.6)),
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detail_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, help="exported model directory")
    parser.add_argument("folder", type=Path, help="a labelled folder: its NORMAL/ films are degraded")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    engine = load_engine(args.weights, device="cpu", input_guard="flag")
    spec = engine.guard_spec
    if spec is None or spec.detail_floor is None:
        print(f"error: model {engine.metadata.version} has no detail floor to check", file=sys.stderr)
        return 2
    films = sorted(path for path in (args.folder / "NORMAL").iterdir() if path.is_file())
    size = engine.input_size
    floor, threshold = spec.detail_floor, spec.threshold
    print(f"{len(films)} NORMAL films from {args.folder}; detail floor {floor:.4f}, guard threshold {threshold:.4f}")
    print("| degradation | called PNEUMONIA | under the detail floor | refused by the guard |")
    print("|---|---|---|---|")
    for name, degrade in DEGRADATIONS.items():
        pixels, unreadable = [], 0
        for path in films:
            try:
                with Image.open(path) as image:
                    pixels.append(preprocess(_png(degrade(image.convert("L"))), size))
            except (ImageError, OSError):
                unreadable += 1
        results = [
            result
            for batch in torch.split(torch.stack(pixels), args.batch_size)
            for result in engine.infer(engine.collate(list(batch)))
        ]
        assessments = [engine.assess(result) for result in results]
        pneumonia = sum(assessment.decision.label == "PNEUMONIA" for assessment in assessments)
        low = sum(result.detail is not None and result.detail < spec.detail_floor for result in results)
        refused = sum(assessment.guard is not None and not assessment.guard.passed for assessment in assessments)
        n = len(results)
        note = f" ({unreadable} unreadable)" if unreadable else ""
        print(
            f"| {name}{note} | {pneumonia}/{n} ({100 * pneumonia / n:.0f}%) | {low}/{n} ({100 * low / n:.1f}%) "
            f"| {refused}/{n} ({100 * refused / n:.1f}%) |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
