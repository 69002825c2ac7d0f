"""How many images one forward pass takes, and whether the batcher waits for more: from measurement.

On a GPU bigger batches are nearly free per image, so the configured maximum is used and the
batcher waits a few milliseconds to fill them. On a CPU a batch of 8 can cost *more* per image
than 8 single passes (activations too big for the caches, every buffer a fresh page-faulted
allocation: benchmarks/NOTES.md, sections 5 and 10), so at startup the engine times a ladder of
batch sizes for a bounded few seconds and keeps the largest one that does not lower throughput;
and it never holds a queued image back waiting for company, since the CPU is busy anyway and an
idle CPU gains nothing from waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from app.core.engine import InferenceEngine

# A larger batch is kept when its per-image time is within this fraction of the best one measured:
# equal throughput, fewer passes. Beyond it, the larger batch is slower per image and loses.
TOLERANCE = 0.05
PolicySource = Literal["configured", "measured"]
MAX_EXTRA_ROUNDS = 20  # repeated rounds after the first pass, budget permitting
# The extra rounds stop early once this many in a row have left the choice unchanged: a fast model
# would otherwise spend the whole budget confirming an answer it had after a fraction of it.
SETTLED_ROUNDS = 5
GPU_MAX_WAIT_S = 0.005  # a GPU batch of 32 costs little more than 1: worth a few milliseconds of waiting
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """The batcher's limits and where they came from (reported by /model, /health and the metrics)."""

    batch_size: int
    max_wait_s: float
    source: PolicySource
    seconds_per_image: dict[int, float] = field(default_factory=dict)  # measured, by batch size


def ladder(max_batch_size: int) -> list[int]:
    """Batch sizes worth timing: 1, 2, 4, ... up to (and including) the configured maximum."""
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(sizes[-1] * 2, max_batch_size))
    return sizes


def choose_batch_size(seconds_per_image: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The largest measured batch whose per-image time is within ``tolerance`` of the fastest one."""
    if not seconds_per_image:
        raise ValueError("no batch size was measured")
    best = min(seconds_per_image.values())
    return max(size for size, seconds in seconds_per_image.items() if seconds <= best * (1 + tolerance))


def measure(
    run: Callable[[int], None], max_batch_size: int, budget_s: float, clock: Callable[[], float] = time.perf_counter
) -> dict[int, float]:
    """Seconds per image of ``run(batch_size)`` up the ladder, within about ``budget_s`` seconds.

    Each size is run twice and the faster run kept: on a shared machine the slower of two is
    mostly other processes' noise. Batch 1 is always measured; a larger size is tried only when
    its two runs (estimated from the last size's time) fit in what is left of the budget, so a
    slow CPU measures fewer sizes instead of starting late. The rest of the budget goes to more
    rounds over the measured sizes, interleaved, each keeping its fastest time: on a loaded host
    a single preempted pass would otherwise decide the batch size (benchmarks/NOTES.md, section 10).
    The rounds end early when :data:`SETTLED_ROUNDS` in a row have not changed the size
    :func:`choose_batch_size` would pick.
    """
    started = clock()
    results: dict[int, float] = {}
    for size in ladder(max_batch_size):
        if results:
            last = max(results)
            expected = 2 * results[last] * size
            if clock() - started + expected > budget_s:
                break
        timings = []
        for _ in range(2):
            begun = clock()
            run(size)
            timings.append((clock() - begun) / size)
        results[size] = min(timings)
    choice, unchanged = choose_batch_size(results), 0
    for _ in range(MAX_EXTRA_ROUNDS):
        if unchanged >= SETTLED_ROUNDS:
            break
        if clock() - started + sum(seconds * size for size, seconds in results.items()) > budget_s:
            break
        for size in list(results):
            begun = clock()
            run(size)
            results[size] = min(results[size], (clock() - begun) / size)
        previous, choice = choice, choose_batch_size(results)
        unchanged = unchanged + 1 if choice == previous else 0
    return results


def plan(engine: InferenceEngine, max_batch_size: int, max_wait_s: float | None, probe_s: float) -> BatchPolicy:
    """The batcher's policy for ``engine``: configured on a GPU, measured on the CPU (unless ``probe_s`` is 0).

    ``max_wait_s`` None means the device's default: 5 ms on a GPU, 0 on the CPU.
    """
    if engine.device.type == "cuda" or probe_s <= 0:
        default_wait = GPU_MAX_WAIT_S if engine.device.type == "cuda" else 0.0
        wait = default_wait if max_wait_s is None else max_wait_s
        return BatchPolicy(max_batch_size, wait, "configured")
    size = engine.input_size
    generator = torch.Generator().manual_seed(0)
    batches = {
        batch: torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=generator)
        for batch in ladder(max_batch_size)
    }
    engine.infer(batches[1])  # first call after loading pays one-time allocations: not a measurement
    timings = measure(lambda batch: engine.infer(batches[batch]), max_batch_size, probe_s)
    chosen = choose_batch_size(timings)
    log.info(
        "batch size %d chosen on the CPU (ms per image by batch size: %s)",
        chosen,
        ", ".join(f"{batch}: {1000 * seconds:.1f}" for batch, seconds in timings.items()),
    )
    return BatchPolicy(chosen, 0.0 if max_wait_s is None else max_wait_s, "measured", timings)
