"""uvicorn with drain-on-signal: readiness flips to 503 the moment SIGTERM arrives."""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType

import uvicorn

from app.api.http_protocol import guarded_protocol
from app.settings import Settings


class DrainingServer(uvicorn.Server):
    """Marks the service draining before uvicorn stops listening and waits for in-flight requests."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def server_config(app: object, settings: Settings) -> uvicorn.Config:
    """Serving-grade uvicorn settings: our structured logs instead of its access log, bounded shutdown,
    and the protocol with header limits and JSON errors (``app.api.http_protocol``)."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(settings.max_header_bytes, settings.header_timeout_s),
        ws="none",  # no WebSocket routes: an Upgrade header is ignored and the request answered as plain HTTP
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        timeout_keep_alive=settings.keep_alive_s,
    )
