"""Post-training static int8 quantization from stored activation ranges.

Static int8 needs the range of every activation, which only real images can give. They are
measured once, offline, on a few hundred *training* images (:func:`measure_ranges`, run by
``python -m benchmarks.accuracy_gate --calibrate N``) and stored next to the weights in
``model.cpu.json`` (``app.core.fastpath_record``); the service then builds the int8 graph from
the verified weights and those numbers alone (:func:`quantize`), in about a second.

ONNX Runtime's quantizer does the work (``quantize_static``: QDQ format, per-channel symmetric
int8 weights, uint8 activations, min/max ranges), and its JSON calibration cache is how the stored
ranges are handed back to it, so no quantization arithmetic is re-implemented here. Measured
against NNCF's quantizer on the shipped model (benchmarks/NOTES.md): the same speed in OpenVINO,
about 6x smaller probability differences. ONNX Runtime is imported only where int8 is built, so a
service that never builds int8 never loads it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.core.fastpath_record import Int8Ranges
from app.core.onnx_export import INPUT_NAME

# Everything about how ranges become an int8 graph; part of the conversion cache key.
RECIPE = "ort-qdq-minmax-u8act-s8weight-perchannel-convrelupool-v2"
# Only the VGG stack runs in int8. The input guard's block statistics (ReduceMean, Mul, Sqrt) and
# the Concat of its vector stay float: quantized by default, the whole vector shared one uint8 range,
# the small channel means and deviations rounded away, and on the shipped model the guard's verdict
# moved on 776 of 784 validation images (0 with this list; benchmarks/NOTES.md).
QUANTIZED_OPS = ("Conv", "Relu", "MaxPool")


class CalibrationError(RuntimeError):
    """The stored ranges do not fit the exported graph; the message is one line."""


def ranges_digest(int8: Int8Ranges) -> str:
    """Identifies the ranges, for the conversion cache key."""
    canonical = json.dumps({name: list(pair) for name, pair in sorted(int8.ranges.items())})
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def quantize(fp32_onnx: Path, out: Path, int8: Int8Ranges, *, reduce_range: bool = False) -> None:
    """Write the int8 (QDQ) graph of ``fp32_onnx`` using the stored ranges; no image is needed.

    ``reduce_range`` rounds weights to 7 bits, which CPUs without int8 dot products need to keep
    their int16 pair sums from saturating. The service never builds it (it serves int8 only with
    VNNI/AMX); ``benchmarks.int8_isa`` measures it.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    ranges = {name: (np.float32(low), np.float32(high)) for name, (low, high) in int8.ranges.items()}
    with tempfile.TemporaryDirectory(prefix="cxr-quantize-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        try:
            _quantize(fp32_onnx, out, cache, None, {}, reduce_range=reduce_range)
        except ValueError as exc:  # e.g. a tensor of the graph without a stored range
            raise CalibrationError(f"int8 calibration does not fit the exported graph: {exc}") from exc
    _check_quantized(out)


def _quantize(
    fp32_onnx: Path,
    out: Path,
    cache: Path,
    reader: _Batches | None,
    extra: dict[str, int | bool],
    *,
    reduce_range: bool = False,
) -> None:
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
        op_types_to_quantize=list(QUANTIZED_OPS),
        reduce_range=reduce_range,
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
            f"stay in float (e.g. {floating[:1]}); measure them again (benchmarks.accuracy_gate --calibrate)"
        )


def _scalar(value: object) -> float:
    """A range bound as ONNX Runtime's cache writes it (a number or a one-element array object)."""
    if isinstance(value, dict):
        value = value["data"]
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
