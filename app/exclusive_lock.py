"""One writer at a time: an advisory ``flock`` held while a block runs, refused at once when it is taken.

Used where two processes writing the same thing would interleave (a training run directory, a
scorer's CSV). The kernel drops the lock when its holder ends, however it ends, so a killed process
leaves no stale lock behind (a pid file would). The lock file says who holds it, for the refusal.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(Exception):
    """Another process holds the lock; ``holder`` is what it wrote ("pid N on HOST")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock while the block runs (the file is created and left in place); raises
    :class:`LockHeldError` at once when another process holds it, ``OSError`` when it cannot be made."""
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockHeldError(handle.read().strip() or "another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield  # the lock goes with the file's closing, also when the block raises
