"""On-disk cache of converted models, so a restart does not convert again.

An entry is a folder named after the digest of its *key* (everything the converted file depends
on: the weights' sha256, the input size, the graph kind, the calibration and the library
versions) holding the converted file and ``manifest.json`` (the key and the file's sha256).
An entry is used only when its manifest carries the same key and the file still hashes to the
recorded value; anything else (a tampered or truncated file, a foreign manifest) is rejected,
logged and rebuilt. Entries are built in a private temporary folder and renamed into place, so a
crash or a concurrent start never leaves a half-written entry under the final name. The caller
still checks the loaded model against the golden outputs and calls :func:`reject` when that
fails, so a cache can only ever save time, never change an answer.

``cache_dir=None`` turns the cache off (read-only root filesystems without a writable volume):
every start converts into a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.core.artifacts import file_sha256

MANIFEST = "manifest.json"
CacheStatus = Literal["hit", "built", "rebuilt", "uncached"]
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cxr-pneumonia`` (``~/.cache/cxr-pneumonia``): the per-user cache location on Linux."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxr-pneumonia"


def key_digest(key: Mapping[str, str | int]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Converted:
    """A converted file ready to load, and how it was obtained (``status``; ``reason`` when rebuilt)."""

    path: Path
    status: CacheStatus
    entry: Path | None  # the cache folder, None when uncached
    reason: str | None = None


class ConversionCache:
    """Get-or-build of one converted file per key, in ``root`` (or nowhere when ``root`` is None)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._scratch: list[tempfile.TemporaryDirectory[str]] = []  # uncached builds live as long as the cache

    def get_or_build(
        self, key: Mapping[str, str | int], filename: str, build: Callable[[Path], None], *, prefix: str
    ) -> Converted:
        """Return the cached file for ``key`` or ``build(path)`` it; ``prefix`` names the entry folder."""
        if self.root is None:
            return Converted(self._build_uncached(filename, build), "uncached", None)
        entry = self.root / f"{prefix}-{key_digest(key)[:24]}"
        problem = self._check(entry, key, filename)
        if problem is None:
            log.info("converted model loaded from cache %s", entry)
            return Converted(entry / filename, "hit", entry)
        rebuilt = problem != "absent"
        if rebuilt:
            log.warning("cache entry %s rejected (%s); converting again", entry, problem)
        try:
            path = self._build_entry(entry, key, filename, build)
        except OSError as exc:  # unwritable cache folder (read-only root filesystem): still serve
            log.warning("cannot write the conversion cache in %s (%s); converting without caching", self.root, exc)
            return Converted(self._build_uncached(filename, build), "uncached", None)
        return Converted(path, "rebuilt" if rebuilt else "built", entry, problem if rebuilt else None)

    def reject(self, converted: Converted, reason: str) -> None:
        """Remove an entry whose model failed its golden check, so the next build starts clean."""
        if converted.entry is not None:
            log.warning("cache entry %s rejected (%s)", converted.entry, reason)
            shutil.rmtree(converted.entry, ignore_errors=True)

    def _check(self, entry: Path, key: Mapping[str, str | int], filename: str) -> str | None:
        """None when the entry is usable, else why not ("absent" when there is none)."""
        manifest_path, path = entry / MANIFEST, entry / filename
        if not entry.exists():
            return "absent"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable manifest: {type(exc).__name__}"
        if not isinstance(manifest, dict) or manifest.get("key") != dict(key):
            return "manifest key does not match"
        if not path.is_file():
            return f"{filename} is missing"
        actual = file_sha256(path)
        if actual != manifest.get("sha256"):
            return f"{filename} sha256 {actual[:12]} does not match the manifest"
        return None

    def _build_entry(
        self, entry: Path, key: Mapping[str, str | int], filename: str, build: Callable[[Path], None]
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.root))
        try:
            build(staging / filename)
            manifest = {"key": dict(key), "file": filename, "sha256": file_sha256(staging / filename)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            for item in staging.iterdir():
                with item.open("rb") as handle:
                    os.fsync(handle.fileno())
            if entry.exists():
                shutil.rmtree(entry)
            try:
                os.rename(staging, entry)
            except OSError:
                # Another process finished the same entry first: keep it if it is sound, else ours.
                if self._check(entry, key, filename) is not None:
                    raise
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("converted model written to cache %s", entry)
        return entry / filename

    def _build_uncached(self, filename: str, build: Callable[[Path], None]) -> Path:
        scratch = tempfile.TemporaryDirectory(prefix="cxr-convert-")
        self._scratch.append(scratch)
        path = Path(scratch.name) / filename
        build(path)
        return path
