"""Service behaviours checked by their observable effect: counts, connections, log lines, refusals."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from app.core import engine as engine_module
from app.core.artifacts import ModelLoadError
from app.core.engine import load_engine
from app.logs import JsonFormatter
from tests.conftest import encode, synthetic_xray
from tests.live_server import connect, live_server, metric_samples, read_response, serving_settings


def _predictions_total(text: str) -> float:
    return sum(metric_samples(text, "cxr_predictions_total").values())


def test_prediction_counter_rises_by_exactly_the_number_of_answers(tiny_weights: Path) -> None:
    image = encode(synthetic_xray(), "PNG")
    with live_server(serving_settings(tiny_weights)) as server, server.client() as client:
        before = _predictions_total(client.get("/metrics").text)
        assert client.post("/predict", files={"file": ("a.png", image)}).status_code == 200
        files = [("files", ("b.png", image)), ("files", ("c.png", image)), ("files", ("bad.txt", b"text"))]
        assert client.post("/predict/batch", files=files).status_code == 200
        assert client.post("/predict", files={"file": ("empty.png", b"")}).status_code == 400
        assert _predictions_total(client.get("/metrics").text) - before == 3  # two refusals are not predictions


def test_idle_keep_alive_connections_close_after_the_configured_time(tiny_weights: Path) -> None:
    with live_server(serving_settings(tiny_weights, keep_alive_s=1)) as server, connect(server) as connection:
        started = time.monotonic()
        connection.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\n\r\n")
        status, _, body = read_response(connection)  # returns once the server closes the idle connection
        assert (status, body) == (200, b'{"status":"alive"}')
        # uvicorn's own default is 5 s: closing well before it proves the setting reached the server.
        assert time.monotonic() - started < 4.0


def test_access_log_line_carries_the_request_id(tiny_weights: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("app.access")
    access.addHandler(handler)
    previous = access.level
    access.setLevel(logging.INFO)
    try:
        with live_server(serving_settings(tiny_weights)) as server, server.client() as client:
            image = encode(synthetic_xray(), "PNG")
            response = client.post("/predict", files={"file": ("a.png", image)}, headers={"X-Request-ID": "trace-42"})
            assert response.status_code == 200
    finally:
        access.removeHandler(handler)
        access.setLevel(previous)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    [entry] = [e for e in entries if e.get("path") == "/predict"]
    assert entry["request_id"] == "trace-42" and entry["status"] == 200 and entry["method"] == "POST"


def test_reduced_precision_load_reruns_the_golden_check(tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an impossible bf16 tolerance the load must fail: proof that the bf16 network itself was checked."""
    monkeypatch.setitem(engine_module.GOLDEN_ATOL, torch.bfloat16, 1e-12)
    with pytest.raises(ModelLoadError, match="golden check failed"):
        load_engine(tiny_weights, device="cpu", precision="bf16")
    assert load_engine(tiny_weights, device="cpu", precision="fp32").precision == "fp32"
