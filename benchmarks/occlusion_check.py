"""Which part of a film makes the model call a normal child pneumonia? Occlusion and CAM, cell by cell.

Every test film is cut into a ``g x g`` grid (default: the model's own feature-map grid, 4 x 4 at
128 px) and each cell in turn is painted over with its own median grey; the change in calibrated
log-odds says how much that cell pushed the call (occlusion sensitivity, Zeiler and Fergus 2014).
The cell's own median, not the film's: it wipes out structure (ribs, a burnt-in letter) but keeps
the cell's brightness, where a film-wide grey on a dark lung field would itself look like an
opacity and raise the score.
A false positive that turns NORMAL when one cell is hidden was called on that cell: if the burnt-in
"R" marker in the top-left corner were the shortcut (the error analysis's suspicion), hiding the
top-left cell would clear most false positives and leave true positives alone. True negatives that
turn PNEUMONIA when a cell is hidden measure what occlusion itself does to a film.

Beside it, the class activation map splits each film's log-odds exactly into per-cell contributions
(``app.core.heatmap``: mean of the cells + bias), without changing the image.

Nothing is fitted: the temperature and threshold are the model's own, and the decision is
``app.core.decision.is_pneumonia``, as in serving. ``--montage FILE.png`` draws, for a reader,
each false positive (most confident first) three times: as the model saw it, under its CAM and
under its occlusion map, both in the service's heatmap colours (red pushed towards PNEUMONIA).
The montage shows dataset images: keep it out of the repository (``bench-results/`` is ignored).

    python -m benchmarks.occlusion_check weights --data ../shared/data/chest_xray \
        --montage bench-results/false_positives_occlusion.png
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from app.core.artifacts import load_model
from app.core.decision import is_pneumonia, pneumonia_probability
from app.core.heatmap import ExplainUnsupportedError, Heatmap, cam_head
from app.core.network import PneumoniaNet
from app.core.overlay import render_overlay
from benchmarks import eval_sets
from training.loops import predict_logits

Scorer = Callable[[torch.Tensor], np.ndarray]  # uint8[N, 1, S, S] -> calibrated log-odds of PNEUMONIA, float64[N]
GROUPS = {"false positives": (0, True), "true negatives": (0, False), "true positives": (1, True)}


def cell_slices(size: int, grid: int) -> list[slice]:
    """The ``grid`` row (or column) bands of a ``size``-pixel side; they tile it exactly."""
    edges = [round(i * size / grid) for i in range(grid + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def occlude(pixels: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """A copy of the batch with one cell of each image painted over with that cell's own median value."""
    out = pixels.clone()
    cell = out[:, :, rows, cols]
    cell[...] = cell.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    return out


def occlusion_log_odds(score: Scorer, pixels: torch.Tensor, grid: int) -> np.ndarray:
    """float64[N, grid, grid]: each film's log-odds with each cell hidden in turn."""
    bands = cell_slices(pixels.shape[-1], grid)
    out = np.empty((len(pixels), grid, grid))
    for r, rows in enumerate(bands):
        for c, cols in enumerate(bands):
            out[:, r, c] = score(occlude(pixels, rows, cols))
    return out


def network_scorer(network: PneumoniaNet, temperature: float, batch_size: int = 64) -> Scorer:
    """Calibrated log-odds ``(z_pneumonia - z_normal) / T``: the probability's logit, exactly."""

    def score(pixels: torch.Tensor) -> np.ndarray:
        logits = predict_logits(network, pixels, batch_size=batch_size, device=torch.device("cpu"))
        return ((logits[:, 1] - logits[:, 0]) / temperature).double().numpy()

    return score


def cam_contributions(network: PneumoniaNet, temperature: float, pixels: torch.Tensor) -> np.ndarray:
    """float64[N, h, w]: each feature cell's share of the log-odds (the cells sum to log-odds - bias)."""
    head = cam_head(network, temperature)
    with torch.inference_mode():
        cams = head.maps(network.feature_maps(network.normalize(pixels)))
    return (cams / (cams.shape[1] * cams.shape[2])).double().numpy()


def probability(log_odds: np.ndarray) -> np.ndarray:
    """P(pneumonia) of calibrated log-odds by the decision's own function: logits (0, log-odds) at T = 1."""
    logits = torch.from_numpy(np.stack([np.zeros_like(log_odds), log_odds], axis=-1))
    return pneumonia_probability(logits).double().numpy()


def grid_table(title: str, values: np.ndarray, fmt: str) -> list[str]:
    """A markdown grid of per-cell values, top row of the film first."""
    grid = values.shape[1]
    lines = [f"| {title} | " + " | ".join(f"col {c}" for c in range(grid)) + " |", "|---" * (grid + 1) + "|"]
    lines += [f"| row {r} | " + " | ".join(format(v, fmt) for v in values[r]) + " |" for r in range(values.shape[0])]
    return lines


@dataclass(frozen=True)
class Scored:
    """One model's log-odds on the test films, as they are and with each cell hidden, and its calls' inputs."""

    base: np.ndarray  # float64[N]
    occluded: np.ndarray  # float64[N, g, g]
    cam: np.ndarray | None  # float64[N, g, g] when the model has an exact CAM on this grid
    labels: np.ndarray  # int64[N], 1 = PNEUMONIA
    threshold: float
    names: list[str]

    def false_positives(self) -> np.ndarray:
        return (self.labels == 0) & np.asarray(is_pneumonia(probability(self.base), self.threshold))


def report(scored: Scored) -> list[str]:
    """The lines printed: per group the mean occlusion effect and CAM per cell, flips, and each false positive."""
    base, occluded, cam, labels = scored.base, scored.occluded, scored.cam, scored.labels
    called = np.asarray(is_pneumonia(probability(base), scored.threshold))
    flipped = np.asarray(is_pneumonia(probability(occluded), scored.threshold)) != called[:, None, None]
    change = occluded - base[:, None, None]
    lines = [
        f"threshold {scored.threshold:.4f}; {len(base)} films; occlusion grid {occluded.shape[1]} x {occluded.shape[2]}"
    ]
    for group, (label, call) in GROUPS.items():
        members = (labels == label) & (called == call)
        n = int(members.sum())
        lines += ["", f"## {group}: {n}"]
        if not n:
            continue
        lines += grid_table("mean log-odds change when hidden", change[members].mean(0), "+.2f")
        lines += ["", *grid_table("films whose call flips when hidden", flipped[members].sum(0), "d")]
        if cam is not None:
            lines += ["", *grid_table("mean CAM contribution (log-odds)", cam[members].mean(0), "+.2f")]
        any_cell = flipped[members].reshape(n, -1).any(1)
        lines += ["", f"flipped by hiding some single cell: {int(any_cell.sum())} of {n}"]
    false_positive = (labels == 0) & called
    if false_positive.any():
        lines += ["", "| false positive | p | most lowering cell (row, col) | its change | cells that flip it |"]
        lines += ["|---|---|---|---|---|"]
        for i in np.flatnonzero(false_positive):
            r, c = np.unravel_index(np.argmin(change[i]), change[i].shape)
            flips = ", ".join(f"({a}, {b})" for a, b in zip(*np.nonzero(flipped[i]), strict=True)) or "none"
            lines.append(
                f"| {scored.names[i]} | {probability(base[i]):.3f} | ({r}, {c}) | {change[i, r, c]:+.2f} | {flips} |"
            )
    return lines


def montage(pixels: torch.Tensor, scored: Scored, tile: int = 256) -> Image.Image | None:
    """One row per false positive, most confident first: the film, its CAM, its occlusion map; None if none."""
    base, occluded, cam, names = scored.base, scored.occluded, scored.cam, scored.names
    false_positive = np.flatnonzero(scored.false_positives())
    if not len(false_positive):
        return None
    rows = false_positive[np.argsort(-base[false_positive], kind="stable")]
    columns = 3 if cam is not None else 2
    sheet = Image.new("RGB", (columns * tile, len(rows) * tile))
    draw = ImageDraw.Draw(sheet)
    for y, i in enumerate(rows):
        # Occlusion as "how much the cell pushed towards PNEUMONIA": the log-odds it took away when hidden.
        maps = [None, map_of("occlusion", base[i] - occluded[i])]
        if cam is not None:
            maps.insert(1, map_of("cam", cam[i]))
        for x, heatmap in enumerate(maps):
            sheet.paste(render_overlay(pixels[i], heatmap, (tile, tile)), (x * tile, y * tile))
        draw.text((4, y * tile + 4), f"{names[i]}  p={probability(base[i]):.3f}", fill=(255, 255, 0))
    return sheet


def map_of(method: str, cells: np.ndarray) -> Heatmap:
    return Heatmap(method, "input", cells.shape[0], cells.shape[1], tuple(float(v) for v in cells.flatten()), 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="exported model directory or file")
    parser.add_argument("--data", type=Path, default=eval_sets.DEFAULT_DATA)
    parser.add_argument("--grid", type=int, default=None, help="cells per side (default: the feature-map grid)")
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    parser.add_argument("--montage", type=Path, default=None, help="PNG of the false positives, for a reader")
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    meta = loaded.metadata
    test = eval_sets.held_out_set(args.data, meta, limit=args.limit)
    if test is None:
        raise SystemExit(f"{args.data}: no test folder")
    network, temperature = loaded.network, meta.temperature
    try:
        cam: np.ndarray | None = cam_contributions(network, temperature, test.pixels)
    except ExplainUnsupportedError:
        cam = None  # the classic head has no exact map; occlusion still works on any grid given
    grid = args.grid if args.grid is not None else (cam.shape[1] if cam is not None else None)
    if grid is None:
        raise SystemExit("this model's head has no class activation map: give --grid")
    if grid < 1 or grid > test.pixels.shape[-1]:
        raise SystemExit(f"--grid must be 1..{test.pixels.shape[-1]}, got {grid}")
    if cam is not None and cam.shape[1:] != (grid, grid):
        cam = None  # the CAM exists only on the feature grid
    score = network_scorer(network, temperature)
    base = score(test.pixels)
    occluded = occlusion_log_odds(score, test.pixels, grid)
    print(f"{meta.version} ({args.model}) on {args.data / 'test'}")
    scored = Scored(base, occluded, cam, test.labels, meta.threshold, [p.name for p in test.paths])
    print("\n".join(report(scored)))
    if args.montage is not None:
        sheet = montage(test.pixels, scored)
        if sheet is None:
            print(f"\nno false positives: {args.montage} not written")
        else:
            args.montage.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(args.montage)
            print(f"\nmontage of the false positives: {args.montage}")


if __name__ == "__main__":
    main()
