"""The ``train`` command: data, split, epochs with checkpoints, then calibration and export.

Resuming replays the exact same run: the split, the per-epoch shuffles, augmentations and
dropout masks are all derived from the seed and the epoch number, and the optimizer state
and learning-rate step come from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from app.core.artifacts import export_model, load_model
from app.core.decision import pneumonia_probability
from app.core.engine import resolve_device
from app.core.network import CLASS_NAMES, PneumoniaNet, build_model
from training.calibration import fit_temperature, select_threshold
from training.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from training.config import RESUME_OVERRIDABLE, TrainConfig, flag
from training.data import ImageSet, Sample, Skipped, discover, limit_per_class, load_images
from training.distributed import DistInfo, barrier, gather_rows, init_distributed, shutdown
from training.evaluate import evaluate_images
from training.imagenet import load_imagenet
from training.loops import Schedule, predict_logits, steps_per_epoch, train_one_epoch
from training.metrics import roc_auc
from training.report import compute_report_metrics, json_safe, write_report
from training.split import grouped_stratified_split, patient_id
from training.user_errors import DataError, UsageError

log = logging.getLogger("training")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SPLIT_FILE = "split.json"


class TrainState(BaseModel):
    """Scalars saved with every checkpoint; ``epoch`` is the number of completed epochs."""

    epoch: int = 0
    best_auc: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    stopped_early: bool = False
    split_hash: str = ""
    history: list[dict[str, Any]] = Field(default_factory=list)


def resolve_config(cli: dict[str, Any], resume: str | None) -> tuple[TrainConfig, bool]:
    """Merge CLI values with a stored run's config; returns (config, resuming).

    ``cli`` holds only flags given explicitly. ``resume`` is a run directory, ``"auto"`` (bare
    ``--resume``: continue ``--out`` if it holds a checkpoint, else start it) or ``None``.
    """
    if resume is None:
        config = TrainConfig(**cli)
        if has_checkpoint(config.out):
            raise UsageError(
                f"{config.out} already holds a training run; pass --resume to continue it or choose another --out"
            )
        return config, False
    if resume == "auto":
        if "out" not in cli:
            raise UsageError("--resume without a directory needs --out")
        run_dir = Path(cli["out"])
        if not has_checkpoint(run_dir):
            log.info("no checkpoint in %s yet: starting a new run", run_dir)
            return TrainConfig(**cli), False
    else:
        run_dir = Path(resume)
    config_path = run_dir / CONFIG_FILE
    if not (config_path.is_file() and has_checkpoint(run_dir)):
        raise UsageError(f"cannot resume: {run_dir} has no {CONFIG_FILE} and checkpoint/last.*")
    stored = json.loads(config_path.read_text())
    stored["out"] = str(run_dir)
    original, merged = TrainConfig(**stored), TrainConfig(**{**stored, **cli})
    changed = [k for k in cli if k not in RESUME_OVERRIDABLE and getattr(merged, k) != getattr(original, k)]
    if changed:
        flags = ", ".join(f"{flag(k)} (run has {getattr(original, k)})" for k in changed)
        raise UsageError(f"cannot change {flags} when resuming {run_dir}")
    return merged, True


def place_process(device: torch.device, requested: str, dist: DistInfo) -> torch.device:
    """Under torchrun each process takes its local GPU, unless ``--device`` named one."""
    if device.type == "cuda":
        if dist.enabled and requested in ("auto", "cuda"):
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def configure_threads(config: TrainConfig) -> None:
    """Share the CPU cores between the processes torchrun started on this machine."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(config.threads or max(1, len(os.sched_getaffinity(0)) // local_world))


def setup_logging(run_dir: Path, dist: DistInfo) -> None:
    root = logging.getLogger("training")
    root.setLevel(logging.INFO if dist.is_main else logging.ERROR)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if dist.is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


@dataclass
class PreparedData:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    skipped: list[Skipped]
    data_hash: str
    val_source: str


def _decode_all(config: TrainConfig, samples: dict[str, list[Sample]], dist: DistInfo) -> dict[str, Any]:
    """Decode every split; with a cache the main process decodes first and the others read its cache."""
    cache_dir = config.out / "cache" if config.cache else None

    def decode() -> dict[str, Any]:
        return {
            name: load_images(files, config.input_size, workers=config.workers, cache_dir=cache_dir)
            for name, files in samples.items()
        }

    decoded = decode() if dist.is_main or cache_dir is None else None
    barrier(dist)
    return decoded if decoded is not None else decode()


def prepare_data(config: TrainConfig, splits: dict[str, list[Sample]], dist: DistInfo) -> PreparedData:
    samples = {("train" if name == "all" else name): files for name, files in splits.items()}
    if "train" not in samples:
        raise DataError(f"{config.data}: no train split (expected {config.data}/train/{{NORMAL,PNEUMONIA}})")
    if config.limit_per_class is not None:
        samples = {name: limit_per_class(files, config.limit_per_class, config.seed) for name, files in samples.items()}
    decoded = _decode_all(config, samples, dist)
    train = decoded["train"].images
    val = decoded["val"].images if "val" in decoded else None
    if val is not None and len(val) >= config.min_val_images and min(val.class_counts()) > 0:
        val_source = "provided val split"
    else:
        why = "missing" if val is None else f"too small ({len(val)} images) or one-class"
        val_source = (
            f"patient-grouped split of train (val split {why}; fraction {config.val_fraction}, seed {config.seed})"
        )
        train_index, val_index = grouped_stratified_split(
            train.paths, train.labels.numpy(), config.val_fraction, config.seed
        )
        train, val = train.subset(train_index), train.subset(val_index)
    skipped = [item for result in decoded.values() for item in result.skipped]
    data_hash = hashlib.sha256(
        "".join(f"{k}:{v.content_hash}\n" for k, v in sorted(decoded.items())).encode()
    ).hexdigest()
    test = decoded["test"].images if "test" in decoded else None
    return PreparedData(train, val, test, skipped, data_hash, val_source)


def split_hash(data: PreparedData) -> str:
    """Identifies which files are on which side, so a resume on changed data is refused."""
    digest = hashlib.sha256()
    for side, images in (("train", data.train), ("val", data.val)):
        for path in sorted(Path(p).name for p in images.paths):
            digest.update(f"{side}:{path}\n".encode())
    return digest.hexdigest()


def write_split(run_dir: Path, data: PreparedData) -> None:
    record = {
        side: [
            {"path": path, "label": CLASS_NAMES[label], "patient": patient_id(path)}
            for path, label in zip(images.paths, images.labels.tolist(), strict=True)
        ]
        for side, images in (("train", data.train), ("val", data.val))
    }
    (run_dir / SPLIT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def make_network(config: TrainConfig) -> tuple[PneumoniaNet, str | None]:
    torch.manual_seed(config.seed)
    network = build_model(config.model_spec())
    source = str(load_imagenet(network, config.imagenet_weights)) if config.init == "imagenet" else None
    if config.freeze_features:
        network.features.requires_grad_(False)
    return network, source


def make_optimizer(network: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases and batch-norm parameters (1-D tensors), as in torchvision's recipe."""
    params = [p for p in network.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.resolved_weight_decay()},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.opt == "sgd":
        return torch.optim.SGD(
            groups, lr=config.resolved_lr(), momentum=config.momentum, nesterov=config.momentum > 0, foreach=True
        )
    return torch.optim.AdamW(groups, lr=config.resolved_lr(), foreach=True)


def class_weighted_loss(labels: torch.Tensor, device: torch.device) -> nn.Module:
    """Weights n / (classes * n_c): both classes contribute equally despite the ~2.9:1 imbalance."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).double()
    weights = counts.sum() / (len(CLASS_NAMES) * counts.clamp(min=1))
    return nn.CrossEntropyLoss(weight=weights.float().to(device))


def validate(
    network: PneumoniaNet, val: ImageSet, config: TrainConfig, device: torch.device, dist: DistInfo
) -> dict[str, float]:
    """Val AUC / loss / accuracy at 0.5, each rank predicting a shard."""
    shard = val.pixels[dist.rank :: dist.world_size]
    logits = predict_logits(
        network, shard, batch_size=config.batch_size * 2, device=device, amp=True, show=dist.is_main
    )
    logits = gather_rows(logits, len(val), dist)
    probs = pneumonia_probability(logits).numpy()
    labels = val.labels.numpy()
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, val.labels)),
        "val_auc": roc_auc(labels, probs),
        "val_accuracy_at_0.5": float(np.mean((probs >= 0.5) == labels)),
    }


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--", "app", "training"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


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


def round_to_export_dtype(network: PneumoniaNet, dtype: str) -> None:
    """Calibrate the weights exactly as they will be stored (fp16 rounding changes logits slightly)."""
    if dtype == "float16":
        with torch.no_grad():
            for tensor in network.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half().float())


def finalize(
    config: TrainConfig,
    state: TrainState,
    data: PreparedData,
    network: PneumoniaNet,
    device: torch.device,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Best weights -> temperature + threshold on val -> val report -> export (-> test report).

    ``network`` is the training network, reused (and overwritten with the best weights) to
    avoid building a second VGG16.
    """
    load_checkpoint(config.out, "best", network)
    round_to_export_dtype(network, config.export_dtype)
    network.to(device)
    logits = predict_logits(network, data.val.pixels, batch_size=config.batch_size * 2, device=device, show=True)
    labels = data.val.labels
    temperature = fit_temperature(logits, labels)
    probs = pneumonia_probability(logits, temperature).numpy().astype(np.float64)
    threshold = select_threshold(labels.numpy(), probs, config.threshold_method, config.target_sensitivity)
    val_metrics = compute_report_metrics(labels.numpy(), probs, threshold, bootstrap=config.bootstrap, seed=config.seed)
    write_report(config.out / "val_report", data.val.paths, labels.numpy(), probs, val_metrics)
    log.info(
        "temperature %.3f, threshold %.4f (%s); val %s",
        temperature,
        threshold,
        config.threshold_method,
        _brief(val_metrics),
    )
    provenance = json_safe(
        {
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
            "init": config.init,
            "epochs_trained": state.epoch,
            "best_epoch": state.best_epoch,
            "best_val_auc": state.best_auc,
            "stopped_early": state.stopped_early,
            "args": config.model_dump(mode="json"),
            "torch": torch.__version__,
            **extra,
            **git_commit(),
        }
    )
    version = config.version or f"{config.out.resolve().name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    export_model(
        network.cpu(),
        config.out,
        version=version,
        golden_inputs=golden_inputs(data.val, config.golden_count),
        dtype=config.export_dtype,
        threshold=threshold,
        threshold_method=config.threshold_method
        if config.threshold_method == "youden"
        else f"sensitivity>={config.target_sensitivity}",
        temperature=temperature,
        metrics={"validation": val_metrics},
        provenance=provenance,
    )
    summary: dict[str, Any] = {
        "model": str(config.out / "model.safetensors"),
        "version": version,
        "temperature": temperature,
        "threshold": threshold,
        "validation": val_metrics,
        "unreadable": [vars(item) for item in data.skipped],
        "provenance": provenance,
    }
    if data.test is not None:
        loaded = load_model(config.out)
        summary["test"] = evaluate_images(
            loaded,
            data.test,
            config.out / "test_report",
            device=device,
            batch_size=config.batch_size * 2,
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
    configure_threads(config)
    config.out.mkdir(parents=True, exist_ok=True)
    setup_logging(config.out, dist)
    log.info(
        "%s run in %s on %s (%d process(es))",
        "resuming" if resuming else "starting",
        config.out,
        device,
        dist.world_size,
    )
    data = prepare_data(config, splits, dist)
    for item in data.skipped:
        log.warning("skipped unreadable image %s: %s", item.path, item.reason)
    log.info(
        "train %d images %s, val %d images %s (%s), %d unreadable skipped",
        len(data.train),
        data.train.class_counts(),
        len(data.val),
        data.val.class_counts(),
        data.val_source,
        len(data.skipped),
    )
    # A resumed run takes every weight from its checkpoint: no need for the ImageNet file again.
    network, imagenet_source = make_network(config.model_copy(update={"init": "scratch"}) if resuming else config)
    network.to(device)
    if device.type == "cuda":
        network.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(network, config)
    state = TrainState(split_hash=split_hash(data))
    if resuming:
        meta = load_checkpoint(config.out, "last", network, optimizer)
        stored = TrainState(**meta["state"])
        if stored.split_hash != state.split_hash:
            raise DataError(
                f"the data under {config.data} no longer gives the run's train/val split; refusing to resume"
            )
        state = stored
        log.info("resumed after epoch %d (best val AUC %s at epoch %s)", state.epoch, state.best_auc, state.best_epoch)
    if dist.is_main:
        (config.out / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
        write_split(config.out, data)
        (config.out / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in state.history))
    model: nn.Module = network
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    per_epoch = steps_per_epoch(len(data.train), config.batch_size, dist)
    schedule = Schedule(config.resolved_lr(), round(config.warmup_epochs * per_epoch), config.epochs * per_epoch)
    loss_fn = class_weighted_loss(data.train.labels, device)
    amp = device.type == "cuda"
    for epoch in range(state.epoch, config.epochs):
        if state.stopped_early:
            break
        epoch_seed = config.seed * 100_003 + epoch
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
            aug_strength=config.aug_strength,
            hflip=config.hflip,
            device=device,
            amp=amp,
            dist=dist,
            description=f"epoch {epoch + 1}/{config.epochs}",
        )
        scores = validate(network, data.val, config, device, dist)
        improved = state.best_auc is None or scores["val_auc"] > state.best_auc
        row = {
            "epoch": epoch + 1,
            "train_loss": result.loss,
            **scores,
            "lr": optimizer.param_groups[0]["lr"],
            "train_images_per_s": result.images / max(result.seconds, 1e-9),
            "epoch_seconds": result.seconds,
            "best": improved,
        }
        state.epoch = epoch + 1
        state.history.append(json_safe(row))
        if improved:
            state.best_auc, state.best_epoch, state.epochs_since_best = scores["val_auc"], epoch + 1, 0
        else:
            state.epochs_since_best += 1
        state.stopped_early = (
            config.patience > 0 and state.epochs_since_best >= config.patience and state.epoch < config.epochs
        )
        if dist.is_main:
            if improved:
                save_checkpoint(config.out, "best", network, {"state": state.model_dump(mode="json")}, None)
            save_checkpoint(config.out, "last", network, {"state": state.model_dump(mode="json")}, optimizer)
            with (config.out / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(state.history[-1]) + "\n")
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
    if not dist.is_main:
        return None
    extra = {"imagenet_weights": imagenet_source, "world_size": dist.world_size, "device": str(device)}
    summary = finalize(config, state, data, network, device, extra)
    log.info("exported %s (version %s)", config.out / "model.safetensors", summary["version"])
    return summary
