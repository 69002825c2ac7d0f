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
- ``--out`` already holds a model (an export is never overwritten);
- with several candidate fractions, none keeps the parent's validation AUC (``training.mix_choice``).

Several fractions are candidates: each is scored on validation against the parent, exactly as it would be
exported (rounded to the export dtype), and the rule of ``training.mix_choice`` keeps one; the scores of
all of them go into ``provenance.weight_mix.choice``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.artifacts import LoadedModel
from app.core.engine import resolve_device
from app.core.network import PneumoniaNet
from training.config import TrainConfig
from training.data import PreparedData, data_hash, discover, prepare_data
from training.distributed import DistInfo, configure_threads
from training.finalize import calibrate_and_export, data_provenance, round_to_export_dtype
from training.finetune import load_exported
from training.loops import predict_logits
from training.mix_choice import RESAMPLES, RULE, NoFractionError, choose, score_candidates
from training.report import json_safe
from training.run_lock import run_lock
from training.rundir import git_commit, refuse_overwriting_a_model, run_logging
from training.user_errors import DataError, UsageError, make_dir
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


def _choose_on_validation(
    parent: PneumoniaNet,
    far: PneumoniaNet,
    fractions: list[float],
    config: TrainConfig,
    data: PreparedData,
    device: torch.device,
) -> tuple[float, dict[str, Any]]:
    """The fraction ``mix_choice.choose`` keeps, and the record of every candidate's score."""

    def log_odds(network: PneumoniaNet) -> np.ndarray:
        logits = predict_logits(network.to(device), data.val.pixels, batch_size=config.eval_batch_size(), device=device)
        network.cpu()  # the parent goes on to be mixed with CPU tensors
        return (logits[:, 1] - logits[:, 0]).double().numpy()

    def exported(fraction: float) -> PneumoniaNet:
        network = mix(parent, far, fraction)
        round_to_export_dtype(network, config.export_dtype)
        return network

    labels = data.val.labels.numpy()
    candidates = score_candidates(labels, log_odds(parent), {f: log_odds(exported(f)) for f in set(fractions)})
    for candidate in candidates:
        log.info(
            "fraction %g: val AUC %+.4f (%+.4f to %+.4f) against the parent",
            candidate.fraction,
            candidate.val_auc_difference,
            candidate.low,
            candidate.high,
        )
    try:
        chosen = choose(candidates)
    except NoFractionError as exc:
        raise UsageError(f"--fraction: {exc}") from exc
    record = {"rule": RULE, "resamples": RESAMPLES, "candidates": [c.model_dump() for c in candidates]}
    return chosen.fraction, record


def run_mix(
    parent_path: Path,
    tuned_paths: list[Path],
    fractions: list[float],
    *,
    data: Path,
    out: Path,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Mix (towards the soup of ``tuned_paths``) at the one fraction given or the one the validation rule keeps
    of several, calibrate on validation, fit the guard and export to ``out``; returns the run summary."""
    refuse_overwriting_a_model(out)
    parent = load_exported("--parent", parent_path)
    tuned = [load_exported("--tuned", path) for path in tuned_paths]
    try:
        far = soup(parent, tuned)
    except LineageError as exc:
        raise UsageError(f"--tuned: {exc}") from exc
    config = mix_config(tuned[0], data=data, out=out, overrides=overrides)
    splits = discover(config.data)
    configure_threads(config.threads)
    make_dir(out, "--out")
    single = DistInfo()  # one process: nothing is trained, so there is nothing to spread
    with run_lock(out, single), run_logging(out, single):  # one mix per directory, as one run
        found = data_hash(config, splits)  # from the bytes: other data is refused before minutes of decoding
        for model in tuned:
            trained_on = model.metadata.provenance.get("data_hash")
            if found != trained_on:
                raise DataError(
                    f"the data under {data} is not the data {model.metadata.version} was trained on "
                    f"(data_hash {found[:12]} vs {str(trained_on)[:12]}): its validation split could hold "
                    "images the models trained on"
                )
        prepared = prepare_data(config, splits, single)
        device = resolve_device(config.device)
        fraction, choice = fractions[0], {}
        if len(set(fractions)) > 1:
            fraction, record = _choose_on_validation(parent.network, far, fractions, config, prepared, device)
            choice = {"choice": record}
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
                    **choice,
                },
                "args": config.model_dump(mode="json"),
                "torch": torch.__version__,
                **git_commit(),
            }
        )
        return calibrate_and_export(config, prepared, network, device, made)
