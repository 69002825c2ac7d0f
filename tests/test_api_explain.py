"""Heatmaps over HTTP: ?explain=true, POST /explain (PNG and JSON), refusals, and the web page's routes."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from app.core.engine import InferenceEngine
from app.core.heatmap import ExplainUnsupportedError
from tests.conftest import encode, export_tiny_model, synthetic_xray
from tests.live_server import LiveServer, live_server, serving_settings

SIZE = 64  # a 2x2 map: the smallest grid with more than one cell


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    weights = export_tiny_model(tmp_path_factory.mktemp("explain"), seed=5, input_size=SIZE, temperature=1.3)
    # flag: the extreme aspect ratios below are images the guard fails; /explain must still draw them, with a warning
    settings = serving_settings(weights, max_batch_size=8, max_wait_ms=100, ui=False, input_guard="flag")
    with live_server(settings) as running:
        yield running


def jpeg(seed: int, width: int = 96, height: int = 80) -> bytes:
    return encode(synthetic_xray(width, height, seed=seed))


def test_explain_under_concurrent_load_gives_the_same_probabilities(server: LiveServer) -> None:
    """Explained and plain requests share batches; neither changes the other's probability."""
    images = [jpeg(seed) for seed in range(8)]

    def post(args: tuple[int, bool]) -> tuple[int, bool, dict]:
        index, explain = args
        with server.client() as client:
            response = client.post("/predict", params={"explain": explain}, files={"file": ("x.jpg", images[index])})
        assert response.status_code == 200, response.text
        return index, explain, response.json()

    jobs = [(index, explain) for _ in range(2) for index in range(8) for explain in (False, True)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(post, jobs))
    by_image: dict[int, set[float]] = {}
    for index, explain, body in answers:
        by_image.setdefault(index, set()).add(round(body["pneumonia_probability"], 6))
        assert ("heatmap" in body) == explain
        if explain:
            heatmap = body["heatmap"]
            assert heatmap["grid"] == [2, 2] and len(heatmap["values"]) == 4
            log_odds = sum(heatmap["values"]) / 4 + heatmap["bias"]
            assert 1 / (1 + math.exp(-log_odds)) == pytest.approx(body["pneumonia_probability"], abs=1e-5)
    assert all(len(probabilities) == 1 for probabilities in by_image.values()), by_image


def test_batch_explain_and_per_file_errors(server: LiveServer) -> None:
    files = [("files", ("a.jpg", jpeg(1))), ("files", ("notes.txt", b"not an image")), ("files", ("c.jpg", jpeg(2)))]
    with server.client() as client:
        explained = client.post("/predict/batch", params={"explain": "true"}, files=files).json()["results"]
        plain = client.post("/predict/batch", files=files).json()["results"]
    assert explained[0]["heatmap"]["method"] == "cam" and explained[2]["heatmap"]["grid"] == [2, 2]
    assert explained[1] == plain[1] and plain[1]["error"]["code"] == "unsupported_media_type"
    assert "heatmap" not in plain[0] and plain[2]["filename"] == "c.jpg"
    assert plain[0]["pneumonia_probability"] == pytest.approx(explained[0]["pneumonia_probability"], abs=1e-6)


def test_explain_png_is_the_model_input_at_the_upload_aspect_with_the_prediction_in_headers(
    server: LiveServer,
) -> None:
    data = jpeg(3, width=128, height=64)
    with server.client() as client:
        png = client.post("/explain", files={"file": ("wide.jpg", data)})
        as_json = client.post("/explain", files={"file": ("wide.jpg", data)}, headers={"Accept": "application/json"})
        plain = client.post("/explain", params={"opacity": 0}, files={"file": ("wide.jpg", data)})
        predicted = client.post("/predict", params={"explain": "true"}, files={"file": ("wide.jpg", data)}).json()
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (128, 64)
    assert png.headers["x-label"] == predicted["label"]
    assert float(png.headers["x-pneumonia-probability"]) == pytest.approx(predicted["pneumonia_probability"], abs=1e-6)
    assert float(png.headers["x-threshold"]) == predicted["threshold"]
    assert png.headers["x-model-sha256"] == predicted["model"]["sha256"]
    assert float(png.headers["x-heatmap-scale"]) == pytest.approx(max(map(abs, predicted["heatmap"]["values"])))
    assert as_json.headers["content-type"] == "application/json"
    assert as_json.json()["heatmap"]["values"] == pytest.approx(predicted["heatmap"]["values"], abs=1e-6)
    # opacity=0: the input as the model saw it, gray; with the map, colour appears.
    gray = np.asarray(Image.open(io.BytesIO(plain.content))).astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    coloured = np.asarray(image).astype(int)
    assert np.abs(coloured[..., 0] - coloured[..., 2]).max() > 20


@pytest.mark.parametrize(
    ("params", "data", "status", "code"),
    [
        ({"opacity": 2}, None, 422, "validation_error"),
        ({"opacity": "nan"}, None, 422, "validation_error"),
        ({"opacity": "-inf"}, None, 422, "validation_error"),
        ({}, b"", 400, "empty_file"),
        ({}, b"GIF89a not supported", 415, "unsupported_media_type"),
    ],
)
def test_explain_errors_are_coded(server: LiveServer, params: dict, data: bytes | None, status: int, code: str) -> None:
    with server.client() as client:
        response = client.post("/explain", params=params, files={"file": ("x", jpeg(1) if data is None else data)})
    assert response.status_code == status and response.json()["error"]["code"] == code


ACCEPT = {
    # The audit's two: a q=0 range refuses its type; it was ignored.
    "application/json, image/png;q=0": "application/json",
    "image/png, application/json;q=0": "image/png",
    "image/png;q=0.5, application/json;q=0.9": "application/json",
    "application/json;q=0.4, image/png;q=0.5": "image/png",
    # Equal q: the more specific range, then the first listed.
    "application/json, */*": "application/json",
    "image/*, application/json": "application/json",
    "image/png, application/json": "image/png",
    "application/json, image/png": "application/json",
    "image/*;q=0.1, */*": "application/json",
    "*/*": "image/png",
    "*/*;q=0.8, application/json;q=1.000": "application/json",
    "Application/JSON": "application/json",
    "application/json;q=2, image/png": "image/png",  # a q out of range drops its range
    # Neither acceptable: 406 rather than a representation the client refused.
    "application/json;q=0": 406,
    "image/png;q=0, application/json;q=0": 406,
    "text/html": 406,
    "*/*;q=0": 406,
}


def test_explain_honours_accept_q_values(server: LiveServer) -> None:
    with server.client() as client:
        for accept, expected in ACCEPT.items():
            response = client.post("/explain", files={"file": ("x.jpg", jpeg(1))}, headers={"Accept": accept})
            if expected == 406:
                assert response.status_code == 406 and response.json()["error"]["code"] == "not_acceptable", accept
            else:
                assert response.status_code == 200 and response.headers["content-type"] == expected, accept
                assert response.headers["vary"] == "Accept"
        default = client.post("/explain", files={"file": ("x.jpg", jpeg(1))}, headers={"Accept": ""})
    assert default.status_code == 200 and default.headers["content-type"] == "image/png"


def test_a_model_without_maps_refuses_explain_before_decoding(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(engine: InferenceEngine) -> None:
        raise ExplainUnsupportedError()

    monkeypatch.setattr(InferenceEngine, "check_explainable", refuse)
    with server.client() as client:
        for path, params in (("/predict", {"explain": "true"}), ("/explain", {})):
            response = client.post(path, params=params, files={"file": ("x.jpg", b"not even an image")})
            assert response.status_code == 422 and response.json()["error"]["code"] == "explain_unsupported"
        assert client.post("/predict", files={"file": ("x.jpg", jpeg(1))}).status_code == 200


def test_without_the_ui_home_leads_to_the_docs(server: LiveServer) -> None:
    with server.client() as client:
        home = client.get("/")
        assert home.status_code == 307 and home.headers["location"] == "docs"
        assert client.get("/ui").status_code == 404


def test_ui_is_on_by_default_and_home_leads_to_it(tiny_weights: Path) -> None:
    with live_server(serving_settings(tiny_weights)) as running, running.client() as client:
        home = client.get("/")
        assert home.status_code == 307 and home.headers["location"] == "ui"
        page = client.get("/", follow_redirects=True)
        assert page.status_code == 200 and "Not a medical device" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")


@pytest.mark.parametrize(("width", "height"), [(4000, 1), (1, 4000), (1, 1), (4000, 1333), (SIZE - 1, 100)])
def test_explain_refuses_what_no_chest_film_looks_like(server: LiveServer, width: int, height: int) -> None:
    """A strip, a dot or a thumbnail: refused before any overlay is drawn, not drawn from a squashed guess."""
    data = encode(synthetic_xray(width, height, seed=1), "PNG")
    with server.client() as client:
        response = client.post("/explain", files={"file": ("odd.png", data)})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsuitable_shape"
    assert response.json()["error"]["message"].startswith(f"the image is {width}x{height} px")


@pytest.mark.parametrize(("width", "height"), [(3 * SIZE, SIZE), (SIZE, 3 * SIZE), (SIZE, SIZE), (1500, 500)])
def test_explain_survives_the_most_extreme_accepted_shapes(server: LiveServer, width: int, height: int) -> None:
    data = encode(synthetic_xray(width, height, seed=1), "PNG")
    with server.client() as client:
        response = client.post("/explain", files={"file": ("odd.png", data)})
    assert response.status_code == 200, response.text
    assert response.headers["X-Input-Guard-Passed"] in ("true", "false") and float(
        response.headers["X-Input-Guard-Score"]
    )
    if response.headers["X-Input-Guard-Passed"] == "false":
        assert unquote(response.headers["X-Warning"]).startswith("unreliable: input guard score")
    image = Image.open(io.BytesIO(response.content))
    long_side = max(min(max(width, height), 512), SIZE)
    assert max(image.size) == long_side and min(image.size) >= 1
