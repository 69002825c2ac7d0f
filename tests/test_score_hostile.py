"""Issue 10, finding 4: the offline scorer gives every entry of a folder a row and never dies or hangs."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app import score
from app.core.engine import InferenceEngine, load_engine
from tests.conftest import encode, synthetic_xray
from tests.hostile_inputs import lossless_without_huffman_table, two_channel_jpeg

UNDECODABLE = os.fsdecode(b"caf\xe9-latin1.jpeg")  # 0xE9 alone is not UTF-8


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> InferenceEngine:
    # Hostile folder entries are tested here; a blank or two-channel image is what the guard refuses
    # (tests/test_input_guard.py), so flag mode keeps every readable image a scored row.
    return load_engine(tiny_weights, device="cpu", input_guard="flag")


@pytest.fixture(autouse=True)
def clean_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("CXR_")]:
        monkeypatch.delenv(name)


def run_with(engine: InferenceEngine, root: Path, out: Path, batch_size: int = 4) -> score.Summary:
    return score.score(root, out, engine, batch_size=batch_size, workers=2, max_pixels=10_000_000, progress=False)


def read_rows(out: Path) -> list[dict[str, str]]:
    with out.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def hostile_dir(tmp_path: Path) -> Path:
    """Everything the issue's scorer run died or hung on, plus the entries it silently dropped."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    good = encode(synthetic_xray(), "JPEG")
    (root / "good.jpeg").write_bytes(good)
    (root / "sub" / "good2.jpeg").write_bytes(good)
    os.mkfifo(root / "fifo.jpeg")  # opening it for reading blocks until a writer comes: hung the old scorer
    (root / "loop-a.jpeg").symlink_to(root / "loop-b.jpeg")
    (root / "loop-b.jpeg").symlink_to(root / "loop-a.jpeg")  # RuntimeError in the old file walk
    (root / "linked-dir").symlink_to(root / "sub", target_is_directory=True)
    (root / UNDECODABLE).write_bytes(good)  # UnicodeEncodeError writing the CSV
    (root / "back\\slash.jpeg").write_bytes(good)
    (root / '=HYPERLINK("x").jpeg').write_bytes(good)  # kept exact: resume matches on it (README: the CSV is data)
    (root / "two-channel.jpeg").write_bytes(two_channel_jpeg(12))  # ended the old run with 0 rows
    (root / "crash-input.jpeg").write_bytes(lossless_without_huffman_table())  # segfaulted the old decoder
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket.jpeg"))
    listener.close()
    return root


@pytest.mark.timeout(120)
def test_every_entry_gets_a_row_and_the_run_finishes(hostile_dir: Path, engine: InferenceEngine, tmp_path: Path):
    out = tmp_path / "p.csv"
    summary = run_with(engine, hostile_dir, out)
    rows = {row["path"]: row for row in read_rows(out)}
    expected = {
        "good.jpeg": "",
        "sub/good2.jpeg": "",
        "two-channel.jpeg": "",
        "caf\\xe9-latin1.jpeg": "",
        "back\\\\slash.jpeg": "",
        '=HYPERLINK("x").jpeg': "",
        "fifo.jpeg": "read_error",
        "socket.jpeg": "read_error",
        "loop-a.jpeg": "read_error",
        "loop-b.jpeg": "read_error",
        "linked-dir": "read_error",
        "crash-input.jpeg": "corrupt_image",
    }
    assert {path: row["error_code"] for path, row in rows.items()} == expected
    assert "FIFO" in rows["fifo.jpeg"]["error_message"] and "socket" in rows["socket.jpeg"]["error_message"]
    assert "directory" in rows["linked-dir"]["error_message"]
    assert "symbolic links" in rows["loop-a.jpeg"]["error_message"].lower()
    assert rows["two-channel.jpeg"]["label"] in ("NORMAL", "PNEUMONIA")
    assert summary.scored == len(expected)
    # A rerun recognises every name, the escaped ones too, and redoes nothing.
    again = run_with(engine, hostile_dir, out)
    assert (again.scored, again.skipped) == (0, len(expected))


def test_escaped_names_are_distinct_from_literal_backslashes() -> None:
    literal = "caf\\xe9.jpeg"  # a real name holding a backslash, an x, an e and a 9
    escaped = os.fsdecode(b"caf\xe9.jpeg")
    assert score.csv_path(literal) != score.csv_path(escaped)
    assert score.csv_path(escaped) == "caf\\xe9.jpeg" and score.csv_path("ok/é.jpeg") == "ok/é.jpeg"


def test_resume_repair_handles_a_cut_anywhere(engine: InferenceEngine, tmp_path: Path) -> None:
    """Every cut of a CSV whose names hold newlines, quotes and commas: no crash, only whole rows kept."""
    root = tmp_path / "images"
    root.mkdir()
    names = ["a\nb.jpeg", 'quote"d.jpeg', "comma,name.jpeg", "plain.jpeg"]
    for seed, name in enumerate(names):
        (root / name).write_bytes(encode(synthetic_xray(seed=seed), "JPEG"))
    full = tmp_path / "full.csv"
    run_with(engine, root, full, batch_size=1)
    raw = full.read_bytes()
    rows = read_rows(full)
    assert len(rows) == len(names)
    cut_file = tmp_path / "cut.csv"
    for cut in range(len(raw) + 1):
        cut_file.write_bytes(raw[:cut])
        done = score.finished_paths(cut_file, score.run_settings(engine))
        kept = cut_file.read_bytes()
        assert raw.startswith(kept)
        whole_rows = [row["path"] for row in read_rows(cut_file)] if kept else []
        assert done == set(whole_rows)
        assert kept in (b"", *[raw[:end] for end in row_ends(raw)]), cut
    # The cut: right after the newline inside the quoted name; a rerun completes the file exactly.
    cut_file.write_bytes(raw[: raw.index(b"a\n") + 2])
    run_with(engine, root, cut_file, batch_size=1)
    assert cut_file.read_bytes() == raw


def row_ends(raw: bytes) -> list[int]:
    """Byte offsets right after each physical row terminator the writer put (``\\r\\n`` after a model hash)."""
    ends, pos = [], 0
    while (pos := raw.find(b"\r\n", pos)) >= 0:
        pos += 2
        ends.append(pos)
    return ends


def _python(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXR_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )


@pytest.mark.timeout(300)
def test_ctrl_c_while_the_scorer_imports_exits_130_quietly(tmp_path: Path) -> None:
    """Importing torch takes seconds; a Ctrl-C then printed a KeyboardInterrupt traceback."""
    result = _python(
        f"""
        import importlib.abc, os, runpy, signal, sys

        class CtrlCAtTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch":
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, CtrlCAtTorch())
        sys.argv = ["app.score", {str(tmp_path)!r}, "--out", {str(tmp_path / "p.csv")!r}]
        runpy.run_module("app.score", run_name="__main__", alter_sys=True)
        """,
        tmp_path,
    )
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(300)
def test_ctrl_c_while_the_decoders_start_is_not_the_forkservers_traceback(tmp_path: Path) -> None:
    """The forkserver preloads torch before it ignores SIGINT; a Ctrl-C to the process group then was its
    traceback, and the pool could not start. It now starts with SIGINT ignored."""
    result = _python(
        """
        import os, signal
        import multiprocessing.forkserver as forkserver
        from app.core.decode_pool import DecodePool

        server = forkserver._forkserver
        start = server.ensure_running

        def start_then_interrupt():  # as a Ctrl-C to the process group reaches the new forkserver
            started = server._forkserver_pid is None
            start()
            if started:
                os.kill(server._forkserver_pid, signal.SIGINT)

        server.ensure_running = forkserver.ensure_running = start_then_interrupt
        with DecodePool(1, 32) as pool:
            print("started", pool.size)
        """,
        tmp_path,
    )
    assert result.returncode == 0 and "started 2" in result.stdout, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr
