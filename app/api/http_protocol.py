"""uvicorn's httptools protocol with the limits it lacks, and JSON bodies for the errors it sends itself.

uvicorn bounds neither the size of a request head nor the time a client may take to send it,
arms its keep-alive timer only after a first response (a connection that never sends a byte
stays open for good) and answers unparseable requests with a plain-text 400. This subclass:

- refuses a request line + headers over ``max_header_bytes`` with 431 ``header_too_large``;
- gives a started request head ``header_timeout_s`` to complete, else 408 ``request_timeout``;
- closes a connection that sends nothing within the keep-alive timeout, as after a response;
- answers parse errors with the service's JSON error body (400 ``bad_request``);
- answers an ``Upgrade`` request (WebSocket, h2c) as plain HTTP and then closes the connection
  (the server runs with ``ws="none"``: uvicorn's WebSocket handshake would refuse with a bare 403).

The request body's own deadline is enforced in the ASGI layer (``BodySizeLimitMiddleware``),
where a 408 can go through the normal error handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("app.access")


def json_error_bytes(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying the service's error body; the connection is closed after it."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _HeadTooLargeError(Exception):
    """Raised from a parser callback to stop parsing an oversized head."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Set the two class attributes with :func:`guarded_protocol`; uvicorn instantiates it per connection."""

    max_header_bytes: ClassVar[int] = 64 * 1024
    header_timeout_s: ClassVar[float] = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0  # bytes received while a head is incomplete (may include a body's first bytes)
        self._head_size = 0  # exact size of the current head, from the parser's callbacks
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
        super().data_received(data)  # completes the head (on_headers_complete) when it is all there
        # A head still incomplete after this many bytes (one endless header line, say) is refused here.
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    # httptools calls these once per complete URL piece / header line, also within one big chunk.
    def on_url(self, url: bytes) -> None:
        self._grow_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _grow_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.max_header_bytes:
            self._head_too_large = True
            raise _HeadTooLargeError  # aborts parsing; httptools reports it as a parser error (send_400_response)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # the next bytes on this connection start a new request head
        self._head_bytes = 0

    def _unsupported_upgrade_warning(self) -> None:
        """Called once httptools has parsed an ``Upgrade`` request, which the app answers as plain HTTP.

        RFC 9110 7.8 lets a server ignore ``Upgrade``; httptools parses nothing more on this
        connection, so it closes after the answer instead of leaving the client's next request unread.
        uvicorn's version logs a warning that suggests installing a WebSocket library.
        """
        if self.cycle is not None:
            self.cycle.keep_alive = False

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_too_large()
        else:
            self._refuse(400, "bad_request", "the request is not valid HTTP/1.1")

    def _refuse_too_large(self) -> None:
        limit = self.max_header_bytes
        self._refuse(431, "header_too_large", f"the request line and headers are over {limit} bytes")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, "request_timeout", f"the request head did not arrive within {self.header_timeout_s:g} s")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._cancel_head_timer()
        client = self.client[0] if self.client else None
        log.warning("refused a request before routing: %d %s", status, code, extra={"status": status, "client": client})
        self.transport.write(json_error_bytes(status, code, message))
        self.transport.close()


def guarded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this service's limits."""
    return type(
        "CxrHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s},
    )
