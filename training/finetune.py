"""Initialise from an exported cxr-pneumonia model: fine-tune the shipped model, or one of your own.

The parent is read with the service's own loader, so it is verified as serving verifies it (sha256,
exact tensor fit, golden logits) and nothing is unpickled. Two refusals keep a fine-tune honest:
- the run must build the parent's network (same spec), or the weights would not mean what they did;
- a validation split drawn from train must be drawn as the parent's was (same fraction, seed and
  per-class limit, compared as values from the parent's recorded arguments), or validation would hold
  images the parent trained on and its AUC would flatter the model. Why validation was drawn (no
  ``val`` folder, or the official one of 16 films) does not matter: the same draw is the same split.
  A provided ``val`` folder is the user's own word that it holds none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.core.artifacts import LoadedModel, ModelLoadError, load_model
from app.core.network import PneumoniaNet
from training.data import PROVIDED_VAL
from training.split import recorded_split
from training.user_errors import UsageError

log = logging.getLogger(__name__)


def load_exported(option: str, path: Path) -> LoadedModel:
    """The model at ``path`` read by the service's verified loader; a refusal names the ``option`` that gave it."""
    try:
        return load_model(path)
    except ModelLoadError as exc:
        raise UsageError(f"{option}: {exc}") from exc


def load_parent(network: PneumoniaNet, path: Path) -> dict[str, Any]:
    """Copy every weight of the exported model at ``path`` into ``network``; returns its provenance record.

    Runs before any image is decoded, so a wrong path, a tampered file or another network is refused at once.
    """
    parent = load_exported("--init-model", path)
    spec = parent.metadata.spec
    theirs = spec.model_dump()
    different = sorted(name for name, value in network.spec.model_dump().items() if theirs[name] != value)
    if different:
        raise UsageError(
            f"--init-model {path} is a {spec.architecture}/{spec.head} network at {spec.input_size} px; this run's "
            f"spec differs in {', '.join(different)}: use the parent's flags"
        )
    network.load_state_dict(parent.network.state_dict(), strict=True)
    provenance = parent.metadata.provenance
    val_source = provenance.get("val_source")
    log.info("initialised from model %s (version %s, validated on %s)", path, parent.metadata.version, val_source)
    args = provenance.get("args")
    drawn = val_source != PROVIDED_VAL and isinstance(args, dict)
    return {
        "path": str(path),
        "version": parent.metadata.version,
        "sha256": parent.metadata.sha256,
        "val_source": val_source,
        "drawn_split": drawn_split(args) if drawn else None,
    }


def drawn_split(args: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes a validation split drawn from train, from a run's arguments: its fraction, seed and the
    per-class limit (which decides the files it is drawn from)."""
    fraction, seed = recorded_split(args)
    return {"val_fraction": fraction, "split_seed": seed, "limit_per_class": args.get("limit_per_class")}


def _described(split: Mapping[str, Any] | None) -> str:
    if split is None:
        return "no split this run can draw again"
    limit = split["limit_per_class"]
    files = "all images" if limit is None else f"at most {limit} per class"
    return f"fraction {split['val_fraction']}, seed {split['split_seed']}, {files}"


def check_split(parent: dict[str, Any], args: Mapping[str, Any], val_source: str) -> None:
    """A validation split this run drew from train must be the parent's (``parent`` is :func:`load_parent`'s
    record, ``args`` this run's arguments); a provided val folder passes."""
    if val_source == PROVIDED_VAL:
        return
    ours = drawn_split(args)
    if parent["drawn_split"] != ours:
        raise UsageError(
            f"--init-model {parent['path']} was validated on {parent['val_source'] or 'an unrecorded split'} "
            f"({_described(parent['drawn_split'])}), this run on a split of train ({_described(ours)}): its "
            "validation images may be ones the parent trained on; draw the parent's split "
            "(--val-fraction/--split-seed/--limit-per-class) or provide DIR/val"
        )
