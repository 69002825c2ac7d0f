"""Patient-grouped, class-stratified train/validation split.

The Kermany data has several images per patient; splitting per image would put a patient
on both sides and inflate validation scores, so whole patients are assigned to one side.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from training.user_errors import DataError

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE),
)


def patient_id(path: str | Path) -> str:
    """Patient key from a Kermany file name; an unrecognised name is its own patient."""
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1).lower()
    return f"file:{name.lower()}"


def grouped_stratified_split(
    paths: list[str], labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): about ``val_fraction`` of each class's images go to val, whole patients at a time.

    A patient is stratified by the majority class of their images. Deterministic for a given
    file list and seed.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = defaultdict(list)
    for index, path in enumerate(paths):
        groups[patient_id(path)].append(index)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in np.unique(labels).tolist():
        keys = sorted(k for k, members in groups.items() if _majority(labels[members]) == label)
        if len(keys) < 2:
            raise DataError(f"class {label} has {len(keys)} patient(s); need at least 2 to split off validation")
        target = max(1, round(val_fraction * sum(len(groups[k]) for k in keys)))
        taken = 0
        for position in rng.permutation(len(keys)).tolist()[: len(keys) - 1]:
            if taken >= target:
                break
            val.extend(groups[keys[position]])
            taken += len(groups[keys[position]])
    val_index = np.array(sorted(val), dtype=np.int64)
    train_index = np.setdiff1d(np.arange(len(paths)), val_index)
    return train_index, val_index


def recorded_split(args: Mapping[str, Any]) -> tuple[float, int]:
    """(val_fraction, seed) a run drew its validation split with, from its recorded arguments.

    The arguments are a run's ``config.json`` or the ``provenance.args`` of its ``model.json``.
    ``split_seed`` wins when the run set one (seed replicates sharing a split), else ``seed``:
    whoever rebuilds a model's validation split must read it here, or it scores other images.
    """
    split_seed = args.get("split_seed")
    return float(args["val_fraction"]), int(args["seed"] if split_seed is None else split_seed)


def _majority(labels: np.ndarray) -> int:
    counts = np.bincount(labels)
    return int(np.flatnonzero(counts == counts.max())[-1])
