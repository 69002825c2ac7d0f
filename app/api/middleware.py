"""Pure ASGI middleware: request context (id, logs, metrics, last-resort 500), API key, CORS errors, body limits,
startup errors.

Pure ASGI rather than ``BaseHTTPMiddleware`` so request bodies stream through untouched: the size,
time and multipart limits can stop an upload at the first byte over, and nothing buffers whole uploads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Sequence

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.batching import ShuttingDownError
from app.api.errors import BodyRefusedError, UnauthorizedError, coded_error_response, error_response
from app.api.telemetry import Metrics
from app.logs import request_id_var
from app.settings import Settings

log = logging.getLogger("app.access")
error_log = logging.getLogger("app.api.errors")

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Polled by orchestrators every few seconds: logged at DEBUG so they do not drown real traffic.
_QUIET_ENDPOINTS = frozenset({"/health", "/livez", "/metrics", "/v2/health/live", "/v2/health/ready"})


def _route_for(scope: Scope, routes: Sequence[Route | Mount]) -> Route | Mount | None:
    """The route Starlette's router picks for ``scope``: the first full match, else the first partial one."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def _endpoint_label(scope: Scope, arrived: Scope, routes: Sequence[Route | Mount]) -> str:
    """The route template, never the raw path, so metric label cardinality stays bounded.

    Routing names the route in ``scope`` for API routes only; a request answered before routing
    (401, 413) or by a mount (``/static/``) is labelled with the template its path matches as it
    ``arrived`` (a mount rewrites ``root_path`` in ``scope``), and anything else is ``unmatched``.
    """
    route = scope.get("route") or _route_for(arrived, routes)
    return "unmatched" if route is None else str(route.path_format)


class RequestContextMiddleware:
    """Tag each request with an id, log and count it, and turn escaped exceptions into a JSON 500."""

    def __init__(self, app: ASGIApp, metrics: Metrics, retry_after_s: int, routes: Sequence[Route | Mount]) -> None:
        self.app = app
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.routes = routes  # every route the app serves, flat: the only values the endpoint label takes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = supplied if _VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        arrived = dict(scope)  # routing adds to the scope in place
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when the drain grace ends; it would answer a plain-text 500
            # and log the cancellation as an error with a traceback. Answered 503, the request ends here.
            if response_started:
                raise
            status = 503
            shutting_down = coded_error_response(ShuttingDownError(), self.retry_after_s, scope["path"])
            await shutting_down(scope, receive, send_with_id)
        except Exception:
            error_log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not response_started:
                response = error_response(
                    "internal_error",
                    f"unexpected server error; it has been logged with request id {request_id}",
                    self.retry_after_s,
                    path=scope["path"],
                )
                await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            endpoint = _endpoint_label(scope, arrived, self.routes)
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            level = logging.DEBUG if endpoint in _QUIET_ENDPOINTS else logging.INFO
            client = scope.get("client")
            log.log(
                level,
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": client[0] if client else None,
                },
            )
            request_id_var.reset(token)


class ApiKeyMiddleware:
    """401 for protected paths without a valid ``X-API-Key``, before any of the body is read.

    The route dependency alone runs only after FastAPI has parsed the whole multipart upload, so an
    unauthenticated client could make the server take in ``CXR_MAX_UPLOAD_BYTES`` per request.
    """

    def __init__(self, app: ASGIApp, settings: Settings, protected: Sequence[BaseRoute]) -> None:
        self.app = app
        self.settings = settings
        self.protected = protected

    def _is_protected(self, scope: Scope) -> bool:
        # PARTIAL (path matches, method does not) counts too: a wrong method learns nothing without the key.
        return any(route.matches(scope)[0] is not Match.NONE for route in self.protected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] != "OPTIONS"  # CORS preflights carry no credentials
            and self._is_protected(scope)
            and not self.settings.api_key_accepts(Headers(scope=scope).get("x-api-key"))
        ):
            response = coded_error_response(UnauthorizedError(), self.settings.retry_after_s, scope["path"])
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class JsonCorsMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered in the service's JSON error shape.

    Starlette answers it with a text/plain 400 ``Disallowed CORS origin, method``; here it is 400
    ``cors_refused`` with the same CORS headers, under ``/v2`` in the protocol's shape.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:  # Starlette's test for one
                await self._preflight(headers, scope["path"])(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _preflight(self, headers: Headers, path: str) -> Response:
        response = self.preflight_response(request_headers=headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # e.g. "origin, method"
        cors = {name: value for name, value in response.headers.items() if name.startswith(("access-control-", "vary"))}
        # A 400 carries no Retry-After, so its delay (0) is never sent.
        return error_response("cors_refused", f"CORS preflight refused: {refused} not allowed", 0, cors, path)


class BodySizeLimitMiddleware:
    """413 before reading anything when Content-Length is too big; stop a body at the limit or the deadline.

    A chunked upload is stopped at the first chunk over ``max_bytes``; a body still arriving
    ``timeout_s`` after the headers (a slow or stalled client) gets 408 ``request_timeout``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, retry_after_s: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s

    def _too_large(self) -> BodyRefusedError:
        return BodyRefusedError("payload_too_large", f"request body is over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = self._too_large()
            response = error_response(error.code, error.detail, self.retry_after_s, error.headers, scope["path"])
            await response(scope, receive, send)
            return
        received = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyRefusedError(
                    "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


class MultipartLimitsMiddleware:
    """Count multipart parts as they stream in and insist on the closing boundary.

    More than ``max_parts`` parts is 413 ``too_many_files`` as soon as the part after the limit
    starts (Starlette would parse up to 1,000 and answer its own 400); a body that ends without
    its closing ``--boundary--`` is 400 ``bad_request`` (Starlette would hand on the parts it saw,
    so a cut upload looked like a missing field).
    """

    def __init__(self, app: ASGIApp, max_parts: int) -> None:
        self.app = app
        self.max_parts = max_parts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type, options = parse_options_header(Headers(scope=scope).get("content-type", ""))
        boundary = options.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            await self.app(scope, receive, send)
            return
        delimiter = b"\r\n--" + boundary
        pending = b"\r\n"  # the first delimiter may open the body without a line break before it
        parts = 0
        closed = False

        async def counting_receive() -> Message:
            nonlocal pending, parts, closed
            message = await receive()
            if message["type"] != "http.request" or closed:
                return message
            more = message.get("more_body", False)
            buffer, pos = pending + message.get("body", b""), 0
            while (found := buffer.find(delimiter, pos)) >= 0:
                after = found + len(delimiter)
                if len(buffer) < after + 2 and more:  # cannot tell "--" (close) from a new part yet
                    break
                if buffer[after : after + 2] == b"--":
                    closed = True
                    break
                parts += 1
                pos = after
                if parts > self.max_parts:
                    raise BodyRefusedError(
                        "too_many_files", f"over {self.max_parts} parts in the multipart body; at most {self.max_parts}"
                    )
            else:
                found = max(pos, len(buffer) - len(delimiter) - 1)
            pending = buffer[found:] if not closed else b""
            if not more and not closed:
                raise BodyRefusedError("bad_request", "the multipart body ended before its closing boundary")
            return message

        await self.app(scope, counting_receive, send)


class StartupFailureMiddleware:
    """Report a failed start (model, decoders) as its one-line reason, not the traceback Starlette sends uvicorn."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_reason(message: Message) -> None:
            reason = getattr(scope["app"].state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and reason is not None:
                message = {**message, "message": f"startup failed: {reason}"}
            await send(message)

        await self.app(scope, receive, send_reason)
