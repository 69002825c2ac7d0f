"""After the last epoch: calibrate the best weights on validation, report, export, and summarise the run.

Calibration sees the weights exactly as they are exported (rounded to the export dtype), and the
export carries real validation images as its golden check inputs plus the run's provenance.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from app.core.artifacts import export_model, load_model
from app.core.input_guard import fit_guard
from app.core.network import CLASS_NAMES, PneumoniaNet
from training.calibration import operating_point, rule_name
from training.checkpoint import TrainState, load_checkpoint
from training.config import TrainConfig
from training.data import ImageSet, PreparedData
from training.evaluate import evaluate_images
from training.loops import predict_logits
from training.report import compute_report_metrics, json_safe, write_report
from training.rundir import SUMMARY_FILE, git_commit, read_starts

log = logging.getLogger(__name__)


def round_to_export_dtype(network: PneumoniaNet, dtype: str) -> None:
    """Calibrate the weights exactly as they will be stored (fp16 rounding changes logits slightly)."""
    if dtype == "float16":
        with torch.no_grad():
            for tensor in network.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())


def calibrate(
    network: PneumoniaNet, val: ImageSet, config: TrainConfig, device: torch.device
) -> tuple[float, float, np.ndarray]:
    """(temperature, threshold, calibrated validation probabilities): the operating point, chosen on val only."""
    logits = predict_logits(network, val.pixels, batch_size=config.eval_batch_size(), device=device, show=True)
    return operating_point(logits, val.labels, config.threshold_method, config.target_sensitivity)


def golden_inputs(val: ImageSet, count: int) -> torch.Tensor:
    """Real validation images, both classes represented, as the export's golden check inputs."""
    labels = val.labels.numpy()
    per_class = [np.flatnonzero(labels == c).tolist() for c in range(len(CLASS_NAMES))]
    chosen: list[int] = []
    while len(chosen) < min(count, len(val)):
        for members in per_class:
            if members and len(chosen) < count:
                chosen.append(members.pop(0))
    return val.pixels[sorted(chosen)]


def data_provenance(config: TrainConfig, data: PreparedData) -> dict[str, Any]:
    """What model.json records about the data a model was trained, calibrated and guarded on."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_dir": str(config.data),
        "data_hash": data.data_hash,
        "val_source": data.val_source,
        "train_images": len(data.train),
        "train_class_counts": dict(zip(CLASS_NAMES, data.train.class_counts(), strict=True)),
        "val_images": len(data.val),
        "val_class_counts": dict(zip(CLASS_NAMES, data.val.class_counts(), strict=True)),
        "unreadable_files": len(data.skipped),
        "input_size": config.input_size,
    }


def provenance(config: TrainConfig, state: TrainState, data: PreparedData, extra: dict[str, Any]) -> dict[str, Any]:
    """What model.json records about how the model was made: data, run, arguments, code."""
    return json_safe(
        {
            **data_provenance(config, data),
            "init": config.init,
            "epochs_trained": state.epoch,
            "best_epoch": state.best_epoch,
            "best_val_auc": state.best_auc,
            "stopped_early": state.stopped_early,
            "args": config.model_dump(mode="json"),
            "torch": torch.__version__,
            **extra,
            **git_commit(),
            "starts": read_starts(config.out),
        }
    )


def finalize(
    config: TrainConfig,
    state: TrainState,
    data: PreparedData,
    network: PneumoniaNet,
    device: torch.device,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Best weights -> temperature + threshold on val -> val report -> export (-> test report) -> summary.

    ``network`` is the training network, reused (and overwritten with the best weights) to
    avoid building a second VGG16.
    """
    load_checkpoint(config.out, "best", network)
    return calibrate_and_export(config, data, network, device, provenance(config, state, data, extra))


def calibrate_and_export(
    config: TrainConfig, data: PreparedData, network: PneumoniaNet, device: torch.device, made: dict[str, Any]
) -> dict[str, Any]:
    """Round ``network`` to the export dtype, fit its operating point and input guard on ``data``, export it to
    ``config.out`` with provenance ``made``, report validation (and test), and write the run summary."""
    round_to_export_dtype(network, config.export_dtype)
    network.to(device)
    temperature, threshold, probs = calibrate(network, data.val, config, device)
    labels = data.val.labels.numpy()
    val_metrics = compute_report_metrics(labels, probs, threshold, bootstrap=config.bootstrap, seed=config.seed)
    write_report(config.out / "val_report", data.val.paths, labels, probs, val_metrics)
    log.info(
        "temperature %.3f, threshold %.4f (%s); val %s",
        temperature,
        threshold,
        config.threshold_method,
        _brief(val_metrics),
    )
    # The input guard: statistics from the training images, threshold from validation (never test).
    guard = fit_guard(
        network,
        data.train.pixels,
        data.val.pixels,
        input_size=config.input_size,
        max_false_refusal=config.guard_max_false_refusal,
        batch_size=config.eval_batch_size(),
        source=f"training split ({data.val_source})",
    )
    log.info(
        "input guard: threshold %.4f, %.2f%% of val refused",
        guard[0].threshold,
        100 * guard[0].calibration["val_refusal_rate"],
    )
    version = config.version or f"{config.out.resolve().name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    export_model(
        network.cpu(),
        config.out,
        version=version,
        golden_inputs=golden_inputs(data.val, config.golden_count),
        dtype=config.export_dtype,
        threshold=threshold,
        threshold_method=rule_name(config.threshold_method, config.target_sensitivity),
        temperature=temperature,
        metrics={"validation": val_metrics},
        provenance=made,
        guard=guard,
    )
    summary: dict[str, Any] = {
        "model": str(config.out / "model.safetensors"),
        "version": version,
        "temperature": temperature,
        "threshold": threshold,
        "validation": val_metrics,
        "unreadable": [vars(item) for item in data.skipped],
        "provenance": made,
    }
    if data.test is not None:
        summary["test"] = evaluate_images(
            load_model(config.out),
            data.test,
            config.out / "test_report",
            device=device,
            batch_size=config.eval_batch_size(),
            bootstrap=config.bootstrap,
        )
        log.info("test (reported only, never used for selection): %s", _brief(summary["test"]))
    (config.out / SUMMARY_FILE).write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return summary


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("roc_auc", "sensitivity", "specificity", "accuracy", "ece")
    return " ".join(
        f"{k}={metrics[k]:.4f}" if isinstance(metrics.get(k), float) else f"{k}={metrics.get(k)}" for k in keys
    )
