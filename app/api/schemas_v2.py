"""JSON bodies of the Open Inference Protocol (KServe V2 REST), as Triton's clients send and expect them.

Field names and shapes follow the protocol exactly so ``tritonclient``, ``perf_analyzer`` and KServe
gateways work unchanged; ``code`` in :class:`V2Error` is this service's addition (a stable error
code beside the protocol's message), which those clients ignore.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_MODEL = "cxr-pneumonia-vgg16"
# A real (1 x 1 px, gray) PNG in base64, so the documented example is a request the server accepts.
_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR42mNoAAAAggCB2kUIOwAAAABJRU5ErkJggg=="
_VERSION = "1.0.0-cpu64"


class V2Error(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "unknown model 'resnet50'", "code": "unknown_model"}]}
    )

    error: str = Field(description="What went wrong, in one line.")
    code: str = Field(description="Stable machine-readable code (the same codes as /predict).")


class ServerMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "cxr-pneumonia", "version": "0.1.0", "extensions": ["binary_tensor_data"]}]
        }
    )

    name: str
    version: str
    extensions: list[str] = Field(description="Protocol extensions supported, as Triton names them.")


class ServerLive(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"live": True}]})

    live: bool


class ServerReady(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})

    ready: bool


class ModelReady(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": _MODEL, "ready": True}]})

    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a dimension of any size (the batch).")


class ModelMetadata(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": _MODEL,
                    "versions": [_VERSION],
                    "platform": "pytorch",
                    "inputs": [
                        {"name": "image", "datatype": "BYTES", "shape": [-1]},
                        {"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, 64, 64]},
                    ],
                    "outputs": [
                        {"name": "probability", "datatype": "FP32", "shape": [-1]},
                        {"name": "label", "datatype": "BYTES", "shape": [-1]},
                    ],
                }
            ]
        }
    )

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="Alternatives: a request carries exactly one of them.")
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    name: str
    shape: list[int] = Field(description="Row-major shape; every dimension >= 0.")
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="`binary_data_size` for binary data.")
    data: list[Any] | None = Field(None, description="Flat or nested row-major values; absent for binary data.")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="`binary_data`: return it as binary.")


class InferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "study-42",
                    "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_PNG_BASE64]}],
                    "outputs": [{"name": "probability"}, {"name": "label"}],
                }
            ]
        }
    )

    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="`binary_data_output`: all outputs binary.")
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = Field(None, description="Absent: every output.")


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` when the data follows the JSON.")
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_name": _MODEL,
                    "model_version": _VERSION,
                    "id": "study-42",
                    "parameters": {"threshold": 0.9298, "sha256": "05d16aa4..."},
                    "outputs": [
                        {"name": "probability", "shape": [1], "datatype": "FP32", "data": [0.9955]},
                        {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["PNEUMONIA"]},
                    ],
                }
            ]
        }
    )

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(description="The decision threshold and the weights' sha256, for audit.")
    outputs: list[InferOutput]
