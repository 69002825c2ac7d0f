"""The ``mix`` command: export a point between a model and its own fine-tune as a model the service loads.

``ensemble_check --weight-mix`` scores points of that line (EXPERIMENTS.md, E27); this makes one of
them a model like any trained one: the same verified loading of both ends, the same calibration of
temperature and threshold on validation, the same input guard fitted on train and validation, the
same golden outputs and sha256. Nothing is trained, so what it needs is the fine-tune's data, split
and export settings, and it takes them from the fine-tune's own ``provenance.args``. Several
fine-tunes of the parent make a soup (their mean) as the far end. Refusals:
- a fine-tune was not fine-tuned from the parent, or the networks differ (``check_lineage``);
- the data under ``--data`` is not the data each fine-tune was trained on (``provenance.data_hash``):
  the same split of other files would calibrate on images the models may have trained on;
- ``--out`` already holds a model (an export is never overwritten).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from app.core.artifacts import LoadedModel
from app.core.engine import resolve_device
from training.config import TrainConfig
from training.data import discover, prepare_data
from training.distributed import DistInfo, configure_threads
from training.finalize import calibrate_and_export, data_provenance
from training.finetune import load_exported
from training.report import json_safe
from training.rundir import git_commit, setup_logging
from training.user_errors import DataError, UsageError
from training.weight_mix import LineageError, mix, soup

log = logging.getLogger("training.mix")


def _record(path: Path, model: LoadedModel) -> dict[str, str]:
    return {"path": str(path), "version": model.metadata.version, "sha256": model.metadata.sha256}


def mix_config(tuned: LoadedModel, *, data: Path, out: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The fine-tune's own settings (split, preprocessing, operating-point rule, export dtype) with a new
    data path and output directory; nothing is initialised or trained, so the init flags are cleared."""
    args = tuned.metadata.provenance.get("args")
    if not isinstance(args, dict):
        raise UsageError(f"--tuned: {tuned.metadata.version} records no training arguments (provenance.args)")
    return TrainConfig(
        **{
            **args,
            "data": data,
            "out": out,
            "init": "scratch",
            "init_model": None,
            "imagenet_weights": None,
            "version": None,
            **overrides,
        }
    )


def run_mix(
    parent_path: Path, tuned_paths: list[Path], fraction: float, *, data: Path, out: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """Mix (towards the soup of ``tuned_paths``), calibrate on validation, fit the guard and export to ``out``;
    returns the run summary."""
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"--fraction must lie in [0, 1], not {fraction}")
    if (out / "model.json").exists() or (out / "model.safetensors").exists():
        raise UsageError(f"--out {out} already holds a model; choose another directory")
    parent = load_exported("--parent", parent_path)
    tuned = [load_exported("--tuned", path) for path in tuned_paths]
    try:
        far = soup(parent, tuned)
    except LineageError as exc:
        raise UsageError(f"--tuned: {exc}") from exc
    config = mix_config(tuned[0], data=data, out=out, overrides=overrides)
    splits = discover(config.data)
    configure_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)
    single = DistInfo()  # one process: nothing is trained, so there is nothing to spread
    setup_logging(out, single)
    prepared = prepare_data(config, splits, single)
    for model in tuned:
        trained_on = model.metadata.provenance.get("data_hash")
        if prepared.data_hash != trained_on:
            raise DataError(
                f"the data under {data} is not the data {model.metadata.version} was trained on "
                f"(data_hash {prepared.data_hash[:12]} vs {str(trained_on)[:12]}): its validation split could hold "
                "images the models trained on"
            )
    network = mix(parent.network, far, fraction)
    log.info(
        "mixed %s and %s at %.3f of the way (validated on %s)",
        parent.metadata.version,
        " + ".join(model.metadata.version for model in tuned),
        fraction,
        prepared.val_source,
    )
    made = json_safe(
        {
            **data_provenance(config, prepared),
            "weight_mix": {
                "fraction": fraction,
                "parent": _record(parent_path, parent),
                "tuned": [_record(path, model) for path, model in zip(tuned_paths, tuned, strict=True)],
            },
            "args": config.model_dump(mode="json"),
            "torch": torch.__version__,
            **git_commit(),
        }
    )
    return calibrate_and_export(config, prepared, network, resolve_device(config.device), made)
