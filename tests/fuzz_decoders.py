"""Mutation fuzzer for ``app.core.preprocessing``, run through the isolated decode pool.

Seeded and deterministic: mutant ``i`` of format ``f`` under seed ``s`` is always the same bytes,
so a finding is reproduced (and kept as a regression test in ``tests/test_fuzz.py``) by its
``(format, seed, index)`` alone. Each mutant is decoded by a worker process, so a decoder crash
is observed and reported as a finding instead of killing the fuzzer. Findings: a crashed or
hung decoder, or an exception that is not an ``ImageError`` (which the service would answer 500).

    python -m tests.fuzz_decoders --mutations 20000 --seed 1 --out fuzz-findings   # make fuzz
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
from PIL import Image
from pydicom import uid

from app.core.decode_pool import DecodePool, DecoderCrashedError, DecoderFailedError, DecodeTimeoutError
from app.core.preprocessing import ImageError
from tests.conftest import encode, synthetic_xray
from tests.dicom_files import Spec, dicom_bytes
from tests.hostile_inputs import gradient16, two_channel_jpeg

INPUT_SIZE = 32
FINDINGS = ("crash", "timeout", "bug")


def _seeds() -> dict[str, bytes]:
    """One small valid file per decoder path the service has."""
    xray = synthetic_xray(64, 48, seed=4)
    return {
        "jpeg-baseline": encode(xray, "JPEG", quality=85),
        "jpeg-progressive-rgb": encode(xray.convert("RGB"), "JPEG", quality=85, progressive=True),
        "jpeg-cmyk": encode(xray.convert("CMYK"), "JPEG", quality=85),
        "jpeg-12bit": imagecodecs.jpeg8_encode(gradient16(64, 48, 4095), bitspersample=12, level=85),
        "jpeg-lossless-16": imagecodecs.jpeg8_encode(gradient16(64, 48), lossless=True, bitspersample=16),
        "jpeg-lossless-12-grey-alpha": two_channel_jpeg(12, lossless=True),
        "png-8-rgb": encode(xray.convert("RGB"), "PNG"),
        "png-16-grey": encode(Image.fromarray(gradient16(64, 48)), "PNG"),
        # DICOM: the parser (pydicom) and every codec behind it, on small single-frame radiographs.
        "dicom-uncompressed-12bit": dicom_bytes(Spec(bits_stored=12)),
        "dicom-jpeg-lossless": dicom_bytes(Spec(bits_stored=12, syntax=uid.JPEGLosslessSV1)),
        "dicom-jpeg-ls": dicom_bytes(Spec(bits_stored=12, syntax=uid.JPEGLSLossless)),
        "dicom-jpeg2000": dicom_bytes(Spec(bits_stored=12, syntax=uid.JPEG2000Lossless)),
    }


SEEDS = _seeds()


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment before the first scan's data."""
    segments, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segments.append((pos, pos + 2 + length))
        if data[pos + 1] == 0xDA:
            break
        pos += 2 + length
    return segments


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((pos, min(end, len(data))))
        pos = end
    return chunks


def _fix_png_crcs(data: bytearray) -> None:
    """Recompute every chunk CRC, so the mutation reaches zlib and the pixel decoder instead of the CRC check."""
    for start, end in _png_chunks(bytes(data)):
        if end - 4 > start + 4 and end <= len(data):
            data[end - 4 : end] = zlib.crc32(data[start + 4 : end - 4]).to_bytes(4, "big")


def _flip_bits(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)


def _interesting_bytes(rng: random.Random, data: bytearray) -> None:
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))


def _delete_span(rng: random.Random, data: bytearray) -> None:
    start = rng.randrange(len(data))
    del data[start : start + rng.randint(1, 64)]


def _duplicate_span(rng: random.Random, data: bytearray) -> None:
    start = rng.randrange(len(data))
    span = data[start : start + rng.randint(1, 64)]
    pos = rng.randrange(len(data))
    data[pos:pos] = span


def _truncate(rng: random.Random, data: bytearray) -> None:
    del data[rng.randrange(1, len(data)) :]
    if data[:2] == b"\xff\xd8" and rng.random() < 0.5:
        data += b"\xff\xd9"


def _drop_structure(rng: random.Random, data: bytearray) -> None:
    """Remove a whole JPEG segment (DHT, DQT, SOF, SOS ...) or PNG chunk: what broke the ljpeg fallback."""
    parts = _jpeg_segments(bytes(data)) if data[:2] == b"\xff\xd8" else _png_chunks(bytes(data))
    if parts:
        start, end = rng.choice(parts)
        del data[start:end]


def _change_field(rng: random.Random, data: bytearray) -> None:
    """Rewrite a length or size field with a boundary value."""
    value = rng.choice((0, 1, 2, 7, 8, 255, 256, 4095, 65535, rng.randrange(65536)))
    if data[:2] == b"\xff\xd8":
        segments = _jpeg_segments(bytes(data))
        if segments:
            start, _ = rng.choice(segments)
            offset = rng.choice((2, 5, 7)) if data[start + 1] in range(0xC0, 0xD0) else 2
            data[start + offset : start + offset + 2] = value.to_bytes(2, "big")
    elif len(data) > 24:
        offset = rng.choice((16, 20, 24, 25))
        width = 1 if offset >= 24 else 4
        data[offset : offset + width] = (value % (256**width)).to_bytes(width, "big")


MUTATORS: tuple[Callable[[random.Random, bytearray], None], ...] = (
    _flip_bits,
    _interesting_bytes,
    _delete_span,
    _duplicate_span,
    _truncate,
    _drop_structure,
    _change_field,
)


def mutant(fmt: str, seed: int, index: int) -> bytes:
    """The ``index``-th mutant of a format's seed file: one to three stacked mutations."""
    rng = random.Random(f"{fmt}:{seed}:{index}")
    data = bytearray(SEEDS[fmt])
    for _ in range(rng.randint(1, 3)):
        if len(data) < 4:
            break
        rng.choice(MUTATORS)(rng, data)
    if fmt.startswith("png") and rng.random() < 0.7:
        _fix_png_crcs(data)
    return bytes(data)


@dataclass(frozen=True)
class Finding:
    kind: str  # crash, timeout or bug
    format: str
    seed: int
    index: int
    detail: str


def classify(pool: DecodePool, data: bytes) -> tuple[str, str]:
    """(outcome, detail): ``ok``, an ImageError code, or one of :data:`FINDINGS`."""
    try:
        pool.decode(data)
    except DecoderCrashedError as exc:
        return "crash", str(exc)
    except DecodeTimeoutError as exc:
        return "timeout", str(exc)
    except DecoderFailedError as exc:
        return "bug", str(exc)
    except ImageError as exc:
        return exc.code, str(exc)
    return "ok", ""


def fuzz(
    pool: DecodePool, formats: list[str], mutations: int, seed: int, out: Path | None = None
) -> tuple[dict[str, Counter[str]], list[Finding]]:
    outcomes: dict[str, Counter[str]] = {fmt: Counter() for fmt in formats}
    findings: list[Finding] = []
    for fmt in formats:
        for index in range(mutations):
            data = mutant(fmt, seed, index)
            outcome, detail = classify(pool, data)
            outcomes[fmt][outcome] += 1
            if outcome in FINDINGS:
                findings.append(Finding(outcome, fmt, seed, index, detail))
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"{outcome}-{fmt}-{seed}-{index}.bin").write_bytes(data)
    return outcomes, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_decoders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=2000, help="mutants per format")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--format", action="append", choices=sorted(SEEDS), help="repeat to pick formats (all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write each finding's input here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with DecodePool(args.workers, INPUT_SIZE, max_decode_bytes=64 * 1024 * 1024, timeout_s=10) as pool:
        outcomes, findings = fuzz(pool, args.format or sorted(SEEDS), args.mutations, args.seed, args.out)
    for fmt, counts in outcomes.items():
        print(f"{fmt:30s} " + ", ".join(f"{name}={count}" for name, count in counts.most_common()))
    for finding in findings:
        print(f"FINDING {finding.kind}: ({finding.format!r}, {finding.seed}, {finding.index}) {finding.detail}")
    total = sum(counts.total() for counts in outcomes.values())
    print(f"{total} mutants in {time.perf_counter() - started:.0f} s, {len(findings)} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
