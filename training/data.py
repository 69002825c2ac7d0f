"""Find labelled images on disk, decode each of them once into an in-memory uint8 tensor, and
prepare a run's train/validation(/test) sets from them.

Every image goes through :func:`app.core.preprocessing.preprocess_file`, the same code the service
uses, so training sees exactly the pixels that serving will and a failure has the service's error
code. Unreadable files are skipped and returned to the caller, which logs them and records them
in the run summary; so is every entry the listing does not take (a hidden file, a file outside the
class folders), and a folder the layout does not know that holds files is refused: nothing that
looks like data is left out without a word.
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.core.decode_pool import DecodePool
from app.core.image_errors import ImageError
from app.core.input_guard import MIN_TRAIN_IMAGES
from app.core.network import CLASS_NAMES
from app.core.preprocessing import preprocess_file, read_image_file
from app.durable_files import replace_durably
from training.config import TrainConfig
from training.distributed import DistInfo, barrier
from training.leakage import check_no_leakage
from training.split import grouped_stratified_split, recorded_split
from training.user_errors import DataError

SPLITS = ("train", "val", "test")
# Other spellings of a split folder: refused with the name to use, never silently passed over.
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}
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


class Splits(dict[str, list[Sample]]):
    """:func:`discover`'s result: each split's files, and ``passed_over``: per split ("" for the data root)
    the entries the listing did not take, with why, which the caller logs and records like unreadable files."""

    def __init__(self, samples: dict[str, list[Sample]], passed_over: dict[str, list[Skipped]]) -> None:
        super().__init__(samples)
        self.passed_over = passed_over


def passed_over(splits: dict[str, list[Sample]], names: list[str] | None = None) -> list[Skipped]:
    """What :func:`discover` passed over in the splits ``names`` (all when None) and at the data root."""
    found = getattr(splits, "passed_over", {})
    return [item for key, items in found.items() if names is None or key in ("", *names) for item in items]


def log_passed_over(items: list[Skipped]) -> None:
    for item in items:
        log.warning("not used: %s (%s)", item.path, item.reason)


def _is_class_dir(directory: Path) -> bool:
    return any((directory / name).is_dir() for name in CLASS_NAMES)


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def list_files(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Every entry under ``folder`` that is not a folder, sorted, and what was passed over, with why.

    Taken by content, not by name, as the service and ``app.score`` take them: a PACS export names DICOM
    files by UID (``1.2.840....123``), without ``.dcm``, and a suffix filter dropped them without a word.
    What is no image (a note, a FIFO, a broken link) is skipped at decoding with its error code, and listed.
    A linked folder is read like any subfolder (a study linked in from a PACS export is data the user means),
    once: a link to a folder already read (a loop) is passed over. Hidden files and folders (macOS's ``._``
    copies, ``.thumbnails``) are passed over, and listed as such.
    """
    found: list[Path] = []
    passed: list[Skipped] = []
    seen = {_identity(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in dirnames:
            path = Path(dirpath, name)
            if name.startswith("."):
                passed.append(Skipped(str(path), "hidden folder, not read"))
                continue
            try:
                identity = _identity(path)
            except OSError as exc:
                passed.append(Skipped(str(path), f"folder not readable ({exc.strerror or exc})"))
                continue
            if identity in seen:
                passed.append(Skipped(str(path), "linked folder already read (a link loop, or a second link)"))
                continue
            seen.add(identity)
            kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith("."):
                passed.append(Skipped(str(path), "hidden file"))
            else:
                found.append(path)

    def order(path: str | Path) -> tuple[str, ...]:
        return Path(path).relative_to(folder).parts

    return sorted(found, key=order), sorted(passed, key=lambda item: order(item.path))


def files_under(folder: Path) -> list[Path]:
    """The files :func:`list_files` takes under ``folder`` (what it passes over, callers that record it get there)."""
    return list_files(folder)[0]


def _hidden(entry: Path) -> Skipped:
    return Skipped(str(entry), "hidden folder, not read" if entry.is_dir() else "hidden file")


def _not_a_class_folder(entry: Path) -> Skipped | None:
    """An entry of a split folder beside its class folders: passed over (listed), or refused when it is a folder
    that holds files, which the user would believe trained on (``train/COVID/``, ``train/normal/``)."""
    if entry.name.startswith("."):
        return _hidden(entry)
    if not entry.is_dir():
        return Skipped(str(entry), f"not in a class folder ({' or '.join(f'{c}/' for c in CLASS_NAMES)})")
    files = list_files(entry)[0]
    if not files:
        return None  # an empty folder: nothing left out
    raise DataError(
        f"{entry}: not a class folder (the classes are {' and '.join(f'{c}/' for c in CLASS_NAMES)}), yet it "
        f"holds {len(files)} file(s) that would not be used: move it out of {entry.parent}, or its files into "
        "a class folder"
    )


def scan_split(split_dir: Path, *, one_class: bool = False) -> tuple[list[Sample], list[Skipped]]:
    """All files of ``split_dir/{NORMAL,PNEUMONIA}`` (:func:`list_files`), and what was passed over.

    Training needs both classes. ``one_class`` (``evaluate``) also takes a folder of one class, a
    hospital's normal films say, whose report then holds specificity without sensitivity or AUC.
    """
    samples: list[Sample] = []
    passed: list[Skipped] = []
    for entry in sorted(split_dir.iterdir()):
        if entry.name not in CLASS_NAMES:
            item = _not_a_class_folder(entry)
            passed += [item] if item is not None else []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if one_class:
                continue
            raise DataError(
                f"{split_dir}: missing class folder {name}/ (expected {split_dir}/{{{','.join(CLASS_NAMES)}}})"
            )
        files, skipped = list_files(class_dir)
        passed += skipped
        if not files and not one_class:
            raise DataError(f"{class_dir}: class {name} has no files")
        samples.extend(Sample(path, label) for path in files)
    if not samples:
        raise DataError(f"{split_dir}: no files in {' or '.join(f'{name}/' for name in CLASS_NAMES)}")
    return samples, passed


def list_split(split_dir: Path, *, one_class: bool = False) -> list[Sample]:
    """The samples of :func:`scan_split` (for callers that do not record what it passed over)."""
    return scan_split(split_dir, one_class=one_class)[0]


def _outside_the_splits(root: Path, entry: Path) -> Skipped:
    """An entry of the data root beside its split folders: listed; a misspelt split folder is refused."""
    if entry.name.startswith("."):
        return _hidden(entry)
    if not entry.is_dir():
        return Skipped(str(entry), "not in a split folder (train/, val/, test/)")
    meant = entry.name.lower() if entry.name.lower() in SPLITS else SPLIT_ALIASES.get(entry.name.lower())
    if meant is not None and not ((root / meant).is_dir() and (root / meant).samefile(entry)):  # case-blind disks
        raise DataError(f"{entry}: split folders are named train/, val/ and test/; rename it to {root / meant}")
    return Skipped(str(entry), "folder outside the layout (train/, val/, test/), not read")


def discover(root: Path, *, one_class: bool = False) -> Splits:
    """Splits under ``root``: ``root/{train,val,test}/CLASS`` or a single split ``root/CLASS`` (named ``"all"``);
    ``one_class`` as in :func:`list_split`."""
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if _is_class_dir(root):
        samples, passed = scan_split(root, one_class=one_class)
        return Splits({"all": samples}, {"all": passed})
    outside = [_outside_the_splits(root, entry) for entry in sorted(root.iterdir()) if entry.name not in SPLITS]
    found = {name: scan_split(root / name, one_class=one_class) for name in SPLITS if (root / name).is_dir()}
    if not found:
        raise DataError(
            f"{root}: expected {root}/NORMAL and {root}/PNEUMONIA, or {root}/train/{{NORMAL,PNEUMONIA}} "
            "(optionally also val/ and test/)"
        )
    return Splits(
        {name: samples for name, (samples, _) in found.items()},
        {"": outside, **{name: passed for name, (_, passed) in found.items()}},
    )


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
        try:
            where = sample.path.resolve()
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13): skipped at decoding
            where = sample.path.absolute()
        digest.update(os.fsencode(f"{where}|{sample.label}|{state}\n"))
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
    """The decoded images cached at ``base``; None when there are none, when they were written before the
    cache held each file's sha256, or when the entry is damaged (a crash, a full disk): such an entry is
    decoded again and overwritten, with a warning for the damage."""
    meta_path, tensors_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not (meta_path.is_file() and tensors_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if "sha256" not in meta:
            return None
        tensors = load_file(str(tensors_path))
        skipped = [Skipped(**item) for item in meta["skipped"]]
        images = ImageSet(tensors["pixels"], tensors["labels"], list(meta["paths"]), list(meta["sha256"]))
        if not len(images) == len(images.labels) == len(images.pixels) == len(images.sha256):
            raise ValueError("its tensors and file list differ in length")
        decoded = Decoded(images, skipped, str(meta["content_hash"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        log.warning("decode cache %s is damaged (%s: %s): decoding again", base, type(exc).__name__, exc)
        return None
    log.info("loaded %d decoded images from cache %s", len(images), base)
    for item in skipped:
        log.warning("unreadable image skipped: %s (%s)", item.path, item.reason)
    return decoded


def _write_cache(base: Path, decoded: Decoded) -> None:
    """Write atomically and durably, so that a concurrent, interrupted or power-cut run never reads a
    half-written cache (the tensors first: a reader needs both, and a damaged pair is decoded again)."""
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
    replace_durably([(tmp_tensors, base.with_suffix(".safetensors")), (tmp_meta, base.with_suffix(".json"))])


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
    """Decode the splits; a missing, too small or one-class val split is replaced by a patient-grouped one.

    What :func:`discover` passed over is logged here (into the run's log) and listed with the unreadable files.
    """
    samples = run_samples(config, splits)
    unused = passed_over(splits)
    log_passed_over(unused)
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
    skipped = unused + [item for result in decoded.values() for item in result.skipped]
    data_hash = _combined_hash({name: result.content_hash for name, result in decoded.items()})
    return PreparedData(train, val, test, skipped, data_hash, val_source)


def split_hash(data: PreparedData) -> str:
    """Identifies which files are on which side, so a resume on changed data is refused."""
    digest = hashlib.sha256()
    for side, images in (("train", data.train), ("val", data.val)):
        for path in sorted(Path(p).name for p in images.paths):
            digest.update(os.fsencode(f"{side}:{path}\n"))
    return digest.hexdigest()
