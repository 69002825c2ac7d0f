"""What isolating the decoders costs on the common 8-bit JPEG path, measured against in-process decoding.

    python -m benchmarks.decode_isolation_bench [--passes 5] [--input-size 224]

Three ways to turn the same uploads into model input, timed in the same run, interleaved round
by round so machine noise hits all of them alike:

- ``pillow``: the old in-process path (Pillow draft decode, not strict) for reference;
- ``in-process``: today's ``preprocess`` (strict libjpeg-turbo decode) in the calling thread;
- ``pool``: the same ``preprocess`` in a decoder worker process (``DecodePool.decode``).

Upload sets: 224 px training-size JPEGs (the per-call overhead dominates there), generated
1-3 MP JPEGs of 200-800 KB, and the large real X-rays when ``../shared/data/large-uploads`` exists.
Prints ms per image and the ratios pool / in-process and in-process / pillow.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.decode_pool import DecodePool
from app.core.preprocessing import preprocess, resize_square
from benchmarks.uploads import DEFAULT_REAL_DIR, real_uploads, synthetic_uploads, xray_like

TRAINING_DIR = DEFAULT_REAL_DIR.parent / "chest_xray" / "train"


def pillow_draft(data: bytes, size: int) -> np.ndarray:
    """The decoder preprocess used before strict decoding: Pillow's draft mode."""
    img = Image.open(io.BytesIO(data))
    img.draft("L", (size, size))
    return resize_square(img.convert("L"), size)


def small_uploads(count: int) -> list[bytes]:
    files = sorted(TRAINING_DIR.glob("*/*.jpeg"))[:count] if TRAINING_DIR.is_dir() else []
    if files:
        return [path.read_bytes() for path in files]
    out = []
    for seed in range(count):
        buffer = io.BytesIO()
        Image.fromarray(xray_like(224, 224, seed)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def ms_per_image(fn: Callable[[bytes], object], images: Sequence[bytes]) -> float:
    started = time.perf_counter()
    for data in images:
        fn(data)
    return (time.perf_counter() - started) * 1000 / len(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_isolation_bench")
    parser.add_argument("--passes", type=int, default=5, help="interleaved rounds per upload set")
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args(argv)
    size = args.input_size
    sets = {
        "224px training JPEGs": small_uploads(40),
        "1-3 MP synthetic JPEGs": [upload.data for upload in synthetic_uploads(8)],
    }
    real = [upload.data for upload in real_uploads(Path(DEFAULT_REAL_DIR))]
    if real:
        sets["large real X-rays"] = real
    with DecodePool(1, size, large_slots=1) as pool:
        ways: dict[str, Callable[[bytes], object]] = {
            "pillow": lambda data: pillow_draft(data, size),
            "in-process": lambda data: preprocess(data, size),
            "pool": pool.decode,
        }
        print(f"input {size} px, {args.passes} interleaved passes, ms per image (median over passes)")
        columns = ("pillow", "in-proc", "pool")
        header = " ".join(f"{c:>8s}" for c in columns)
        print(f"{'upload set':26s} {'n':>3s} {header}  pool/in-proc in-proc/pillow")
        for name, images in sets.items():
            for fn in ways.values():  # warm-up: allocators, libjpeg tables, the worker's first job
                ms_per_image(fn, images[:2])
            times: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.passes):
                for way, fn in ways.items():
                    times[way].append(ms_per_image(fn, images))
            median = {way: float(np.median(values)) for way, values in times.items()}
            print(
                f"{name:26s} {len(images):3d} {median['pillow']:8.2f} {median['in-process']:8.2f} "
                f"{median['pool']:8.2f}  {median['pool'] / median['in-process']:12.2f} "
                f"{median['in-process'] / median['pillow']:14.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
