"""Should decoding move to the GPU? Pillow draft-mode decode vs batched nvJPEG, same uploads.

Pillow's draft mode lets libjpeg skip most of the IDCT work for large X-rays (it decodes at
1/2..1/8 scale), while nvJPEG via ``torchvision.io.decode_jpeg(device='cuda')`` decodes at
FULL resolution, then we resize on the GPU. Which wins depends on upload size and core
count, so measure it: images/s for each path, end to end to a ``uint8[N,1,S,S]`` batch.

Run: ``python -m benchmarks.decode_gpu [--device cuda] [--batch 32] [--threads 16]``
(``--device cpu`` runs the torchvision path on the CPU, as a smoke test without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from app.core.preprocessing import preprocess
from benchmarks.uploads import Upload, real_uploads, synthetic_uploads


def pillow_ips(uploads: Sequence[Upload], size: int, threads: int, passes: int) -> float:
    """The service's path: draft decode + squash resize on ``threads`` CPU threads."""
    work = [item.data for _ in range(passes) for item in uploads]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda data: preprocess(data, size), work))
    return len(work) / (time.perf_counter() - started)


def torchvision_batch(encoded: list[torch.Tensor], size: int, device: str) -> torch.Tensor:
    """Batched decode (nvJPEG on CUDA) at full resolution, then a bilinear squash per image."""
    images = decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=device)
    resized = [
        F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        for image in images
    ]
    return torch.cat(resized).round_().clamp_(0, 255).to(torch.uint8)


def torchvision_ips(uploads: Sequence[Upload], size: int, device: str, batch: int, passes: int) -> float:
    """Images/s for :func:`torchvision_batch`, counting the host-to-device copy of the bytes."""
    encoded = [torch.frombuffer(bytearray(item.data), dtype=torch.uint8) for item in uploads]
    work = [encoded[index % len(encoded)] for index in range(passes * len(encoded))]
    torchvision_batch(work[:batch], size, device)  # warm-up: nvJPEG handles, allocator
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(work), batch):
        torchvision_batch(work[start : start + batch], size, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(work) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--synthetic", type=int, default=12)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    uploads = real_uploads() + synthetic_uploads(args.synthetic)
    result = {
        "device": args.device,
        "uploads": len(uploads),
        "pillow_draft_1_thread_ips": pillow_ips(uploads, args.input_size, 1, 1),
        "pillow_draft_n_threads_ips": pillow_ips(uploads, args.input_size, args.threads, args.passes),
        "threads": args.threads,
        "torchvision_decode_jpeg_ips": torchvision_ips(uploads, args.input_size, args.device, args.batch, args.passes),
        "batch": args.batch,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
