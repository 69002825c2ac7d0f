"""Find labelled images on disk, decode each of them once into an in-memory uint8 tensor, and
prepare a run's train/validation(/test) sets from them.

Every image goes through :func:`app.core.preprocessing.preprocess_file`, the same code the service
uses, so training sees exactly the pixels that serving will and a failure has the service's error
code. Unreadable files are skipped and returned to the caller, which logs them and records them
in the run summary.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from app.core.decode_pool import DecodePool
from app.core.image_errors import ImageError
from app.core.input_guard import MIN_TRAIN_IMAGES
from app.core.network import CLASS_NAMES
from app.core.preprocessing import preprocess_file, read_image_file
from training.config import TrainConfig
from training.distributed import DistInfo, barrier
from training.leakage import check_no_leakage
from training.split import grouped_stratified_split, recorded_split
from training.user_errors import DataError

SPLITS = ("train", "val", "test")
# What validation is called when it is the dataset's own val folder (fine-tuning trusts it as the user's hold-out).
PROVIDED_VAL = "provided val split"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image file and its class index (position in ``CLASS_NAMES``)."""

    path: Path
    label: int


@dataclass(frozen=True)
class Skipped:
    """An image that could not be decoded, with the reason."""

    path: str
    reason: str


@dataclass
class ImageSet:
    """Decoded images held in memory: ``pixels`` uint8[N, 1, S, S], ``labels`` int64[N], and each file's
    ``sha256`` (of its bytes), by which :mod:`training.leakage` finds copies."""

    pixels: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    sha256: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray | list[int]) -> ImageSet:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        kept = index.tolist()
        return ImageSet(
            self.pixels[index], self.labels[index], [self.paths[i] for i in kept], [self.sha256[i] for i in kept]
        )

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(CLASS_NAMES)).tolist()


def _is_class_dir(directory: Path) -> bool:
    return any((directory / name).is_dir() for name in CLASS_NAMES)


def files_under(folder: Path) -> list[Path]:
    """Every entry under ``folder`` that is not a folder (subfolders included; hidden names and linked folders
    not), sorted.

    Taken by content, not by name, as the service and ``app.score`` take them: a PACS export names DICOM
    files by UID (``1.2.840....123``), without ``.dcm``, and a suffix filter dropped them without a word.
    What is no image (a note, a FIFO, a broken link) is skipped at decoding with its error code, and listed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not Path(dirpath, d).is_symlink()]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def list_split(split_dir: Path, *, one_class: bool = False) -> list[Sample]:
    """All files of ``split_dir/{NORMAL,PNEUMONIA}`` (:func:`files_under`).

    Training needs both classes. ``one_class`` (``evaluate``) also takes a folder of one class, a
    hospital's normal films say, whose report then holds specificity without sensitivity or AUC.
    """
    samples: list[Sample] = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if one_class:
                continue
            raise DataError(
                f"{split_dir}: missing class folder {name}/ (expected {split_dir}/{{{','.join(CLASS_NAMES)}}})"
            )
        files = files_under(class_dir)
        if not files and not one_class:
            raise DataError(f"{class_dir}: class {name} has no files")
        samples.extend(Sample(path, label) for path in files)
    if not samples:
        raise DataError(f"{split_dir}: no files in {' or '.join(f'{name}/' for name in CLASS_NAMES)}")
    return samples


def discover(root: Path, *, one_class: bool = False) -> dict[str, list[Sample]]:
    """Splits under ``root``: ``root/{train,val,test}/CLASS`` or a single split ``root/CLASS`` (named ``"all"``);
    ``one_class`` as in :func:`list_split`."""
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if _is_class_dir(root):
        return {"all": list_split(root, one_class=one_class)}
    splits = {name: list_split(root / name, one_class=one_class) for name in SPLITS if (root / name).is_dir()}
    if not splits:
        raise DataError(
            f"{root}: expected {root}/NORMAL and {root}/PNEUMONIA, or {root}/train/{{NORMAL,PNEUMONIA}} "
            "(optionally also val/ and test/)"
        )
    return splits


def limit_per_class(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """A seeded random subset of at most ``limit`` images per class, for quick runs."""
    rng = np.random.default_rng(seed)
    kept: list[Sample] = []
    for label in range(len(CLASS_NAMES)):
        members = [s for s in samples if s.label == label]
        chosen = sorted(rng.permutation(len(members))[:limit].tolist())
        kept.extend(members[i] for i in chosen)
    return kept


# What decoded pixels depend on besides the files and the input size: the decoding code and its libraries.
_DECODER_MODULES = (
    "app.core.preprocessing",
    "app.core.image_headers",
    "app.core.image_errors",
    "app.core.jpeg_header",
    "app.core.jpeg_complete",
    "app.core.dicom",
    "app.core.dicom_pixels",
    "app.core.dicom_codecs",
    "app.core.decode_pool",
)
_DECODER_LIBRARIES = ("numpy", "pillow", "simplejpeg", "imagecodecs", "pydicom")


@functools.cache
def decoder_fingerprint() -> str:
    """The sha256 of the decoding modules' source and the versions of the decoders they call.

    Part of the decode cache's key: a cache written before a preprocessing change (an orientation now
    applied, another scaling, a new refusal) is decoded again, never trained on pixels the service no
    longer produces. Any edit of those modules costs one re-decode; a stale cache would be train/serve skew.
    """
    digest = hashlib.sha256()
    for name in _DECODER_MODULES:
        digest.update(Path(importlib.import_module(name).__file__ or name).read_bytes())
    for library in _DECODER_LIBRARIES:
        digest.update(f"{library}=={importlib.metadata.version(library)}\n".encode())
    return digest.hexdigest()


def _listing_key(samples: list[Sample], input_size: int) -> str:
    """Cache key: file paths, sizes and mtimes, the input size (content changes change mtime), and the decoder."""
    digest = hashlib.sha256(f"{input_size}|{decoder_fingerprint()}".encode())
    for sample in samples:
        try:
            stat = sample.path.stat()
            state = f"{stat.st_size}|{stat.st_mtime_ns}"
        except OSError as exc:  # a broken link: decoding skips it, with its reason
            state = type(exc).__name__
        digest.update(os.fsencode(f"{sample.path.resolve()}|{sample.label}|{state}\n"))
    return digest.hexdigest()


def _content_line(sample: Sample, digest: str) -> bytes:
    """One file's line of a content hash: its class folder, name and the sha256 of its bytes ("" if unreadable)."""
    # fsencode: a name that is not UTF-8 (a Latin-1 disk) hashes as its bytes; UTF-8 names as before
    return os.fsencode(f"{sample.path.parent.name}/{sample.path.name}|{digest}\n")


def _combined_hash(content_hashes: dict[str, str]) -> str:
    """A run's ``data_hash``: the content hashes of its splits, by split name."""
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(content_hashes.items())).encode()).hexdigest()


@dataclass
class Decoded:
    """Result of :func:`load_images`: the images, what was skipped and a hash of the content."""

    images: ImageSet
    skipped: list[Skipped]
    content_hash: str


def load_images(samples: list[Sample], input_size: int, *, workers: int, cache_dir: Path | None) -> Decoded:
    """Decode ``samples`` in ``workers`` decoder processes, or read them from the cache.

    The service's :class:`~app.core.decode_pool.DecodePool`, as ``app.score`` uses it: a file that
    crashes or hangs a native decoder, or would take more memory than a worker may, costs that file
    (skipped with ``corrupt_image`` or ``image_too_large``), not hours of a run that dies at its start.
    """
    cache_base = None
    if cache_dir is not None:
        cache_base = cache_dir / f"images-{_listing_key(samples, input_size)[:20]}-{input_size}px"
        cached = _read_cache(cache_base)
        if cached is not None:
            return cached
    with DecodePool(max(1, workers), input_size) as decoder, ThreadPoolExecutor(decoder.size) as pool:
        results = list(pool.map(lambda s: preprocess_file(s.path, input_size, decoder=decoder.decode), samples))
    pixels, labels, paths, digests, skipped = [], [], [], [], []
    content = hashlib.sha256()
    for sample, prepared in zip(samples, results, strict=True):
        content.update(_content_line(sample, prepared.sha256))
        if prepared.error is not None:
            reason = f"{prepared.error.code}: {prepared.error}"
            log.warning("unreadable image skipped: %s (%s)", sample.path, reason)
            skipped.append(Skipped(str(sample.path), reason))
            continue
        pixels.append(prepared.pixels)
        labels.append(sample.label)
        paths.append(str(sample.path))
        digests.append(prepared.sha256)
    if not pixels:
        raise DataError("no readable images")
    images = ImageSet(torch.stack(pixels), torch.tensor(labels, dtype=torch.int64), paths, digests)
    decoded = Decoded(images, skipped, content.hexdigest())
    if cache_base is not None:
        _write_cache(cache_base, decoded)
    return decoded


def _read_cache(base: Path) -> Decoded | None:
    """The decoded images cached at ``base``; None when there are none, or when they were written before the
    cache held each file's sha256 (such an entry is decoded again and overwritten)."""
    if not (base.with_suffix(".json").is_file() and base.with_suffix(".safetensors").is_file()):
        return None
    meta = json.loads(base.with_suffix(".json").read_text())
    if "sha256" not in meta:
        return None
    tensors = load_file(str(base.with_suffix(".safetensors")))
    log.info("loaded %d decoded images from cache %s", len(meta["paths"]), base)
    skipped = [Skipped(**item) for item in meta["skipped"]]
    for item in skipped:
        log.warning("unreadable image skipped: %s (%s)", item.path, item.reason)
    images = ImageSet(tensors["pixels"], tensors["labels"], meta["paths"], meta["sha256"])
    return Decoded(images, skipped, meta["content_hash"])


def _write_cache(base: Path, decoded: Decoded) -> None:
    """Write atomically so that a concurrent or interrupted run never reads a half-written cache."""
    base.parent.mkdir(parents=True, exist_ok=True)
    tmp_tensors = base.with_suffix(f".{os.getpid()}.tmp.safetensors")
    tmp_meta = base.with_suffix(f".{os.getpid()}.tmp.json")
    save_file({"pixels": decoded.images.pixels.contiguous(), "labels": decoded.images.labels}, str(tmp_tensors))
    meta = {
        "paths": decoded.images.paths,
        "sha256": decoded.images.sha256,
        "skipped": [vars(item) for item in decoded.skipped],
        "content_hash": decoded.content_hash,
    }
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_tensors, base.with_suffix(".safetensors"))
    os.replace(tmp_meta, base.with_suffix(".json"))


@dataclass
class PreparedData:
    """A run's decoded train/val(/test) images, what was skipped, and where validation came from."""

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


def run_samples(config: TrainConfig, splits: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    """The files a run reads, per split: a single split is its train split, ``--limit-per-class`` applied."""
    samples = {("train" if name == "all" else name): files for name, files in splits.items()}
    if "train" not in samples:
        raise DataError(f"{config.data}: no train split (expected {config.data}/train/{{NORMAL,PNEUMONIA}})")
    if config.limit_per_class is not None:
        seed = recorded_split(config.model_dump())[1]
        samples = {name: limit_per_class(files, config.limit_per_class, seed) for name, files in samples.items()}
    return samples


def data_hash(config: TrainConfig, splits: dict[str, list[Sample]]) -> str:
    """The ``data_hash`` :func:`prepare_data` records, from the files' bytes alone, without decoding any.

    Whoever must match a recorded hash (``training mix``) refuses other data in seconds, not after
    minutes of decoding. Same lines, same order, same "" for a file that cannot be read.
    """
    hashes = {}
    for name, files in run_samples(config, splits).items():
        content = hashlib.sha256()
        for sample in files:
            try:
                digest = hashlib.sha256(read_image_file(sample.path)).hexdigest()
            except ImageError:
                digest = ""
            content.update(_content_line(sample, digest))
        hashes[name] = content.hexdigest()
    return _combined_hash(hashes)


def prepare_data(config: TrainConfig, splits: dict[str, list[Sample]], dist: DistInfo) -> PreparedData:
    """Decode the splits; a missing, too small or one-class val split is replaced by a patient-grouped one."""
    samples = run_samples(config, splits)
    val_fraction, split_seed = recorded_split(config.model_dump())  # as every later rebuild of the split reads it
    decoded = _decode_all(config, samples, dist)
    train = decoded["train"].images
    for label, count in enumerate(train.class_counts()):
        if count == 0:  # its files were all skipped: list_split saw files, none of them an image
            raise DataError(
                f"{config.data}: class {CLASS_NAMES[label]} of the train split has no readable image "
                f"({len(decoded['train'].skipped)} file(s) of the split skipped, each logged with its reason)"
            )
    val = decoded["val"].images if "val" in decoded else None
    if val is not None and len(val) >= config.min_val_images and min(val.class_counts()) > 0:
        val_source = PROVIDED_VAL
    else:
        why = "missing" if val is None else f"too small ({len(val)} images) or one-class"
        val_source = f"patient-grouped split of train (val split {why}; fraction {val_fraction}, seed {split_seed})"
        train_index, val_index = grouped_stratified_split(train.paths, train.labels.numpy(), val_fraction, split_seed)
        train, val = train.subset(train_index), train.subset(val_index)
    if len(train) < MIN_TRAIN_IMAGES:  # found now, not after hours of training when the guard is fitted
        raise DataError(
            f"{len(train)} training image(s) after the validation split; "
            f"the input guard needs at least {MIN_TRAIN_IMAGES}"
        )
    test = decoded["test"].images if "test" in decoded else None
    check_no_leakage({"train": train, "val": val} | ({"test": test} if test is not None else {}))
    skipped = [item for result in decoded.values() for item in result.skipped]
    data_hash = _combined_hash({name: result.content_hash for name, result in decoded.items()})
    return PreparedData(train, val, test, skipped, data_hash, val_source)


def split_hash(data: PreparedData) -> str:
    """Identifies which files are on which side, so a resume on changed data is refused."""
    digest = hashlib.sha256()
    for side, images in (("train", data.train), ("val", data.val)):
        for path in sorted(Path(p).name for p in images.paths):
            digest.update(os.fsencode(f"{side}:{path}\n"))
    return digest.hexdigest()
