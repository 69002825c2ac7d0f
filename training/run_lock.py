"""One run per run directory: a second ``train`` into the same ``--out`` is refused while the first lives.

Two runs in one directory interleave their checkpoints and logs (a retried Kubernetes Job whose first
pod is still terminating, one command typed in two terminals), and what a later ``--resume`` reads
would belong to neither. The main process holds an advisory ``flock`` on ``OUT/run.lock`` for the
run's life (``app.exclusive_lock``: a killed run leaves no stale lock). The other processes of a
torchrun job write nothing there and take no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from app.exclusive_lock import LockHeldError, exclusive_lock
from training.distributed import DistInfo
from training.user_errors import UsageError

LOCK_FILE = "run.lock"


@contextmanager
def run_lock(run_dir: Path, dist: DistInfo) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; refuse at once if another process holds it."""
    if not dist.is_main:
        yield
        return
    held = ExitStack()
    try:  # only taking the lock is translated, not what the run raises
        held.enter_context(exclusive_lock(run_dir / LOCK_FILE))
    except LockHeldError as busy:
        raise UsageError(
            f"--out {run_dir} is in use by a run that is still going ({busy.holder}): wait for it, "
            "or choose another --out"
        ) from None
    with held:
        yield
