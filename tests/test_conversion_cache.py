"""The converted-model cache: reuse, tamper detection, atomic entries, running without a writable folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.core.conversion_cache import MANIFEST, ConversionCache

KEY = {"weights_sha256": "ab" * 32, "graph": "int8", "input_size": 32}


class Builder:
    """Counts conversions, so reuse is asserted by what ran, not by how long it took."""

    def __init__(self, payload: bytes = b"converted model") -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, path: Path) -> None:
        self.calls += 1
        path.write_bytes(self.payload)


def test_second_lookup_reuses_the_entry(tmp_path: Path) -> None:
    build = Builder()
    first = ConversionCache(tmp_path).get_or_build(KEY, "model.onnx", build, prefix="int8")
    second = ConversionCache(tmp_path).get_or_build(KEY, "model.onnx", build, prefix="int8")
    assert (first.status, second.status, build.calls) == ("built", "hit", 1)
    assert second.path == first.path and second.path.read_bytes() == b"converted model"
    manifest = json.loads((second.path.parent / MANIFEST).read_text())
    assert manifest["key"] == KEY and len(manifest["sha256"]) == 64
    # Only the entry is left behind: no staging folder.
    assert [p.name for p in tmp_path.iterdir()] == [first.path.parent.name]


def test_a_different_key_is_a_different_entry(tmp_path: Path) -> None:
    build = Builder()
    cache = ConversionCache(tmp_path)
    cache.get_or_build(KEY, "model.onnx", build, prefix="int8")
    other = cache.get_or_build({**KEY, "weights_sha256": "cd" * 32}, "model.onnx", build, prefix="int8")
    assert other.status == "built" and build.calls == 2


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda entry: (entry / "model.onnx").write_bytes(b"converted modeL"), "does not match the manifest"),
        (lambda entry: (entry / "model.onnx").unlink(), "model.onnx is missing"),
        (lambda entry: (entry / MANIFEST).write_text("{"), "unreadable manifest"),
        (
            lambda entry: (entry / MANIFEST).write_text(json.dumps({"key": {**KEY, "input_size": 64}})),
            "manifest key does not match",
        ),
    ],
)
def test_a_damaged_entry_is_rejected_and_rebuilt(tmp_path: Path, damage, reason: str) -> None:  # type: ignore[no-untyped-def]
    build = Builder()
    first = ConversionCache(tmp_path).get_or_build(KEY, "model.onnx", build, prefix="int8")
    damage(first.path.parent)
    again = ConversionCache(tmp_path).get_or_build(KEY, "model.onnx", build, prefix="int8")
    assert again.status == "rebuilt" and reason in (again.reason or "")
    assert build.calls == 2 and again.path.read_bytes() == b"converted model"
    assert ConversionCache(tmp_path).get_or_build(KEY, "model.onnx", build, prefix="int8").status == "hit"


def test_reject_removes_the_entry(tmp_path: Path) -> None:
    build = Builder()
    cache = ConversionCache(tmp_path)
    entry = cache.get_or_build(KEY, "model.onnx", build, prefix="int8")
    cache.reject(entry, "golden check failed")
    assert not entry.path.parent.exists()
    assert cache.get_or_build(KEY, "model.onnx", build, prefix="int8").status == "built"


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        ConversionCache(tmp_path).get_or_build(KEY, "model.onnx", broken, prefix="int8")
    assert list(tmp_path.iterdir()) == []


def test_no_cache_folder_converts_every_time(tmp_path: Path) -> None:
    build = Builder()
    cache = ConversionCache(None)
    first = cache.get_or_build(KEY, "model.onnx", build, prefix="int8")
    second = cache.get_or_build(KEY, "model.onnx", build, prefix="int8")
    assert (first.status, second.status, build.calls) == ("uncached", "uncached", 2)
    assert first.entry is None and first.path.read_bytes() == b"converted model"


def test_an_unwritable_cache_folder_still_serves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # mkdir fails even for root
    build = Builder()
    converted = ConversionCache(blocker / "cache").get_or_build(KEY, "model.onnx", build, prefix="int8")
    assert converted.status == "uncached" and converted.path.read_bytes() == b"converted model"
    assert "cannot write the conversion cache" in caplog.text
