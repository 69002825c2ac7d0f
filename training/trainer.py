"""The ``train`` command: data, split, epochs with checkpoints, then calibration and export.

Resuming replays the exact same run: the split, the per-epoch shuffles, augmentations and
dropout masks are all derived from the seed and the epoch number, and the optimizer state
and learning-rate step come from the checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from app.core.engine import resolve_device
from training.checkpoint import TrainState, load_last, save_epoch
from training.components import class_weighted_loss, make_network, make_optimizer
from training.config import TrainConfig
from training.data import PreparedData, Sample, discover, prepare_data, split_hash
from training.distributed import (
    DistInfo,
    barrier,
    check_replicas_in_sync,
    configure_threads,
    init_distributed,
    place_process,
    shutdown,
)
from training.finalize import finalize
from training.finetune import check_split
from training.loops import Schedule, steps_per_epoch, train_one_epoch, validate
from training.report import json_safe
from training.run_lock import run_lock
from training.rundir import append_metrics, record_start, run_logging, write_run_files
from training.user_errors import DataError, make_dir
from training.weight_average import WeightAverage

log = logging.getLogger("training")
# Epoch e of a run seeded s shuffles, augments and drops out with seed s * EPOCH_SEED_STRIDE + e: a function
# of (s, e) alone, so a resumed run replays its epochs, and different for every pair while e < the stride,
# which is far above any epoch count.
EPOCH_SEED_STRIDE = 100_003


def train(config: TrainConfig, resuming: bool) -> dict[str, Any] | None:
    """Run (or continue) training and export; returns the summary on the main process."""
    device = resolve_device(config.device)  # the service's device policy: training and serving agree
    dist = init_distributed(device.type)
    try:
        return _train(config, resuming, dist, place_process(device, config.device, dist))
    finally:
        shutdown(dist)


def _train(config: TrainConfig, resuming: bool, dist: DistInfo, device: torch.device) -> dict[str, Any] | None:
    splits = discover(config.data)  # a layout error must not leave an empty run directory behind
    configure_threads(config.threads)
    make_dir(config.out, "--out")
    with run_lock(config.out, dist), run_logging(config.out, dist):
        return _train_locked(config, resuming, dist, device, splits)


def _train_locked(
    config: TrainConfig, resuming: bool, dist: DistInfo, device: torch.device, splits: dict[str, list[Sample]]
) -> dict[str, Any] | None:
    log.info(
        "%s run in %s on %s (%d process(es))",
        "resuming" if resuming else "starting",
        config.out,
        device,
        dist.world_size,
    )
    # The network first: a missing ImageNet file or a wrong parent model is refused before minutes of decoding.
    # A resumed run takes every weight from its checkpoint: no need for the ImageNet file or parent model again.
    network, init_source = make_network(config.model_copy(update={"init": "scratch"}) if resuming else config)
    data = prepare_data(config, splits, dist)
    _log_data(data)
    if init_source is not None and "model" in init_source:
        check_split(init_source["model"], config.model_dump(), data.val_source)
    network.to(device)
    if device.type == "cuda":
        network.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(network, config)
    per_epoch = steps_per_epoch(len(data.train), config.batch_size, dist)
    schedule = Schedule(config.resolved_lr(), round(config.warmup_epochs * per_epoch), config.epochs * per_epoch)
    average = (
        WeightAverage(network, epochs=config.ema_epochs, steps_per_epoch=per_epoch, warmup_steps=schedule.warmup_steps)
        if config.ema_epochs > 0
        else None
    )
    state = (
        _resume(config, network, optimizer, average, data)
        if resuming
        else TrainState(split_hash=split_hash(data), data_hash=data.data_hash, init_weights=init_source)
    )
    if dist.is_main:
        write_run_files(config, data, state.history)
        record_start(config.out, state.epoch)
    model: nn.Module = network
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = class_weighted_loss(data.train.labels, device, config.label_smoothing)

    for epoch in range(state.epoch, config.epochs):
        if state.stopped_early:
            break
        epoch_seed = config.seed * EPOCH_SEED_STRIDE + epoch
        torch.manual_seed(epoch_seed)  # dropout masks
        if config.freeze_features:
            network.features.eval()  # frozen BN keeps its statistics
        result = train_one_epoch(
            model,
            data.train.pixels,
            data.train.labels,
            optimizer=optimizer,
            loss_fn=loss_fn,
            schedule=schedule,
            first_step=epoch * per_epoch,
            epoch_seed=epoch_seed,
            batch_size=config.batch_size,
            augmentation=config.augmentation(),
            acquisition=config.acquisition,
            mixup=config.mixup,
            device=device,
            amp=device.type == "cuda",
            dist=dist,
            description=f"epoch {epoch + 1}/{config.epochs}",
            on_step=average.update if average is not None else None,
        )
        scored = average.network if average is not None else network
        scores = validate(scored, data.val, batch_size=config.eval_batch_size(), device=device, dist=dist)
        row = {
            "epoch": epoch + 1,
            "train_loss": result.loss,
            **scores,
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": result.images / max(result.seconds, 1e-9),
            "epoch_seconds": result.seconds,
        }
        improved = state.end_epoch(json_safe(row), scores["val_auc"], patience=config.patience, epochs=config.epochs)
        if dist.is_main:
            save_epoch(config.out, network, optimizer, state, best=improved, average=average)
            append_metrics(config.out, state.history[-1])
        barrier(dist)
        log.info(
            "epoch %d/%d train_loss %.4f val_loss %.4f val_auc %.4f (%.1f img/s)%s",
            epoch + 1,
            config.epochs,
            result.loss,
            scores["val_loss"],
            scores["val_auc"],
            row["train_images_per_s"],
            " *best*" if improved else "",
        )
        if state.stopped_early:
            log.info("early stop: no val AUC gain for %d epochs", config.patience)

    check_replicas_in_sync(network, dist)
    if not dist.is_main:
        return None
    extra = {
        "init_weights": state.init_weights,
        "world_size": dist.world_size,
        "replicas_checked_in_sync": dist.enabled,
        "device": str(device),
        "loss_class_weights": loss_fn.weight.tolist() if loss_fn.weight is not None else None,
    }
    summary = finalize(config, state, data, network, device, extra)
    log.info("exported %s (version %s)", config.out / "model.safetensors", summary["version"])
    return summary


def _log_data(data: PreparedData) -> None:
    for item in data.skipped:
        log.warning("skipped %s: %s", item.path, item.reason)
    log.info(
        "train %d images %s, val %d images %s (%s), %d file(s) skipped",
        len(data.train),
        data.train.class_counts(),
        len(data.val),
        data.val.class_counts(),
        data.val_source,
        len(data.skipped),
    )


def _resume(
    config: TrainConfig,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None,
    data: PreparedData,
) -> TrainState:
    """The checkpointed state, refused when the data no longer gives the run's train/val split, or when its
    images changed under the same names (the model's data_hash would claim every epoch saw the new ones)."""
    state = load_last(config.out, network, optimizer, average)
    if state.split_hash != split_hash(data):
        raise DataError(f"the data under {config.data} no longer gives the run's train/val split; refusing to resume")
    if state.data_hash and state.data_hash != data.data_hash:
        raise DataError(
            f"the images under {config.data} changed since the run started (same names, other content: data_hash "
            f"{state.data_hash[:12]} then, {data.data_hash[:12]} now); refusing to resume: restore the data, "
            "or start a new run (another --out)"
        )
    log.info("resumed after epoch %d (best val AUC %s at epoch %s)", state.epoch, state.best_auc, state.best_epoch)
    return state
