"""Open Inference Protocol (KServe V2 REST) beside ``/predict``: same service, batcher, decision and error codes.

Inputs, alternatives (a request carries exactly one):
- ``image``  BYTES [-1]: encoded image files (whatever ``/predict`` accepts), decoded as ``/predict`` does;
- ``pixels`` UINT8 [-1, 1, S, S]: images the client already preprocessed to this model's input size.

Outputs are the rows of :data:`OUTPUTS`, each read off the same :class:`Prediction` that ``/predict``
returns, so the two endpoints cannot disagree; a new field of ``Prediction`` becomes a new output tensor
with one more row. A request succeeds or fails as a whole, as it does on Triton and as
``tritonclient`` expects (``InferResult`` has no per-item errors): an image that cannot be used fails
the request with that image's own code, status and position, and nothing of it is scored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from starlette.requests import ClientDisconnect

from app import SERVICE_NAME, __version__
from app.api.deps import ApiKeyGuard, ServiceDep, SettingsDep
from app.api.errors import (
    IMAGE_ERRORS,
    SERVICE_ERRORS,
    InvalidInferenceRequestError,
    MalformedRequestError,
    TooManyFilesError,
    UnknownModelError,
    error_responses,
)
from app.api.schemas import ModelIdentity, Prediction
from app.api.schemas_v2 import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    RequestedOutput,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)
from app.api.service import Service
from app.api.tensor_codec import (
    BINARY_EXTENSION,
    HEADER_LENGTH,
    binary_sections,
    bytes_elements,
    decompress,
    encode_output,
    inference_response,
    numeric_array,
    parse_request,
    split_body,
)
from app.settings import Settings

IMAGE_INPUT = "image"
PIXELS_INPUT = "pixels"
PLATFORM = "pytorch"


@dataclass(frozen=True)
class OutputTensor:
    """One output of the model: protocol name, datatype, per-image shape, and how to read it off a Prediction."""

    name: str
    datatype: str
    item_shape: tuple[int, ...]  # after the batch dimension; -1 where the size varies
    value: Callable[[Prediction], Any]


OUTPUTS: tuple[OutputTensor, ...] = (
    OutputTensor("probability", "FP32", (), lambda p: p.pneumonia_probability),
    OutputTensor("label", "BYTES", (), lambda p: p.label.encode()),
)

health_router = APIRouter(tags=["open inference protocol"])
router = APIRouter(tags=["open inference protocol"], dependencies=[ApiKeyGuard])

_MODEL_ERRORS = error_responses("unauthorized", "unknown_model", "not_ready", v2=True)
# V2 reports malformed requests as invalid_request, never FastAPI's form-field codes.
_INFER_ERRORS = (
    "invalid_request",
    "unknown_model",
    *IMAGE_ERRORS,
    *(code for code in SERVICE_ERRORS if code not in ("missing_field", "validation_error")),
)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined, for a request body FastAPI does not parse itself."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


_INFER_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            f"The inference request as JSON; or, with the `{HEADER_LENGTH}` header (Triton's binary tensor "
            "extension, tritonclient's default), that many bytes of JSON followed by the binary tensor data."
        ),
        "content": {
            "application/json": {"schema": _inline(InferRequest.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponse,
        "description": f"JSON, or (when binary outputs were asked for) JSON of `{HEADER_LENGTH}` bytes, then data.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(*_INFER_ERRORS, v2=True),
}


# --- health: open, like /health and /livez --------------------------------------------------------


@health_router.get("/v2", summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> ServerMetadata:
    """Name, version and the protocol extensions this server supports."""
    return ServerMetadata(name=SERVICE_NAME, version=__version__, extensions=[BINARY_EXTENSION])


@health_router.head("/v2/health/live", include_in_schema=False)  # load balancers may probe with HEAD
@health_router.get("/v2/health/live", summary="Server liveness (Open Inference Protocol)")
async def server_live() -> ServerLive:
    """200 while the process serves HTTP, as /livez."""
    return ServerLive(live=True)


@health_router.head("/v2/health/ready", include_in_schema=False)
@health_router.get(
    "/v2/health/ready",
    summary="Server readiness (Open Inference Protocol)",
    responses={503: {"model": ServerReady, "description": "Loading, draining, or the last batch failed."}},
)
async def server_ready(service: ServiceDep, response: Response) -> ServerReady:
    """200 only when requests would be scored now, as /health; 503 otherwise."""
    ready = service.health().status == "ok"
    if not ready:
        response.status_code = 503
    return ServerReady(ready=ready)


# --- model routes: behind the API key, like /predict and /model -----------------------------------


def _served(service: Service, name: str, version: str | None = None) -> ModelIdentity:
    """The loaded model's identity when ``name`` (and ``version``, if given) are its own; else 404."""
    identity = service.identity()
    if name != identity.name:
        raise UnknownModelError(f"unknown model {name!r}; this server serves {identity.name!r}")
    if version is not None and version != identity.version:
        raise UnknownModelError(f"model {name!r} has no version {version!r}; it serves {identity.version!r}")
    return identity


def _served_model(request: Request, service: ServiceDep) -> ModelIdentity:
    """The model named by the path, read from the path itself: see :func:`_path_parameters`."""
    return _served(service, request.path_params["model_name"], request.path_params.get("model_version"))


ServedModel = Annotated[ModelIdentity, Depends(_served_model)]


def _path_parameters(*names: str) -> dict[str, Any]:
    """OpenAPI for path parameters a route reads through :data:`ServedModel`.

    Declared as FastAPI parameters they would make FastAPI document a 422 ``HTTPValidationError``,
    a shape this service never sends, which a string path segment cannot cause anyway.
    """
    text = {"type": "string"}
    return {"parameters": [{"name": name, "in": "path", "required": True, "schema": text} for name in names]}


_NAME_PATH = _path_parameters("model_name")
_VERSION_PATH = _path_parameters("model_name", "model_version")


def _metadata(service: Service, identity: ModelIdentity) -> ModelMetadata:
    size = service.input_size()
    return ModelMetadata(
        name=identity.name,
        versions=[identity.version],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=PIXELS_INPUT, datatype="UINT8", shape=[-1, 1, size, size]),
        ],
        outputs=[TensorMetadata(name=o.name, datatype=o.datatype, shape=[-1, *o.item_shape]) for o in OUTPUTS],
    )


def _ready(service: Service, identity: ModelIdentity, response: Response) -> ModelReady:
    ready = service.health().status == "ok"
    if not ready:
        response.status_code = 503
    return ModelReady(name=identity.name, ready=ready)


@router.get("/v2/models/{model_name}", summary="Model metadata", responses=_MODEL_ERRORS, openapi_extra=_NAME_PATH)
async def model_metadata(identity: ServedModel, service: ServiceDep) -> ModelMetadata:
    """Inputs (alternatives: send one) and outputs, with their datatypes and shapes; -1 is the batch."""
    return _metadata(service, identity)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    summary="Model metadata, one version",
    responses=_MODEL_ERRORS,
    openapi_extra=_VERSION_PATH,
)
async def model_version_metadata(identity: ServedModel, service: ServiceDep) -> ModelMetadata:
    """As the model metadata; 404 unless this is the version being served."""
    return _metadata(service, identity)


@router.get(
    "/v2/models/{model_name}/ready", summary="Model readiness", responses=_MODEL_ERRORS, openapi_extra=_NAME_PATH
)
async def model_ready(identity: ServedModel, service: ServiceDep, response: Response) -> ModelReady:
    """200 when this model would score requests now; 503 while loading, draining or after a failed batch."""
    return _ready(service, identity, response)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    summary="Model readiness, one version",
    responses=_MODEL_ERRORS,
    openapi_extra=_VERSION_PATH,
)
async def model_version_ready(identity: ServedModel, service: ServiceDep, response: Response) -> ModelReady:
    """As the model readiness, for the version being served."""
    return _ready(service, identity, response)


@router.post(
    "/v2/models/{model_name}/infer",
    summary="Inference (Open Inference Protocol)",
    response_model=None,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOCS,
)
async def infer(model_name: str, request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    """Score a batch of images given as encoded files (`image`) or preprocessed pixels (`pixels`)."""
    return await _infer(_served(service, model_name), request, service, settings)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    summary="Inference, one version",
    response_model=None,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOCS,
)
async def infer_version(
    model_name: str, model_version: str, request: Request, service: ServiceDep, settings: SettingsDep
) -> Response:
    """As the inference endpoint, for the version being served."""
    return await _infer(_served(service, model_name, model_version), request, service, settings)


# --- inference ------------------------------------------------------------------------------------


def _check_parameters(where: str, parameters: Mapping[str, Any], supported: Mapping[str, type]) -> None:
    """Refuse parameters this model does not implement, rather than silently ignore what a client asked for."""
    unknown = sorted(set(parameters) - set(supported))
    if unknown:
        raise InvalidInferenceRequestError(
            f"{where}: parameter {', '.join(map(repr, unknown))} is not supported here"
            f" (supported: {', '.join(sorted(supported))})"
        )
    for name, value in parameters.items():
        if type(value) is not supported[name]:  # exact: JSON true is no count, 1 is no flag
            raise InvalidInferenceRequestError(f"{where}: parameter {name!r} must be a {supported[name].__name__}")


def _requested(outputs: list[RequestedOutput] | None, binary_default: bool) -> list[tuple[OutputTensor, bool]]:
    """The outputs to return, each with whether it goes as binary data; all of them when none are named."""
    if outputs is None:
        return [(spec, binary_default) for spec in OUTPUTS]
    by_name = {spec.name: spec for spec in OUTPUTS}
    chosen: list[tuple[OutputTensor, bool]] = []
    for requested in outputs:
        if requested.name not in by_name:
            raise InvalidInferenceRequestError(
                f"unknown output {requested.name!r}; this model has {', '.join(map(repr, by_name))}"
            )
        if requested.name in {spec.name for spec, _ in chosen}:
            raise InvalidInferenceRequestError(f"output {requested.name!r} is requested twice")
        _check_parameters(f"output {requested.name!r}", requested.parameters, {"binary_data": bool})
        chosen.append((by_name[requested.name], requested.parameters.get("binary_data", binary_default)))
    return chosen


def _guard_parameters(predictions: list[Prediction]) -> dict[str, Any]:
    """The input guard's verdict on the request (V2 parameters are scalars): the worst score, the least fine
    detail where the model's guard checks it, and any warning.

    Absent when the server runs with ``CXR_INPUT_GUARD=off``; in ``reject`` mode a failing
    image has already failed the whole request with ``not_chest_xray`` or ``insufficient_detail``.
    """
    guards = [p.input_guard for p in predictions if p.input_guard is not None]
    if not guards:
        return {}
    out: dict[str, Any] = {
        "input_guard_max_score": max(g.score for g in guards),
        "input_guard_threshold": guards[0].threshold,
    }
    details = [g.detail for g in guards if g.detail is not None]
    if details:
        out["input_guard_min_detail"] = min(details)
        out["input_guard_detail_floor"] = guards[0].detail_floor
    warnings = [f"item {i}: {p.warning}" for i, p in enumerate(predictions) if p.warning]
    if warnings:
        out["warning"] = "; ".join(warnings)
    return out


def _check_batch(count: int, settings: Settings) -> None:
    if count == 0:
        raise InvalidInferenceRequestError("the request holds no image")
    if count > settings.max_batch_files:
        raise TooManyFilesError(f"{count} images in one request; at most {settings.max_batch_files}")


async def _predict(request: InferRequest, binary: bytes, service: Service, settings: Settings) -> list[Prediction]:
    names = [tensor.name for tensor in request.inputs]
    if len(names) != 1:
        raise InvalidInferenceRequestError(
            f"send exactly one input, {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (UINT8); got {names}"
        )
    (tensor,) = request.inputs
    _check_parameters(f"input {tensor.name!r}", tensor.parameters, {"binary_data_size": int})
    (section,) = binary_sections(request.inputs, binary)
    expected = {IMAGE_INPUT: "BYTES", PIXELS_INPUT: "UINT8"}
    if tensor.name not in expected:
        raise InvalidInferenceRequestError(
            f"unknown input {tensor.name!r}; this model takes {IMAGE_INPUT!r} (BYTES) or {PIXELS_INPUT!r} (UINT8)"
        )
    if tensor.datatype != expected[tensor.name] or any(dim < 0 for dim in tensor.shape):
        raise InvalidInferenceRequestError(
            f"input {tensor.name!r} must be {expected[tensor.name]} with a non-negative shape,"
            f" got {tensor.datatype} {tensor.shape}"
        )
    if tensor.name == IMAGE_INPUT:
        if len(tensor.shape) != 1:
            raise InvalidInferenceRequestError(
                f"input {IMAGE_INPUT!r} has shape [-1] (one file per element), got {tensor.shape}"
            )
        _check_batch(tensor.shape[0], settings)
        return await service.predict_images(bytes_elements(tensor, section))
    _check_batch(tensor.shape[0] if tensor.shape else 1, settings)
    pixels = numeric_array(tensor, section)
    return await service.predict_pixels(torch.from_numpy(pixels.copy()))


async def _body(http: Request) -> bytes:
    """The whole request body; one that stops early is a 400, as FastAPI answers it on the multipart routes."""
    try:
        return await http.body()
    except ClientDisconnect:  # the client went away, or its chunked framing was invalid (uvicorn closed it)
        raise MalformedRequestError("the request body ended before its declared length or final chunk") from None


async def _infer(identity: ModelIdentity, http: Request, service: Service, settings: Settings) -> Response:
    body = decompress(await _body(http), http.headers.get("content-encoding"), settings.max_upload_bytes)
    header, binary = split_body(body, http.headers.get(HEADER_LENGTH))
    request = parse_request(header)
    _check_parameters("request", request.parameters, {"binary_data_output": bool})
    outputs = _requested(request.outputs, request.parameters.get("binary_data_output", False))
    predictions = await _predict(request, binary, service, settings)
    encoded = [
        encode_output(
            spec.name,
            spec.datatype,
            np.array([spec.value(p) for p in predictions], dtype=object if spec.datatype == "BYTES" else None),
            as_binary,
        )
        for spec, as_binary in outputs
    ]
    response = InferResponse(
        model_name=identity.name,
        model_version=identity.version,
        id=request.id,
        parameters={"threshold": predictions[0].threshold, "sha256": identity.sha256, **_guard_parameters(predictions)},
        outputs=[output for output, _ in encoded],
    )
    return inference_response(response, [raw for _, raw in encoded])
