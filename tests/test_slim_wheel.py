"""The GPU-host wheel slimmer keeps exactly the codecs we use and leaves a RECORD pip can trust."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from benchmarks.slim_imagecodecs import slim

DIST = "imagecodecs-2026.3.6.dist-info"
MEMBERS = {
    "imagecodecs/__init__.py": b"from .imagecodecs import *\n",
    "imagecodecs/imagecodecs.py": b"# lazy loader\n",
    "imagecodecs/py.typed": b"",
    "imagecodecs/licenses/LICENSE-libjpeg-turbo": b"BSD\n",
    "imagecodecs/_imcd.abi3.so": b"core",
    "imagecodecs/_shared_cython.abi3.so": b"cython runtime",
    "imagecodecs/_jpeg8.abi3.so": b"jpeg8",
    "imagecodecs/_jpegxl.abi3.so": b"x" * 5000,  # not used by us
    "imagecodecs/_avif.abi3.so": b"x" * 5000,  # not used by us
    "imagecodecs.libs/libjpeg-f212e7a6.so.8.3.2": b"libjpeg",
    "imagecodecs.libs/libaom-391a2213.so.3.13.1": b"x" * 5000,  # only _avif needs it
    f"{DIST}/METADATA": b"Name: imagecodecs\n",
    f"{DIST}/WHEEL": b"Wheel-Version: 1.0\n",
    f"{DIST}/RECORD": b"stale,sha256=nothing,1\n",
}


def _b64_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_keeps_used_codecs_drops_the_rest_and_rewrites_record(tmp_path: Path) -> None:
    wheel = tmp_path / "imagecodecs-2026.3.6-cp311-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in MEMBERS.items():
            z.writestr(name, data)

    slim(wheel)

    with zipfile.ZipFile(wheel) as z:
        kept = {name: z.read(name) for name in z.namelist()}
    dropped = {"imagecodecs/_jpegxl.abi3.so", "imagecodecs/_avif.abi3.so", "imagecodecs.libs/libaom-391a2213.so.3.13.1"}
    assert set(kept) == set(MEMBERS) - dropped
    for name in set(MEMBERS) - dropped - {f"{DIST}/RECORD"}:
        assert kept[name] == MEMBERS[name]

    record = kept[f"{DIST}/RECORD"].decode().splitlines()
    assert sorted(record) == sorted(
        [f"{name},sha256={_b64_sha256(MEMBERS[name])},{len(MEMBERS[name])}" for name in set(kept) - {f"{DIST}/RECORD"}]
        + [f"{DIST}/RECORD,,"]
    )
    assert not wheel.with_suffix(".tmp").exists()
