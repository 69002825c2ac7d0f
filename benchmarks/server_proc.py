"""Run a server as a real subprocess on a free loopback port, as production would run it.

The benchmark must measure the process users get (uvicorn, its event loop, its workers), not
an in-process ASGI shortcut; running it as a child also lets us read its peak memory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port the OS says is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (uvicorn ``--workers`` are children of the launcher)."""
    pids, index = [pid], 0
    while index < len(pids):
        task_dir = Path(f"/proc/{pids[index]}/task")
        for children in task_dir.glob("*/children") if task_dir.is_dir() else []:
            try:
                pids.extend(int(child) for child in children.read_text().split())
            except OSError:
                continue
        index += 1
    return pids


def peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over the process tree, in MiB (upper bound of the true peak)."""
    total_kb = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024.0


@dataclass
class RunningServer:
    """A started server: where to reach it and how to read its peak memory."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_healthy(server: RunningServer, timeout_s: float) -> None:
    """Poll ``/health`` until 200; fail fast with the server's log if it exits or never gets ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not healthy after {timeout_s:.0f}s:\n{server.log_tail()}")


@contextmanager
def serve(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, port: int, startup_timeout_s: float = 180.0
) -> Iterator[RunningServer]:
    """Start ``python <args>`` with ``env`` added, yield once healthy, always stop it (TERM, then KILL)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stopping it also stops any workers it forked
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_healthy(server, startup_timeout_s)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
