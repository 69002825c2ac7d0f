"""The serving pipeline behind the routes: parallel decoding, then the shared batcher.

Decoding happens per file in a thread pool *before* batching, so a bad upload fails alone
with its own error code and never reaches (or breaks) a batch of good images.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict

import torch

from app.api.batching import DynamicBatcher, ShuttingDownError
from app.api.errors import NotReadyError, RequestTimeoutError
from app.api.schemas import (
    BatchItemError,
    BatchPrediction,
    ErrorBody,
    Health,
    InputGuard,
    ModelCard,
    ModelIdentity,
    Prediction,
)
from app.api.telemetry import Metrics
from app.core.engine import ImageResult, InferenceEngine, default_decode_workers, load_engine
from app.core.input_guard import NotChestXrayError
from app.core.preprocessing import ImageError, preprocess
from app.settings import Settings

log = logging.getLogger(__name__)


class Service:
    """One loaded model and its batcher, plus the readiness state /health reports."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: InferenceEngine | None = None
        self._batcher: DynamicBatcher | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.draining = False

    async def start(self) -> None:
        """Load, verify, place and warm up the model without blocking the event loop."""
        settings = self.settings
        engine = await asyncio.to_thread(
            load_engine, settings.weights, settings.device, settings.precision, settings.input_guard
        )
        # cuDNN autotunes per input shape, so every batch size the batcher can form is warmed on the GPU.
        sizes = range(1, settings.max_batch_size + 1) if engine.device.type == "cuda" else [1]
        await asyncio.to_thread(engine.warmup, sizes)
        workers = settings.decode_workers or default_decode_workers(engine.device)
        self._decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="cxr-decode")
        self._batcher = DynamicBatcher(
            engine,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            queue_size=settings.queue_size,
            metrics=self.metrics,
        )
        self._batcher.start()
        self.engine = engine
        meta = engine.metadata
        log.info(
            "model ready",
            extra={
                "model": meta.name,
                "version": meta.version,
                "sha256": meta.sha256,
                "device": str(engine.device),
                "precision": engine.precision,
            },
        )

    def begin_drain(self) -> None:
        """Called on SIGTERM: /health turns 503 and new predictions are refused, in-flight ones finish."""
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
        if self._batcher is not None:
            await self._batcher.close()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> Health:
        if self.engine is None or self._batcher is None:
            return Health(status="loading", detail="the model is loading")
        identity = {"device": str(self.engine.device), "precision": self.engine.precision, "model": self.identity()}
        if self.draining:
            return Health(status="draining", detail="shutting down", **identity)
        if self._batcher.last_error is not None:
            return Health(status="failed", detail=self._batcher.last_error, **identity)
        return Health(status="ok", **identity)

    def identity(self) -> ModelIdentity:
        meta = self._loaded().metadata
        return ModelIdentity(name=meta.name, version=meta.version, sha256=meta.sha256)

    def model_card(self) -> ModelCard:
        engine = self._loaded()
        meta = engine.metadata.model_dump(exclude={"golden": True, "guard": {"golden_scores"}})
        return ModelCard(**meta, input_guard=engine.guard_mode, device=str(engine.device), precision=engine.precision)

    async def predict(self, data: bytes) -> Prediction:
        async with self._deadline():
            result = await self._score(data)
        return self._prediction(result)  # raises NotChestXrayError (422) when the guard refuses the image

    async def predict_many(self, files: list[tuple[str | None, bytes]]) -> list[BatchPrediction | BatchItemError]:
        """Score files concurrently (they share batches); image errors stay per file, service errors fail all."""
        try:
            async with self._deadline(), asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._score_item(name, data)) for name, data in files]
        except BaseExceptionGroup as failed:  # overloaded, shutting down, inference failed: retry the batch
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    def _loaded(self) -> InferenceEngine:
        if self.engine is None:
            raise NotReadyError()
        return self.engine

    def _admit(self) -> tuple[InferenceEngine, DynamicBatcher]:
        """Gate for new work only: requests already admitted finish even while draining."""
        engine = self._loaded()
        if self.draining or self._batcher is None:
            raise ShuttingDownError()
        return engine, self._batcher

    @asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        timeout = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            raise RequestTimeoutError(f"no result within the {timeout:g} s request timeout") from None

    async def _score(self, data: bytes) -> ImageResult:
        engine, batcher = self._admit()
        try:
            pixels: torch.Tensor = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, preprocess, data, engine.input_size, self.settings.max_pixels
            )
        except ImageError as exc:
            self.metrics.rejected_images.labels(exc.code).inc()
            raise
        return await batcher.submit(pixels)

    async def _score_item(self, filename: str | None, data: bytes) -> BatchPrediction | BatchItemError:
        try:
            prediction = self._prediction(await self._score(data))
        except ImageError as exc:  # unusable upload, or refused by the input guard: this file only
            return BatchItemError(filename=filename, error=ErrorBody(code=exc.code, message=exc.message))
        return BatchPrediction(filename=filename, **prediction.model_dump())

    def _prediction(self, result: ImageResult) -> Prediction:
        try:
            assessment = self._loaded().assess(result)
        except NotChestXrayError:
            self.metrics.guard_failures.labels("refused").inc()
            raise
        if assessment.warning is not None:
            self.metrics.guard_failures.labels("flagged").inc()
        decision = assessment.decision
        self.metrics.predictions.labels(decision.label).inc()
        guard = assessment.guard
        return Prediction(
            **asdict(decision),
            input_guard=InputGuard(score=guard.score, threshold=guard.threshold, passed=guard.passed)
            if guard
            else None,
            warning=assessment.warning,
            model=self.identity(),
        )
