"""Response bodies of the HTTP API, with the examples shown in /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.network import ModelSpec

_SHA = "9f2c1d4e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"
_IDENTITY = {"name": "cxr-pneumonia-vgg16", "version": "2024-06-01", "sha256": _SHA}
_SOURCE = {
    "format": "DICOM",
    "width": 2048,
    "height": 2500,
    "details": {
        "transfer_syntax": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 12,
        "modality": "CR",
        "view_position": "PA",
        "modality_lut": "none",
        "voi": "window",
        "window_center": 2047.0,
        "window_width": 4096.0,
        "voi_function": "LINEAR",
        "inverted": True,
    },
}
_PREDICTION = {
    "label": "PNEUMONIA",
    "pneumonia_probability": 0.9312,
    "probabilities": {"NORMAL": 0.0688, "PNEUMONIA": 0.9312},
    "threshold": 0.42,
    "input_guard": {"score": 0.98, "threshold": 1.546, "passed": True},
    "warning": None,
    "model": _IDENTITY,
    "source": _SOURCE,
}


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["corrupt_image"])
    message: str = Field(description="Human-readable explanation.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelIdentity(BaseModel):
    """Which exact weights produced a result, so results can be traced and audited."""

    name: str
    version: str
    sha256: str


class InputGuard(BaseModel):
    """How much the image resembles the model's training chest X-rays, so every answer can be audited."""

    score: float = Field(
        description="Distance from the training images' features; about 1 is typical, lower is closer."
    )
    threshold: float = Field(description="Scores above this fail the guard.")
    passed: bool = Field(description="The score is within the threshold and the detail (when checked) above the floor.")
    detail: float | None = Field(
        default=None,
        description="Fine detail of the image as the model sees it; blur and enlargement lower it. "
        "Absent for a model whose guard does not check it.",
    )
    detail_floor: float | None = Field(default=None, description="Images with less fine detail than this fail.")


class ImageSource(BaseModel):
    """What the upload was decoded as; format facts and applied transforms only, never patient data."""

    format: str = Field(description="JPEG, PNG or DICOM.", examples=["DICOM"])
    width: int = Field(description="Upright width of the full-resolution image, in pixels.")
    height: int = Field(description="Upright height of the full-resolution image, in pixels.")
    details: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Format-specific facts. DICOM: transfer_syntax, photometric_interpretation, bits_stored, "
        "modality and view_position (standard codes only), modality_lut (none, rescale, lut), voi (voi_lut, "
        "window, percentile) with its window, and inverted (MONOCHROME1 or Presentation LUT Shape INVERSE).",
    )


_HEATMAP = {
    "method": "cam",
    "layer": "features.43",
    "grid": [2, 2],
    "values": [1.92, 3.35, 0.41, 2.07],
    "bias": 0.67,
}


class HeatmapBody(BaseModel):
    """Where the score came from: sigmoid(mean(values) + bias) is ``pneumonia_probability``."""

    model_config = ConfigDict(json_schema_extra={"examples": [_HEATMAP]})

    method: str = Field(description="`cam`: class activation map of the compact head, exact, no gradients.")
    layer: str = Field(description="The network layer whose feature maps the cells are (the last conv block).")
    grid: tuple[int, int] = Field(
        description="[rows, cols]: the input size / 32 on each side (4x4 for the shipped 128-px model)."
    )
    values: list[float] = Field(
        description="rows x cols cells, row-major from the top-left of the image as the model saw it, in calibrated "
        "log-odds: positive pushed towards PNEUMONIA, negative towards NORMAL. Raw and signed, never rescaled."
    )
    bias: float = Field(description="The head's bias in the same units; mean(values) + bias = the calibrated log-odds.")


class Prediction(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_PREDICTION, {**_PREDICTION, "heatmap": _HEATMAP}]})

    label: str = Field(description="Class at the model's decision threshold: PNEUMONIA or NORMAL.")
    pneumonia_probability: float = Field(ge=0.0, le=1.0, description="Temperature-calibrated P(pneumonia).")
    probabilities: dict[str, float] = Field(description="Calibrated probability per class name.")
    threshold: float = Field(description="Decision threshold on pneumonia_probability.")
    input_guard: InputGuard | None = Field(
        description="The input guard's verdict; null when the server runs with CXR_INPUT_GUARD=off (not checked)."
    )
    warning: str | None = Field(
        None, description="Set when the answer must not be trusted: the guard failed and the server flags instead."
    )
    model: ModelIdentity
    source: ImageSource | None = Field(
        None, description="What the upload was decoded as; null only for client-preprocessed pixels (/v2 UINT8 input)."
    )
    heatmap: HeatmapBody | None = Field(None, description="Only with `?explain=true`.")


class BatchPrediction(Prediction):
    model_config = ConfigDict(json_schema_extra={"examples": [{"filename": "a.dcm", **_PREDICTION}]})

    filename: str | None


class BatchItemError(BaseModel):
    """A file of a batch that could not be scored; the other files are unaffected."""

    filename: str | None
    error: ErrorBody


class BatchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        {"filename": "a.dcm", **_PREDICTION},
                        {
                            "filename": "notes.txt",
                            "error": {
                                "code": "unsupported_media_type",
                                "message": "the file is not a JPEG, PNG or DICOM image",
                            },
                        },
                    ]
                }
            ]
        }
    )

    results: list[BatchPrediction | BatchItemError] = Field(description="One entry per uploaded file, in order.")


class Health(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "device": "cpu",
                    "precision": "bf16",
                    "backend": "openvino",
                    "batch_size": 1,
                    "model": _IDENTITY,
                    "detail": None,
                },
                {
                    "status": "loading",
                    "device": None,
                    "precision": None,
                    "model": None,
                    "detail": "the model is loading",
                },
            ]
        }
    )

    status: Literal["ok", "loading", "draining", "failed"]
    device: str | None = None
    precision: str | None = None
    backend: str | None = Field(None, description="Runtime of the forward pass: torch or openvino.")
    batch_size: int | None = Field(None, description="Images per forward pass at most, as chosen at startup.")
    model: ModelIdentity | None = None
    detail: str | None = None


class Liveness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "alive"}]})

    status: Literal["alive"] = "alive"


class Batching(BaseModel):
    """How the batcher groups images, and why (measured on the CPU, configured on a GPU)."""

    batch_size: int = Field(description="Images per forward pass at most.")
    max_wait_ms: float = Field(description="How long a batch waits for more images once the first arrives.")
    source: Literal["configured", "measured"] = Field(
        description="measured: the largest batch size that did not lower throughput in the startup probe."
    )
    ms_per_image: dict[str, float] = Field(
        default_factory=dict, description="The probe's forward-pass time per image, by batch size (CPU only)."
    )


class Backend(BaseModel):
    """The runtime that computes the feature maps."""

    name: str = Field(description="torch or openvino.")
    reason: str = Field(description="Why this backend and precision (CXR_BACKEND=auto says what it chose).")
    conversion: dict[str, str | float] = Field(
        default_factory=dict,
        description="openvino: cache (hit, built, rebuilt, uncached), seconds to convert or load, threads.",
    )


class ModelCard(BaseModel):
    """The metadata that travels with the weights, minus the golden test vectors."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_IDENTITY,
                    "format_version": 1,
                    "dtype": "float32",
                    "spec": ModelSpec().model_dump(mode="json"),
                    "threshold": 0.42,
                    "threshold_method": "youden",
                    "temperature": 1.37,
                    "metrics": {"test_auroc": 0.962, "test_sensitivity": 0.95},
                    "provenance": {"git_commit": "8e8cf9a", "dataset": "chest_xray"},
                    "device": "cpu",
                    "precision": "bf16",
                    "backend": {
                        "name": "openvino",
                        "reason": "auto: the accuracy gate approves bf16 with the input guard",
                        "conversion": {"cache": "hit", "seconds": 0.41, "threads": 4},
                    },
                    "batching": {
                        "batch_size": 1,
                        "max_wait_ms": 0.0,
                        "source": "measured",
                        "ms_per_image": {"1": 61.2, "2": 66.0, "4": 71.9},
                    },
                }
            ]
        }
    )

    name: str
    version: str
    sha256: str
    format_version: int
    dtype: str = Field(description="Storage dtype of the weights file.")
    spec: ModelSpec
    threshold: float
    threshold_method: str
    temperature: float
    guard: dict[str, Any] | None = Field(
        None, description="The model's input guard (method, threshold, calibration); null if it has none."
    )
    input_guard: str = Field("reject", description="What this server does with images the guard fails.")
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    device: str = Field(description="Where this instance runs the model.")
    precision: str = Field(description="Compute precision on that device.")
    backend: Backend
    batching: Batching
