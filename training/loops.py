"""One training epoch, validation and batched inference: the loops that touch the device."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from app.core.decision import pneumonia_probability
from app.core.network import PneumoniaNet
from training.augment import Augmentation, acquisition_shift, augment_batch, mix_pairs
from training.data import ImageSet
from training.distributed import DistInfo, all_reduce_sum, gather_rows
from training.metrics import roc_auc
from training.user_errors import DivergedError

DIVERGED = "the run diverged; start a new run (another --out) with a lower --lr"
ACQUISITION_SEED_OFFSET = 2**31  # far from the epoch seeds (seed * stride + epoch) the other generators use


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from ~0 to ``peak_lr`` then cosine decay to 0, per optimizer step."""

    peak_lr: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on CUDA (no loss scaling needed); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_batches(n: int, batch_size: int, epoch_seed: int, dist: DistInfo) -> list[torch.Tensor]:
    """This rank's batches of shuffled indices; every rank gets the same number of batches.

    The permutation depends only on the seed and epoch, so a resumed run replays it exactly.
    A trailing batch of one image is dropped (batch norm cannot train on it).
    """
    generator = torch.Generator().manual_seed(epoch_seed)
    order = torch.randperm(n, generator=generator)
    if dist.enabled:
        padded = -(-n // dist.world_size) * dist.world_size
        order = torch.cat([order, order[: padded - n]])[dist.rank :: dist.world_size]
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int, dist: DistInfo) -> int:
    return len(epoch_batches(n, batch_size, 0, dist))


@dataclass(frozen=True)
class EpochResult:
    loss: float
    images: int
    seconds: float


def train_one_epoch(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    schedule: Schedule,
    first_step: int,
    epoch_seed: int,
    batch_size: int,
    augmentation: Augmentation,
    acquisition: float,
    mixup: float,
    device: torch.device,
    amp: bool,
    dist: DistInfo,
    description: str,
    on_step: Callable[[int], None] | None = None,
) -> EpochResult:
    """Train over this rank's shard; ``pixels`` stay uint8 on the host until each batch is moved.

    ``on_step`` is called with the run-wide step number after each optimizer step (the weight average).
    """
    model.train()
    generator = torch.Generator().manual_seed(epoch_seed + 1)
    # A generator of its own (seeded apart from the batch order's and the augmentation's), so turning
    # the acquisition shift on changes nothing else the run draws.
    acquisition_generator = torch.Generator().manual_seed(epoch_seed + ACQUISITION_SEED_OFFSET)
    batches = epoch_batches(len(labels), batch_size, epoch_seed, dist)
    totals = torch.zeros(2, dtype=torch.float64)
    start = time.perf_counter()
    progress = tqdm(batches, desc=description, disable=not dist.is_main, dynamic_ncols=True, leave=False)
    for offset, index in enumerate(progress):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(first_step + offset)
        batch = pixels[index].to(device, non_blocking=True)
        target = labels[index].to(device, non_blocking=True)
        inputs = augment_batch(batch, generator, augmentation)
        if acquisition > 0.0:
            inputs = acquisition_shift(inputs, acquisition_generator, acquisition)
        partner, lam = target, 1.0
        if mixup > 0.0:
            inputs, partner, lam = mix_pairs(inputs, target, generator, mixup)
        if device.type == "cuda":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            outputs = model(inputs).float()
            loss = loss_fn(outputs, target)
            if mixup > 0.0:  # mixup's loss: the same blend of the two images' label losses
                loss = lam * loss + (1.0 - lam) * loss_fn(outputs, partner)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(first_step + offset)
        value = loss.item()
        where = f"{description}, step {offset + 1} of {len(batches)}"
        stop_if_diverged(value, dist, where, optimizer.param_groups[0]["lr"])
        totals += torch.tensor([value * len(index), len(index)], dtype=torch.float64)
        progress.set_postfix(loss=f"{totals[0] / totals[1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    totals = all_reduce_sum(totals, dist)
    return EpochResult(float(totals[0] / max(totals[1], 1)), int(totals[1]), time.perf_counter() - start)


def stop_if_diverged(loss: float, dist: DistInfo, where: str, lr: float) -> None:
    """Raise when this step's loss is not finite on any rank: the weights are poisoned from here on, so stop
    before a checkpoint keeps them. Summed over ranks, so every rank stops at the same step (one rank
    stopping alone would leave the others waiting in the next all-reduce)."""
    total = float(all_reduce_sum(torch.tensor([loss], dtype=torch.float64), dist)[0])
    if not math.isfinite(total):
        raise DivergedError(
            f"{where}: the training loss is {loss if not math.isfinite(loss) else 'not finite on another process'} "
            f"(learning rate {lr:.2e}): {DIVERGED}"
        )


def _chunks(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.inference_mode()
def predict_logits(
    network: nn.Module,
    pixels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    show: bool = False,
) -> torch.Tensor:
    """float32 CPU logits for uint8 ``pixels`` in eval mode (fp32 unless ``amp``)."""
    network.eval()
    outputs = []
    for part in tqdm(list(_chunks(len(pixels), batch_size)), desc="predict", disable=not show, leave=False):
        with autocast(device, amp):
            outputs.append(network(pixels[part].to(device)).float().cpu())
    if not outputs:
        return torch.zeros((0, 2))
    return torch.cat(outputs)


def validate(
    network: PneumoniaNet, val: ImageSet, *, batch_size: int, device: torch.device, dist: DistInfo
) -> dict[str, float]:
    """Val AUC / loss / accuracy at 0.5, each rank predicting a shard."""
    shard = val.pixels[dist.rank :: dist.world_size]
    logits = predict_logits(network, shard, batch_size=batch_size, device=device, amp=True, show=dist.is_main)
    logits = gather_rows(logits, len(val), dist)  # every rank holds all of them: all raise alike
    if not bool(torch.isfinite(logits).all()):
        raise DivergedError(f"the network's validation outputs are not finite: {DIVERGED}")
    probs = pneumonia_probability(logits).numpy()
    labels = val.labels.numpy()
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, val.labels)),
        "val_auc": roc_auc(labels, probs),
        "val_accuracy_at_0.5": float(np.mean((probs >= 0.5) == labels)),
    }
