"""Initialise from an exported cxr-pneumonia model: fine-tune the shipped model, or one of your own.

The parent is read with the service's own loader, so it is verified as serving verifies it (sha256,
exact tensor fit, golden logits) and nothing is unpickled. Two refusals keep a fine-tune honest:
- the run must build the parent's network (same spec), or the weights would not mean what they did;
- a validation split drawn from train must be drawn as the parent's was (same fraction and seed),
  or validation would hold images the parent trained on and its AUC would flatter the model. A
  provided ``val`` folder is the user's own word that it holds none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.core.artifacts import LoadedModel, ModelLoadError, load_model
from app.core.network import PneumoniaNet
from training.data import PROVIDED_VAL
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
    val_source = parent.metadata.provenance.get("val_source")
    log.info("initialised from model %s (version %s, validated on %s)", path, parent.metadata.version, val_source)
    return {
        "path": str(path),
        "version": parent.metadata.version,
        "sha256": parent.metadata.sha256,
        "val_source": val_source,
    }


def check_split(parent: dict[str, Any], val_source: str) -> None:
    """A validation split drawn from train must be the parent's (``parent`` is :func:`load_parent`'s record)."""
    if val_source != PROVIDED_VAL and parent["val_source"] != val_source:
        raise UsageError(
            f"--init-model {parent['path']} was validated on {parent['val_source'] or 'an unrecorded split'}, "
            f"this run on {val_source}: its validation images may be ones the parent trained on; draw the parent's "
            "split (--val-fraction/--split-seed) or provide DIR/val"
        )
