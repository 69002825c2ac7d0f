"""Optional multi-process data parallelism under ``torchrun`` (gloo on CPU, nccl on GPU).

Without torchrun's environment everything degrades to a single process and no collective
call is made, so the default path has no distributed overhead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when started by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _comm_device(info: DistInfo) -> torch.device:
    """nccl only moves CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", info.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over ranks; returns it on the CPU."""
    if not info.enabled:
        return values
    reduced = values.to(_comm_device(info))
    dist.all_reduce(reduced)
    return reduced.cpu()


def gather_rows(rows: torch.Tensor, total: int, info: DistInfo) -> torch.Tensor:
    """Reassemble a tensor sharded as ``rows[rank::world_size]`` (uneven shards allowed)."""
    if not info.enabled:
        return rows
    device = _comm_device(info)
    per_rank = -(-total // info.world_size)
    padded = torch.zeros((per_rank, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded)
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype)
    for rank, chunk in enumerate(gathered):
        count = len(range(rank, total, info.world_size))
        out[rank :: info.world_size] = chunk[:count].cpu()
    return out


class ReplicaDriftError(RuntimeError):
    """The ranks of a data-parallel run no longer hold the same parameters: gradients were not shared."""


def check_replicas_in_sync(module: torch.nn.Module, info: DistInfo) -> None:
    """Raise unless every rank holds bitwise the same parameters (DDP's guarantee), checked by checksums.

    Cheap (three float64 sums per rank) and run once after the last epoch, so a run whose ranks
    silently trained apart fails instead of exporting one rank's weights as if they were the team's.
    """
    if not info.enabled:
        return
    flat = torch.cat([p.detach().double().flatten().cpu() for p in module.parameters()])
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    checksum = torch.stack([flat.sum(), flat.square().sum(), (flat * position).sum()]).to(_comm_device(info))
    gathered = [torch.empty_like(checksum) for _ in range(info.world_size)]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
        raise ReplicaDriftError(f"the {info.world_size} processes ended with different parameters")


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def place_process(device: torch.device, requested: str, info: DistInfo) -> torch.device:
    """Under torchrun each process takes its local GPU, unless ``--device`` named one."""
    if device.type == "cuda":
        if info.enabled and requested in ("auto", "cuda"):
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def configure_threads(threads: int | None) -> None:
    """Share the CPU cores between the processes torchrun started on the same host."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local_world))
