"""The ``endpoint`` label of the request metrics is always a route template: /metrics cannot be grown by clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import LiveServer, live_server, metric_samples, serving_settings, wait_for

API_KEY = "s3cret-key"
MAX_UPLOAD_BYTES = 4096


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    settings = serving_settings(tiny_weights, api_key=API_KEY, max_upload_bytes=MAX_UPLOAD_BYTES)
    with live_server(settings) as running:
        yield running


def counted_after(client: httpx.Client, before: dict[str, float], requests: int) -> dict[str, float]:
    """The request counts added since ``before``, once ``requests`` of them are in (each is counted after
    its answer has been sent), without the scrapes of /metrics."""

    def added() -> dict[str, float]:
        now = metric_samples(client.get("/metrics").text, "cxr_http_requests_total")
        changed = (key for key in now if now[key] != before.get(key) and "/metrics" not in key)
        return {key: now[key] - before.get(key, 0) for key in changed}

    wait_for(lambda: sum(added().values()) >= requests)
    return added()


def test_static_and_unknown_paths_add_no_labels(server: LiveServer) -> None:
    """Every /static/<random> used to add a counter and a 13-bucket histogram, unauthenticated."""
    token = uuid.uuid4().hex
    with server.client() as client:
        before = metric_samples(client.get("/metrics").text, "cxr_http_requests_total")
        for i in range(5):
            assert client.get(f"/static/{token}{i}").status_code == 404
            assert client.get(f"/{token}{i}").status_code == 404
        assert client.get("/static/ui.js").status_code == 200
        added = counted_after(client, before, 11)
        assert token not in client.get("/metrics").text
    assert added == {
        '{endpoint="/static/{path}",method="GET",status="404"}': 5,
        '{endpoint="/static/{path}",method="GET",status="200"}': 1,
        '{endpoint="unmatched",method="GET",status="404"}': 5,
    }


def test_answers_before_routing_are_labelled_with_their_route(server: LiveServer) -> None:
    """A 401 (API key) or 413 (Content-Length) is answered before routing; it still belongs to its route."""
    with server.client() as client:
        before = metric_samples(client.get("/metrics").text, "cxr_http_requests_total")
        refused = client.post("/predict", files={"file": ("x.jpg", b"\xff\xd8\xff")})
        too_large = client.post(
            "/predict", headers={"X-API-Key": API_KEY}, files={"file": ("x.jpg", b"\0" * MAX_UPLOAD_BYTES)}
        )
        versioned = client.get("/v2/models/any/versions/7/ready")
        added = counted_after(client, before, 3)
    assert (refused.status_code, too_large.status_code, versioned.status_code) == (401, 413, 401)
    assert added == {
        '{endpoint="/predict",method="POST",status="401"}': 1,
        '{endpoint="/predict",method="POST",status="413"}': 1,
        '{endpoint="/v2/models/{model_name}/versions/{model_version}/ready",method="GET",status="401"}': 1,
    }
