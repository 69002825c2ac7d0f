"""The serving pipeline behind the routes: parallel decoding, then the shared batcher.

Decoding happens per file in decoder worker processes (``app.core.decode_pool``) *before*
batching, so a bad upload fails alone with its own error code, never reaches (or breaks) a batch
of good images, and cannot take the serving process down even when it crashes a native decoder. Every route,
``/predict`` and the Open Inference Protocol alike, goes through the same decode, batcher and
decision here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

import torch

from app.api.batching import DynamicBatcher, ShuttingDownError
from app.api.errors import InvalidInferenceRequestError, NotReadyError, RequestTimeoutError
from app.api.schemas import (
    Backend,
    Batching,
    BatchItemError,
    BatchPrediction,
    ErrorBody,
    Health,
    HeatmapBody,
    ImageSource,
    InputGuard,
    ModelCard,
    ModelIdentity,
    Prediction,
)
from app.api.telemetry import Metrics
from app.core.artifacts import read_metadata
from app.core.batch_policy import BatchPolicy, plan
from app.core.decode_pool import DecodePool
from app.core.engine import (
    Assessment,
    ImageResult,
    InferenceEngine,
    default_decode_workers,
    load_engine,
    target_device,
)
from app.core.heatmap import Heatmap
from app.core.input_guard import NotChestXrayError
from app.core.overlay import heatmap_scale, overlay_size, png_bytes, render_overlay
from app.core.preprocessing import ImageError, ModelInput, SourceInfo
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """One upload after the forward pass: what the model said and the input it said it about."""

    result: ImageResult
    input: ModelInput


@dataclass(frozen=True)
class Explanation:
    """A prediction with its heatmap, drawn: the PNG and the magnitude shown at full colour."""

    prediction: Prediction
    png: bytes
    scale: float


class Service:
    """One loaded model and its batcher, plus the readiness state /health reports."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: InferenceEngine | None = None
        self._batcher: DynamicBatcher | None = None
        self.decoder: DecodePool | None = None  # the isolated decoder processes, once started
        self.batching: BatchPolicy | None = None  # set at startup, measured on the CPU
        self.draining = False

    async def start(self) -> None:
        """Load, verify, place and warm up the model without blocking the event loop.

        The decoder workers start while the model loads: each takes seconds (imports, the
        weights' checks), the workers in processes of their own, so a start costs the longer of
        the two rather than their sum. The batch-size probe runs after both, on an otherwise idle CPU.
        """
        settings = self.settings
        # Both read cheaply what load_engine will use, and raise its errors for a bad device or model.json.
        device = target_device(settings.device, settings.backend)
        input_size = read_metadata(settings.weights).spec.input_size
        decoder = asyncio.create_task(asyncio.to_thread(self._decode_pool, device, input_size))
        try:
            engine = await asyncio.to_thread(
                load_engine,
                settings.weights,
                settings.device,
                settings.precision,
                settings.input_guard,
                settings.backend,
                settings.cache_dir,
            )
        except BaseException:
            started = (await asyncio.gather(decoder, return_exceptions=True))[0]
            if isinstance(started, DecodePool):
                await asyncio.to_thread(started.close)
            raise
        self.decoder = await decoder
        # cuDNN autotunes per input shape, so every batch size the batcher can form is warmed on the GPU.
        sizes = range(1, settings.max_batch_size + 1) if engine.device.type == "cuda" else [1]
        await asyncio.to_thread(engine.warmup, sizes)
        wait_s = None if settings.max_wait_ms is None else settings.max_wait_ms / 1000
        policy = await asyncio.to_thread(plan, engine, settings.max_batch_size, wait_s, settings.batch_probe_s)
        self.batching = policy
        self.metrics.batch_size_limit.set(policy.batch_size)
        self.metrics.backend.labels(engine.backend.name, engine.precision).set(1)
        self._batcher = DynamicBatcher(
            engine,
            max_batch_size=policy.batch_size,
            max_wait_s=policy.max_wait_s,
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
                "backend": engine.backend.name,
                "batch_size": policy.batch_size,
                "max_wait_ms": 1000 * policy.max_wait_s,
            },
        )

    def _decode_pool(self, device: torch.device, input_size: int) -> DecodePool:
        """The one preprocessing function, with the DICOM checks the settings ask for, in worker processes."""
        settings = self.settings
        return DecodePool(
            settings.decode_workers or default_decode_workers(device),
            input_size,
            max_pixels=settings.max_pixels,
            max_decode_bytes=settings.max_decode_bytes,
            large_decode_bytes=settings.large_decode_bytes,
            large_slots=settings.large_decodes,
            timeout_s=settings.decode_timeout_s,
            dicom=settings.dicom_policy(),
            on_replace=self.metrics.record_decoder_replacement,
        )

    def begin_drain(self) -> None:
        """Called on SIGTERM: /health turns 503 and new predictions are refused, in-flight ones finish."""
        self.draining = True

    async def stop(self) -> None:
        self.draining = True
        if self._batcher is not None:
            await self._batcher.close()
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close)

    def health(self) -> Health:
        if self.engine is None or self._batcher is None:
            return Health(status="loading", detail="the model is loading")
        identity = {
            "device": str(self.engine.device),
            "precision": self.engine.precision,
            "backend": self.engine.backend.name,
            "batch_size": self.batching.batch_size if self.batching is not None else None,
            "model": self.identity(),
        }
        if self.draining:
            return Health(status="draining", detail="shutting down", **identity)
        if self._batcher.last_error is not None:
            return Health(status="failed", detail=self._batcher.last_error, **identity)
        return Health(status="ok", **identity)

    def identity(self) -> ModelIdentity:
        meta = self._loaded().metadata
        return ModelIdentity(name=meta.name, version=meta.version, sha256=meta.sha256)

    def input_size(self) -> int:
        """Side of the square ``uint8`` image the loaded network takes."""
        return self._loaded().input_size

    def model_card(self) -> ModelCard:
        engine = self._loaded()
        meta = engine.metadata.model_dump(exclude={"golden": True, "guard": {"golden_scores"}})
        assert self.batching is not None  # set with the engine in start()
        policy = self.batching
        batching = Batching(
            batch_size=policy.batch_size,
            max_wait_ms=1000 * policy.max_wait_s,
            source=policy.source,
            ms_per_image={str(size): round(1000 * seconds, 3) for size, seconds in policy.seconds_per_image.items()},
        )
        backend = Backend(
            name=engine.backend.name, reason=engine.backend.reason, conversion=dict(engine.backend.conversion)
        )
        return ModelCard(
            **meta,
            input_guard=engine.guard_mode,
            device=str(engine.device),
            precision=engine.precision,
            backend=backend,
            batching=batching,
        )

    async def predict(self, data: bytes, explain: bool = False) -> Prediction:
        async with self._deadline():
            scored = await self._score(data, explain)
        prediction = self._prediction(scored.result, scored.input.source)  # NotChestXrayError (422) if refused
        self._count_returned([prediction])
        return prediction

    async def explain(self, data: bytes, opacity: float) -> Explanation:
        """The prediction with its heatmap drawn over the input at the upload's aspect ratio, as a PNG."""
        async with self._deadline():
            scored = await self._score(data, explain=True)
            heatmap = scored.result.heatmap
            assert heatmap is not None
            source = scored.input.source
            size = overlay_size(source.width, source.height, self._loaded().input_size)
            png = await asyncio.to_thread(_draw, scored.input, heatmap, size, opacity)
        prediction = self._prediction(scored.result, source)
        self._count_returned([prediction])
        return Explanation(prediction, png, heatmap_scale(heatmap))

    async def predict_many(
        self, files: list[tuple[str | None, bytes]], explain: bool = False
    ) -> list[BatchPrediction | BatchItemError]:
        """Score files concurrently (they share batches); image errors stay per file, service errors fail all."""
        try:
            async with self._deadline(), asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._score_item(name, data, explain)) for name, data in files]
        except BaseExceptionGroup as failed:  # overloaded, shutting down, inference failed: retry the batch
            raise failed.exceptions[0] from None
        results = [task.result() for task in tasks]
        self._count_returned(item for item in results if isinstance(item, BatchPrediction))
        return results

    async def predict_images(self, images: Sequence[bytes]) -> list[Prediction]:
        """All or nothing, for protocols where a request succeeds or fails as a whole.

        Every image is decoded first, in parallel; when any cannot be used the request fails with
        that image's own error code and position (the first such image), and nothing is scored.
        """
        async with self._deadline():
            engine, batcher = self._admit()
            decoded = await asyncio.gather(*(self._decode(engine, data) for data in images), return_exceptions=True)
            prepared: list[ModelInput] = []
            for index, item in enumerate(decoded):
                if isinstance(item, ImageError):
                    raise type(item)(f"item {index} of {len(images)}: {item.message}") from item
                if isinstance(item, BaseException):
                    raise item
                prepared.append(item)
            pixels = [item.pixels for item in prepared]
            return await self._submit_all(batcher, pixels, [item.source for item in prepared])

    async def predict_pixels(self, pixels: torch.Tensor) -> list[Prediction]:
        """Images the client preprocessed itself: ``uint8[N,1,S,S]`` at exactly this model's input size."""
        engine, batcher = self._admit()
        size = engine.input_size
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (1, size, size):
            raise InvalidInferenceRequestError(
                f"pixels must be uint8[N, 1, {size}, {size}] for this model, got {pixels.dtype}{list(pixels.shape)}"
            )
        if pixels.shape[0] == 0:
            raise InvalidInferenceRequestError("pixels holds no image")
        async with self._deadline():
            return await self._submit_all(batcher, list(pixels.contiguous().unbind(0)), [None] * pixels.shape[0])

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

    async def _decode(self, engine: InferenceEngine, data: bytes) -> ModelInput:
        assert self.decoder is not None and self.decoder.input_size == engine.input_size  # both set in start()
        try:
            return await self.decoder.decode_async(data)
        except ImageError as exc:
            self.metrics.rejected_images.labels(exc.code).inc()
            raise

    async def _score(self, data: bytes, explain: bool = False) -> Scored:
        engine, batcher = self._admit()
        if explain:
            engine.check_explainable()  # refuse before decoding anything
        prepared = await self._decode(engine, data)
        return Scored(await batcher.submit(prepared.pixels, explain), prepared)

    async def _submit_all(
        self, batcher: DynamicBatcher, pixels: list[torch.Tensor], sources: Sequence[SourceInfo | None]
    ) -> list[Prediction]:
        """Queue every image at once (they share forward passes); a service error fails them all."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(batcher.submit(image)) for image in pixels]
        except BaseExceptionGroup as failed:  # overloaded, shutting down, inference failed
            raise failed.exceptions[0] from None
        assessments = []
        for index, task in enumerate(tasks):
            try:
                assessments.append(self._assess(task.result()))
            except NotChestXrayError as exc:  # all or nothing: the request fails, naming the image
                raise NotChestXrayError(f"item {index} of {len(tasks)}: {exc.message}") from exc
        predictions = [
            self._answer(assessment, task.result(), source)
            for assessment, task, source in zip(assessments, tasks, sources, strict=True)
        ]
        self._count_returned(predictions)
        return predictions

    async def _score_item(self, filename: str | None, data: bytes, explain: bool) -> BatchPrediction | BatchItemError:
        try:
            scored = await self._score(data, explain)
            prediction = self._prediction(scored.result, scored.input.source)
        except ImageError as exc:  # unusable upload, or refused by the input guard: this file only
            return BatchItemError(filename=filename, error=ErrorBody(code=exc.code, message=exc.message))
        return BatchPrediction(filename=filename, **prediction.model_dump(exclude_unset=True))

    def _count_returned(self, predictions: Iterable[Prediction]) -> None:
        """``cxr_predictions_total`` and the guard's ``flagged`` count predictions handed back, never when they are
        made: a batch that fails as a whole (504, 503) after some of its images were scored returns none of them."""
        for prediction in predictions:
            self.metrics.predictions.labels(prediction.label).inc()
            if prediction.warning is not None:  # set in flag mode exactly when the guard failed
                self.metrics.guard_failures.labels("flagged").inc()

    def _prediction(self, result: ImageResult, source: SourceInfo | None) -> Prediction:
        return self._answer(self._assess(result), result, source)

    def _assess(self, result: ImageResult) -> Assessment:
        """The engine's guard verdict and decision; raises NotChestXrayError (counted) in reject mode."""
        try:
            return self._loaded().assess(result)
        except NotChestXrayError:
            self.metrics.guard_failures.labels("refused").inc()
            raise

    def _answer(self, assessment: Assessment, result: ImageResult, source: SourceInfo | None) -> Prediction:
        """The response body: ``source`` is None only for client-preprocessed pixels, where nothing was
        decoded; ``heatmap`` is set only when one was computed, so it is absent otherwise."""
        decision = assessment.decision
        described = ImageSource(**asdict(source)) if source is not None else None
        guard = assessment.guard
        prediction = Prediction(
            **asdict(decision),
            input_guard=InputGuard(
                score=guard.score,
                threshold=guard.threshold,
                passed=guard.passed,
                **({"detail": guard.detail, "detail_floor": guard.detail_floor} if guard.detail is not None else {}),
            )
            if guard
            else None,
            warning=assessment.warning,
            model=self.identity(),
            source=described,
        )
        if result.heatmap is not None:
            heatmap = result.heatmap
            prediction.heatmap = HeatmapBody(
                method=heatmap.method,
                layer=heatmap.layer,
                grid=(heatmap.rows, heatmap.cols),
                values=list(heatmap.values),
                bias=heatmap.bias,
            )
        return prediction


def _draw(model_input: ModelInput, heatmap: Heatmap, size: tuple[int, int], opacity: float) -> bytes:
    return png_bytes(render_overlay(model_input.pixels, heatmap, size, opacity))
