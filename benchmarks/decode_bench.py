"""Decode-and-preprocess throughput, alone: how fast uploads become model input on the host.

If this is not well above the model's throughput the service can never be model-bound, so
it bounds what batching can achieve. The naive path (full decode, RGB, torchvision resize)
is measured the same way to show where the baseline server spends its time.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torchvision import transforms

from app.core.preprocessing import preprocess
from benchmarks.uploads import Upload


def naive_preprocess(size: int) -> Callable[[bytes], torch.Tensor]:
    """The baseline server's per-request input path, for a like-for-like decode comparison."""
    pipeline = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    return lambda data: pipeline(Image.open(io.BytesIO(data)).convert("RGB"))


def images_per_second(fn: Callable[[bytes], object], uploads: Sequence[Upload], threads: int, passes: int) -> float:
    """Run ``fn`` over the upload set ``passes`` times on ``threads`` threads (Pillow drops the GIL)."""
    work = [item.data for _ in range(passes) for item in uploads]
    started = time.perf_counter()
    if threads == 1:
        for data in work:
            fn(data)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, work))
    return len(work) / (time.perf_counter() - started)


def preprocess_ips(uploads: Sequence[Upload], input_size: int, threads: int, passes: int = 1) -> float:
    """Images/s of the service's input path on ``threads`` threads, after a warm-up (libjpeg, allocators)."""

    def ours(data: bytes) -> torch.Tensor:
        return preprocess(data, input_size)

    images_per_second(ours, uploads[:2], 1, 1)
    return images_per_second(ours, uploads, threads, passes)


def run(uploads: Sequence[Upload], input_size: int, threads: int, passes: int = 1) -> dict[str, float | int]:
    """Images/s for the service's preprocess (1 and ``threads`` threads) and the naive path (1 thread)."""
    return {
        "preprocess_1_thread_ips": preprocess_ips(uploads, input_size, 1, passes),
        "preprocess_n_threads_ips": preprocess_ips(uploads, input_size, threads, passes),
        "naive_1_thread_ips": images_per_second(naive_preprocess(input_size), uploads, 1, passes),
        "threads": threads,
    }
