"""Issue 10, findings 6 and 7 against a real uvicorn: limits below routing, JSON for every error, safe logs."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.logs import TextFormatter
from tests.conftest import encode, synthetic_xray
from tests.hostile_inputs import png_with_bad_ihdr_crc
from tests.live_server import ForwardGate, LiveServer, connect, live_server, read_response, serving_settings, wait_for

BOUNDARY = "cxr-protocol-test"


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    settings = serving_settings(
        tiny_weights,
        max_header_bytes=8 * 1024,
        header_timeout_s=0.5,
        body_timeout_s=1.0,
        keep_alive_s=1,
        max_batch_files=3,
    )
    with live_server(settings) as running:
        yield running


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> None:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code


def still_serving(server: LiveServer) -> None:
    with server.client() as client:
        assert client.get("/livez").status_code == 200


def test_oversized_header_is_431_json(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert_json_error(*read_response(sock), 431, "header_too_large")
    still_serving(server)


def test_header_at_the_limit_is_served(server: LiveServer) -> None:
    with server.client() as client:
        assert client.get("/livez", headers={"X-Pad": "a" * 6000}).status_code == 200


def test_a_head_that_stalls_gets_408_json(server: LiveServer) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        response = read_response(sock)
        assert time.monotonic() - started < 5
    assert_json_error(*response, 408, "request_timeout")


def test_a_connection_that_never_sends_is_closed_at_the_keep_alive_timeout(server: LiveServer) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert 0.5 < time.monotonic() - started < 5


def test_a_body_that_stalls_gets_408_json(server: LiveServer) -> None:
    with connect(server) as sock:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            "Content-Length: 5000\r\n\r\n"
        )
        sock.sendall(head.encode() + f"--{BOUNDARY}\r\n".encode())
        assert_json_error(*read_response(sock), 408, "request_timeout")
    still_serving(server)


def test_invalid_http_gets_400_json(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Name: y\r\n\r\n")
        assert_json_error(*read_response(sock), 400, "bad_request")


WEBSOCKET_UPGRADE = (
    b"Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_websocket_upgrade_is_answered_as_plain_http(server: LiveServer) -> None:
    """Was uvicorn's empty text/plain 403 from a WebSocket handshake the service never speaks."""
    with connect(server) as sock:
        sock.sendall(b"GET /predict HTTP/1.1\r\n" + WEBSOCKET_UPGRADE)
        status, headers, body = read_response(sock)
    assert_json_error(status, headers, body, 405, "method_not_allowed")
    assert headers["connection"] == "close"  # httptools reads nothing more on an upgraded connection
    with connect(server) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\n" + WEBSOCKET_UPGRADE)
        status, headers, body = read_response(sock)
    assert status == 200 and json.loads(body) == {"status": "alive"}


def multipart(parts: list[tuple[str, bytes]], close: bool = True) -> bytes:
    body = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in parts
    )
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def post_multipart(server: LiveServer, path: str, body: bytes) -> httpx.Response:
    with server.client() as client:
        return client.post(path, content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def test_multipart_without_closing_boundary_is_400(server: LiveServer) -> None:
    """Finding 7: was 422 missing_field."""
    response = post_multipart(server, "/predict", multipart([("file", encode(synthetic_xray()))], close=False))
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("parts", [4, 1001])
def test_too_many_parts_is_413_too_many_files(server: LiveServer, parts: int) -> None:
    """Finding 7: over 1,000 parts was Starlette's 400."""
    response = post_multipart(server, "/predict/batch", multipart([("files", b"x")] * parts))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_files"


def test_intact_multipart_at_the_limit_is_scored(server: LiveServer) -> None:
    response = post_multipart(server, "/predict/batch", multipart([("files", encode(synthetic_xray()))] * 3))
    assert response.status_code == 200 and len(response.json()["results"]) == 3


def test_png_with_bad_ihdr_checksum_is_422(server: LiveServer) -> None:
    """Finding 7: was 415."""
    with server.client() as client:
        response = client.post("/predict", files={"file": ("x.png", png_with_bad_ihdr_crc(), "image/png")})
    assert response.status_code == 422 and response.json()["error"]["code"] == "corrupt_image"


def test_openapi_declares_the_key_only_when_one_is_set(tiny_weights: Path) -> None:
    from app.api.factory import create_app

    open_schema = create_app(serving_settings(tiny_weights)).openapi()
    keyed = create_app(serving_settings(tiny_weights, api_key="k")).openapi()
    operations = [op for ops in open_schema["paths"].values() for op in ops.values()]
    assert not any("security" in op for op in operations)
    assert "securitySchemes" not in open_schema.get("components", {})
    assert keyed["paths"]["/predict"]["post"]["security"] == [{"APIKeyHeader": []}]
    bodies = open_schema["components"]["schemas"]
    assert bodies["Body_predict_predict_post"]["properties"]["file"]["minLength"] == 1
    files = bodies["Body_predict_batch_predict_batch_post"]["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, 32)


def test_text_log_lines_cannot_be_forged(server: LiveServer) -> None:
    """Finding 6: a %0a in the path used to start a new, forged line in the text log."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    access = logging.getLogger("app.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        with server.client() as client:
            client.get("/nope%0a2026-01-01 00:00:00,000 INFO    app.access [-] GET /admin 200")
        wait_for(lambda: "404" in stream.getvalue())  # the access line is written after the response
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "\\n2026-01-01" in lines[0] and lines[0].endswith(" 404")


def test_requests_cut_at_the_end_of_the_drain_grace_get_json(tiny_weights: Path, monkeypatch) -> None:
    """Finding 6: uvicorn cancels what is still running after the grace and used to send a plain-text 500."""
    running = LiveServer(serving_settings(tiny_weights, graceful_shutdown_s=1))
    running.start()
    gate = ForwardGate(monkeypatch)
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        with running.client() as client:
            result["response"] = client.post("/predict", files={"file": ("a.jpg", encode(synthetic_xray()))})

    caller = threading.Thread(target=call)
    caller.start()
    assert gate.entered.wait(30)
    running.stop()  # drain: the request is held past the 1 s grace, then cancelled
    gate.release.set()
    caller.join(30)
    response = result["response"]
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "shutting_down"
    wait_for(lambda: not running.thread.is_alive(), 30)
