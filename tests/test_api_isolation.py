"""Issue 10, findings 1-3 and 5 through the real service: hostile uploads cost one request, never the process."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import encode, synthetic_xray
from tests.hostile_inputs import (
    cut_with_eoi,
    jpeg8,
    lossless_without_huffman_table,
    one_colour_rgba_png,
    patch_frame_size,
    two_channel_jpeg,
    zero_middle,
)
from tests.live_server import LiveServer, live_server, metric_samples, serving_settings
from tests.test_decode_pool import running_pid, slow_png, worker_pids

GOOD = encode(synthetic_xray(), "JPEG", quality=90)


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    # Decoder isolation is tested here; one-colour bombs and two-channel JPEGs are what the input guard refuses
    # (tests/test_input_guard.py), so flag mode answers them 200 with a warning and the guard still runs.
    settings = serving_settings(tiny_weights, decode_workers=2, large_decode_bytes=8_000_000, input_guard="flag")
    with live_server(settings) as running:
        yield running


def predict(client: httpx.Client, data: bytes, name: str = "x.jpg") -> httpx.Response:
    return client.post("/predict", files={"file": (name, data, "application/octet-stream")})


def test_the_crash_input_is_422_and_the_service_keeps_serving(server: LiveServer) -> None:
    """Finding 1's exact reproduction: the process used to segfault and stay down."""
    with server.client() as client:
        response = predict(client, lossless_without_huffman_table())
        assert response.status_code == 422 and response.json()["error"]["code"] == "corrupt_image"
        assert predict(client, GOOD).status_code == 200
        assert client.get("/health").status_code == 200


def test_a_decoder_killed_mid_request_fails_only_that_request(server: LiveServer) -> None:
    """A segfault in a decoder (simulated with SIGSEGV) is a 422 for its upload; concurrent requests get 200."""
    decoder = server.app.state.service.decoder
    pids = worker_pids(decoder)
    result: dict[str, httpx.Response] = {}

    def victim() -> None:
        with server.client() as client:
            result["victim"] = predict(client, slow_png(), "slow.png")

    thread = threading.Thread(target=victim)
    thread.start()
    os.kill(running_pid(pids), signal.SIGSEGV)
    with server.client() as client:
        others = [predict(client, GOOD) for _ in range(4)]
    thread.join(60)
    assert result["victim"].status_code == 422 and result["victim"].json()["error"]["code"] == "corrupt_image"
    assert "SIGSEGV" in result["victim"].json()["error"]["message"]
    assert [response.status_code for response in others] == [200] * 4
    assert len(worker_pids(decoder)) == decoder.size
    with server.client() as client:
        replaced = metric_samples(client.get("/metrics").text, "cxr_decoder_replacements_total")
    assert replaced['{reason="crash"}'] >= 1


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("cut-in-half-with-eoi", cut_with_eoi(jpeg8())),
        ("middle-zeroed", zero_middle(jpeg8())),
        ("header-10000x10000", patch_frame_size(jpeg8(), 10000, 10000)),
    ],
)
def test_damaged_jpegs_get_no_diagnosis(server: LiveServer, name: str, data: bytes) -> None:
    """Finding 2: these got confident labels (a pneumonia image became NORMAL, p = 0.87)."""
    with server.client() as client:
        response = predict(client, data)
    assert response.status_code == 422 and response.json()["error"]["code"] == "corrupt_image", name


def test_two_channel_jpeg_in_a_batch_is_scored_and_a_bad_item_fails_alone(server: LiveServer) -> None:
    """Finding 3: a 2-channel 12-bit JPEG was a 500 that failed the whole batch."""
    files = [
        ("files", ("two.jpg", two_channel_jpeg(12))),
        ("files", ("two-lossless.jpg", two_channel_jpeg(16, lossless=True))),
        ("files", ("crash.jpg", lossless_without_huffman_table())),
        ("files", ("good.jpg", GOOD)),
    ]
    with server.client() as client:
        response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [("label" in item, item.get("error", {}).get("code")) for item in results] == [
        (True, None),
        (True, None),
        (False, "corrupt_image"),
        (True, None),
    ]


def test_bombs_do_not_starve_small_requests(server: LiveServer) -> None:
    """Finding 5: four clients sending a cheap bomb pushed everyone's latency from 83 ms to 9.9 s."""
    bomb = one_colour_rgba_png(3000, 3000)  # 36 MB decode: the large lane, one at a time
    with server.client() as client:
        started = time.perf_counter()
        assert predict(client, bomb, "bomb.png").status_code == 200
        one_bomb_s = time.perf_counter() - started

    def send_bomb() -> None:
        with server.client() as bomber:
            predict(bomber, bomb, "bomb.png")

    bombers = [threading.Thread(target=send_bomb) for _ in range(4)]
    for thread in bombers:
        thread.start()
    time.sleep(one_bomb_s / 2)
    with server.client() as client:
        started = time.perf_counter()
        statuses = [predict(client, GOOD).status_code for _ in range(3)]
        small_s = (time.perf_counter() - started) / 3
    for thread in bombers:
        thread.join(120)
    assert statuses == [200] * 3
    assert small_s < one_bomb_s, (small_s, one_bomb_s)  # never queued behind the four bombs
