"""The CPU fast path: the network's convolutions compiled by OpenVINO, in fp32, bf16 or int8.

Chosen over ONNX Runtime by measurement on the target CPU (benchmarks/NOTES.md, section 9):
OpenVINO's CPU plugin runs int8 convolutions on AMX/VNNI and bf16 on AMX, where ONNX Runtime's
default CPU kernels do not. Only the convolutional part runs here (``app.core.onnx_export``);
normalisation, the head, the calibrated probability and class activation maps stay in the shared
PyTorch code, so every backend reports the same things about an image.

The graph is built only from the verified weights (``load_model`` checked their sha256 and golden
outputs), converted once and cached on disk (``app.core.conversion_cache``), and the compiled
model is checked against the golden outputs with the precision's tolerance before it serves;
a cached model that fails the check is thrown away and converted again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import openvino as ov
import torch

from app.core.artifacts import LoadedModel, ModelLoadError
from app.core.conversion_cache import ConversionCache, Converted
from app.core.fastpath_record import Int8Ranges
from app.core.input_guard import GuardSpec
from app.core.int8_calibration import RECIPE, quantize, ranges_digest
from app.core.onnx_export import GUARD_NAME, MAPS_NAME, OPSET, export_features, guard_key

OvPrecision = Literal["fp32", "bf16", "int8"]
# The int8 graph's unquantized parts (quantize/dequantize steps, pooling) stay in fp32. OpenVINO
# would otherwise pick bf16 on its own on CPUs with AMX: fp32 must be asked for to be fp32.
_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
CACHE_FORMAT = 1
log = logging.getLogger(__name__)


class OpenVinoUnavailableError(RuntimeError):
    """The requested OpenVINO configuration cannot run on this host; the message is one line."""


# x86 instructions that multiply-accumulate u8 x s8 into int32. Without them oneDNN runs int8
# convolutions on vpmaddubsw, whose int16 pair sums saturate with full 8-bit weights: on an AVX2-only
# AMD EPYC OpenVINO still reports INT8, and the shipped model's golden input-guard scores came out 63 %
# off (benchmarks/NOTES.md, section 11). OpenVINO's own performance notes ask for VNNI or AMX for int8.
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = _CPUINFO) -> frozenset[str] | None:
    """The kernel's x86 feature flags of the first CPU; None where there are none to read (not Linux x86)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def reported_capabilities() -> frozenset[str]:
    """OpenVINO's own view of the CPU: ``FP32``, ``BF16``, ``INT8``, ..."""
    return frozenset(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def usable_capabilities(reported: frozenset[str], flags: frozenset[str] | None) -> frozenset[str]:
    """``reported`` less ``INT8`` on an x86 CPU whose ``flags`` show no int8 dot-product instructions.

    Where flags cannot be read (``None``), OpenVINO's word stands and the load-time golden check is
    the safety net.
    """
    if flags is not None and not flags & INT8_DOT_PRODUCT_FLAGS:
        return reported - {"INT8"}
    return reported


def cpu_capabilities() -> frozenset[str]:
    """The precisions this CPU runs correctly in OpenVINO."""
    return usable_capabilities(reported_capabilities(), cpu_flags())


def missing_units(precision: OvPrecision) -> str | None:
    """Why this CPU cannot run ``precision`` in OpenVINO, in a few words; None when it can."""
    wanted = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}[precision]
    reported = reported_capabilities()
    if wanted in usable_capabilities(reported, cpu_flags()):
        return None
    if wanted in reported:
        return "it has no int8 dot-product instructions, AVX-512 VNNI, AVX-VNNI or AMX; without them int8 saturates"
    return f"OpenVINO finds no {precision} units"


def check_supported(precision: OvPrecision) -> None:
    """Refuse a precision the CPU has no correct fast kernels for, instead of serving it wrong or slowly."""
    why = missing_units(precision)
    if why is not None:
        raise OpenVinoUnavailableError(f"precision {precision} is not supported by this CPU ({why})")


@dataclass
class OpenVinoFeatures:
    """A compiled feature extractor: normalised ``float32[N,3,S,S]`` -> (maps, guard vector or None)."""

    precision: OvPrecision
    converted: Converted
    threads: int
    convert_seconds: float
    with_guard: bool
    _request: ov.InferRequest

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # infer() copies its outputs (share_outputs=False), so the tensors outlive the next request.
        outputs = self._request.infer({0: np.ascontiguousarray(x.detach().float().cpu().numpy())})
        vector = torch.from_numpy(outputs[GUARD_NAME]) if self.with_guard else None
        return torch.from_numpy(outputs[MAPS_NAME]), vector


def cache_key(
    loaded: LoadedModel, precision: OvPrecision, guard: GuardSpec | None, calibration: Int8Ranges | None
) -> dict[str, str | int]:
    """Everything the converted graph depends on. bf16 and fp32 share the fp32 graph (bf16 is a compile option)."""
    key: dict[str, str | int] = {
        "format": CACHE_FORMAT,
        "weights_sha256": loaded.metadata.sha256,
        "input_size": loaded.metadata.spec.input_size,
        "graph": "int8" if precision == "int8" else "fp32",
        "guard_taps": guard_key(guard),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": OPSET,
    }
    if precision == "int8":
        import onnxruntime  # only int8 conversion uses it (its quantizer)

        assert calibration is not None
        key |= {"recipe": RECIPE, "calibration": ranges_digest(calibration), "onnxruntime": onnxruntime.__version__}
    return key


def _build(
    loaded: LoadedModel, precision: OvPrecision, guard: GuardSpec | None, calibration: Int8Ranges | None
) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            export_features(loaded.network, fp32, guard)
            if precision == "int8":
                assert calibration is not None
                quantize(fp32, path, calibration)
            else:
                shutil.move(fp32, path)

    return build


def compile_request(graph: Path, precision: OvPrecision, threads: int) -> ov.InferRequest:
    """Compile an ONNX graph for this CPU as the service runs it (no capability check, no golden check)."""
    config = {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",  # one request at a time: all threads on it
        "CPU_DENORMALS_OPTIMIZATION": True,  # flush subnormals, as the PyTorch CPU path does
    }
    core = ov.Core()
    return core.compile_model(core.read_model(str(graph)), "CPU", config).create_infer_request()


def compile_features(
    loaded: LoadedModel,
    precision: OvPrecision,
    *,
    guard: GuardSpec | None,
    cache_dir: Path | None,
    threads: int,
    calibration: Int8Ranges | None = None,
    verify: Callable[[OpenVinoFeatures], float],
) -> OpenVinoFeatures:
    """Convert (or reuse the cached conversion), compile and verify; ``verify`` raises ``ModelLoadError``.

    A cached conversion that fails ``verify`` is removed and converted once more; a fresh one
    that fails is an error (the conversion itself is wrong, not the cache).
    """
    check_supported(precision)
    if precision == "int8" and calibration is None:
        raise OpenVinoUnavailableError("int8 needs the int8 ranges in the weights' model.cpu.json")
    cache = ConversionCache(cache_dir)
    key = cache_key(loaded, precision, guard, calibration)
    for attempt in (1, 2):
        started = time.perf_counter()
        converted = cache.get_or_build(
            key, "model.onnx", _build(loaded, precision, guard, calibration), prefix=str(key["graph"])
        )
        request = compile_request(converted.path, precision, threads)
        seconds = time.perf_counter() - started
        features = OpenVinoFeatures(precision, converted, threads, seconds, guard is not None, request)
        try:
            difference = verify(features)
        except ModelLoadError as exc:
            if converted.status != "hit" or attempt == 2:
                raise
            cache.reject(converted, f"golden check failed: {exc}")
            continue
        log.info(
            "OpenVINO %s model ready (%s, %.1f s, golden max logit difference %.3g)",
            precision,
            converted.status,
            features.convert_seconds,
            difference,
        )
        return features
    raise AssertionError("unreachable")
