"""Dynamic batching: many concurrent requests, one forward pass.

Requests put one decoded image each on a bounded queue and await a future. A single worker
takes the first waiting image, keeps collecting until the batch is full or ``max_wait`` has
passed (the loop LitServe's server uses; with ``max_wait`` 0, as on the CPU, it takes only what
is already queued), runs the forward pass on a dedicated thread so the event loop never blocks,
and resolves the futures. The batch size and wait come from ``app.core.batch_policy``. A
request that was cancelled or timed out while waiting has a done future and is simply left out,
so it can never break its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from app.api.telemetry import Metrics
from app.core.coded_error import CodedError
from app.core.engine import ImageResult, InferenceEngine

log = logging.getLogger(__name__)


class BatcherError(CodedError):
    """The image was fine but the service could not score it; the whole request should be retried."""

    code = "unavailable"
    default_message = "the service cannot score images right now"


class QueueFullError(BatcherError):
    code = "overloaded"


class ShuttingDownError(BatcherError):
    code = "shutting_down"
    default_message = "the service is shutting down; retry on another instance"


class InferenceFailedError(BatcherError):
    code = "inference_failed"
    default_message = "the model failed to score this batch"


@dataclass(eq=False)
class _Job:
    pixels: torch.Tensor
    future: asyncio.Future[ImageResult]
    explain: bool = False


class DynamicBatcher:
    """Owns the queue, the batching worker task and the one thread that talks to the device."""

    def __init__(
        self, engine: InferenceEngine, *, max_batch_size: int, max_wait_s: float, queue_size: int, metrics: Metrics
    ) -> None:
        self._engine = engine
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._metrics = metrics
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue(queue_size)
        # One thread: device work stays ordered and on a single CUDA context/stream.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cxr-inference")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.last_error: str | None = None
        metrics.queue_depth.set_function(self._queue.qsize)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="cxr-batcher")

    async def submit(self, pixels: torch.Tensor, explain: bool = False) -> ImageResult:
        """Queue one ``uint8[1,S,S]`` image and wait for the engine's result for it (with a heatmap if asked)."""
        if self._closed:
            raise ShuttingDownError()
        job = _Job(pixels, asyncio.get_running_loop().create_future(), explain)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._queue.maxsize} images are already waiting; retry shortly") from None
        return await job.future  # cancelling the caller cancels the future, which the worker then skips

    async def close(self) -> None:
        """Refuse new work, finish everything already queued, then stop the worker and its thread."""
        self._closed = True
        if self._worker is not None:
            await self._queue.put(None)  # FIFO: the worker reaches this only after the queued jobs
            await self._worker
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        while (first := await self._queue.get()) is not None:
            batch = [first]
            # With max_wait 0 (the CPU) the deadline has passed already: the timeout fires on the loop's
            # next turn, so only what is already queued is taken and nothing waits for more.
            deadline = asyncio.get_running_loop().time() + self._max_wait_s
            while len(batch) < self._max_batch_size:
                try:
                    async with asyncio.timeout_at(deadline):
                        job = await self._queue.get()
                except TimeoutError:
                    break
                if job is None:
                    # Run this batch first; the sentinel goes back (the queue has room: it was just taken
                    # and close() refuses new jobs before sending it), so the loop's next get ends the worker.
                    self._queue.put_nowait(None)
                    break
                batch.append(job)
            await self._execute([job for job in batch if not job.future.done()])

    async def _execute(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._forward, [job.pixels for job in jobs], [job.explain for job in jobs]
            )
        except Exception as exc:
            log.exception("inference failed for a batch of %d images", len(jobs))
            self.last_error = f"inference failed: {type(exc).__name__}: {exc}"
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(InferenceFailedError())
            return
        self.last_error = None
        self._metrics.batch_size.observe(len(jobs))
        self._metrics.inference_seconds.observe(time.perf_counter() - started)
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _forward(self, images: Sequence[torch.Tensor], explain: Sequence[bool]) -> list[ImageResult]:
        results = self._engine.infer(self._engine.collate(images), explain)
        # Checked here, inside _execute's try: a wrong count fails this batch; found later, it would kill the worker.
        if len(results) != len(images):
            raise RuntimeError(f"the engine returned {len(results)} results for {len(images)} images")
        return results
