"""A run directory that cannot be made, or a damaged one to resume, is one ``error:`` line, never a traceback.

Each case here was a traceback before (FileExistsError, NotADirectoryError, SafetensorError,
JSONDecodeError, KeyError), found by pointing the commands at such files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import encode, synthetic_xray
from tests.training_support import IMAGE_SIDE, lock_held_elsewhere, make_dataset, refused_with_one_line, train_args
from training.cli import _how_to_continue, build_parser, main
from training.distributed import DistInfo
from training.rundir import STARTS_FILE, read_starts, record_start, run_logging
from training.user_errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-epoch run (its checkpoint, config and export) and its data."""
    root = tmp_path_factory.mktemp("finished")
    data = make_dataset(root / "data")
    assert main(train_args(data, root / "run", "--epochs", "1")) == 0
    return {"data": data, "run": root / "run"}


def test_an_out_or_report_that_is_a_file_or_lies_under_one_is_refused(
    finished: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    err = refused_with_one_line(capsys, train_args(finished["data"], a_file))
    assert err == f"error: --out {a_file} is a file, not a directory"
    err = refused_with_one_line(capsys, train_args(finished["data"], a_file / "run"))
    assert err == f"error: --out {a_file / 'run'}: cannot create the directory (Not a directory)"
    evaluate = ["evaluate", "--weights", str(finished["run"]), "--data", str(finished["data"] / "train")]
    err = refused_with_one_line(capsys, [*evaluate, "--report", str(a_file)])
    assert err == f"error: --report {a_file} is a file, not a directory"
    assert a_file.read_text() == "not a directory"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _garble(path: Path) -> None:
    path.write_text("{not json")


def _drop_optimizer(path: Path) -> None:
    meta = json.loads(path.read_text())
    del meta["optimizer"]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        (
            "checkpoint/last.safetensors",
            _truncate,
            "checkpoint is damaged (SafetensorError: Error while deserializing header",
        ),
        ("checkpoint/last.json", _garble, "checkpoint is damaged (JSONDecodeError: Expecting property name"),
        ("checkpoint/last.json", _drop_optimizer, "checkpoint is damaged (KeyError: 'optimizer')"),
        ("checkpoint/last.json", lambda path: path.write_text("[]"), "damaged (ValueError: last.json is not a JSON"),
        ("config.json", _garble, "config.json is damaged (not JSON: Expecting property name"),
        ("config.json", lambda path: path.write_text("[1, 2]"), "config.json is damaged (not a JSON object)"),
    ],
)
def test_resuming_a_damaged_run_is_refused_in_one_line(
    finished: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file: str,
    damage: Callable[[Path], None],
    message: str,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    damage(run / file)
    err = refused_with_one_line(capsys, ["train", "--resume", str(run), "--epochs", "2"])
    assert message in err
    for kept in ("model.safetensors", "model.json", "checkpoint/best.safetensors"):  # nothing overwritten
        assert (run / kept).read_bytes() == (finished["run"] / kept).read_bytes()


def test_a_second_run_into_a_busy_out_is_refused_and_a_killed_run_leaves_no_stale_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process holds the run directory's lock (as a live run does): refused; SIGKILL it: the run starts."""
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    with lock_held_elsewhere(out) as pid:
        err = refused_with_one_line(capsys, train_args(data, out))
        assert err == (
            f"error: --out {out} is in use by a run that is still going (pid {pid} on {socket.gethostname()}): "
            "wait for it, or choose another --out"
        )
        assert not (out / "checkpoint").exists() and not (out / "config.json").exists()
    assert main(train_args(data, out, "--epochs", "1")) == 0  # the kernel dropped the lock with the process
    assert (out / "model.safetensors").exists()
    assert (out / "run.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_ctrl_c_ends_a_run_with_one_line_naming_how_to_continue(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C, or what torchrun forwards) after an epoch: status 130, the resume command, no
    traceback; that command then finishes the run."""
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training", *train_args(data, out, "--epochs", "200")]
    run = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert run.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: interrupted; continue from the last finished epoch with: python -m training train --resume {out}"
    )
    assert main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows][-1] == 2 and (out / "model.safetensors").exists()


def test_an_interruption_before_the_first_epoch_says_there_is_nothing_to_continue(tmp_path: Path) -> None:
    fresh = build_parser().parse_args(train_args(tmp_path / "data", tmp_path / "run"))
    assert _how_to_continue(fresh) == " before the first epoch finished: nothing to continue"
    evaluate = build_parser().parse_args(["evaluate", "--weights", "w", "--data", "d", "--report", "r"])
    assert _how_to_continue(evaluate) == ""


def test_a_new_run_never_overwrites_an_exported_model_but_a_resume_re_exports_its_own(
    finished: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train --out`` replaced a model already there without a word, even the parent that ``--init-model`` named."""
    deployed = tmp_path / "deployed"
    deployed.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(finished["run"] / name, deployed / name)
    before = (deployed / "model.safetensors").read_bytes()
    parent = ["--init", "model", "--init-model", str(deployed)]
    for argv in (
        train_args(finished["data"], deployed, *parent),
        [*train_args(finished["data"], deployed), "--resume"],
    ):
        err = refused_with_one_line(capsys, argv)
        assert err == f"error: --out {deployed} already holds a model; choose another directory"
    assert (deployed / "model.safetensors").read_bytes() == before and not (deployed / "checkpoint").exists()
    run = tmp_path / "run"  # a finished run's own export: --resume re-calibrates and re-exports it
    shutil.copytree(finished["run"], run)
    assert main(["train", "--resume", str(run), "--target-sensitivity", "0.9", "--bootstrap", "0"]) == 0
    assert json.loads((run / "model.json").read_text())["provenance"]["args"]["target_sensitivity"] == 0.9


def test_resuming_on_images_changed_under_the_same_names_is_refused(
    finished: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The split hash compares names: a film replaced under its name was trained on without a word."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(finished["data"], data)
    shutil.copytree(finished["run"], run)
    film = sorted((data / "train" / "NORMAL").iterdir())[0]
    film.write_bytes(encode(synthetic_xray(IMAGE_SIDE, IMAGE_SIDE, 777), "JPEG", quality=90))
    err = refused_with_one_line(capsys, ["train", "--resume", str(run), "--data", str(data), "--epochs", "2"])
    assert f"the images under {data} changed since the run started (same names, other content" in err
    assert json.loads((run / "checkpoint" / "last.json").read_text())["state"]["epoch"] == 1


def test_a_torn_last_line_of_starts_jsonl_is_dropped_and_a_damaged_middle_line_refused(tmp_path: Path) -> None:
    """A kill during an append left half a line: every later --resume trained on, then died at export."""
    record_start(tmp_path, 0)
    starts = tmp_path / STARTS_FILE
    with starts.open("a") as handle:
        handle.write('{"started": "2026-12-08T05:0')
    assert [row["epochs_done"] for row in read_starts(tmp_path)] == [0]
    record_start(tmp_path, 1)  # the torn line is cut off, never glued to the new one
    assert [row["epochs_done"] for row in read_starts(tmp_path)] == [0, 1]
    assert starts.read_text().count("\n") == 2
    starts.write_text(starts.read_text().replace('"epochs_done": 0', '"epochs_done": 0,,', 1))
    with pytest.raises(UsageError, match=r"starts.jsonl is damaged \(line 1 is not a JSON object"):
        record_start(tmp_path, 2)  # refused at the start of a run, not at its export


def test_the_log_of_a_run_stopped_by_ctrl_c_says_so(tmp_path: Path) -> None:
    """Its last line read "stopped: " with no reason."""
    with pytest.raises(KeyboardInterrupt), run_logging(tmp_path, DistInfo()):
        raise KeyboardInterrupt
    assert (tmp_path / "train.log").read_text().splitlines()[-1].endswith("ERROR stopped: interrupted (SIGINT)")


def test_an_empty_path_is_refused_not_taken_as_the_current_directory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["train", "--data", "d", "--out", ""])
    assert refused.value.code == 2
    assert "argument --out: an empty path" in capsys.readouterr().err
