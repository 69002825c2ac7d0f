"""Write an evaluation report directory: metrics.json, predictions.csv and the four plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from app.core.decision import decide
from app.core.network import CLASS_NAMES
from training import plots
from training.metrics import binary_metrics, bootstrap_ci

PLOT_FILES = ("roc.png", "pr.png", "confusion.png", "reliability.png")


def json_safe(value: Any) -> Any:
    """NaN/inf become null: strict JSON readers (and model.json consumers) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def compute_report_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float, *, bootstrap: int, seed: int = 0
) -> dict[str, Any]:
    metrics: dict[str, Any] = binary_metrics(labels, probs, threshold)
    if bootstrap > 0:
        metrics["ci95"] = bootstrap_ci(labels, probs, threshold, n_boot=bootstrap, seed=seed)
    return json_safe(metrics)


def write_report(
    report_dir: Path, paths: list[str], labels: np.ndarray, probs: np.ndarray, metrics: dict[str, Any]
) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    threshold = float(metrics["threshold"])
    # a file name that is not UTF-8 is written with backslash escapes: the report stays valid UTF-8
    with (report_dir / "predictions.csv").open("w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "probability", "prediction"])
        for path, label, prob in zip(paths, labels.tolist(), probs.tolist(), strict=True):
            writer.writerow([path, CLASS_NAMES[label], f"{prob:.6f}", decide(prob, threshold).label])
    nan = float("nan")
    auc = metrics["roc_auc"] if metrics["roc_auc"] is not None else nan
    if 0 < int(labels.sum()) < len(labels):
        plots.plot_roc(labels, probs, auc, threshold, report_dir / "roc.png")
        plots.plot_pr(labels, probs, metrics["pr_auc"], report_dir / "pr.png")
    plots.plot_confusion(metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"], report_dir / "confusion.png")
    plots.plot_reliability(labels, probs, metrics["ece"], report_dir / "reliability.png")
