"""Repack the imagecodecs wheel with only the codecs the service uses, so it fits the GPU host's carry limit.

The full manylinux wheel is 26 MB (about 80 codecs); the device tool carries at most 64 MiB of working tree
and the tracked tree is ~44 MB. imagecodecs loads each codec's extension module lazily on first use, so a
wheel that keeps the package's Python files, the core modules (``_imcd``, ``_shared``, ``_shared_cython``),
the codecs the service calls (``_jpeg8`` and ``_ljpeg`` for 12/16-bit and lossless JPEG, ``_jpeg2k`` and
``_jpegls`` for DICOM; packbits lives in ``_imcd``), those the tests' fixtures encode with (``_htj2k``,
``_png``) and the bundled libraries they link against works unchanged for us. The RECORD is rewritten to
list exactly what is kept, with fresh hashes, so pip installs it like any wheel.

    python -m benchmarks.slim_imagecodecs benchmarks/wheels/imagecodecs-*.whl
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import zipfile
from pathlib import Path

# The service: _jpeg8, _ljpeg, _jpeg2k, _jpegls. The tests also encode HTJ2K and PNG fixtures with it.
KEEP_MODULES = ("_imcd", "_shared", "_shared_cython", "_jpeg8", "_ljpeg", "_jpeg2k", "_jpegls", "_htj2k", "_png")
KEEP_LIBS = ("libjpeg-", "libopenjp2-", "liblcms2-", "libcharls-", "libopenjph-", "libpng16-")


def keep(name: str) -> bool:
    """Whether a wheel member is needed by the codecs above."""
    if ".dist-info/" in name or name.startswith("imagecodecs/licenses/"):
        return True
    if name.startswith("imagecodecs.libs/"):
        return name.removeprefix("imagecodecs.libs/").startswith(KEEP_LIBS)
    if name.startswith("imagecodecs/"):
        leaf = name.removeprefix("imagecodecs/")
        if leaf.endswith(".so"):
            return leaf.split(".", 1)[0] in KEEP_MODULES
        return leaf.endswith((".py", ".pyi", "py.typed"))
    return False


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: Path) -> Path:
    """Rewrite ``wheel`` in place with only the kept members; returns it."""
    with zipfile.ZipFile(wheel) as source:
        members = {info.filename: source.read(info) for info in source.infolist() if keep(info.filename)}
    record = next(n for n in members if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
    lines = [_record_line(name, data) for name, data in members.items() if name != record] + [f"{record},,"]
    members[record] = ("\n".join(lines) + "\n").encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
        for name, data in members.items():
            target.writestr(name, data)
    tmp.replace(wheel)
    return wheel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    args = parser.parse_args(argv)
    before = args.wheel.stat().st_size
    slim(args.wheel)
    print(f"{args.wheel.name}: {before / 1e6:.1f} MB -> {args.wheel.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
