"""``evaluate``: score an exported model on a labelled folder at its stored threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.artifacts import LoadedModel, load_model
from app.core.decision import pneumonia_probability
from training.data import ImageSet, discover, load_images
from training.loops import predict_logits
from training.report import compute_report_metrics, write_report
from training.user_errors import DataError


def evaluate_images(
    loaded: LoadedModel,
    images: ImageSet,
    report_dir: Path,
    *,
    device: torch.device,
    batch_size: int,
    bootstrap: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Probabilities with the model's temperature, metrics at its threshold, and the report files.

    ``extra`` (e.g. the unreadable files) is stored in metrics.json alongside the metrics.
    """
    network = loaded.network.to(device)
    logits = predict_logits(network, images.pixels, batch_size=batch_size, device=device, show=True)
    probs = pneumonia_probability(logits, loaded.metadata.temperature).numpy().astype(np.float64)
    labels = images.labels.numpy()
    metrics = {**compute_report_metrics(labels, probs, loaded.metadata.threshold, bootstrap=bootstrap), **(extra or {})}
    write_report(report_dir, images.paths, labels, probs, metrics)
    return metrics


def run_evaluate(
    weights: Path,
    data: Path,
    report_dir: Path,
    *,
    split: str,
    device: torch.device,
    batch_size: int,
    workers: int,
    bootstrap: int,
) -> dict[str, Any]:
    loaded = load_model(weights)
    splits = discover(data)
    name = "all" if "all" in splits else split
    if name not in splits:
        raise DataError(f"{data}: no '{split}' split (found {', '.join(sorted(splits))}); choose one with --split")
    decoded = load_images(splits[name], loaded.metadata.spec.input_size, workers=workers, cache_dir=None)
    extra = {
        "model_version": loaded.metadata.version,
        "data_hash": decoded.content_hash,
        "unreadable": [vars(item) for item in decoded.skipped],
    }
    return evaluate_images(
        loaded, decoded.images, report_dir, device=device, batch_size=batch_size, bootstrap=bootstrap, extra=extra
    )
