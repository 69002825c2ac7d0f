"""A real uvicorn server on a free loopback port, in a thread of the test process.

In-process (rather than a subprocess) so tests can gate the model's forward pass with an
event and observe queueing, timeouts and draining deterministically, without sleeps.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI

from app.api.factory import create_app
from app.api.server import DrainingServer, server_config
from app.core.engine import ImageResult, InferenceEngine
from app.settings import Settings


def serving_settings(weights: Path, **overrides: object) -> Settings:
    """Settings for a CPU test server; never the process environment's CXR_* values.

    The CPU batch-size probe is off (``batch_probe_s=0``): tests that form batches must get the
    batch size they configure, not one timed on a busy machine; the probe has its own tests.
    """
    values: dict[str, object] = {
        "weights": weights,
        "device": "cpu",
        "log_format": "text",
        "decode_workers": 2,
        "batch_probe_s": 0,
    }
    return Settings.model_validate({**values, **overrides})


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.app: FastAPI = create_app(settings)
        config = server_config(self.app, settings.model_copy(update={"host": "127.0.0.1", "port": 0}))
        self.server = DrainingServer(config, on_exit=self.app.state.service.begin_drain)
        self.exit_code: int | str | None = None
        self.thread = threading.Thread(target=self._run, name="live-uvicorn", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as exc:  # uvicorn exits the process when the lifespan startup fails
            self.exit_code = exc.code

    def start(self, timeout_s: float = 60.0) -> None:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout_s)
        if not self.server.started:
            raise RuntimeError("test server did not start")

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def live_server(settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ForwardGate:
    """Holds every forward pass until released, so a test decides exactly when inference finishes.

    Install it after the server started: warm-up runs forward passes too.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        original = InferenceEngine.infer

        def gated(engine: InferenceEngine, pixels: torch.Tensor, explain: Sequence[bool] = ()) -> list[ImageResult]:
            self.entered.set()
            if not self.release.wait(timeout=30):
                raise RuntimeError("forward gate never released")
            return original(engine, pixels, explain)

        monkeypatch.setattr(InferenceEngine, "infer", gated)


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll until ``condition`` holds; the test fails if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` for one metric family's sample lines in Prometheus text format."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key[len(name) :]] = float(value)
    return samples


def connect(server: LiveServer) -> socket.socket:
    """A raw TCP connection to the server, for tests that speak HTTP/1.1 byte by byte."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read until the server closes the connection; parse status, headers and body."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body
