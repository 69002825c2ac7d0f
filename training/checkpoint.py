"""Per-epoch training checkpoints without pickle: tensors in safetensors, everything else in JSON.

``checkpoint/last.*`` holds model + optimizer state (and the weight average, when the run keeps one)
to resume exactly; ``checkpoint/best.*`` holds the weights with the best validation ROC AUC (the
average's, when there is one), which is what gets exported.
Files are written to a temporary name, flushed and renamed, so an interrupted write never leaves a
truncated checkpoint behind. The two renames of a pair cannot be one, so the tensor file carries the
sha256 of its JSON: a kill between them is found on load (and completed from the leftover temporary
JSON), never read as epoch N's weights under epoch N-1's state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from app.durable_files import replace_durably
from training.user_errors import UsageError
from training.weight_average import WeightAverage

CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1
_MODEL = "model."
_OPTIM = "optim."
_AVERAGE = "average."
# safetensors metadata key: the sha256 of the JSON written with these tensors (absent before it was stamped).
_PAIR_KEY = "json_sha256"
log = logging.getLogger(__name__)


class TrainState(BaseModel):
    """Scalars saved with every checkpoint; ``epoch`` is the number of completed epochs."""

    epoch: int = 0
    best_auc: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    stopped_early: bool = False
    split_hash: str = ""
    # The data's content (training.data's data_hash); "" in runs saved before it was kept.
    data_hash: str = ""
    # What the first epoch started from (ImageNet file, parent model), kept so a resumed run still says so.
    init_weights: dict[str, Any] | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)

    def end_epoch(self, row: dict[str, Any], val_auc: float, *, patience: int, epochs: int) -> bool:
        """Record a finished epoch (``row`` JSON-safe); True when its val AUC is the best so far.

        Early stopping is part of the saved state, so a resumed run stops where the uninterrupted one would.
        """
        improved = self.best_auc is None or val_auc > self.best_auc
        self.epoch = row["epoch"]
        self.history.append({**row, "best": improved})
        if improved:
            self.best_auc, self.best_epoch, self.epochs_since_best = val_auc, self.epoch, 0
        else:
            self.epochs_since_best += 1
        self.stopped_early = patience > 0 and self.epochs_since_best >= patience and self.epoch < epochs
        return improved


def checkpoint_paths(run_dir: Path, name: str) -> tuple[Path, Path]:
    base = run_dir / CHECKPOINT_DIR / name
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name[len(_OPTIM) :].split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists; torch's optimizers expect the original types.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _write(run_dir: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    weights, info = checkpoint_paths(run_dir, name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp_weights, tmp_info = weights.with_suffix(".tmp.safetensors"), info.with_suffix(".tmp.json")
    text = (json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2) + "\n").encode()
    tmp_info.write_bytes(text)
    save_file(tensors, str(tmp_weights), metadata={_PAIR_KEY: hashlib.sha256(text).hexdigest()})
    replace_durably([(tmp_weights, weights), (tmp_info, info)])


def _settle_pair(weights: Path, info: Path) -> bool:
    """Whether ``weights`` and ``info`` come from one save, after finishing a save killed between its renames.

    Such a kill leaves the new tensors beside the old JSON, and the new JSON under its temporary name:
    renaming it completes the save. A pair written before pairs were stamped counts as one save.
    """
    with safe_open(str(weights), "pt") as handle:
        stamp = (handle.metadata() or {}).get(_PAIR_KEY)
    if stamp is None or hashlib.sha256(info.read_bytes()).hexdigest() == stamp:
        return True
    leftover = info.with_suffix(".tmp.json")
    if leftover.is_file() and hashlib.sha256(leftover.read_bytes()).hexdigest() == stamp:
        replace_durably([(leftover, info)])
        log.warning("completed the save of %s that was interrupted between its two renames", info)
        return True
    return False


def _damaged(run_dir: Path, name: str, exc: Exception) -> UsageError:
    detail = str(exc).splitlines()[0] if str(exc) else "no detail"
    return UsageError(
        f"the '{name}' checkpoint in {run_dir / CHECKPOINT_DIR} is damaged ({type(exc).__name__}: {detail}): "
        "restore it, or start a new run (another --out)"
    )


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{_MODEL}{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    run_dir: Path,
    name: str,
    model: torch.nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None,
    average: WeightAverage | None = None,
) -> None:
    """Write ``name`` (``last`` or ``best``); ``meta`` is the JSON training state (epoch, history, ...)."""
    tensors = model_tensors(model)
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
        meta = {**meta, "optimizer": optim_meta}
    if average is not None:
        tensors.update({_AVERAGE + k: v for k, v in average.state_tensors().items()})
    _write(run_dir, name, tensors, meta)


def load_checkpoint(
    run_dir: Path,
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    average: WeightAverage | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer state and weight average when given) in place; return the JSON training state."""
    weights, info = checkpoint_paths(run_dir, name)
    if not (weights.is_file() and info.is_file()):
        raise UsageError(f"no '{name}' checkpoint in {run_dir / CHECKPOINT_DIR}")
    try:
        paired = _settle_pair(weights, info)
        meta = json.loads(info.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{info.name} is not a JSON object")
        tensors = load_file(str(weights))
        model.load_state_dict({k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)})
        if optimizer is not None:
            optim = {k: v for k, v in tensors.items() if k.startswith(_OPTIM)}
            optimizer.load_state_dict(_unflatten_optimizer(optim, meta["optimizer"]))
        if not paired:  # checked last, so a damage the JSON itself shows is named as such
            raise ValueError(f"{weights.name} and {info.name} come from different saves")
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        # JSONDecodeError is a ValueError; a JSON of the wrong shape (a list for an object) a Key/Type/AttributeError
        raise _damaged(run_dir, name, exc) from exc
    if average is not None:
        averaged = {k[len(_AVERAGE) :]: v for k, v in tensors.items() if k.startswith(_AVERAGE)}
        if not averaged:
            raise UsageError(f"the '{name}' checkpoint in {run_dir / CHECKPOINT_DIR} holds no weight average")
        average.load_state_tensors(averaged)
    return meta


def has_checkpoint(run_dir: Path, name: str = "last") -> bool:
    return all(path.is_file() for path in checkpoint_paths(run_dir, name))


def save_epoch(
    run_dir: Path,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    best: bool,
    average: WeightAverage | None = None,
) -> None:
    """``last`` after every epoch (with the optimizer and average, to resume); ``best`` when the epoch improved.

    With a weight average, ``best`` holds the averaged weights: they are the ones validation scored.
    """
    meta = {"state": state.model_dump(mode="json")}
    if best:
        save_checkpoint(run_dir, "best", average.network if average is not None else network, meta, None)
    save_checkpoint(run_dir, "last", network, meta, optimizer, average)


def load_last(
    run_dir: Path, network: torch.nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None = None
) -> TrainState:
    """Restore weights, optimizer and average from ``last`` in place; returns the training state saved with them."""
    meta = load_checkpoint(run_dir, "last", network, optimizer, average)
    try:
        return TrainState.model_validate(meta["state"])
    except (KeyError, ValidationError) as exc:
        raise _damaged(run_dir, "last", exc) from exc
