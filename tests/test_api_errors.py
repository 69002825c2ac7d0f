"""Every bad request gets a JSON error with a stable code and the documented status, never a 500."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import ASGIApp, Message

from app.api.errors import ERRORS
from app.api.factory import create_app
from tests.conftest import encode, synthetic_xray
from tests.live_server import LiveServer, live_server, serving_settings

MAX_UPLOAD = 64 * 1024
BOUNDARY = "cxr-test-boundary"


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    settings = serving_settings(tiny_weights, max_pixels=20_000, max_upload_bytes=MAX_UPLOAD, max_batch_files=3)
    with live_server(settings) as running:
        yield running


def jpeg(width: int = 96, height: int = 80) -> bytes:
    return encode(synthetic_xray(width, height), "JPEG", quality=90)


def multipart(field: str, filename: str, data: bytes) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


BAD_UPLOADS = {
    "empty_file": (b"", 400, "empty_file"),
    "text_file": (b"just some text, not pixels", 415, "unsupported_media_type"),
    "gif": (encode(synthetic_xray(), "GIF"), 415, "unsupported_media_type"),
    "bmp": (encode(synthetic_xray(), "BMP"), 415, "unsupported_media_type"),
    "truncated_jpeg": (jpeg(120, 120)[:1500], 422, "corrupt_image"),
    "jpeg_header_only": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage", 422, "corrupt_image"),
    "too_many_pixels": (jpeg(200, 200), 413, "image_too_large"),
    "thumbnail": (jpeg(24, 24), 422, "unsuitable_shape"),
    "strip": (jpeg(40, 130), 422, "unsuitable_shape"),
}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert ERRORS[code][0] == status  # the documented status is the one served


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads(server: LiveServer, case: str) -> None:
    data, status, code = BAD_UPLOADS[case]
    with server.client() as client:
        response = client.post("/predict", files={"file": ("upload.jpg", data, "image/jpeg")})
    assert_error(response, status, code)


@pytest.mark.parametrize(
    ("request_kwargs", "code"),
    [
        ({}, "missing_field"),
        ({"files": {"image": ("a.jpg", b"\xff\xd8")}}, "missing_field"),
        ({"data": {"file": "a plain form field, not a file"}}, "validation_error"),
        ({"json": {"file": "base64?"}}, "missing_field"),
    ],
)
def test_malformed_requests(server: LiveServer, request_kwargs: dict[str, object], code: str) -> None:
    with server.client() as client:
        response = client.post("/predict", **request_kwargs)  # type: ignore[arg-type]
    assert_error(response, 422, code)


def test_unknown_route_and_wrong_method(server: LiveServer) -> None:
    with server.client() as client:
        assert_error(client.get("/nope"), 404, "not_found")
        wrong_method = client.get("/predict")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]


def test_upload_over_limit_by_content_length(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/predict", files={"file": ("big.jpg", os.urandom(MAX_UPLOAD + 1))})
    assert_error(response, 413, "payload_too_large")


def test_chunked_upload_over_limit(server: LiveServer) -> None:
    body = multipart("file", "big.jpg", os.urandom(MAX_UPLOAD + 10_000))
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    with server.client() as client:
        response = client.post(
            "/predict", content=chunks, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        )
    assert "content-length" not in response.request.headers  # really sent chunked
    assert_error(response, 413, "payload_too_large")


def test_chunked_upload_under_limit_is_scored(server: LiveServer) -> None:
    body = multipart("file", "ok.jpg", jpeg())
    with server.client() as client:
        response = client.post(
            "/predict",
            content=iter([body[:100], body[100:]]),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
    assert response.status_code == 200, response.text


def test_too_many_files_in_a_batch(server: LiveServer) -> None:
    files = [("files", (f"{i}.jpg", jpeg())) for i in range(4)]
    with server.client() as client:
        assert_error(client.post("/predict/batch", files=files), 413, "too_many_files")
        assert client.post("/predict/batch", files=files[:3]).status_code == 200


def test_batch_items_get_per_file_codes(server: LiveServer) -> None:
    files = [("files", ("big.jpg", jpeg(200, 200))), ("files", ("cut.jpg", jpeg(120, 120)[:1500]))]
    with server.client() as client:
        response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    assert [item["error"]["code"] for item in response.json()["results"]] == ["image_too_large", "corrupt_image"]


def test_rejections_are_counted(server: LiveServer) -> None:
    with server.client() as client:
        client.post("/predict", files={"file": ("e.jpg", b"")})
        text = client.get("/metrics").text
    assert 'cxr_rejected_images_total{code="empty_file"}' in text


def _call_asgi(app: ASGIApp, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[list[Message], int]:
    """Drive the ASGI app directly and report what it sent and how many body chunks it pulled."""
    sent: list[Message] = []
    pulled = 0
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "root_path": "",
    }

    async def receive() -> Message:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, pulled


def test_declared_oversize_body_is_never_read(tiny_weights: Path) -> None:
    app = create_app(serving_settings(tiny_weights, max_upload_bytes=1000))
    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()), (b"content-length", b"5000")]
    sent, pulled = _call_asgi(app, headers, [b"x" * 5000])
    assert pulled == 0
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"


def test_streamed_body_stops_at_the_limit(tiny_weights: Path) -> None:
    app = create_app(serving_settings(tiny_weights, max_upload_bytes=1000))
    body = multipart("file", "a.jpg", b"x" * 100_000)
    chunks = [body[i : i + 400] for i in range(0, len(body), 400)]
    sent, pulled = _call_asgi(app, [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())], chunks)
    assert pulled == 3  # 1200 bytes: the chunk that crossed 1000 was the last one read
    assert sent[0]["status"] == 413


def test_missing_api_key_is_refused_before_the_body_is_read(tiny_weights: Path) -> None:
    app = create_app(serving_settings(tiny_weights, api_key="s3cret"))
    content_type = (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())
    body = multipart("file", "a.jpg", b"x" * 4000)
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    sent, pulled = _call_asgi(app, [content_type, (b"x-api-key", b"wrong")], chunks)
    assert pulled == 0
    assert sent[0]["status"] == 401 and json.loads(sent[1]["body"])["error"]["code"] == "unauthorized"
    sent, pulled = _call_asgi(app, [content_type, (b"x-api-key", b"s3cret")], chunks)
    # The right key goes through to the route, which reads the whole body (and, with no model loaded, says so).
    assert pulled >= len(chunks) and sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "not_ready"
    assert pulled >= len(chunks) and sent[0]["status"] != 401  # the right key goes through to the route


def test_readme_documents_every_error_code_and_setting() -> None:
    """The README's error and settings tables are the contract operators read: no code or CXR_* may be missing."""
    from app.settings import Settings

    text = (Path(__file__).parents[1] / "README.md").read_text()
    errors = text.split("### Errors", 1)[1].split("## Settings", 1)[0]
    assert set(ERRORS) <= set(re.findall(r"`([a-z_]+)`", errors))
    settings = text.split("## Settings", 1)[1].split("## The model files", 1)[0]
    assert {f"CXR_{name.upper()}" for name in Settings.model_fields} <= set(re.findall(r"`(CXR_[A-Z_]+)`", settings))
