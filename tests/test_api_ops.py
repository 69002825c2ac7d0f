"""Overload, timeouts, failures, draining, readiness, API key, CORS and structured logs."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from app.api.factory import create_app
from app.api.service import Service
from app.core.engine import ImageResult, InferenceEngine
from app.logs import JsonFormatter, request_id_var
from tests.conftest import encode, synthetic_xray
from tests.live_server import ForwardGate, LiveServer, live_server, metric_samples, serving_settings, wait_for

IMAGE = encode(synthetic_xray(), "JPEG")
API_KEY = "s3cret-key"
ORIGIN = "https://viewer.example"


def post_image(server: LiveServer, **headers: str) -> httpx.Response:
    with server.client() as client:
        return client.post("/predict", files={"file": ("x.jpg", IMAGE, "image/jpeg")}, headers=headers)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def test_queue_full_is_503_with_retry_after(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, pool: ThreadPoolExecutor
) -> None:
    settings = serving_settings(tiny_weights, max_batch_size=1, queue_size=1, max_wait_ms=0, retry_after_s=3)
    with live_server(settings) as server:
        gate = ForwardGate(monkeypatch)
        running = pool.submit(post_image, server)
        assert gate.entered.wait(20)
        queued = pool.submit(post_image, server)
        with server.client() as client:
            wait_for(lambda: metric_samples(client.get("/metrics").text, "cxr_queue_depth")[""] == 1)
        rejected = post_image(server)
        gate.release.set()
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "overloaded"
        assert rejected.headers["retry-after"] == "3"
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_timeout_is_504_and_the_batcher_keeps_working(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with live_server(serving_settings(tiny_weights, request_timeout_s=0.5)) as server:
        gate = ForwardGate(monkeypatch)
        timed_out = post_image(server)
        assert gate.entered.is_set()
        gate.release.set()
        assert timed_out.status_code == 504
        assert timed_out.json()["error"]["code"] == "timeout"
        assert post_image(server).status_code == 200


def test_a_batch_that_times_out_counts_no_predictions(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cxr_predictions_total`` counts predictions returned: none when the batch fails, though one image was scored.
    So does the guard's ``flagged`` count (white images fail the guard, flagged in ``flag`` mode)."""
    settings = serving_settings(tiny_weights, max_batch_size=1, max_wait_ms=0, request_timeout_s=2, input_guard="flag")
    with live_server(settings) as server:
        release = threading.Event()
        passes: list[int] = []
        original = InferenceEngine.infer

        def second_pass_stalls(
            engine: InferenceEngine, pixels: torch.Tensor, explain: Sequence[bool] = ()
        ) -> list[ImageResult]:
            passes.append(len(pixels))
            if len(passes) == 2 and not release.wait(timeout=30):
                raise RuntimeError("second forward pass never released")
            return original(engine, pixels, explain)

        monkeypatch.setattr(InferenceEngine, "infer", second_pass_stalls)
        white = encode(Image.new("L", (96, 80), 255), "JPEG")
        batch = [("files", (f"white-{i}.jpg", white, "image/jpeg")) for i in range(2)]
        with server.client() as client:

            def predictions() -> float:
                return sum(metric_samples(client.get("/metrics").text, "cxr_predictions_total").values())

            def flagged() -> float:
                samples = metric_samples(client.get("/metrics").text, "cxr_input_guard_failures_total")
                return sum(value for labels, value in samples.items() if "flagged" in str(labels))

            before, flagged_before = predictions(), flagged()
            timed_out = client.post("/predict/batch", files=batch)
            release.set()
            assert passes == [1, 1]  # the first image was scored, the second one's pass stalled
            assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
            assert (predictions(), flagged()) == (before, flagged_before)
            answered = client.post("/predict/batch", files=batch)
            assert answered.status_code == 200 and answered.json()["results"][0]["input_guard"]["passed"] is False
            assert (predictions(), flagged()) == (before + 2, flagged_before + 2)


def test_requests_cut_off_by_the_drain_deadline_get_503_without_a_traceback(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, pool: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn cancels what still runs after ``CXR_GRACEFUL_SHUTDOWN_S``: an expected end, answered and not an error."""
    server = LiveServer(serving_settings(tiny_weights, graceful_shutdown_s=1))
    server.start()
    gate = ForwardGate(monkeypatch)
    in_flight = pool.submit(post_image, server)
    try:
        assert gate.entered.wait(20)
        server.server.handle_exit(signal.SIGTERM, None)
        cut_off = in_flight.result(timeout=30)
    finally:
        gate.release.set()
        server.thread.join(timeout=30)
    assert cut_off.status_code == 503 and cut_off.json()["error"]["code"] == "shutting_down"
    assert "retry-after" in cut_off.headers
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info is not None or "Traceback" in r.getMessage()]
    assert tracebacks == []


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    with live_server(serving_settings(tiny_weights)) as running:
        yield running


def test_inference_failure_fails_health_until_a_batch_succeeds(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(engine: InferenceEngine, pixels: torch.Tensor, explain: Sequence[bool] = ()) -> list[ImageResult]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    healthy = InferenceEngine.infer
    monkeypatch.setattr(InferenceEngine, "infer", broken)
    failed = post_image(server)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "inference_failed"
    with server.client() as client:
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed" and "illegal memory access" in health.json()["detail"]
        monkeypatch.setattr(InferenceEngine, "infer", healthy)
        assert post_image(server).status_code == 200
        assert client.get("/health").status_code == 200


def test_unexpected_error_is_json_500_logged_with_traceback(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(self: Service, data: bytes, explain: bool = False) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(Service, "predict", crash)
    with caplog.at_level(logging.ERROR, logger="app.api.errors"):
        response = post_image(server, **{"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error" and "req-500" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "req-500"
    [record] = [r for r in caplog.records if r.name == "app.api.errors"]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    with server.client() as client:
        assert client.get("/livez").status_code == 200


def test_no_cors_headers_unless_configured(server: LiveServer) -> None:
    with server.client() as client:
        response = client.get("/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_draining_refuses_new_work_and_finishes_in_flight(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, pool: ThreadPoolExecutor
) -> None:
    with live_server(serving_settings(tiny_weights)) as server:
        gate = ForwardGate(monkeypatch)
        in_flight = pool.submit(post_image, server)
        assert gate.entered.wait(20)
        server.app.state.service.begin_drain()
        with server.client() as client:
            health = client.get("/health")
            refused = post_image(server)
            livez = client.get("/livez")
        gate.release.set()
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert "retry-after" in refused.headers
        assert livez.status_code == 200
        assert in_flight.result().status_code == 200


def test_sigterm_lets_in_flight_requests_finish(
    tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, pool: ThreadPoolExecutor
) -> None:
    server = LiveServer(serving_settings(tiny_weights))
    server.start()
    gate = ForwardGate(monkeypatch)
    in_flight: Future[httpx.Response] = pool.submit(post_image, server)
    assert gate.entered.wait(20)
    server.server.handle_exit(signal.SIGTERM, None)  # exactly what uvicorn's signal handler calls
    assert server.app.state.service.draining
    gate.release.set()
    assert in_flight.result().status_code == 200
    server.thread.join(timeout=30)
    assert not server.thread.is_alive()


def test_not_ready_before_the_model_is_loaded(tiny_weights: Path) -> None:
    """Under uvicorn the port opens only after loading; other ASGI hosts may route earlier."""
    app = create_app(serving_settings(tiny_weights))

    async def probe() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return [
                await client.get("/health"),
                await client.post("/predict", files={"file": ("x.jpg", IMAGE)}),
                await client.get("/model"),
                await client.get("/livez"),
            ]

    health, predict, model, livez = asyncio.run(probe())
    assert health.status_code == 503 and health.json()["status"] == "loading"
    for response in (predict, model):
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        assert "retry-after" in response.headers
    assert livez.status_code == 200


@pytest.fixture(scope="module")
def guarded(tiny_weights: Path) -> Iterator[LiveServer]:
    with live_server(serving_settings(tiny_weights, api_key=API_KEY, cors_origins=ORIGIN)) as running:
        yield running


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}])
def test_api_key_required_for_predictions_and_model(guarded: LiveServer, headers: dict[str, str]) -> None:
    response = post_image(guarded, **headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    with guarded.client() as client:
        model = client.get("/model", headers=headers)
        explain = client.post("/explain", headers=headers, files={"file": ("x.jpg", b"\xff\xd8\xff")})
    assert model.status_code == 401 and model.json()["error"]["code"] == "unauthorized"
    assert explain.status_code == 401 and explain.json()["error"]["code"] == "unauthorized"


def test_api_key_accepted_and_operations_stay_open(guarded: LiveServer) -> None:
    assert post_image(guarded, **{"X-API-Key": API_KEY}).status_code == 200
    with guarded.client() as client:
        assert client.get("/model", headers={"X-API-Key": API_KEY}).status_code == 200
        for path in ("/health", "/livez", "/metrics", "/docs", "/openapi.json", "/ui", "/static/ui.js"):
            assert client.get(path).status_code == 200, path


def test_cors_when_configured(guarded: LiveServer) -> None:
    with guarded.client() as client:
        preflight = client.options(
            "/predict",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-api-key",
            },
        )
        denied = client.post("/predict", headers={"Origin": ORIGIN})
        stranger = client.get("/health", headers={"Origin": "https://evil.example"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    # A browser app on that origin can read the prediction headers of /explain's PNG.
    explained = client_post_explain(guarded)
    exposed = {name.strip().lower() for name in explained.headers["access-control-expose-headers"].split(",")}
    assert {"x-label", "x-pneumonia-probability", "x-model-sha256"} <= exposed
    assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize(
    ("path", "origin", "method", "refused"),
    [
        ("/predict", "https://evil.example", "POST", "origin"),
        ("/predict", ORIGIN, "DELETE", "method"),
        ("/v2/models/m/infer", "https://evil.example", "PUT", "origin, method"),
    ],
)
def test_refused_cors_preflight_is_a_json_error(
    guarded: LiveServer, path: str, origin: str, method: str, refused: str
) -> None:
    """Starlette answers a refused preflight with a text/plain 400; every error here has a JSON body and a code."""
    with guarded.client() as client:
        response = client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method})
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    message = f"CORS preflight refused: {refused} not allowed"
    ours = {"error": {"code": "cors_refused", "message": message}}
    v2 = {"error": message, "code": "cors_refused"}  # the Open Inference Protocol's error shape
    assert response.json() == (v2 if path.startswith("/v2/") else ours)
    assert "GET" in response.headers["access-control-allow-methods"]  # the CORS headers Starlette sent stay


def client_post_explain(server: LiveServer) -> httpx.Response:
    data = encode(synthetic_xray(seed=2))
    headers = {"Origin": ORIGIN, "X-API-Key": API_KEY}
    with server.client() as client:
        response = client.post("/explain", headers=headers, files={"file": ("x.jpg", data)})
    assert response.status_code == 200 and response.headers["x-label"] in ("NORMAL", "PNEUMONIA")
    return response


def test_json_log_lines_carry_request_id_and_fields() -> None:
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "POST /predict %d", (200,), None)
    record.status = 200
    token = request_id_var.set("abc123")
    try:
        line = JsonFormatter().format(record)
    finally:
        request_id_var.reset(token)
    entry = json.loads(line)
    assert entry["message"] == "POST /predict 200" and entry["request_id"] == "abc123"
    assert entry["status"] == 200 and entry["level"] == "INFO" and "\n" not in line
