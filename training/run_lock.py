"""One run per run directory: a second ``train`` into the same ``--out`` is refused while the first lives.

Two runs in one directory interleave their checkpoints and logs (a retried Kubernetes Job whose first
pod is still terminating, one command typed in two terminals), and what a later ``--resume`` reads
would belong to neither. The main process holds an advisory ``flock`` on ``OUT/run.lock`` for the
run's life. The kernel drops it when the process ends, however it ends, so a killed run leaves no
stale lock behind (a pid file would). The other processes of a torchrun job write nothing there and
take no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.distributed import DistInfo
from training.user_errors import UsageError

LOCK_FILE = "run.lock"


@contextmanager
def run_lock(run_dir: Path, dist: DistInfo) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; refuse at once if another process holds it."""
    if not dist.is_main:
        yield
        return
    with open(run_dir / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UsageError(
                f"--out {run_dir} is in use by a run that is still going ({holder}): wait for it, "
                "or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield  # the lock goes with the file's closing, also when the block raises
