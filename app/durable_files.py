"""Writes that survive a kill or a power cut: data on disk before the rename that publishes it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to disk, so a rename published after this never names an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s entries, so a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(pairs: list[tuple[Path, Path]]) -> None:
    """``os.replace(tmp, final)`` for each pair, each ``tmp`` flushed first and the folders after."""
    for tmp, _ in pairs:
        fsync_file(tmp)
    for tmp, final in pairs:
        os.replace(tmp, final)
    for folder in {final.parent for _, final in pairs}:
        fsync_dir(folder)
