"""Every failure becomes ``{"error": {"code", "message"}}`` with a status fixed by its code.

Under ``/v2`` (the Open Inference Protocol) the same errors take the protocol's shape,
``{"error": "<message>", "code": "<code>"}``, which Triton's and KServe's clients read.
Every error a client can see is a :class:`~app.core.coded_error.CodedError` (image errors from
the core, batcher errors, and the HTTP layer's own below), handled by one handler. ``ERRORS`` is
the one table of codes: that handler, the ASGI middleware and the OpenAPI ``responses=``
documentation all read it, so documented and actual behaviour cannot drift.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.batching import BatcherError, InferenceFailedError, ShuttingDownError
from app.api.schemas import ErrorResponse
from app.api.schemas_v2 import V2Error
from app.core.coded_error import CodedError, first_validation_error
from app.core.dicom import NotForPresentationError
from app.core.heatmap import ExplainUnsupportedError
from app.core.preprocessing import EmptyImageError, ImageError

log = logging.getLogger(__name__)


class UnauthorizedError(CodedError):
    code = "unauthorized"
    default_message = "a valid X-API-Key header is required"


class NotReadyError(CodedError):
    code = "not_ready"
    default_message = "the model is still loading"


class RequestTimeoutError(CodedError):
    code = "timeout"


class TooManyFilesError(CodedError):
    code = "too_many_files"


class PayloadTooLargeError(CodedError):
    code = "payload_too_large"


class MalformedRequestError(CodedError):
    """The body cannot be parsed at all (JSON syntax, binary framing)."""

    code = "bad_request"


class InvalidInferenceRequestError(CodedError):
    """A well-formed inference request that does not fit the model: names, datatypes, shapes, parameters."""

    code = "invalid_request"


class UnknownModelError(CodedError):
    code = "unknown_model"


# code -> (HTTP status, example message)
ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the multipart body could not be parsed"),
    "cors_refused": (400, "CORS preflight refused: origin not allowed"),
    "empty_file": (400, EmptyImageError.default_message),
    "invalid_request": (400, "input 'pixels' has shape [2, 1, 32, 32]; this model takes [-1, 1, 224, 224]"),
    "unauthorized": (401, UnauthorizedError.default_message),
    "not_found": (404, "no route for GET /nope"),
    "unknown_model": (404, "unknown model 'resnet50'; this server serves 'cxr-pneumonia-vgg16'"),
    "method_not_allowed": (405, "GET is not allowed on /predict"),
    "not_acceptable": (406, "the Accept header refuses both image/png and application/json"),
    "request_timeout": (408, "the request body did not arrive within 120 s"),
    "payload_too_large": (413, "request body is over the limit of 20971520 bytes"),
    "image_too_large": (413, "image is 12000x10000 = 120000000 pixels, over the limit of 100000000"),
    "too_many_files": (413, "40 files uploaded; at most 32 per batch"),
    "unsupported_media_type": (415, "the file is not a JPEG, PNG or DICOM image"),
    "header_too_large": (431, "the request line and headers are over 65536 bytes"),
    "corrupt_image": (422, "the JPEG data is corrupt or truncated: Corrupt JPEG data: premature end of data segment"),
    "invalid_image": (422, ImageError.default_message),
    "unsuitable_shape": (
        422,
        "the image is 24x24 px; its short side must be at least the model's 128 px input (a thumbnail lacks the "
        "detail the model reads: send the original film)",
    ),
    "not_chest_xray": (
        422,
        "refused: input guard score 4.210 > threshold 1.546: it does not resemble the frontal chest X-rays "
        "the model was trained on",
    ),
    "insufficient_detail": (
        422,
        "refused: fine detail 0.041 < floor 0.074: the image is blurred or was enlarged from a small picture, and "
        "blur reads as opacity to the model (send the original, sharp film)",
    ),
    "unsupported_modality": (422, "the DICOM modality is CT, not a plain radiograph (CR, DX or DR)"),
    "not_frontal_view": (422, "the DICOM view position is LL; only frontal (PA/AP) views are accepted"),
    "not_for_presentation": (422, NotForPresentationError.default_message),
    "multi_frame": (422, "the DICOM file holds 3 frames; send a single-frame radiograph"),
    "not_monochrome": (
        422,
        "the DICOM image is RGB with 3 samples per pixel; only grayscale (MONOCHROME1/MONOCHROME2) radiographs "
        "are accepted",
    ),
    "explain_unsupported": (422, ExplainUnsupportedError.default_message),
    "missing_field": (422, "file: Field required"),
    "validation_error": (422, "files.0: Expected UploadFile, received: <class 'str'>"),
    "multiple_files": (422, "2 files in the field 'file'; /predict takes one image: send several to /predict/batch"),
    "internal_error": (500, "unexpected server error; it has been logged with this request's id"),
    "inference_failed": (500, InferenceFailedError.default_message),
    "unavailable": (503, BatcherError.default_message),
    "not_ready": (503, NotReadyError.default_message),
    "overloaded": (503, "512 images are already waiting; retry shortly"),
    "shutting_down": (503, ShuttingDownError.default_message),
    "timeout": (504, "no result within the 30 s request timeout"),
}

# What any upload route can answer besides its own codes (documented in OpenAPI from here).
SERVICE_ERRORS = (
    "unauthorized",
    "payload_too_large",
    "too_many_files",
    "request_timeout",
    "header_too_large",
    "bad_request",
    "missing_field",
    "validation_error",
    "internal_error",
    "inference_failed",
    "not_ready",
    "overloaded",
    "shutting_down",
    "timeout",
)
# Image errors of one upload; /predict answers with them, /predict/batch puts them in the file's entry.
IMAGE_ERRORS = (
    "empty_file",
    "image_too_large",
    "unsupported_media_type",
    "corrupt_image",
    "unsuitable_shape",
    "unsupported_modality",
    "not_frontal_view",
    "not_for_presentation",
    "multi_frame",
    "not_monochrome",
    "not_chest_xray",
    "insufficient_detail",
)
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
}


V2_PREFIX = "/v2"


def speaks_v2(path: str) -> bool:
    """Whether ``path`` belongs to the Open Inference Protocol, whose clients expect its error shape."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(code: str, message: str, v2: bool = False) -> dict[str, Any]:
    return {"error": message, "code": code} if v2 else {"error": {"code": code, "message": message}}


def error_response(
    code: str, message: str, retry_after_s: int, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    """The JSON error body, in the protocol's shape under /v2; 503s tell clients when to come back."""
    status = ERRORS[code][0]
    merged = dict(headers or {})
    if status == 503:
        merged["Retry-After"] = str(retry_after_s)
    return JSONResponse(error_body(code, message, speaks_v2(path)), status_code=status, headers=merged)


def coded_error_response(error: CodedError, retry_after_s: int, path: str = "") -> JSONResponse:
    return error_response(error.code, error.message, retry_after_s, path=path)


def error_responses(*codes: str, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the given codes, one example per code, grouped by status."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status, message = ERRORS[code]
        entry = out.setdefault(
            status,
            {
                "model": V2Error if v2 else ErrorResponse,
                "description": "",
                "content": {"application/json": {"examples": {}}},
            },
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
        entry["content"]["application/json"]["examples"][code] = {
            "summary": code,
            "value": error_body(code, message, v2),
        }
    return out


def _retry_after(request: Request) -> int:
    return request.app.state.settings.retry_after_s


async def _coded_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CodedError)
    return coded_error_response(exc, _retry_after(request), request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    where, message, kind = first_validation_error(exc.errors(), skip=("body", "query", "header"))
    code = "missing_field" if kind == "missing" else "validation_error"
    return error_response(code, f"{where}: {message}", _retry_after(request), path=request.url.path)


class BodyRefusedError(StarletteHTTPException):
    """Raised from the ASGI ``receive`` while the body streams in (too big, too slow, bad multipart).

    An HTTPException, so FastAPI's body parsing re-raises it untouched to :func:`_http_error`; it
    carries its own code because one status (413) has several.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(ERRORS[code][0], message, {"Connection": "close"})
        self.code = code


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = exc.code if isinstance(exc, BodyRefusedError) else _HTTP_CODES.get(exc.status_code)
    if code is None:  # a status this service never raises itself; keep it, still in our shape
        body = error_body(f"http_{exc.status_code}", str(exc.detail), speaks_v2(request.url.path))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    message = f"no route for {request.method} {request.url.path}" if code == "not_found" else str(exc.detail)
    if code == "method_not_allowed":
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(code, message, _retry_after(request), exc.headers, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(CodedError, _coded_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
