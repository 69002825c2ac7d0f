"""Post-training static int8 quantization from stored activation ranges.

Static int8 needs the range of every activation, which only real images can give. Measuring
them needs training images, which a serving host does not (and should not) hold, so the ranges
are measured once, offline, on a few hundred *training* images (``python -m
benchmarks.accuracy_gate --calibrate N``), and stored next to the weights as
``model.int8.json``: numbers only, no pixels, tied to the weights by their sha256, together
with the accuracy gate's verdict on the validation split. The service then builds the int8
model from the verified weights and these numbers alone, in about a second.

ONNX Runtime's quantizer does the work (``quantize_static``: QDQ format, per-channel symmetric
int8 weights, uint8 activations, min/max ranges), and its JSON calibration cache is how the
stored ranges are handed back to it, so no quantization arithmetic is re-implemented here.
Measured against NNCF's quantizer on the shipped model (benchmarks/NOTES.md): the same speed in
OpenVINO, about 6x smaller probability differences.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from app.core.artifacts import resolve_paths
from app.core.coded_error import first_validation_error
from app.core.onnx_export import INPUT_NAME

CALIBRATION_SUFFIX = ".int8.json"
FORMAT_VERSION = 1
# Everything about how ranges become an int8 graph; part of the conversion cache key.
RECIPE = "ort-qdq-minmax-u8act-s8weight-perchannel-v1"
# The accuracy gate (issue 14): what a reduced-precision model must keep against fp32 PyTorch.
MAX_AUC_DROP = 0.002
MAX_FLIP_RATE = 0.005


class CalibrationError(RuntimeError):
    """The calibration file is missing, malformed or made for other weights; the message is one line."""


class GateResult(BaseModel):
    """The accuracy gate on one evaluation set: the int8 model against fp32 PyTorch."""

    dataset: str = Field(description="Which images, e.g. 'validation (patient-grouped split of train, ...)'.")
    images: int = Field(ge=1)
    roc_auc_fp32: float
    roc_auc: float
    max_probability_difference: float = Field(ge=0.0)
    label_flips: int = Field(ge=0, description="Images whose label at the model's threshold changed.")
    guard_refusal_flips: int | None = Field(
        None, ge=0, description="Images the input guard refuses in one precision and not the other."
    )
    passed: bool


class Int8Calibration(BaseModel):
    """Contents of ``model.int8.json``."""

    format_version: int = FORMAT_VERSION
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_size: int = Field(ge=1)
    method: Literal["minmax"] = "minmax"
    images: int = Field(ge=1, description="Calibration images (training side of the split only).")
    source: str = Field(description="Where the calibration images came from.")
    exporter: str = Field(description="torch version whose ONNX export the tensor names belong to.")
    ranges: dict[str, tuple[float, float]] = Field(description="ONNX tensor name -> (lowest, highest) value seen.")
    gate: list[GateResult] = Field(default_factory=list, description="The accuracy gate's results, per dataset.")

    @property
    def gate_passed(self) -> bool:
        """True only when the gate was run and passed on every dataset it was run on."""
        return bool(self.gate) and all(result.passed for result in self.gate)

    def digest(self) -> str:
        """Identifies the ranges (not the gate results), for the conversion cache key."""
        canonical = json.dumps({name: list(pair) for name, pair in sorted(self.ranges.items())})
        return hashlib.sha256(canonical.encode()).hexdigest()


def calibration_path(weights: Path) -> Path:
    """``weights/model.int8.json`` for a weights folder (or ``X.int8.json`` beside ``X.safetensors``)."""
    weights_path, _ = resolve_paths(Path(weights))
    return weights_path.with_suffix(CALIBRATION_SUFFIX)


def read_calibration(weights: Path, weights_sha256: str) -> Int8Calibration | None:
    """The calibration for these weights; None when there is no file, an error when it is unusable."""
    path = calibration_path(weights)
    if not path.is_file():
        return None
    try:
        calibration = Int8Calibration.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        raise CalibrationError(f"invalid int8 calibration {path}: {where}: {message}") from exc
    if calibration.weights_sha256 != weights_sha256:
        raise CalibrationError(
            f"int8 calibration {path} was measured for weights {calibration.weights_sha256[:12]}, not these "
            f"({weights_sha256[:12]}): run python -m benchmarks.accuracy_gate --calibrate again"
        )
    return calibration


def write_calibration(calibration: Int8Calibration, weights: Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = calibration_path(weights)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(calibration.model_dump_json(indent=2) + "\n")
    os.replace(staging, path)
    return path


class _Batches:
    """ONNX Runtime's calibration reader protocol over normalised float32 batches.

    With ``CalibStridedMinMax`` the quantizer asks for one slice at a time (``set_range``) and
    merges each slice's ranges, so memory holds one batch's activations, not every image's.
    (``CalibMaxIntermediateOutputs``, the other memory bound, discards data in onnxruntime 1.32.)
    """

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._batches = [np.ascontiguousarray(batch, dtype=np.float32) for batch in batches]
        self._pending: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = self._batches[start_index:end_index]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return {INPUT_NAME: self._pending.pop(0)} if self._pending else None


def measure_ranges(fp32_onnx: Path, batches: Sequence[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Run the float graph on calibration batches and return every tensor's (lowest, highest)."""
    if not batches:
        raise CalibrationError("no calibration images")
    with tempfile.TemporaryDirectory(prefix="cxr-calibrate-") as tmp:
        cache = Path(tmp) / "ranges.json"
        # Quantizing once with a cache path is the public way to get the ranges out of ONNX Runtime.
        _quantize(fp32_onnx, Path(tmp) / "int8.onnx", cache, _Batches(batches), {"CalibStridedMinMax": 1})
        data = json.loads(cache.read_text())["data"]
    return {name: (_scalar(item["lowest"]), _scalar(item["highest"])) for name, item in sorted(data.items())}


def quantize(fp32_onnx: Path, out: Path, calibration: Int8Calibration) -> None:
    """Write the int8 (QDQ) graph of ``fp32_onnx`` using the stored ranges; no image is needed."""
    # ONNX Runtime (and onnx) are imported only where int8 is built: a PyTorch-only service never loads them.
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    ranges = {name: (np.float32(low), np.float32(high)) for name, (low, high) in calibration.ranges.items()}
    with tempfile.TemporaryDirectory(prefix="cxr-quantize-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        try:
            _quantize(fp32_onnx, out, cache, None, {})
        except ValueError as exc:  # e.g. a tensor of the graph without a stored range
            raise CalibrationError(f"int8 calibration does not fit the exported graph: {exc}") from exc
    _check_quantized(out)


def _quantize(fp32_onnx: Path, out: Path, cache: Path, reader: _Batches | None, extra: dict[str, int | bool]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32_onnx),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_cache_path=str(cache),
        extra_options=extra,
    )


def _check_quantized(path: Path) -> None:
    """Every convolution must read quantized activations and weights; a missing range would leave one float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    produced_by = {output: node.op_type for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    floating = [node.name for node in convs if any(produced_by.get(i) != "DequantizeLinear" for i in node.input[:2])]
    if not convs or floating:
        raise CalibrationError(
            f"int8 calibration does not cover the exported graph: {len(floating)} of {len(convs)} convolutions "
            f"stay in float (e.g. {floating[:1]}); run python -m benchmarks.accuracy_gate --calibrate again"
        )


def _scalar(value: object) -> float:
    """A range bound as ONNX Runtime's cache writes it (a number or a one-element array object)."""
    if isinstance(value, dict):
        value = value["data"]
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
