"""``model.cpu.json``: what the CPU fast path knows about one set of weights, measured offline.

Two things about a model can only be measured with images, which a serving host does not hold:

- the int8 activation ranges (``int8``), measured on a few hundred *training* images;
- the accuracy gate (``gate``): each reduced precision against fp32 PyTorch on the validation
  split and the test folder (ROC AUC, largest probability difference, label flips at the
  threshold, input-guard refusal flips).

``python -m benchmarks.accuracy_gate`` writes both next to the weights; the file holds numbers
only (no pixels), is tied to the weights by their sha256, and is what lets ``CXR_BACKEND=auto``
choose a reduced precision: only one whose *validation* result passes the gate, for the input
guard mode being served (the test folder is reported on, never used to choose).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from app.core.artifacts import resolve_paths
from app.core.coded_error import first_validation_error

RECORD_SUFFIX = ".cpu.json"
FORMAT_VERSION = 1
# The accuracy gate (issue 14): what a reduced precision must keep against fp32 PyTorch.
MAX_AUC_DROP = 0.002
MAX_FLIP_RATE = 0.005
VALIDATION = "validation"
GatedPrecision = Literal["bf16", "int8"]


class RecordError(RuntimeError):
    """``model.cpu.json`` is malformed or belongs to other weights; the message is one line."""


class Int8Ranges(BaseModel):
    """Activation ranges for static int8, and how they were measured."""

    method: Literal["minmax"] = "minmax"
    images: int = Field(ge=1, description="Calibration images (training side of the split only).")
    source: str = Field(description="Where the calibration images came from.")
    exporter: str = Field(description="torch version whose ONNX export the tensor names belong to.")
    ranges: dict[str, tuple[float, float]] = Field(description="ONNX tensor name -> (lowest, highest) value seen.")
    guard_noise: float | None = Field(
        None,
        ge=0.0,
        description="Squared input-guard score int8 adds, measured on the same images (None: no guard).",
    )


class GateResult(BaseModel):
    """One reduced precision against fp32 PyTorch on one evaluation set."""

    dataset: str = Field(description="'validation' or 'test'.")
    description: str = Field(description="Which images exactly.")
    images: int = Field(ge=1)
    roc_auc_fp32: float
    roc_auc: float
    max_probability_difference: float = Field(ge=0.0)
    label_flips: int = Field(ge=0, description="Images whose label at the model's threshold changed.")
    guard_refusal_flips: int | None = Field(
        None, ge=0, description="Images the input guard refuses in one precision and not the other (None: no guard)."
    )

    def passes(self, with_guard: bool) -> bool:
        """AUC drop and flips within the gate; with the guard served, its refusals must agree too."""
        allowed = MAX_FLIP_RATE * self.images
        if self.roc_auc_fp32 - self.roc_auc > MAX_AUC_DROP or self.label_flips > allowed:
            return False
        return not with_guard or (self.guard_refusal_flips is not None and self.guard_refusal_flips <= allowed)


class GateRecord(BaseModel):
    """The gate's results for one backend and precision."""

    backend: Literal["openvino"] = "openvino"
    precision: GatedPrecision
    results: list[GateResult]

    def validation(self) -> GateResult | None:
        return next((result for result in self.results if result.dataset == VALIDATION), None)


class FastPathRecord(BaseModel):
    """Contents of ``model.cpu.json``."""

    format_version: int = FORMAT_VERSION
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_size: int = Field(ge=1)
    int8: Int8Ranges | None = None
    gate: list[GateRecord] = Field(default_factory=list)

    def gate_for(self, precision: str) -> GateRecord | None:
        return next((record for record in self.gate if record.precision == precision), None)

    def approves(self, precision: str, with_guard: bool) -> bool:
        """True when the gate was run for ``precision`` and its validation result passes."""
        record = self.gate_for(precision)
        result = record.validation() if record is not None else None
        return result is not None and result.passes(with_guard)

    def with_gate(self, record: GateRecord) -> FastPathRecord:
        kept = [existing for existing in self.gate if existing.precision != record.precision]
        return self.model_copy(update={"gate": [*kept, record]})


def record_path(weights: Path) -> Path:
    """``weights/model.cpu.json`` for a weights folder (or ``X.cpu.json`` beside ``X.safetensors``)."""
    weights_path, _ = resolve_paths(Path(weights))
    return weights_path.with_suffix(RECORD_SUFFIX)


def read_record(weights: Path, weights_sha256: str) -> FastPathRecord | None:
    """The record for these weights; None when there is none, an error when it is unusable."""
    path = record_path(weights)
    if not path.is_file():
        return None
    try:
        record = FastPathRecord.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        where, message, _ = first_validation_error(exc.errors())
        raise RecordError(f"invalid {path}: {where}: {message}") from exc
    if record.weights_sha256 != weights_sha256:
        raise RecordError(
            f"{path} was measured for weights {record.weights_sha256[:12]}, not these ({weights_sha256[:12]}): "
            "run python -m benchmarks.accuracy_gate again"
        )
    return record


def write_record(record: FastPathRecord, weights: Path) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = record_path(weights)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(record.model_dump_json(indent=2) + "\n")
    os.replace(staging, path)
    return path
