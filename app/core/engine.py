"""Run the verified network on the best available device, in the precision that device does well.

Shared by the HTTP service and the offline scorer so both produce the same calibrated
probabilities. On CUDA the network runs in bf16/fp16 with channels_last; on the CPU in fp32
unless bf16 is asked for (with channels_last, about 2.5x faster on CPUs with AVX512-BF16 or
AMX). On CUDA batches are staged in page-locked host memory for asynchronous copies. On a CPU
host the convolutions can instead run in OpenVINO (``CXR_BACKEND``, ``app.core.backend_choice``):
fp32, bf16 or int8, several times faster, with normalisation, head, heatmaps and guard scoring
still computed here. In any reduced precision or other runtime the stored golden outputs are
re-checked before serving, so such a deployment is proven to still compute the exported model.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from app.core.artifacts import (
    LoadedModel,
    ModelLoadError,
    ModelMetadata,
    check_golden,
    compare_golden,
    load_model,
    read_metadata,
)
from app.core.backend_choice import Backend, BackendChoice, BackendChoiceError, choose
from app.core.decision import Decision, decide, pneumonia_probability
from app.core.fastpath_record import Int8Ranges
from app.core.heatmap import CamHead, ExplainUnsupportedError, Heatmap, cam_head
from app.core.input_guard import (
    GuardMode,
    GuardSpec,
    GuardVerdict,
    detail,
    features_and_maps,
    guard_scores,
    judge,
)
from app.core.int8_calibration import CalibrationError
from app.core.network import PneumoniaNet

Precision = Literal["auto", "fp16", "bf16", "fp32", "int8"]
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Golden logits are fp32 CPU results; 13 reduced-precision conv layers drift by roughly this much
# (relative to the largest logit), while wrong or corrupted weights miss by far more.
GOLDEN_ATOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1.5e-1}
# Relative drift of the golden inputs' input-guard scores in reduced precision (measured in
# benchmarks/NOTES.md); tampered statistics move them by far more.
GUARD_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
# The same for the OpenVINO backend, by precision. int8 moves the shipped model's logits by at most
# 6 % of their size on 1,123 evaluation images (benchmarks/NOTES.md); corrupted weights miss by far more.
OPENVINO_GOLDEN_ATOL: dict[str, float] = {"fp32": 1e-3, "bf16": 1.5e-1, "int8": 1e-1}
OPENVINO_GUARD_RTOL: dict[str, float] = {"fp32": 1e-3, "bf16": 1e-1, "int8": 1e-1}
# The feature stage: normalised input -> (last feature maps, input-guard vector or None).
Features = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The requested device, backend or precision cannot be honoured; the message is one line."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` prefers the GPU; an explicit ``cuda`` without one is an error, not a silent CPU fallback."""
    if not re.match(DEVICE_PATTERN, requested):
        raise EngineError(f"invalid device {requested!r}: use auto, cpu, cuda or cuda:N")
    if requested == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise EngineError(f"device {requested!r} was requested but no CUDA GPU is available")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise EngineError(f"device {requested!r} was requested but only {torch.cuda.device_count()} GPU(s) exist")
    return torch.device("cuda", index)


def target_device(device: str, backend: Backend | str) -> torch.device:
    """The device :func:`load_engine` will place the model on, known before loading it."""
    # The OpenVINO backend is the CPU's: with CXR_DEVICE=auto it runs there even on a GPU host.
    return torch.device("cpu") if backend == "openvino" and device == "auto" else resolve_device(device)


def default_decode_workers(device: torch.device) -> int:
    """Decoder worker processes (``app.core.decode_pool``) when none are configured.

    With a GPU, decoding is the host's main job: up to 4 workers. On the CPU the forward pass
    needs the cores and decoding costs about an eighth of it, so one worker per 8 cores: more
    only steal cycles from the model (measured in benchmarks/NOTES.md). The pool adds one when
    needed so a large decode never holds the only worker.
    """
    cpus = len(os.sched_getaffinity(0))
    return min(4, cpus) if device.type == "cuda" else max(1, cpus // 8)


def resolve_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Pick the compute dtype: fp32 on the CPU (bf16 on request), bf16 where the GPU supports it, else fp16."""
    if precision not in ("auto", *_DTYPES):
        raise EngineError(f"invalid precision {precision!r}: use auto, fp16, bf16 or fp32")
    if device.type == "cpu":
        if precision == "fp16":
            raise EngineError("precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")
        return torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.cuda.device(device):
        bf16_ok = torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    if precision == "bf16" and not bf16_ok:
        raise EngineError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}")
    return _DTYPES[precision]


@dataclass(frozen=True)
class ImageResult:
    """What one forward pass says about one image."""

    probability: float  # calibrated P(pneumonia)
    guard_score: float | None = None  # input-guard score; None when the guard is off
    detail: float | None = None  # fine detail of the input; None when the guard is off or has no detail floor
    heatmap: Heatmap | None = None  # only for images whose request asked to explain


@dataclass(frozen=True)
class Assessment:
    """Everything a client is told about one scored image."""

    decision: Decision
    guard: GuardVerdict | None  # None: the guard is off, the image was not checked
    warning: str | None = None  # flag mode: the guard failed, the label must not be trusted


@dataclass(frozen=True)
class BackendInfo:
    """Which runtime computes the feature maps, and how it got there (shown by /model)."""

    name: str  # "torch" or "openvino"
    reason: str = "requested"
    conversion: dict[str, str | float] = field(default_factory=dict)  # openvino: cache status, seconds


class InferenceEngine:
    """A loaded network pinned to one device and dtype, turning uint8 batches into P(pneumonia).

    ``features`` replaces the PyTorch feature stage with another runtime (OpenVINO), which must
    return the same maps and guard vector; ``precision`` then names that runtime's precision.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        dtype: torch.dtype,
        guard_mode: GuardMode = "reject",
        *,
        features: Features | None = None,
        precision: str | None = None,
        backend: BackendInfo | None = None,
        guard_noise: float = 0.0,
    ) -> None:
        self.metadata: ModelMetadata = loaded.metadata
        self.device = device
        self.dtype = dtype
        self.input_size: int = loaded.metadata.spec.input_size
        self.guard_mode: GuardMode = guard_mode
        if guard_mode != "off" and (loaded.guard is None or loaded.metadata.guard is None):
            raise EngineError(
                f"model {loaded.metadata.version} has no input guard: re-export it with the training package, "
                "or set CXR_INPUT_GUARD=off to serve it without one"
            )
        self.guard_spec: GuardSpec | None = loaded.metadata.guard if guard_mode != "off" else None
        self._guard = loaded.guard.to(device) if self.guard_spec is not None and loaded.guard is not None else None
        self._guard_noise = guard_noise  # what the runtime's rounding adds to squared guard scores (int8)
        self._cuda = device.type == "cuda"
        # channels_last is faster for cuDNN and for oneDNN's bf16 kernels; CPU fp32 stays contiguous
        # because there its results are bitwise independent of batch composition.
        fast_layout = self._cuda or dtype != torch.float32
        self._memory_format = torch.channels_last if fast_layout else torch.contiguous_format
        network = loaded.network.to(device=device, dtype=dtype)
        self.network: PneumoniaNet = network.to(memory_format=self._memory_format).eval()
        self._cam: CamHead | None = None
        if loaded.metadata.spec.head == "compact":
            self._cam = cam_head(self.network, loaded.metadata.temperature)
        self._features: Features = features or self._torch_features
        self.precision: str = precision or next(name for name, kind in _DTYPES.items() if kind == dtype)
        self.backend: BackendInfo = backend or BackendInfo("torch")

    def check_explainable(self) -> None:
        """Raise :class:`ExplainUnsupportedError` before any work when this model cannot give heatmaps."""
        if self._cam is None:
            raise ExplainUnsupportedError()

    def _torch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.guard_spec is None:
            return self.network.feature_maps(x), None
        return features_and_maps(self.network.features, x, self.guard_spec.mean_blocks, self.guard_spec.std_blocks)

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack ``uint8[1,S,S]`` images into one batch, in page-locked memory on CUDA so the copy is async."""
        size = self.input_size
        out = torch.empty((len(items), 1, size, size), dtype=torch.uint8, pin_memory=self._cuda)
        return torch.stack(list(items), out=out)

    def infer(self, pixels: torch.Tensor, explain: Sequence[bool] = ()) -> list[ImageResult]:
        """One batched forward pass over a ``uint8[N,1,S,S]`` batch: a result per image, in order.

        The feature maps are computed once; everything reported about an image derives from them.
        ``explain[i]`` asks for image i's heatmap; it is computed for those images only, so a batch
        where nobody asked does no extra work.
        """
        size = self.input_size
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[2:]) != (size, size):
            raise ValueError(f"expected uint8[N,1,{size},{size}], got {pixels.dtype}{list(pixels.shape)}")
        with torch.inference_mode():
            if self._cuda and not pixels.is_pinned():
                pixels = pixels.pin_memory()
            on_device = pixels.to(self.device, non_blocking=True)
            # On the device beside the forward pass: about 0.25 ms per image on one CPU core, which a GPU
            # host would otherwise spend per batch on its CPU.
            floored = self.guard_spec is not None and self.guard_spec.detail_floor is not None
            details = detail(on_device) if floored else None
            x = self.network.normalize(on_device)
            x = x.contiguous(memory_format=self._memory_format)
            maps, vectors = self._features(x)
            scores: list[float | None] = [None] * len(pixels)
            if vectors is not None and self._guard is not None:
                scores = list(guard_scores(vectors, self._guard, self._guard_noise).cpu().tolist())
            logits = self.network.head(maps)
            probabilities = pneumonia_probability(logits, self.metadata.temperature).cpu().tolist()
            fine: list[float | None] = details.cpu().tolist() if details is not None else [None] * len(probabilities)
            heatmaps: list[Heatmap | None] = [None] * len(probabilities)
            wanted = [index for index, flag in enumerate(explain) if flag]
            if wanted:
                self.check_explainable()
                assert self._cam is not None
                for index, heatmap in zip(wanted, self._cam.heatmaps(maps[wanted]), strict=True):
                    heatmaps[index] = heatmap
        return [
            ImageResult(probability=p, guard_score=s, detail=d, heatmap=h)
            for p, s, d, h in zip(probabilities, scores, fine, heatmaps, strict=True)
        ]

    def decide(self, probability: float) -> Decision:
        """The decision at this model's threshold: what the service, the scorer and the reports all say."""
        return decide(probability, self.metadata.threshold, self.metadata.spec.class_names)

    def assess(self, result: ImageResult) -> Assessment:
        """The input guard's verdict and the decision: the one path from a result to an answer.

        Raises :class:`NotChestXrayError` when the guard fails in ``reject`` mode; in ``flag``
        mode the answer carries a warning instead; in ``off`` mode there is no verdict.
        """
        decision = self.decide(result.probability)
        if self.guard_spec is None or result.guard_score is None:
            return Assessment(decision, None)
        verdict = judge(self.guard_spec, result.guard_score, result.detail)
        if verdict.passed:
            return Assessment(decision, verdict)
        if self.guard_mode == "reject":
            raise verdict.refusal()
        return Assessment(decision, verdict, f"unreliable: {verdict.reason}")

    def warmup(self, batch_sizes: Iterable[int]) -> None:
        """Run each batch size once so cuDNN autotuning and allocations happen before traffic does."""
        for batch_size in sorted(set(batch_sizes)):
            blank = [torch.zeros((1, self.input_size, self.input_size), dtype=torch.uint8)] * batch_size
            self.infer(self.collate(blank))
        if self._cuda:
            torch.cuda.synchronize(self.device)


def load_engine(
    weights: Path,
    device: str = "auto",
    precision: str = "auto",
    input_guard: GuardMode = "reject",
    backend: Backend | str = "torch",
    cache_dir: Path | None = None,
) -> InferenceEngine:
    """Load, verify and place the model; raises ``ModelLoadError`` or ``EngineError`` with one-line reasons.

    A model without an input guard only loads with ``input_guard="off"``: serving one
    silently would label anything it is given. ``backend`` is ``torch``, ``openvino`` or ``auto``
    (``app.core.backend_choice``); ``cache_dir`` holds OpenVINO conversions (None: no cache).
    """
    if precision not in ("auto", "int8", *_DTYPES):
        raise EngineError(f"invalid precision {precision!r}: use auto, fp16, bf16, fp32 or int8")
    target = target_device(device, backend)
    sha256 = read_metadata(Path(weights)).sha256
    failed: dict[str, str] = {}  # precisions auto picked that did not load here, and why
    while True:
        try:
            choice = choose(
                backend,
                target,
                precision,
                weights=Path(weights),
                sha256=sha256,
                guard_on=input_guard != "off",
                failed=failed,
            )
        except BackendChoiceError as exc:
            raise EngineError(str(exc)) from exc
        if choice.backend != "openvino":
            break
        try:
            return load_openvino(Path(weights), choice, input_guard, cache_dir)
        except (ModelLoadError, EngineError) as exc:
            # A precision the operator named is served or refused, never swapped; one auto picked
            # is passed over for the next (fp32 last: its failure means the model, not the CPU).
            if not choice.automatic or choice.precision == "fp32":
                raise
            log.warning("OpenVINO %s does not load on this CPU (%s): trying the next precision", choice.precision, exc)
            failed[choice.precision] = str(exc)
    dtype = resolve_dtype(target, choice.precision)
    loaded = load_model(Path(weights))  # verifies sha256, tensor fit and golden outputs on the CPU in fp32
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # Subnormal activations are many times slower on x86 CPUs; flushing them moves logits by ~1e-38.
        torch.set_flush_denormal(True)
    engine = InferenceEngine(loaded, target, dtype, input_guard, backend=BackendInfo("torch", choice.reason))
    if target.type == "cpu":
        reason = "no CUDA GPU found" if device == "auto" else "device=cpu was requested"
        log.warning("%s: running inference on the CPU in %s, expect high latency", reason, engine.precision)
    if target.type == "cuda" or dtype != torch.float32:
        diff = check_golden(loaded, engine.network, atol=GOLDEN_ATOL[dtype], guard_rtol=GUARD_RTOL[dtype])
        log.info("golden check passed on %s in %s (max logit difference %.3g)", target, engine.precision, diff)
    return engine


def int8_guard_noise(precision: str, ranges: Int8Ranges | None) -> float:
    """The squared guard score int8 rounding adds, as measured with the ranges; 0 in other precisions."""
    if precision != "int8" or ranges is None or ranges.guard_noise is None:
        return 0.0
    return ranges.guard_noise


def load_openvino(
    weights: Path, choice: BackendChoice, guard_mode: GuardMode, cache_dir: Path | None
) -> InferenceEngine:
    """The CPU fast path: OpenVINO feature stage built from the verified weights, golden-checked.

    Serves ``choice`` as given: :func:`load_engine` calls it after ``backend_choice.choose`` approved
    the combination; the accuracy gate calls it directly to measure a precision not yet approved.
    """
    from app.core import openvino_backend  # imports OpenVINO: only when this backend serves

    loaded = load_model(weights)  # sha256, tensor fit and golden outputs verified in fp32 PyTorch first
    torch.set_flush_denormal(True)
    guard = loaded.metadata.guard if guard_mode != "off" else None
    precision = choice.precision
    ranges = choice.record.int8 if choice.record is not None else None
    noise = int8_guard_noise(precision, ranges)

    def verify(features: Features) -> float:
        """The golden inputs through the whole engine path: PyTorch normalisation, runtime features, head."""
        assert loaded.golden_inputs is not None  # load_model's own golden check required them
        with torch.inference_mode():
            maps, vectors = features(loaded.network.normalize(loaded.golden_inputs))
            logits = loaded.network.head(maps)
            scores = None
            if vectors is not None and loaded.guard is not None:
                scores = guard_scores(vectors, loaded.guard, noise)
        return compare_golden(
            loaded, logits, scores, OPENVINO_GOLDEN_ATOL[precision], guard_rtol=OPENVINO_GUARD_RTOL[precision]
        )

    try:
        runtime = openvino_backend.compile_features(
            loaded,
            precision,  # type: ignore[arg-type]
            guard=guard,
            cache_dir=cache_dir,
            threads=torch.get_num_threads(),
            calibration=ranges,
            verify=verify,
        )
    except ModelLoadError:
        raise  # the converted model failed its golden check: the message says by how much
    except (openvino_backend.OpenVinoUnavailableError, CalibrationError) as exc:
        raise EngineError(str(exc)) from exc
    except (RuntimeError, ValueError, OSError) as exc:  # OpenVINO or the exporter failed: say so in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"OpenVINO {precision} conversion failed: {first[:300]}") from exc
    conversion: dict[str, str | float] = {
        "cache": runtime.converted.status,
        "seconds": round(runtime.convert_seconds, 3),
        "threads": runtime.threads,
    }
    info = BackendInfo("openvino", choice.reason, conversion)
    engine = InferenceEngine(
        loaded,
        torch.device("cpu"),
        torch.float32,
        guard_mode,
        features=runtime,
        precision=precision,
        backend=info,
        guard_noise=noise,
    )
    log.info("CPU inference in OpenVINO %s (%s)", precision, choice.reason)
    return engine
