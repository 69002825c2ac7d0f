"""Does the model read how a film was squashed to a square as pneumonia?

Every film of this dataset was squashed to a square from its original shape (``resize_square``,
"as the training images were made"): a film that was wider than tall has its anatomy narrowed,
which brings vertical edges closer together and raises horizontal gradients against vertical ones.
If the original shapes differ by class (they are not recorded in the files), the squash is a
shortcut the network can learn, and a test normal squashed like the training pneumonias would be
called pneumonia with no opacity on it.

Two measurements, nothing fitted (the temperature and threshold are the model's own, the calls
``app.core.decision.is_pneumonia``, as in serving):

1. **Gradient anisotropy** of each film as the network sees it: mean ``|d/dx|`` over mean
   ``|d/dy|``. Per group (validation normals and pneumonias; test false positives, true negatives,
   true positives, false negatives) its median, and its rank AUC as a one-number classifier:
   validation pneumonia against validation normal (is it a class cue in training data?) and test
   false positives against test true negatives (does it single out the errors?). Anisotropy also
   falls when opacities blur the rib edges, so a class cue alone proves nothing; the next part
   asks the network.
2. **Counterfactual stretch**: every film magnified by a factor along one axis about its centre
   (> 1 crops that axis' edges, < 1 pads them with their mirror image) and scored again. The
   mean change in calibrated log-odds per group, and how many calls change. A network that uses
   the squash lowers its pneumonia log-odds when the films are widened (factor > 1, horizontal)
   and raises them when they are narrowed, and the vertical stretch by the same factor moves
   them the other way (it changes the shape inversely). Stretching also crops or pads the
   stretched axis' edges, and the bottom edge (diaphragm, abdomen) is NORMAL evidence (E16):
   the zoom along both axes by the same factors, which crops or pads every edge and keeps the
   shape, is the control for that.

    python -m benchmarks.aspect_check weights --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from app.core.artifacts import load_model
from app.core.decision import is_pneumonia
from benchmarks import eval_sets
from benchmarks.occlusion_check import GROUPS, Scorer, network_scorer, probability
from training.metrics import roc_auc

Axis = Literal["horizontal", "vertical", "both"]
AXES: tuple[Axis, ...] = ("horizontal", "vertical", "both")
Column = tuple[Axis, float]  # one stretch: (axis, factor)
DEFAULT_FACTORS = (0.85, 1.15)


def anisotropy(pixels: torch.Tensor) -> np.ndarray:
    """float64[N]: mean absolute horizontal over mean absolute vertical difference of each film.

    A flat film has no direction (1); one that varies only across has an infinite ratio.
    """
    x = pixels.double()
    across = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    down = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    ratio = torch.where(down > 0, across / down.clamp_min(1e-300), torch.inf)
    return torch.where((across == 0) & (down == 0), 1.0, ratio).numpy()


def stretch(pixels: torch.Tensor, factor: float, axis: Axis) -> torch.Tensor:
    """float32 films magnified by ``factor`` along ``axis`` (or both) about the centre (bilinear; edges mirrored)."""
    n = pixels.shape[0]
    sx = 1.0 / factor if axis in ("horizontal", "both") else 1.0
    sy = 1.0 / factor if axis in ("vertical", "both") else 1.0
    theta = torch.tensor([[sx, 0.0, 0.0], [0.0, sy, 0.0]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass(frozen=True)
class Group:
    name: str
    members: np.ndarray  # bool[N] over the films of its set


@dataclass(frozen=True)
class Scored:
    """One set's films, how they were called, and their log-odds as they are and stretched."""

    base: np.ndarray  # float64[N]
    stretched: dict[Column, np.ndarray]  # float64[N] per stretch
    anisotropy: np.ndarray  # float64[N]
    groups: list[Group]


def score_set(
    score: Scorer, pixels: torch.Tensor, factors: tuple[float, ...]
) -> tuple[np.ndarray, dict[Column, np.ndarray]]:
    base = score(pixels)
    return base, {(axis, f): score(stretch(pixels, f, axis)) for axis in AXES for f in factors}


def held_out_groups(labels: np.ndarray, called: np.ndarray) -> list[Group]:
    """occlusion_check's outcome groups, plus the false negatives, over the test films."""
    outcomes = {**GROUPS, "false negatives": (1, False)}
    return [Group(f"test {name}", (labels == label) & (called == call)) for name, (label, call) in outcomes.items()]


def report(scored: list[Scored], threshold: float, factors: tuple[float, ...]) -> list[str]:
    """Anisotropy per group with its two AUCs, then the stretch table and the calls it changes."""
    lines = ["| group | films | median anisotropy (IQR) |", "|---|---|---|"]
    for s in scored:
        for g in s.groups:
            if g.members.any():
                q1, med, q3 = np.percentile(s.anisotropy[g.members], [25, 50, 75])
                lines.append(f"| {g.name} | {int(g.members.sum())} | {med:.3f} ({q1:.3f}-{q3:.3f}) |")
    by_name = {g.name: (s, g.members) for s in scored for g in s.groups}
    lines.append("")
    for positive, negative in (
        ("validation PNEUMONIA", "validation NORMAL"),
        ("test false positives", "test true negatives"),
    ):
        if positive in by_name and negative in by_name:
            s, pos = by_name[positive]
            _, neg = by_name[negative]
            if pos.any() and neg.any():
                chosen = pos | neg
                auc = roc_auc(pos[chosen].astype(np.int64), s.anisotropy[chosen])
                lines.append(f"anisotropy rank AUC, {positive} against {negative}: {auc:.3f}")
    columns = [(axis, f) for axis in AXES for f in factors]
    names = " | ".join(f"{axis} x{f:g}" for axis, f in columns)

    def table(title: str, first: str, cell: Callable[[Scored, Column | None, np.ndarray], str]) -> list[str]:
        """One row per non-empty group: ``cell(set, column, members)``, first as they are (column None)."""
        rows = ["", title, "", f"| group | {first} | {names} |", "|---" * (len(columns) + 2) + "|"]
        for s in scored:
            for g in s.groups:
                if g.members.any():
                    cells = " | ".join(cell(s, c, g.members) for c in columns)
                    rows.append(f"| {g.name} | {cell(s, None, g.members)} | {cells} |")
        return rows

    def log_odds(s: Scored, column: Column | None, members: np.ndarray) -> str:
        if column is None:
            return f"{s.base[members].mean():+.2f}"
        return f"{(s.stretched[column][members] - s.base[members]).mean():+.2f}"

    def calls(s: Scored, column: Column | None, members: np.ndarray) -> str:
        scores = s.base if column is None else s.stretched[column]
        return str(int(np.asarray(is_pneumonia(probability(scores[members]), threshold)).sum()))

    lines += table(
        "mean calibrated log-odds as they are, and its mean change when stretched (factor > 1 widens along that axis):",
        "base log-odds",
        log_odds,
    )
    lines += table("films called PNEUMONIA, as they are and stretched:", "as they are", calls)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="exported model directory or file")
    parser.add_argument("--data", type=Path, default=eval_sets.DEFAULT_DATA)
    parser.add_argument("--factors", type=float, nargs="+", default=list(DEFAULT_FACTORS), help="stretch factors")
    parser.add_argument("--limit", type=int, default=None, help="first N images of each set (smoke runs)")
    args = parser.parse_args(argv)
    factors = tuple(args.factors)
    if any(not 0.5 <= f <= 2.0 or f == 1.0 for f in factors):
        raise SystemExit(f"--factors must lie in 0.5..2.0 and differ from 1, got {list(factors)}")

    loaded = load_model(args.model)
    meta = loaded.metadata
    score = network_scorer(loaded.network, meta.temperature)
    val = eval_sets.validation_set(args.data, meta, limit=args.limit)
    scored = []
    base, stretched = score_set(score, val.pixels, factors)
    val_groups = [Group("validation NORMAL", val.labels == 0), Group("validation PNEUMONIA", val.labels == 1)]
    scored.append(Scored(base, stretched, anisotropy(val.pixels), val_groups))
    test = eval_sets.held_out_set(args.data, meta, limit=args.limit)
    if test is not None:
        base, stretched = score_set(score, test.pixels, factors)
        called = np.asarray(is_pneumonia(probability(base), meta.threshold))
        scored.append(Scored(base, stretched, anisotropy(test.pixels), held_out_groups(test.labels, called)))
    print(f"{meta.version} ({args.model}) at {meta.spec.input_size} px; threshold {meta.threshold:.4f}")
    print(val.description + (f"; {test.description}" if test is not None else ""))
    print("\n".join(report(scored, meta.threshold, factors)))


if __name__ == "__main__":
    main()
