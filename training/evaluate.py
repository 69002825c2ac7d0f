"""``evaluate``: score an exported model on a labelled folder at its stored threshold.

Also reports the input guard's refusal rate on that folder (chest X-rays it would refuse) and,
with ``ood``, per subfolder of a folder of other images (what it should refuse).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.artifacts import LoadedModel, compute_guard_scores, load_model
from app.core.decision import pneumonia_probability
from app.core.input_guard import detail, judge
from app.core.preprocessing import preprocess_file
from training.data import ImageSet, discover, load_images, log_passed_over, passed_over
from training.loops import predict_logits
from training.report import compute_report_metrics, write_report
from training.user_errors import DataError, UsageError, make_dir


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
    if loaded.guard is not None:
        metrics["input_guard"] = guard_refusals(loaded, images.pixels, batch_size)
    write_report(report_dir, images.paths, labels, probs, metrics)
    return metrics


def guard_refusals(loaded: LoadedModel, pixels: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """How many of these images the model's input guard refuses, judged as the service judges them (the
    score against the threshold, and the fine detail against the floor when the guard has one)."""
    spec, stats = loaded.metadata.guard, loaded.guard
    if spec is None or stats is None:
        raise DataError(f"model {loaded.metadata.version} has no input guard to report on")
    scores = (
        torch.cat(
            [compute_guard_scores(loaded.network, batch, spec, stats) for batch in torch.split(pixels, batch_size)]
        )
        if len(pixels)
        else torch.zeros(0)
    )
    details: list[float | None] = detail(pixels).tolist() if spec.detail_floor is not None else [None] * len(scores)
    verdicts = [judge(spec, score, fine) for score, fine in zip(scores.tolist(), details, strict=True)]
    refused = sum(not verdict.passed for verdict in verdicts)
    return {
        "threshold": spec.threshold,
        "detail_floor": spec.detail_floor,
        "n": len(scores),
        "refused": refused,
        "refusal_rate": refused / len(scores) if len(scores) else None,
        "low_detail": sum(fine is not None and not fine >= spec.detail_floor for fine in details),  # type: ignore[operator]
    }


def ood_refusals(loaded: LoadedModel, root: Path, batch_size: int) -> dict[str, dict[str, Any]]:
    """The guard's refusal rate per subfolder of ``root`` (images found recursively; unreadable ones counted apart)."""
    if not root.is_dir():
        raise DataError(f"--ood {root} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"--ood {root} has no subfolders (one per category of other images)")
    size = loaded.metadata.spec.input_size
    report = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        prepared = [preprocess_file(path, size) for path in files]
        pixels = [item.pixels for item in prepared if item.pixels is not None]
        stacked = torch.stack(pixels) if pixels else torch.zeros((0, 1, size, size), dtype=torch.uint8)
        report[folder.name] = {**guard_refusals(loaded, stacked, batch_size), "unreadable": len(files) - len(pixels)}
    return report


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
    ood: Path | None = None,
) -> dict[str, Any]:
    """Score the model at ``weights`` on the ``split`` of ``data``; the report goes to ``report_dir``."""
    numbers = (("--batch-size", batch_size, 1), ("--workers", workers, 1), ("--bootstrap", bootstrap, 0))
    for option, value, least in numbers:
        if value < least:
            raise UsageError(f"{option} must be at least {least}, got {value}")
    if not weights.exists():  # the loader would name the model.json it looked for, not what was given
        raise UsageError(f"--weights {weights} not found")
    loaded = load_model(weights)
    splits = discover(data, one_class=True)  # a set of normal films alone is scored for specificity
    name = "all" if "all" in splits else split
    if name not in splits:
        raise DataError(f"{data}: no '{split}' split (found {', '.join(sorted(splits))}); choose one with --split")
    make_dir(report_dir, "--report")  # now, not after minutes of scoring
    unused = passed_over(splits, [name])
    log_passed_over(unused)
    decoded = load_images(splits[name], loaded.metadata.spec.input_size, workers=workers, cache_dir=None)
    extra = {
        "model_version": loaded.metadata.version,
        "data_hash": decoded.content_hash,
        "unreadable": [vars(item) for item in unused + decoded.skipped],
    }
    if ood is not None:
        if loaded.guard is None:
            raise DataError(f"--ood: model {loaded.metadata.version} has no input guard to report on")
        loaded.network.to(device)
        extra["ood"] = ood_refusals(loaded, ood, batch_size)
    return evaluate_images(
        loaded, decoded.images, report_dir, device=device, batch_size=batch_size, bootstrap=bootstrap, extra=extra
    )
