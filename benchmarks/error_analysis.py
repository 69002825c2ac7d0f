"""What the misclassified images have in common: image statistics per outcome, and a montage to look at.

Reads the ``predictions.csv`` that ``python -m training evaluate`` writes, re-decodes every listed image with
the service's own preprocessing (``prepare_input``, so the statistics describe what the network saw, plus
the upright source size), and prints the median of each statistic per outcome group (false positives, true
negatives, true positives, false negatives). A montage of the false positives next to as many true
negatives is written to ``--out`` for a human to look at; it is made of dataset images, so it stays out of
git (``bench-results/`` is ignored).

Statistics, all on the ``--size`` px squashed grey image (0-255):
- ``mean``, ``std``: exposure and global contrast; ``p01``/``p99``: the used intensity range;
- ``border_dark``: share of the outer 10% frame darker than 16 (collimation, black padding);
- ``bright_px``: share of pixels above 240 (burnt-in text markers, saturated areas);
- ``aspect``: source width / height; ``megapixels``: source size.

    python -m benchmarks.error_analysis runs/eval-shipped-test/predictions.csv --out bench-results/errors
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.preprocessing import prepare_input

STATS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda a: float(a.mean()),
    "std": lambda a: float(a.std()),
    "p01": lambda a: float(np.percentile(a, 1)),
    "p99": lambda a: float(np.percentile(a, 99)),
    "border_dark": lambda a: float((_frame(a) < 16).mean()),
    "bright_px": lambda a: float((a > 240).mean()),
}
GROUPS = {"FP": ("NORMAL", "PNEUMONIA"), "TN": ("NORMAL", "NORMAL"), "TP": ("PNEUMONIA", "PNEUMONIA")}
GROUPS["FN"] = ("PNEUMONIA", "NORMAL")


def _frame(a: np.ndarray) -> np.ndarray:
    """Pixels of the outer 10% on every side."""
    k = max(1, a.shape[0] // 10)
    mask = np.ones_like(a, dtype=bool)
    mask[k:-k, k:-k] = False
    return a[mask]


def image_stats(path: Path, size: int) -> tuple[dict[str, float], np.ndarray]:
    """Statistics of one image as the network sees it, and the squashed pixels."""
    model_input = prepare_input(path.read_bytes(), size)
    pixels = model_input.pixels[0].numpy()
    stats = {name: fn(pixels.astype(np.float64)) for name, fn in STATS.items()}
    stats["aspect"] = model_input.source.width / model_input.source.height
    stats["megapixels"] = model_input.source.width * model_input.source.height / 1e6
    return stats, pixels


def read_predictions(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def montage(rows: list[np.ndarray], tile: int) -> Image.Image:
    """Rows of tiles, each row padded with black to the longest."""
    width = max(len(r) for r in rows) * tile
    canvas = Image.new("L", (width, tile * len(rows)))
    for y, row in enumerate(rows):
        for x, pixels in enumerate(row):
            canvas.paste(Image.fromarray(pixels).resize((tile, tile)), (x * tile, y * tile))
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="predictions.csv from `python -m training evaluate`")
    parser.add_argument("--size", type=int, default=128, help="side of the squashed image the statistics use")
    parser.add_argument("--out", type=Path, help="folder for the montage (false positives over true negatives)")
    parser.add_argument("--tiles", type=int, default=12, help="images per montage row")
    args = parser.parse_args(argv)

    rows = read_predictions(args.predictions)
    by_group: dict[str, list[tuple[float, dict[str, float], np.ndarray]]] = {g: [] for g in GROUPS}
    for row in rows:
        group = next((g for g, (truth, pred) in GROUPS.items() if (row["label"], row["prediction"]) == (truth, pred)))
        stats, pixels = image_stats(Path(row["path"]), args.size)
        by_group[group].append((float(row["probability"]), stats, pixels))

    names = [*STATS, "aspect", "megapixels"]
    print("| group | n | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for group, items in by_group.items():
        medians = [np.median([s[name] for _, s, _ in items]) if items else float("nan") for name in names]
        print(f"| {group} | {len(items)} | " + " | ".join(f"{m:.3g}" for m in medians) + " |")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        # Most confident false positives first, beside the true negatives the model was surest about.
        fps = [p for _, _, p in sorted(by_group["FP"], key=lambda t: -t[0])]
        tns = [p for _, _, p in sorted(by_group["TN"], key=lambda t: t[0])]
        grid = [fps[i : i + args.tiles] for i in range(0, len(fps), args.tiles)] + [tns[: args.tiles]]
        target = args.out / "false_positives.png"
        montage([r for r in grid if r], args.size).save(target)
        print(f"montage: {target} (rows of false positives, most confident first; last row: true negatives)")


if __name__ == "__main__":
    main()
