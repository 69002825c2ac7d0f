"""Every failure becomes ``{"error": {"code", "message"}}`` with a status fixed by its code.

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
from app.core.coded_error import CodedError, first_validation_error
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


# code -> (HTTP status, example message)
ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the multipart body could not be parsed"),
    "empty_file": (400, EmptyImageError.default_message),
    "unauthorized": (401, UnauthorizedError.default_message),
    "not_found": (404, "no route for GET /nope"),
    "method_not_allowed": (405, "GET is not allowed on /predict"),
    "payload_too_large": (413, "request body is over the limit of 20971520 bytes"),
    "image_too_large": (413, "image is 12000x10000 = 120000000 pixels, over the limit of 100000000"),
    "too_many_files": (413, "40 files uploaded; at most 32 per batch"),
    "unsupported_media_type": (415, "the file is not a JPEG or PNG image"),
    "corrupt_image": (422, "the image data is corrupt or truncated: image file is truncated"),
    "invalid_image": (422, ImageError.default_message),
    "not_chest_xray": (
        422,
        "refused: input guard score 4.210 > threshold 1.546: it does not resemble the frontal chest X-rays "
        "the model was trained on",
    ),
    "missing_field": (422, "file: Field required"),
    "validation_error": (422, "files.0: Expected UploadFile, received: <class 'str'>"),
    "internal_error": (500, "unexpected server error; it has been logged with this request's id"),
    "inference_failed": (500, InferenceFailedError.default_message),
    "unavailable": (503, BatcherError.default_message),
    "not_ready": (503, NotReadyError.default_message),
    "overloaded": (503, "512 images are already waiting; retry shortly"),
    "shutting_down": (503, ShuttingDownError.default_message),
    "timeout": (504, "no result within the 30 s request timeout"),
}
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(code: str, message: str, retry_after_s: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body; 503s tell clients when to come back."""
    status = ERRORS[code][0]
    merged = dict(headers or {})
    if status == 503:
        merged["Retry-After"] = str(retry_after_s)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=merged)


def coded_error_response(error: CodedError, retry_after_s: int) -> JSONResponse:
    return error_response(error.code, error.message, retry_after_s)


def error_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the given codes, one example per code, grouped by status."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status, message = ERRORS[code]
        entry = out.setdefault(
            status, {"model": ErrorResponse, "description": "", "content": {"application/json": {"examples": {}}}}
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
        entry["content"]["application/json"]["examples"][code] = {
            "summary": code,
            "value": {"error": {"code": code, "message": message}},
        }
    return out


def _retry_after(request: Request) -> int:
    return request.app.state.settings.retry_after_s


async def _coded_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CodedError)
    return coded_error_response(exc, _retry_after(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    where, message, kind = first_validation_error(exc.errors(), skip=("body", "query", "header"))
    code = "missing_field" if kind == "missing" else "validation_error"
    return error_response(code, f"{where}: {message}", _retry_after(request))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code)
    if code is None:  # a status this service never raises itself; keep it, still in our shape
        body = {"error": {"code": f"http_{exc.status_code}", "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
    message = f"no route for {request.method} {request.url.path}" if code == "not_found" else str(exc.detail)
    if code == "method_not_allowed":
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(code, message, _retry_after(request), exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(CodedError, _coded_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
