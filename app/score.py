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
picture), written before its CSV row; a picture that cannot be written (a name too long, a folder in
the way) is recorded in the row's ``heatmap_error`` instead of ending the run.
Each row records what changes its numbers (input guard mode, precision, backend, DICOM checks, model),
and a resume with other settings is refused, so one CSV never mixes them. One run at a time writes a
CSV: it holds a lock on a hidden sibling file (``.NAME.lock``) while it runs.

File names are written as UTF-8 with ``\\`` for a backslash and ``\\xNN`` for each byte that is not
valid UTF-8, so every name has exactly one row and a resumed run recognises it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import re
import shutil
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

USAGE_ERROR = 2
INTERRUPTED = 130

# Importing torch takes seconds: a Ctrl-C meanwhile ends the command quietly, not with a traceback.
try:
    from tqdm import tqdm

    from app.core.artifacts import ModelLoadError
    from app.core.decode_pool import (
        DEFAULT_DECODE_TIMEOUT_S,
        DEFAULT_LARGE_DECODE_BYTES,
        MAX_DECODE_LIMIT,
        DecodePool,
    )
    from app.core.dicom import DEFAULT_DICOM_POLICY, DicomPolicy
    from app.core.engine import EngineError, InferenceEngine, default_decode_workers, load_engine
    from app.core.heatmap import ExplainUnsupportedError, Heatmap
    from app.core.input_guard import NotChestXrayError
    from app.core.overlay import overlay_size, png_bytes, render_overlay
    from app.core.preprocessing import DEFAULT_MAX_DECODE_BYTES, PreparedFile, preprocess_file
    from app.durable_files import replace_durably
    from app.exclusive_lock import LockHeldError, exclusive_lock
    from app.settings import Settings, SettingsError, load_settings
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    raise SystemExit(INTERRUPTED) from None

# What changes a row's numbers besides the image: recorded in every row, and a resume must match them.
SETTINGS_COLUMNS = ("input_guard", "precision", "backend", "dicom_checks", "model_sha256")
COLUMNS = (
    "path",
    "label",
    "pneumonia_probability",
    "threshold",
    "guard_score",
    "guard_threshold",
    "guard_detail",
    "detail_floor",
    "warning",
    "error_code",
    "error_message",
    "heatmap_error",
    *SETTINGS_COLUMNS,  # model_sha256 stays last: a row ending in a hash was written whole
)
# The layout before the settings columns: such a CSV cannot be checked, so it is refused, not mixed.
LEGACY_COLUMNS = (*COLUMNS[:6], "warning", "error_code", "error_message", "model_sha256")
UID_COLUMN = "sop_instance_uid"
# Errors that may be gone on a later try: a file still being copied in (cut short, empty, unreadable for
# a moment) or a decoder that timed out, crashed or failed. ``corrupt_image`` covers timeouts and crashes.
RETRYABLE_ERRORS = frozenset({"read_error", "empty_file", "corrupt_image", "internal_error"})
MAX_BATCH_SIZE = 1024  # CXR_MAX_BATCH_SIZE's bound
MAX_WORKERS = 256  # CXR_DECODE_WORKERS's bound: each is a process and a thread
MAX_LISTED_ERRORS = 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA256_PREFIX = re.compile(r"[0-9a-f]{0,64}")
_ROW_END = re.compile(r",[0-9a-f]{64}\r?\n")  # how every whole row ends: a torn last row holds none


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
    retried: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failed_paths: list[tuple[str, str]] = field(default_factory=list)
    heatmap_failures: list[tuple[str, str]] = field(default_factory=list)


def csv_path(relative: str) -> str:
    """The ``path`` column for a name from the file system: injective, and always valid UTF-8.

    ``os.walk`` gives undecodable bytes as lone surrogates (``surrogateescape``); they become ``\\xNN``,
    and a literal backslash becomes ``\\\\`` so no real name can be mistaken for an escaped one.
    """
    raw = relative.replace("\\", "\\\\").encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def list_images(root: Path, exclude: Path | None = None, exclude_dir: Path | None = None) -> list[str]:
    """Every non-hidden entry under ``root`` as sorted POSIX paths relative to it (stable across runs and hosts).

    Symbolic links to directories are listed, not followed (no loops, no folder scored twice), and so
    is a folder that cannot be listed: both get an error row when read, instead of vanishing.
    ``exclude`` (the CSV) and the folder ``exclude_dir`` (the heatmaps' own subtree) are left out.
    """
    found: list[str] = []
    excluded = os.path.realpath(exclude) if exclude is not None else None
    excluded_dir = os.path.realpath(exclude_dir) if exclude_dir is not None else None

    def unlistable(error: OSError) -> None:
        if error.filename is not None:
            found.append(Path(error.filename).relative_to(root).as_posix())

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        linked = [name for name in dirnames if Path(dirpath, name).is_symlink()]
        dirnames[:] = [
            name
            for name in dirnames
            if not name.startswith(".")
            and name not in linked
            and (excluded_dir is None or os.path.realpath(Path(dirpath, name)) != excluded_dir)
        ]
        for name in [*filenames, *linked]:
            path = Path(dirpath, name)
            # realpath, unlike Path.resolve, never raises on a symlink loop
            if name.startswith(".") or (excluded is not None and os.path.realpath(path) == excluded):
                continue
            found.append(path.relative_to(root).as_posix())
    return sorted(found)


def heatmaps_inside(root: Path, heatmaps: Path) -> Path | None:
    """The heatmaps folder when it lies below DIR (its pictures must not be scored), else None.

    A HEATDIR that is DIR or holds it is refused: every scored file would be "inside HEATDIR", and
    the pictures would land among the images.
    """
    # realpath, unlike Path.resolve, never raises on a symlink loop
    real_root, real_heat = Path(os.path.realpath(root)), Path(os.path.realpath(heatmaps))
    if real_heat == real_root or real_heat in real_root.parents:
        raise UsageError(
            f"--heatmaps {heatmaps} is DIR {root} or a folder above it; choose a folder outside DIR or inside it"
        )
    return real_heat if real_root in real_heat.parents else None


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is not a file this run can read and append to.

    A directory fails at open; a FIFO, ``/dev/stdout`` or a device would be read "to the end" on resume,
    which for a pipe or ``/dev/zero`` never comes.
    """
    if not out.name:
        raise UsageError("--out must name a file")
    if not out.parent.is_dir():
        raise UsageError(f"the folder of --out {out} does not exist")
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"--out {out} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"--out {out} is a directory; name a CSV file")
    if not stat.S_ISREG(mode):
        raise UsageError(f"--out {out} exists and is not a regular file (a device, FIFO or socket)")


def lock_path(out: Path) -> Path:
    """Next to the file itself (two symlinks to one CSV share it); hidden, so never scored inside DIR."""
    real = Path(os.path.realpath(out))
    return real.with_name(f".{real.name}.lock")


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock for the run, as training does its run directory; refuse at once if it is held.

    Two runs on one CSV would both score every file and interleave their rows. A sibling file, not the
    CSV, is locked because ``--retry-errors`` replaces the CSV.
    """
    held = contextlib.ExitStack()
    try:  # only taking the lock is translated: an OSError of the run itself is not about the lock
        held.enter_context(exclusive_lock(lock_path(out)))
    except LockHeldError as busy:
        raise UsageError(
            f"another run is writing {out} ({busy.holder}); wait for it to finish, or write to another --out"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot create the lock file {lock_path(out)}: {exc.strerror or exc}") from None
    with held:
        yield


def columns(with_uids: bool) -> tuple[str, ...]:
    """The CSV header: the SOP Instance UID column, right after the path, only when asked for."""
    return (COLUMNS[0], UID_COLUMN, *COLUMNS[1:]) if with_uids else COLUMNS


def run_settings(engine: InferenceEngine, dicom: DicomPolicy = DEFAULT_DICOM_POLICY) -> dict[str, str]:
    """The values of :data:`SETTINGS_COLUMNS` for this run: what was used, after resolving ``auto``."""
    checks = [name.removeprefix("check_") for name, on in vars(dicom).items() if on]
    return {
        "input_guard": engine.guard_mode,
        "precision": engine.precision,
        "backend": engine.backend.name,
        "dicom_checks": ";".join(checks) or "none",
        "model_sha256": engine.metadata.sha256,
    }


def prepare(
    root: Path,
    relative: str,
    input_size: int,
    with_uid: bool,
    decoder: DecodePool,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> Prepared:
    """Read and preprocess one file exactly as the service does with an upload, in the isolated decoders."""
    file = preprocess_file(
        root / relative, input_size, max_decode_bytes=max_decode_bytes, with_uid=with_uid, decoder=decoder.decode
    )
    return Prepared(relative, file)


@dataclass
class Predictions:
    """The whole rows of an existing predictions file, each with where it lies in the text."""

    header_end: int = 0
    rows: list[dict[str, str]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        """Where the last whole row (or the header) ends: a torn row after it is cut off."""
        return self.spans[-1][1] if self.spans else self.header_end


def _not_a_row(text: str, start: int) -> UsageError:
    line = text.count("\n", 0, start) + 1
    return UsageError(
        f"line {line} is not a whole predictions row, and rows follow it; fix or remove that line, "
        "or write to a new --out (the file was left as it is)"
    )


def _torn(text: str, start: int, fields: list[str] | None, expected: tuple[str, ...]) -> bool:
    """Whether ``text[start:]`` can be the last row cut short by a kill: nothing after it, no row end in
    it, and (when it parsed) no more fields than a row has and a last one that begins a hash if all are there.
    """
    if _ROW_END.search(text, start):
        return False
    if fields is None:
        return True
    return len(fields) < len(expected) or (len(fields) == len(expected) and bool(_SHA256_PREFIX.fullmatch(fields[-1])))


def _complete_rows(text: str, expected: tuple[str, ...]) -> Predictions:
    """The rows of a predictions file that were written whole.

    A kill can cut the file anywhere, also inside a quoted file name that holds a newline; a row
    counts only if it parses to every column, ends in a model hash and its line end is there.
    Only the last row may be torn: a bad row with more after it (an edit, a second header) is
    refused, because dropping it would drop every row after it too.
    The reader is fed one line at a time, so the characters it consumed mark the row's end.
    """
    consumed = 0
    lines = re.finditer(r"[^\n]*\n|[^\n]+$", text)

    def feed() -> Iterator[str]:
        nonlocal consumed
        for match in lines:
            consumed = match.end()
            yield match.group()

    reader = csv.reader(feed(), strict=True)
    found = Predictions()
    try:
        header = next(reader, None)
    except csv.Error:  # a bare CR line end (a "Macintosh" CSV), a stray quote: not written by this scorer
        raise UsageError("exists but is not a predictions file from app.score (it does not parse as CSV)") from None
    if header is None:
        return found
    if text[consumed - 1] != "\n":  # no whole first line: the header cut by a kill, or another file's one line
        if (",".join(expected) + "\r\n").startswith(text):
            return found
        raise UsageError("exists but is not a predictions file from app.score (its one line is not our header)")
    header_found = tuple(header)
    if header_found == columns(UID_COLUMN not in expected):  # resuming must not mix rows with and without UIDs
        written, rerun = ("with", "add") if UID_COLUMN in header_found else ("without", "drop")
        raise UsageError(
            f"was written {written} --with-uids; {rerun} --with-uids to resume it, or write to a new --out"
        )
    if header_found in (LEGACY_COLUMNS, (LEGACY_COLUMNS[0], UID_COLUMN, *LEGACY_COLUMNS[1:])):
        raise UsageError(
            "was written by an older app.score that did not record the input guard, precision, backend and "
            "DICOM checks of each row, so a resume cannot be checked against them; write to a new --out"
        )
    if header_found != expected:
        raise UsageError(f"exists but is not a predictions file from app.score (columns {header})")
    found.header_end = consumed
    while True:
        start = found.end
        try:
            fields = next(reader, None)
        except csv.Error as exc:  # strict: only a quoted field left open at the end of the text is a cut
            if "unexpected end of data" in str(exc) and _torn(text, start, None, expected):
                return found
            raise _not_a_row(text, start) from None
        if fields is None:
            return found
        whole = text[consumed - 1] == "\n"
        if whole and len(fields) == len(expected) and _SHA256.fullmatch(fields[-1]):
            found.rows.append(dict(zip(expected, fields, strict=True)))
            found.spans.append((start, consumed))
        elif consumed == len(text) and not whole and _torn(text, start, fields, expected):
            return found
        else:
            raise _not_a_row(text, start)


def read_predictions(out: Path, settings: dict[str, str], with_uids: bool = False) -> tuple[Predictions, str]:
    """The whole rows of ``out`` and its text; repairs a row torn by a kill and refuses a CSV made otherwise.

    Nothing is changed unless every whole row passed: a refused file is left exactly as it was.
    """
    if not out.exists():
        return Predictions(), ""
    raw = out.read_bytes()
    text = raw.decode("utf-8", "surrogateescape")
    try:
        found = _complete_rows(text, columns(with_uids))
    except UsageError as exc:
        raise UsageError(f"{out} {exc}") from None
    for row in found.rows:
        if row["model_sha256"] != settings["model_sha256"]:
            raise UsageError(
                f"{out} holds predictions of model {row['model_sha256'][:12]}, not {settings['model_sha256'][:12]}; "
                "write to a new --out file"
            )
        differ = [
            f"{name} {row[name]} (now {settings[name]})" for name in SETTINGS_COLUMNS if row[name] != settings[name]
        ]
        if differ:
            raise UsageError(
                f"{out} holds rows made with {', '.join(differ)}; rerun with the settings it was written with "
                "(--input-guard, --precision, --backend, CXR_DICOM_CHECK_*) or write to a new --out"
            )
    keep = len(text[: found.end].encode("utf-8", "surrogateescape"))
    if keep < len(raw):  # the last row was cut mid-write: drop it, its file is redone
        with out.open("r+b") as handle:
            handle.truncate(keep)
    return found, text[: found.end]


def finished_paths(out: Path, settings: dict[str, str], with_uids: bool = False) -> set[str]:
    """Paths already in ``out`` (after the repair and checks of :func:`read_predictions`)."""
    return {row["path"] for row in read_predictions(out, settings, with_uids)[0].rows}


def drop_rows(out: Path, text: str, found: Predictions, drop: set[int]) -> None:
    """Rewrite ``out`` without the rows numbered in ``drop`` (``--retry-errors``), atomically.

    The CSV is otherwise append-only; here a temporary sibling replaces it in one ``os.replace``, so a
    kill leaves either the old file or the new one, never half of each. The rows kept are copied byte
    for byte, and a dropped row's file is scored again by this run, or by the next if it is interrupted.
    """
    kept = [text[start:end] for index, (start, end) in enumerate(found.spans) if index not in drop]
    out = Path(os.path.realpath(out))  # replace the file a symlink names, not the symlink
    temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # hidden: never scored
    try:
        temporary.write_bytes((text[: found.header_end] + "".join(kept)).encode("utf-8", "surrogateescape"))
        shutil.copymode(out, temporary)
        replace_durably([(temporary, out)])  # synced before the rename, and the rename after
    finally:
        temporary.unlink(missing_ok=True)


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


def write_overlay(folder: Path, overlay: Overlay, input_size: int) -> str:
    """Draw and write one overlay; returns why it could not be written, or "".

    A name too long for the file system or a folder in the way (a file ``x`` next to a folder
    ``x.png/``) must not end the run: the row is still written, with the reason in ``heatmap_error``.
    """
    source, pixels = overlay.file.source, overlay.file.pixels
    assert source is not None and pixels is not None
    target = folder / heatmap_path(overlay.path)
    size = overlay_size(source.width, source.height, input_size)
    picture = png_bytes(render_overlay(pixels, overlay.heatmap, size))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(picture)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return ""


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
        spec = engine.guard_spec
        if result.guard_score is not None and spec is not None:
            row.update(guard_score=repr(result.guard_score), guard_threshold=repr(spec.threshold))
        if result.detail is not None and spec is not None and spec.detail_floor is not None:
            row.update(guard_detail=repr(result.detail), detail_floor=repr(spec.detail_floor))
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
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S,
    large_decode_bytes: int = DEFAULT_LARGE_DECODE_BYTES,
    large_decodes: int = 1,
    retry_errors: bool = False,
) -> Summary:
    """Score the files of ``root`` not yet in ``out``, appending and flushing one batch at a time.

    With ``heatmaps``, each scored image's overlay PNG is written there (same relative path plus ``.png``)
    by the decoding threads, before the batch's rows. With ``retry_errors``, rows whose error may be
    gone (:data:`RETRYABLE_ERRORS`, or a heatmap not written) of files still in ``root`` are taken out of
    ``out`` and their files scored again. The decoding limits are the service's ``CXR_*`` settings.
    """
    check_out(out)
    exclude_dir = heatmaps_inside(root, heatmaps) if heatmaps is not None else None
    settings = run_settings(engine, dicom)
    with out_lock(out):
        found, text = read_predictions(out, settings, with_uids)
        listed = list_images(root, exclude=out, exclude_dir=exclude_dir)
        summary = Summary()
        if retry_errors:
            present = {csv_path(path) for path in listed}
            retry = {
                index
                for index, row in enumerate(found.rows)
                if row["path"] in present
                and (row["error_code"] in RETRYABLE_ERRORS or (heatmaps is not None and row["heatmap_error"]))
            }
            if retry:
                drop_rows(out, text, found, retry)
                found.rows = [row for index, row in enumerate(found.rows) if index not in retry]
                summary.retried = len(retry)
        done = {row["path"] for row in found.rows}
        pending_paths = [path for path in listed if csv_path(path) not in done]
        summary.skipped = len(done)
        _score_files(
            root,
            out,
            engine,
            pending_paths,
            summary,
            settings,
            batch_size=batch_size,
            heatmaps=heatmaps,
            with_uids=with_uids,
            pool_options={
                "max_pixels": max_pixels,
                "max_decode_bytes": max_decode_bytes,
                "large_decode_bytes": large_decode_bytes,
                "large_slots": large_decodes,
                "timeout_s": decode_timeout_s,
                "dicom": dicom,
            },
            workers=workers,
            progress=progress,
        )
    return summary


def _score_files(
    root: Path,
    out: Path,
    engine: InferenceEngine,
    pending_paths: list[str],
    summary: Summary,
    settings: dict[str, str],
    *,
    batch_size: int,
    workers: int,
    progress: bool,
    heatmaps: Path | None,
    with_uids: bool,
    pool_options: dict[str, Any],
) -> None:
    """The scoring loop of :func:`score`, run while it holds the CSV's lock."""
    write_header = not out.exists() or out.stat().st_size == 0
    max_decode_bytes = pool_options["max_decode_bytes"]
    with (
        DecodePool(workers, engine.input_size, **pool_options) as decoder,
        ThreadPoolExecutor(max_workers=decoder.size) as pool,
        out.open("a", newline="", encoding="utf-8") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=columns(with_uids), extrasaction="ignore")
        if write_header:
            writer.writeheader()

        def submit(chunk: list[str] | None) -> list[Future[Prepared]]:
            return [
                pool.submit(prepare, root, path, engine.input_size, with_uids, decoder, max_decode_bytes)
                for path in chunk or []
            ]

        chunks = batched(pending_paths, batch_size)
        # Decode the next batch on the pool while the current one runs on the device.
        upcoming = submit(next(chunks, None))
        with tqdm(total=len(pending_paths), unit="img", disable=None if progress else True) as bar:
            while upcoming:
                batch = [future.result() for future in upcoming]
                upcoming = submit(next(chunks, None))
                rows, overlays = rows_for(batch, engine, explain=heatmaps is not None)
                for row in rows:
                    row.update(settings)
                if heatmaps is not None:
                    drawn = [pool.submit(write_overlay, heatmaps, overlay, engine.input_size) for overlay in overlays]
                    by_path = {row["path"]: row for row in rows}
                    for overlay, future in zip(overlays, drawn, strict=True):
                        if reason := future.result():
                            path = csv_path(overlay.path)
                            by_path[path]["heatmap_error"] = reason
                            summary.heatmap_failures.append((path, reason))
                            tqdm.write(f"warning: no heatmap for {path}: {reason}", file=sys.stderr)
                write_batch(handle, writer, rows, summary)
                bar.update(len(batch))


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
    if summary.retried:
        print(f"{summary.retried} of them scored again (--retry-errors): their error rows were replaced", file=stream)
    if unreadable:
        codes = ", ".join(f"{code}={count}" for code, count in sorted(summary.errors.items()))
        print(f"files without a label by error code: {codes}", file=stream)
        for path, code in summary.failed_paths[:MAX_LISTED_ERRORS]:
            print(f"  {code}: {path}", file=stream)
        if unreadable > MAX_LISTED_ERRORS:
            print(f"  ... {unreadable - MAX_LISTED_ERRORS} more, see the error_code column of {out}", file=stream)
    if failures := len(summary.heatmap_failures):
        print(f"{failures} heatmaps could not be written, see the heatmap_error column of {out}", file=stream)


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in ``[low, high]``: a value past the service's own bound would fail
    later with a traceback (``islice``, the decode pool) or start thousands of decoder processes."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


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
    parser.add_argument(
        "--batch-size",
        type=bounded_int(1, MAX_BATCH_SIZE),
        default=defaults.max_batch_size,
        help=f"images per forward pass, at most {MAX_BATCH_SIZE} (default: $CXR_MAX_BATCH_SIZE)",
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: $CXR_DEVICE)")
    parser.add_argument("--precision", default=defaults.precision, help="auto, fp16, bf16, fp32 or int8")
    parser.add_argument(
        "--backend",
        choices=("torch", "openvino", "auto"),
        default=defaults.backend,
        help="forward-pass runtime; openvino is the CPU fast path (default: $CXR_BACKEND, else torch)",
    )
    parser.add_argument(
        "--workers",
        type=bounded_int(1, MAX_WORKERS),
        default=defaults.decode_workers,
        help=f"decoder processes, at most {MAX_WORKERS} (default: $CXR_DECODE_WORKERS, else by device)",
    )
    parser.add_argument(
        "--max-pixels",
        type=bounded_int(1, MAX_DECODE_LIMIT),
        default=defaults.max_pixels,
        help=f"reject larger images, at most {MAX_DECODE_LIMIT} (default: $CXR_MAX_PIXELS)",
    )
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
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help=f"on resume, score again the files whose rows have an error that may be gone "
        f"({', '.join(sorted(RETRYABLE_ERRORS))}; with --heatmaps also a heatmap not written); "
        "their old rows are replaced",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a user's mistake is one line on stderr and exit status 2, Ctrl-C is 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before or after the scoring, which reports it itself
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
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
    if args.heatmaps is not None and args.heatmaps.exists() and not args.heatmaps.is_dir():
        parser.error(f"--heatmaps {args.heatmaps} exists and is not a directory")
    try:
        check_out(args.out)  # before loading the model: a wrong --out costs no wait
        if args.heatmaps is not None:
            heatmaps_inside(args.directory, args.heatmaps)
        engine = load_engine(
            args.weights,
            device=args.device,
            precision=args.precision,
            input_guard=args.input_guard,
            backend=args.backend,
            cache_dir=defaults.cache_dir,
        )
        if args.heatmaps is not None:
            engine.check_explainable()
            try:
                args.heatmaps.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create --heatmaps {args.heatmaps}: {exc.strerror or exc}") from None
        summary = score(
            args.directory,
            args.out,
            engine,
            batch_size=args.batch_size,
            workers=args.workers or default_decode_workers(engine.device),
            max_pixels=args.max_pixels,
            max_decode_bytes=defaults.max_decode_bytes,
            decode_timeout_s=defaults.decode_timeout_s,
            large_decode_bytes=defaults.large_decode_bytes,
            large_decodes=defaults.large_decodes,
            progress=not args.no_progress,
            dicom=defaults.dicom_policy(),
            with_uids=args.with_uids,
            heatmaps=args.heatmaps,
            retry_errors=args.retry_errors,
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
