"""The run directory: its record files, its log, and the config a ``--resume`` continues with."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.artifacts import METADATA_FILENAME, WEIGHTS_FILENAME
from app.core.network import CLASS_NAMES
from training.checkpoint import has_checkpoint
from training.config import RESUME_OVERRIDABLE, TrainConfig, flag
from training.data import PreparedData
from training.distributed import DistInfo
from training.split import patient_id
from training.user_errors import UsageError

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STARTS_FILE = "starts.jsonl"
LOG_FILE = "train.log"
log = logging.getLogger(__name__)


def holds_model(directory: Path) -> bool:
    """Whether ``directory`` holds an exported model (either of its two files)."""
    return any((directory / name).exists() for name in (METADATA_FILENAME, WEIGHTS_FILENAME))


def refuse_overwriting_a_model(out: Path) -> None:
    """A new run or mix never overwrites an export: a deployed model, or the very parent it starts from."""
    if holds_model(out):
        raise UsageError(f"--out {out} already holds a model; choose another directory")


def resolve_config(cli: dict[str, Any], resume: str | None) -> tuple[TrainConfig, bool]:
    """Merge CLI values with a stored run's config; returns (config, resuming).

    ``cli`` holds only flags given explicitly. ``resume`` is a run directory, ``"auto"`` (bare
    ``--resume``: continue ``--out`` if it holds a checkpoint, else start it) or ``None``.
    A new run is refused an ``--out`` that holds a model; a resumed run may replace its own export
    (a run directory's model is that run's, exported from its checkpoint: re-exporting a finished run
    after a change of ``--target-sensitivity`` and the like is what ``--resume`` is for).
    """
    if resume is None:
        config = TrainConfig(**cli)
        if has_checkpoint(config.out):
            raise UsageError(
                f"{config.out} already holds a training run; pass --resume to continue it or choose another --out"
            )
        refuse_overwriting_a_model(config.out)
        return config, False
    if resume == "auto":
        if "out" not in cli:
            raise UsageError("--resume without a directory needs --out")
        run_dir = Path(cli["out"])
        if not has_checkpoint(run_dir):
            config = TrainConfig(**cli)
            refuse_overwriting_a_model(config.out)
            log.info("no checkpoint in %s yet: starting a new run", run_dir)
            return config, False
    else:
        run_dir = Path(resume)
    config_path = run_dir / CONFIG_FILE
    if not (config_path.is_file() and has_checkpoint(run_dir)):
        raise UsageError(f"cannot resume: {run_dir} has no {CONFIG_FILE} and checkpoint/last.*")
    try:
        stored = json.loads(config_path.read_text())
    except ValueError as exc:
        raise UsageError(f"cannot resume: {config_path} is damaged (not JSON: {exc})") from exc
    if not isinstance(stored, dict):
        raise UsageError(f"cannot resume: {config_path} is damaged (not a JSON object)")
    stored["out"] = str(run_dir)
    original, merged = TrainConfig(**stored), TrainConfig(**{**stored, **cli})
    changed = [k for k in cli if k not in RESUME_OVERRIDABLE and getattr(merged, k) != getattr(original, k)]
    if changed:
        flags = ", ".join(f"{flag(k)} (run has {getattr(original, k)})" for k in changed)
        raise UsageError(f"cannot change {flags} when resuming {run_dir}")
    if holds_model(run_dir):
        log.info("resuming %s: its export will be replaced by this run's new export", run_dir)
    return merged, True


@contextmanager
def run_logging(run_dir: Path, dist: DistInfo) -> Iterator[None]:
    """While the block runs, the ``training`` loggers print on every process and write ``train.log`` on the
    main one only; afterwards they are as before, so a later run in the same process (a notebook, the
    tests) never writes into this run's log."""
    root = logging.getLogger("training")
    before = (root.level, root.propagate, list(root.handlers))
    root.setLevel(logging.INFO if dist.is_main else logging.ERROR)
    root.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if dist.is_main:
        handlers.append(logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8", errors="backslashreplace"))
    for handler in before[2]:
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    try:
        yield
    except BaseException as exc:
        # Why the run stopped, at the end of its log (a background run's only record); the file only, as the
        # CLI prints the error line on the console. A bug, unlike a user error, comes with its traceback.
        expected = isinstance(exc, UsageError | KeyboardInterrupt)
        why = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        reason = f"stopped: {why}"
        record = root.makeRecord(
            root.name, logging.ERROR, __file__, 0, reason, None, None if expected else sys.exc_info()
        )
        for handler in handlers[1:]:
            handler.handle(record)
        raise
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(before[0])
        root.propagate = before[1]
        for handler in before[2]:
            root.addHandler(handler)


def write_split(run_dir: Path, data: PreparedData) -> None:
    """Which file (and patient) is on which side, for audits of patient leakage."""
    record = {
        side: [
            {"path": path, "label": CLASS_NAMES[label], "patient": patient_id(path)}
            for path, label in zip(images.paths, images.labels.tolist(), strict=True)
        ]
        for side, images in (("train", data.train), ("val", data.val))
    }
    (run_dir / SPLIT_FILE).write_text(json.dumps(record, indent=1) + "\n")


def write_run_files(config: TrainConfig, data: PreparedData, history: list[dict[str, Any]]) -> None:
    """config.json (what ``--resume`` reads back), split.json and metrics.jsonl as of the first epoch to run."""
    (config.out / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    write_split(config.out, data)
    (config.out / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in history))


def git_commit() -> dict[str, Any]:
    """The code's commit, and whether app/ or training/ had uncommitted changes; null outside a git checkout."""
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


def record_start(run_dir: Path, epoch: int) -> None:
    """Append this process's start to starts.jsonl: when, the epochs already done, and the code's commit.

    A run resumed after a code change was trained by more than one version of the code; the export lists
    every start, not only the commit present at export time. The file is read first, so a damaged one is
    refused now, not at export after every remaining epoch.
    """
    read_starts(run_dir)
    row = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "epochs_done": epoch, **git_commit()}
    _append_line(run_dir / STARTS_FILE, row)


def read_starts(run_dir: Path) -> list[dict[str, Any]]:
    """The run's starts, oldest first; none for a run made before starts were recorded.

    A last line without its newline is a write a kill cut short: dropped, with a warning (the next
    append removes it). Any other line that is not a JSON object is damage, refused in one line.
    """
    path = run_dir / STARTS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines[-1]:
        log.warning("%s: dropped its last line, cut short by an interrupted write: %r", path, lines[-1][:80])
    starts = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise UsageError(
                f"{path} is damaged (line {number} is not a JSON object: {line[:60]!r}): "
                "repair or remove that line, then rerun"
            )
        starts.append(row)
    return starts


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    _append_line(run_dir / METRICS_FILE, row)


def _append_line(path: Path, row: dict[str, Any]) -> None:
    """One JSON object per line, appended in one write: the run's logs survive a crash up to the last
    finished line. A last line a kill cut short is cut off first, so it never glues onto this one."""
    data = (json.dumps(row) + "\n").encode()
    with path.open("ab+") as handle:
        handle.seek(0)
        text = handle.read()
        if text and not text.endswith(b"\n"):
            log.warning("%s: removed a last line cut short by an interrupted write", path)
            handle.truncate(text.rfind(b"\n") + 1)
        os.write(handle.fileno(), data)
