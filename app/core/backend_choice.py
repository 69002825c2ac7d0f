"""Which runtime and precision serve: from what was asked, what the host has and what the gate approved.

- ``torch``: PyTorch on the CPU or a GPU, as before (fp32/bf16 on the CPU, bf16/fp16 on a GPU).
- ``openvino``: the CPU fast path (``app.core.openvino_backend``) in fp32, bf16 or int8.
- ``auto``: PyTorch on a GPU; on a CPU host OpenVINO in the fastest precision the model's
  ``model.cpu.json`` approves for the input guard mode being served (int8 where the CPU has int8
  dot products, then bf16 where it has bf16 units), else fp32, which needs no approval: it
  computes the same numbers as PyTorch fp32 to within the golden check's fp32 tolerance. A
  precision ``auto`` picked that then fails to load here (its golden check, its conversion) is
  passed over for the next one, and the reason says so (``app.core.engine.load_engine``).

A combination that cannot be honoured is refused with a one-line reason, never quietly replaced:
int8 on PyTorch or a GPU, OpenVINO on a GPU, a precision the CPU lacks, int8 without measured
ranges, and int8 the gate did not approve for the input-guard mode being served (the gate
judges the guard's verdicts too: benchmarks/NOTES.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from app.core.fastpath_record import MAX_FLIP_RATE, FastPathRecord, RecordError, read_record

Backend = Literal["auto", "torch", "openvino"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")
log = logging.getLogger(__name__)


class BackendChoiceError(RuntimeError):
    """The requested backend/device/precision combination cannot be honoured; the message is one line."""


@dataclass(frozen=True)
class BackendChoice:
    """What will serve, and a one-line reason (logged at startup, shown by /model)."""

    backend: Literal["torch", "openvino"]
    precision: str  # openvino: fp32, bf16 or int8; torch: as requested (the engine resolves auto/fp16)
    reason: str
    record: FastPathRecord | None = None
    automatic: bool = False  # the precision was picked by auto: a failure to load may fall back


def _record(weights: Path, sha256: str, *, required: bool) -> FastPathRecord | None:
    try:
        return read_record(weights, sha256)
    except RecordError as exc:
        if required:
            raise BackendChoiceError(str(exc)) from exc
        log.warning("ignoring the CPU fast-path record: %s", exc)
        return None


def _cpu_lacks(precision: str) -> str | None:
    """Why this CPU cannot run ``precision`` in OpenVINO; None when it can."""
    from app.core.openvino_backend import missing_units  # imports OpenVINO: only for the CPU fast path

    return missing_units(precision)  # type: ignore[arg-type]


def _int8_refusal(record: FastPathRecord | None, guard_on: bool) -> str | None:
    """Why int8 may not serve these weights in this guard mode; None when it may."""
    if record is None or record.int8 is None:
        return (
            "int8 needs measured activation ranges in model.cpu.json: "
            "run python -m benchmarks.accuracy_gate --calibrate 300"
        )
    gate = record.gate_for("int8")
    result = gate.validation() if gate is not None else None
    if result is None:
        return None if not guard_on else "int8 has not been through the accuracy gate with the input guard"
    if result.passes(with_guard=guard_on):
        return None
    if guard_on and result.passes(with_guard=False):
        return (
            f"int8 moves the input guard's verdict on {result.guard_refusal_flips} of {result.images} validation "
            f"images (gate: at most {MAX_FLIP_RATE:.1%}); use CXR_PRECISION=bf16, or CXR_INPUT_GUARD=off"
        )
    return (
        f"int8 failed the accuracy gate on validation (AUC {result.roc_auc:.4f} vs {result.roc_auc_fp32:.4f}, "
        f"{result.label_flips} label flips of {result.images})"
    )


def choose(
    backend: str,
    device: torch.device,
    precision: str,
    *,
    weights: Path,
    sha256: str,
    guard_on: bool,
    failed: Mapping[str, str] | None = None,
) -> BackendChoice:
    """Resolve the backend and precision for a model on ``device`` (already resolved from CXR_DEVICE).

    ``failed`` maps precisions that ``auto`` already tried and could not load on this host to why.
    """
    if backend not in BACKENDS:
        raise BackendChoiceError(f"invalid backend {backend!r}: use auto, torch or openvino")
    on_gpu = device.type == "cuda"
    if backend == "openvino" and on_gpu:
        raise BackendChoiceError(
            "CXR_BACKEND=openvino runs on the CPU: set CXR_DEVICE=cpu, or CXR_BACKEND=torch for the GPU"
        )
    if backend == "torch" or (backend == "auto" and on_gpu):
        if precision == "int8":
            raise BackendChoiceError("precision int8 needs CXR_BACKEND=openvino (or auto on a CPU host)")
        why = "requested" if backend == "torch" else "auto: a GPU is present"
        return BackendChoice("torch", precision, why)
    if precision == "fp16":
        raise BackendChoiceError("precision fp16 needs a CUDA device; on the CPU use fp32, bf16 or int8")
    record = _record(weights, sha256, required=precision == "int8")
    if precision == "auto":
        return _fastest_approved(record, guard_on, backend, failed or {})
    lacks = _cpu_lacks(precision) if precision in ("bf16", "int8") else None
    if lacks is not None:
        raise BackendChoiceError(f"precision {precision} is not supported by this CPU ({lacks})")
    if precision == "int8":
        refusal = _int8_refusal(record, guard_on)
        if refusal is not None:
            raise BackendChoiceError(refusal)
        if record is not None and record.gate_for("int8") is None:
            log.warning("int8 has not been through the accuracy gate (python -m benchmarks.accuracy_gate)")
    return BackendChoice("openvino", precision, "requested", record)


def _fastest_approved(
    record: FastPathRecord | None, guard_on: bool, backend: str, failed: Mapping[str, str]
) -> BackendChoice:
    """int8, then bf16, then fp32: the first the gate approves for this guard mode on this CPU, not yet failed."""
    prefix = "auto" if backend == "auto" else "openvino, precision auto"
    guard = "with" if guard_on else "without"
    fell_back = "".join(f"; {precision} did not load on this CPU: {why}" for precision, why in failed.items())
    for precision in ("int8", "bf16"):
        if precision in failed or record is None or not record.approves(precision, with_guard=guard_on):
            continue
        if _cpu_lacks(precision) is not None or (precision == "int8" and record.int8 is None):
            continue
        why = f"{prefix}: the accuracy gate approves {precision} {guard} the input guard{fell_back}"
        return BackendChoice("openvino", precision, why, record, automatic=True)
    why = (
        "no model.cpu.json"
        if record is None
        else f"no faster precision the gate approves {guard} the input guard runs on this CPU"
    )
    return BackendChoice("openvino", "fp32", f"{prefix}: fp32 ({why}){fell_back}", record, automatic=True)
