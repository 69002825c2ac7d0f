"""Offline batch scoring: ``python -m app.score DIR --out predictions.csv``.

Scores every file under DIR with the same verified model, preprocessing and device/precision
choice as the HTTP service (``app.core.preprocessing.preprocess`` + ``app.core.engine``), so an offline
prediction equals the one the API would return. Decoding runs in isolated decoder processes,
so an image that crashes a decoder becomes a ``corrupt_image`` row instead of ending the run.
Every entry of the folder gets a row: unreadable files, FIFOs, sockets, devices, symlink loops
and directory symlinks (not followed) get the stable error code ``read_error`` with the reason,
and are never opened in a way that could block. Images the input guard refuses become
``not_chest_xray`` rows (with ``--input-guard flag`` they are scored with a ``warning``). Rows
are flushed after every batch and files already in the CSV are skipped, so rerunning an
interrupted command resumes it.
DICOM exports (files often without an extension) are recognised by content like any upload;
``--with-uids`` adds each file's SOP Instance UID, which identifies the image, so it is opt-in.
With ``--heatmaps`` each scored image also gets an overlay PNG (the service's ``POST /explain``
picture), written before its CSV row so that a row always means its picture exists.

File names are written as UTF-8 with ``\\`` for a backslash and ``\\xNN`` for each byte that is not
valid UTF-8, so every name has exactly one row and a resumed run recognises it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from app.core.artifacts import ModelLoadError
from app.core.decode_pool import DecodePool
from app.core.dicom import DEFAULT_DICOM_POLICY, DicomPolicy
from app.core.engine import EngineError, InferenceEngine, default_decode_workers, load_engine
from app.core.heatmap import ExplainUnsupportedError, Heatmap
from app.core.input_guard import NotChestXrayError
from app.core.overlay import overlay_size, png_bytes, render_overlay
from app.core.preprocessing import DEFAULT_MAX_DECODE_BYTES, PreparedFile, preprocess_file
from app.settings import Settings, SettingsError, load_settings

COLUMNS = (
    "path",
    "label",
    "pneumonia_probability",
    "threshold",
    "guard_score",
    "guard_threshold",
    "warning",
    "error_code",
    "error_message",
    "model_sha256",
)
UID_COLUMN = "sop_instance_uid"
USAGE_ERROR = 2
INTERRUPTED = 130
MAX_LISTED_ERRORS = 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UsageError(Exception):
    """Bad arguments or an output file this run must not append to; exit status 2."""


@dataclass(frozen=True)
class Prepared:
    """One file of the folder after preprocessing: its relative path and the network input or coded error."""

    path: str
    file: PreparedFile


@dataclass
class Summary:
    """What one invocation did; printed to stderr so a resumed run shows it redid nothing."""

    scored: int = 0
    skipped: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failed_paths: list[tuple[str, str]] = field(default_factory=list)


def csv_path(relative: str) -> str:
    """The ``path`` column for a name from the file system: injective, and always valid UTF-8.

    ``os.walk`` gives undecodable bytes as lone surrogates (``surrogateescape``); they become ``\\xNN``,
    and a literal backslash becomes ``\\\\`` so no real name can be mistaken for an escaped one.
    """
    raw = relative.replace("\\", "\\\\").encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def list_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Every non-hidden entry under ``root`` as sorted POSIX paths relative to it (stable across runs and hosts).

    Symbolic links to directories are listed, not followed (no loops, no folder scored twice), and so
    is a folder that cannot be listed: both get an error row when read, instead of vanishing.
    """
    found: list[str] = []
    excluded = os.path.realpath(exclude) if exclude is not None else None

    def unlistable(error: OSError) -> None:
        if error.filename is not None:
            found.append(Path(error.filename).relative_to(root).as_posix())

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        linked = [name for name in dirnames if Path(dirpath, name).is_symlink()]
        dirnames[:] = [name for name in dirnames if not name.startswith(".") and name not in linked]
        for name in [*filenames, *linked]:
            path = Path(dirpath, name)
            # realpath, unlike Path.resolve, never raises on a symlink loop
            if name.startswith(".") or (excluded is not None and os.path.realpath(path) == excluded):
                continue
            found.append(path.relative_to(root).as_posix())
    return sorted(found)


def columns(with_uids: bool) -> tuple[str, ...]:
    """The CSV header: the SOP Instance UID column, right after the path, only when asked for."""
    return (COLUMNS[0], UID_COLUMN, *COLUMNS[1:]) if with_uids else COLUMNS


def prepare(root: Path, relative: str, input_size: int, with_uid: bool, decoder: DecodePool) -> Prepared:
    """Read and preprocess one file exactly as the service does with an upload, in the isolated decoders."""
    file = preprocess_file(root / relative, input_size, with_uid=with_uid, decoder=decoder.decode)
    return Prepared(relative, file)


def _complete_rows(text: str, expected: tuple[str, ...]) -> tuple[list[dict[str, str]], int]:
    """The rows of a predictions file that were written whole, and where the last of them ends.

    A kill can cut the file anywhere, also inside a quoted file name that holds a newline; a row
    counts only if it parses to every column, ends in a model hash and its line end is there.
    The reader is fed one line at a time, so the characters it consumed mark the row's end.
    """
    consumed = 0
    lines = re.finditer(r"[^\n]*\n|[^\n]+$", text)

    def feed() -> Iterator[str]:
        nonlocal consumed
        for match in lines:
            consumed = match.end()
            yield match.group()

    reader = csv.reader(feed())
    rows: list[dict[str, str]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows, 0
        if text[consumed - 1] != "\n":  # the header itself was cut: nothing to keep
            return rows, 0
        found = tuple(header)
        if found == columns(UID_COLUMN not in expected):  # resuming must not mix rows with and without UIDs
            written, rerun = ("with", "add") if UID_COLUMN in found else ("without", "drop")
            raise UsageError(
                f"was written {written} --with-uids; {rerun} --with-uids to resume it, or write to a new --out"
            )
        if found != expected:
            raise UsageError(f"exists but is not a predictions file from app.score (columns {header})")
        end = consumed
        for fields in reader:
            if len(fields) != len(expected) or not _SHA256.fullmatch(fields[-1]) or text[consumed - 1] != "\n":
                break
            rows.append(dict(zip(expected, fields, strict=True)))
            end = consumed
    except csv.Error:  # a quoted field left open by the cut
        pass
    return rows, end


def finished_paths(out: Path, model_sha256: str, with_uids: bool = False) -> set[str]:
    """Paths already in ``out``; repairs a row torn by a kill and refuses a CSV from another model or layout."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    text = raw.decode("utf-8", "surrogateescape")
    try:
        rows, end = _complete_rows(text, columns(with_uids))
    except UsageError as exc:
        raise UsageError(f"{out} {exc}") from None
    keep = len(text[:end].encode("utf-8", "surrogateescape"))
    if keep < len(raw):  # the last row was cut mid-write: drop it, its file is redone
        with out.open("r+b") as handle:
            handle.truncate(keep)
    done: set[str] = set()
    for row in rows:
        if row["model_sha256"] != model_sha256:
            raise UsageError(
                f"{out} holds predictions of model {row['model_sha256'][:12]}, not {model_sha256[:12]}; "
                "write to a new --out file"
            )
        done.add(row["path"])
    return done


def batched(items: Sequence[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


@dataclass(frozen=True)
class Overlay:
    """A heatmap picture still to be drawn and written: ``path`` is relative to the heatmaps folder."""

    path: str
    file: PreparedFile
    heatmap: Heatmap


def heatmap_path(relative: str) -> str:
    """``a/b.jpeg`` -> ``a/b.jpeg.png``: the full name is kept so ``x.jpg`` and ``x.png`` cannot collide."""
    return f"{relative}.png"


def write_overlay(folder: Path, overlay: Overlay, input_size: int) -> None:
    source, pixels = overlay.file.source, overlay.file.pixels
    assert source is not None and pixels is not None
    target = folder / heatmap_path(overlay.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    size = overlay_size(source.width, source.height, input_size)
    target.write_bytes(png_bytes(render_overlay(pixels, overlay.heatmap, size)))


def rows_for(
    batch: list[Prepared], engine: InferenceEngine, explain: bool = False
) -> tuple[list[dict[str, str]], list[Overlay]]:
    """Run the readable images of a batch through the engine in one forward pass (with heatmaps if asked).

    Rows always carry the UID (empty unless it was read); the writer keeps it only under ``--with-uids``.
    """
    meta = engine.metadata
    pixels = [item.file.pixels for item in batch if item.file.pixels is not None]
    results = iter(engine.infer(engine.collate(pixels), [explain] * len(pixels)) if pixels else [])
    rows, overlays = [], []
    for item in batch:
        row = dict.fromkeys(columns(with_uids=True), "")
        row.update(path=csv_path(item.path), threshold=repr(meta.threshold), model_sha256=meta.sha256)
        row[UID_COLUMN] = item.file.sop_instance_uid
        if item.file.error is not None:
            row.update(error_code=item.file.error.code, error_message=item.file.error.message)
            rows.append(row)
            continue
        result = next(results)
        if result.guard_score is not None and engine.guard_spec is not None:
            row.update(guard_score=repr(result.guard_score), guard_threshold=repr(engine.guard_spec.threshold))
        try:
            assessment = engine.assess(result)  # the service's own decision, guard included
        except NotChestXrayError as exc:
            row.update(error_code=exc.code, error_message=exc.message)
        else:
            decision = assessment.decision
            row.update(label=decision.label, pneumonia_probability=repr(decision.pneumonia_probability))
            row.update(warning=assessment.warning or "")
            if result.heatmap is not None:
                overlays.append(Overlay(item.path, item.file, result.heatmap))
        rows.append(row)
    return rows, overlays


def score(
    root: Path,
    out: Path,
    engine: InferenceEngine,
    *,
    batch_size: int,
    workers: int,
    max_pixels: int,
    progress: bool,
    dicom: DicomPolicy = DEFAULT_DICOM_POLICY,
    with_uids: bool = False,
    heatmaps: Path | None = None,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> Summary:
    """Score the files of ``root`` not yet in ``out``, appending and flushing one batch at a time.

    With ``heatmaps``, each scored image's overlay PNG is written there (same relative path plus ``.png``)
    by the decoding threads, before the batch's rows.
    """
    done = finished_paths(out, engine.metadata.sha256, with_uids)
    # realpath, unlike Path.resolve, never raises on a symlink loop
    skip = Path(os.path.realpath(heatmaps)) if heatmaps is not None else None
    pending_paths = [
        path
        for path in list_images(root, exclude=out)
        if csv_path(path) not in done and (skip is None or skip not in Path(os.path.realpath(root / path)).parents)
    ]
    summary = Summary(skipped=len(done))
    write_header = not out.exists() or out.stat().st_size == 0
    with (
        DecodePool(
            workers, engine.input_size, max_pixels=max_pixels, max_decode_bytes=max_decode_bytes, dicom=dicom
        ) as decoder,
        ThreadPoolExecutor(max_workers=decoder.size) as pool,
        out.open("a", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=columns(with_uids), extrasaction="ignore")
        if write_header:
            writer.writeheader()

        def submit(chunk: list[str] | None) -> list[Future[Prepared]]:
            return [pool.submit(prepare, root, path, engine.input_size, with_uids, decoder) for path in chunk or []]

        chunks = batched(pending_paths, batch_size)
        # Decode the next batch on the pool while the current one runs on the device.
        upcoming = submit(next(chunks, None))
        with tqdm(total=len(pending_paths), unit="img", disable=None if progress else True) as bar:
            while upcoming:
                batch = [future.result() for future in upcoming]
                upcoming = submit(next(chunks, None))
                rows, overlays = rows_for(batch, engine, explain=heatmaps is not None)
                if heatmaps is not None:
                    drawn = [pool.submit(write_overlay, heatmaps, overlay, engine.input_size) for overlay in overlays]
                    for future in drawn:
                        future.result()
                write_batch(handle, writer, rows, summary)
                bar.update(len(batch))
    return summary


def write_batch(handle: TextIO, writer: csv.DictWriter[str], rows: list[dict[str, str]], summary: Summary) -> None:
    """Append and flush to disk so an interrupt loses at most the batch in flight."""
    writer.writerows(rows)
    handle.flush()
    os.fsync(handle.fileno())
    for row in rows:
        summary.scored += 1
        if row["error_code"]:
            summary.errors[row["error_code"]] += 1
            summary.failed_paths.append((row["path"], row["error_code"]))


def report(summary: Summary, out: Path, stream: TextIO) -> None:
    unreadable = sum(summary.errors.values())
    print(
        f"scored {summary.scored} files ({unreadable} unreadable or refused), "
        f"skipped {summary.skipped} already in {out}",
        file=stream,
    )
    if unreadable:
        codes = ", ".join(f"{code}={count}" for code, count in sorted(summary.errors.items()))
        print(f"files without a label by error code: {codes}", file=stream)
        for path, code in summary.failed_paths[:MAX_LISTED_ERRORS]:
            print(f"  {code}: {path}", file=stream)
        if unreadable > MAX_LISTED_ERRORS:
            print(f"  ... {unreadable - MAX_LISTED_ERRORS} more, see the error_code column of {out}", file=stream)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    """Defaults come from the service's ``CXR_*`` settings, so both score with the same model and limits."""
    parser = argparse.ArgumentParser(
        prog="python -m app.score",
        description="Score every image under DIR (recursively) with the service's model and write a CSV. "
        "Rerunning the same command resumes: files already in --out are skipped.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="folder of JPEG/PNG/DICOM chest X-rays")
    parser.add_argument("--out", type=Path, required=True, help="CSV to create or append to")
    parser.add_argument(
        "--weights", type=Path, default=defaults.weights, help="model directory (default: $CXR_WEIGHTS)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=defaults.max_batch_size)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: $CXR_DEVICE)")
    parser.add_argument("--precision", default=defaults.precision, help="auto, fp16, bf16 or fp32")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=defaults.decode_workers,
        help="decoder processes (default: $CXR_DECODE_WORKERS, else by device)",
    )
    parser.add_argument("--max-pixels", type=positive_int, default=defaults.max_pixels, help="reject larger images")
    parser.add_argument(
        "--input-guard",
        choices=("reject", "flag", "off"),
        default=defaults.input_guard,
        help="images the input guard fails: an error row (reject), a row with a warning (flag), or unchecked "
        "(off) (default: $CXR_INPUT_GUARD, else reject)",
    )
    parser.add_argument(
        "--with-uids",
        action="store_true",
        help=f"add a {UID_COLUMN} column (DICOM files; it identifies the image, so it is off by default)",
    )
    parser.add_argument(
        "--heatmaps",
        type=Path,
        metavar="HEATDIR",
        help="also write one overlay PNG per scored image here (HEATDIR/<path>.png), as POST /explain draws it",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        defaults = load_settings()
    except SettingsError as exc:
        print(f"python -m app.score: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    parser = build_parser(defaults)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.directory.is_dir():
        parser.error(f"DIR {args.directory} is not a directory")
    if not args.out.parent.is_dir():
        parser.error(f"the folder of --out {args.out} does not exist")
    if args.heatmaps is not None and args.heatmaps.exists() and not args.heatmaps.is_dir():
        parser.error(f"--heatmaps {args.heatmaps} exists and is not a directory")
    try:
        engine = load_engine(args.weights, device=args.device, precision=args.precision, input_guard=args.input_guard)
        if args.heatmaps is not None:
            engine.check_explainable()
            args.heatmaps.mkdir(parents=True, exist_ok=True)
        summary = score(
            args.directory,
            args.out,
            engine,
            batch_size=args.batch_size,
            workers=args.workers or default_decode_workers(engine.device),
            max_pixels=args.max_pixels,
            max_decode_bytes=defaults.max_decode_bytes,
            progress=not args.no_progress,
            dicom=defaults.dicom_policy(),
            with_uids=args.with_uids,
            heatmaps=args.heatmaps,
        )
    except (UsageError, ModelLoadError, EngineError, ExplainUnsupportedError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"interrupted; rows written so far are in {args.out}, rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED
    report(summary, args.out, sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
