"""The images a precision or backend is judged and calibrated on, chosen exactly as training chose them.

- validation: the shipped model's own validation split, rebuilt with ``training.split`` from the
  seed and validation fraction recorded in ``model.json`` provenance (the images its threshold
  and metrics came from);
- test: a held-out folder (``../shared/data/chest_xray/test``): reported on, never fitted on;
- calibration: images from the *training* side of that same split only, so neither evaluation
  set ever influences the int8 ranges it is judged with.

Every image goes through the service's ``preprocess_file``; one that cannot be read is an error
(it would otherwise silently shrink an evaluation set).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.core.artifacts import ModelMetadata
from app.core.preprocessing import preprocess_file
from training.data import Sample, list_split
from training.split import grouped_stratified_split, recorded_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


@dataclass
class EvalSet:
    """Preprocessed images and labels (1 = PNEUMONIA), with a one-line description of where they came from."""

    name: str
    description: str
    pixels: torch.Tensor  # uint8[N, 1, S, S]
    labels: np.ndarray  # int64[N]
    paths: list[Path]  # the image files, in the order of ``pixels``


def split_parameters(metadata: ModelMetadata) -> tuple[float, int]:
    """(val_fraction, seed) the model's validation split was drawn with, from its provenance."""
    args = metadata.provenance.get("args", {})
    if "val_fraction" not in args or "seed" not in args:
        raise SystemExit(f"model {metadata.version}: provenance lacks args.val_fraction/seed; cannot rebuild its split")
    return recorded_split(args)


def train_split(data: Path, metadata: ModelMetadata) -> tuple[list[Sample], list[Sample], str]:
    """(training side, validation side, description) of the patient-grouped split of ``data/train``."""
    samples = list_split(data / "train")
    fraction, seed = split_parameters(metadata)
    train_index, val_index = grouped_stratified_split(
        [str(s.path) for s in samples], np.array([s.label for s in samples]), fraction, seed
    )
    where = f"patient-grouped split of {data / 'train'} (fraction {fraction}, seed {seed})"
    return [samples[i] for i in train_index], [samples[i] for i in val_index], where


def load(samples: list[Sample], input_size: int, workers: int = 2) -> tuple[torch.Tensor, np.ndarray]:
    with ThreadPoolExecutor(workers) as pool:
        prepared = list(pool.map(lambda s: preprocess_file(s.path, input_size), samples))
    failed = [(s.path, p.error) for s, p in zip(samples, prepared, strict=True) if p.error is not None]
    if failed:
        path, error = failed[0]
        raise SystemExit(f"{len(failed)} evaluation image(s) unreadable, e.g. {path}: {error}")
    pixels = torch.stack([p.pixels for p in prepared])  # type: ignore[misc]
    return pixels, np.array([s.label for s in samples], dtype=np.int64)


def evaluation_sets(data: Path, metadata: ModelMetadata, limit: int | None = None) -> list[EvalSet]:
    """Validation and test sets at the model's input size (``limit``: first N of each, for smoke runs)."""
    sets = [validation_set(data, metadata, limit)]
    test = held_out_set(data, metadata, limit)
    return sets if test is None else [*sets, test]


def validation_set(data: Path, metadata: ModelMetadata, limit: int | None = None) -> EvalSet:
    """The model's own validation split, rebuilt from its provenance."""
    _, val, where = train_split(data, metadata)
    return _load_set("validation", f"validation: {where}", val, metadata.spec.input_size, limit)


def held_out_set(data: Path, metadata: ModelMetadata, limit: int | None = None) -> EvalSet | None:
    """The held-out ``data/test`` folder, or None when there is none."""
    if not (data / "test").is_dir():
        return None
    return _load_set("test", f"test: {data / 'test'}", list_split(data / "test"), metadata.spec.input_size, limit)


def _load_set(name: str, description: str, samples: list[Sample], size: int, limit: int | None) -> EvalSet:
    chosen = samples if limit is None else _spread(samples, limit)
    pixels, labels = load(chosen, size)
    return EvalSet(name, description, pixels, labels, [s.path for s in chosen])


def calibration_images(data: Path, metadata: ModelMetadata, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``count`` images drawn at random (seeded) from the training side of the split, and where from."""
    train, _, where = train_split(data, metadata)
    rng = np.random.default_rng(seed)
    chosen = [train[i] for i in sorted(rng.choice(len(train), size=min(count, len(train)), replace=False).tolist())]
    pixels, _ = load(chosen, metadata.spec.input_size)
    return pixels, f"{len(chosen)} images from the training side of the {where}, drawn with seed {seed}"


def _spread(samples: list[Sample], limit: int) -> list[Sample]:
    """Up to ``limit`` samples taken evenly across the (class-sorted) list, so both classes appear."""
    if len(samples) <= limit:
        return samples
    step = len(samples) / limit
    return [samples[int(i * step)] for i in range(limit)]
