"""End to end through a real uvicorn server: predictions, parity, batching, decoding variants, docs."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image

from app.core.artifacts import load_model
from app.core.decision import pneumonia_probability
from app.core.preprocessing import preprocess
from tests.conftest import encode, export_tiny_model, synthetic_xray
from tests.live_server import LiveServer, live_server, metric_samples, serving_settings

SEEDS = range(16)


@pytest.fixture(scope="module")
def calibrated_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose card has a non-default temperature and threshold, so both must be applied."""
    return export_tiny_model(tmp_path_factory.mktemp("calibrated"), seed=7, temperature=0.5, threshold=0.37)


@pytest.fixture(scope="module")
def server(calibrated_weights: Path) -> Iterator[LiveServer]:
    with live_server(serving_settings(calibrated_weights, max_batch_size=16, max_wait_ms=200)) as running:
        yield running


@pytest.fixture(scope="module")
def reference(calibrated_weights: Path) -> Callable[[list[bytes]], list[float]]:
    """The reference computation, without any serving code: preprocess, load_model, pneumonia_probability."""
    loaded = load_model(calibrated_weights)

    def probabilities(images: list[bytes]) -> list[float]:
        pixels = torch.stack([preprocess(data, loaded.metadata.spec.input_size) for data in images])
        with torch.inference_mode():
            return pneumonia_probability(loaded.network(pixels), loaded.metadata.temperature).tolist()

    return probabilities


def exif_rotated_jpeg() -> bytes:
    """An upright chest image stored turned a quarter counter-clockwise, with the EXIF tag that turns it back."""
    img = synthetic_xray(60, 120, seed=5).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(img, "JPEG", exif=exif.tobytes())


VARIANTS = {
    "grayscale_jpeg": lambda: encode(synthetic_xray(seed=1), "JPEG"),
    "rgb_jpeg": lambda: encode(synthetic_xray(seed=2, mode="RGB"), "JPEG"),
    "cmyk_jpeg": lambda: encode(synthetic_xray(seed=3, mode="CMYK"), "JPEG"),
    "progressive_jpeg": lambda: encode(synthetic_xray(seed=4), "JPEG", progressive=True),
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "png_16bit": lambda: encode(Image.fromarray(np.asarray(synthetic_xray(seed=6), np.uint16) * 257), "PNG"),
    "jpeg_12bit": lambda: imagecodecs.jpeg8_encode(
        (np.asarray(synthetic_xray(seed=8), np.uint16) * 16), bitspersample=12, lossless=False
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_image_variants_match_the_reference_computation(
    server: LiveServer, reference: Callable[[list[bytes]], list[float]], variant: str
) -> None:
    data = VARIANTS[variant]()
    with server.client() as client:
        response = client.post("/predict", files={"file": (f"{variant}.img", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    body = response.json()
    [expected] = reference([data])
    assert body["pneumonia_probability"] == pytest.approx(expected, abs=1e-6)
    assert body["label"] == ("PNEUMONIA" if expected >= 0.37 else "NORMAL")
    assert body["threshold"] == 0.37
    assert body["probabilities"]["NORMAL"] == pytest.approx(1 - expected, abs=1e-6)


def test_prediction_carries_model_identity_and_request_id(server: LiveServer, calibrated_weights: Path) -> None:
    meta = json.loads((calibrated_weights / "model.json").read_text())
    with server.client() as client:
        supplied = client.post(
            "/predict", files={"file": ("a.jpg", encode(synthetic_xray()))}, headers={"X-Request-ID": "trace-42"}
        )
        generated = client.get("/livez", headers={"X-Request-ID": "bad id with spaces"})
    assert supplied.json()["model"] == {"name": meta["name"], "version": meta["version"], "sha256": meta["sha256"]}
    assert supplied.headers["X-Request-ID"] == "trace-42"
    assert generated.headers["X-Request-ID"] not in ("", "bad id with spaces")


def test_concurrent_requests_share_forward_passes(
    server: LiveServer, reference: Callable[[list[bytes]], list[float]]
) -> None:
    images = [encode(synthetic_xray(seed=seed)) for seed in SEEDS]
    with server.client() as client:
        before = metric_samples(client.get("/metrics").text, "cxr_batch_size_")

        def post(data: bytes) -> float:
            response = client.post("/predict", files={"file": ("x.jpg", data, "image/jpeg")})
            assert response.status_code == 200, response.text
            return response.json()["pneumonia_probability"]

        with ThreadPoolExecutor(len(images)) as pool:
            probabilities = list(pool.map(post, images))
        after = metric_samples(client.get("/metrics").text, "cxr_batch_size_")
    batches = after["count"] - before.get("count", 0.0)
    images_scored = after["sum"] - before.get("sum", 0.0)
    assert images_scored == len(images)
    assert batches < len(images), "every request ran in its own forward pass"
    assert probabilities == pytest.approx(reference(images), abs=1e-6)


def test_batch_endpoint_keeps_order_and_isolates_bad_files(
    server: LiveServer, reference: Callable[[list[bytes]], list[float]]
) -> None:
    good = [encode(synthetic_xray(seed=seed)) for seed in (11, 12)]
    files = [
        ("files", ("first.jpg", good[0], "image/jpeg")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
        ("files", ("empty.jpg", b"", "image/jpeg")),
        ("files", ("second.jpg", good[1], "image/jpeg")),
    ]
    with server.client() as client:
        response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [item["filename"] for item in results] == ["first.jpg", "notes.txt", "empty.jpg", "second.jpg"]
    assert results[1]["error"]["code"] == "unsupported_media_type"
    assert results[2]["error"]["code"] == "empty_file"
    scored = [results[0]["pneumonia_probability"], results[3]["pneumonia_probability"]]
    assert scored == pytest.approx(reference(good), abs=1e-6)


def test_model_card_is_the_exported_metadata(server: LiveServer, calibrated_weights: Path) -> None:
    meta = json.loads((calibrated_weights / "model.json").read_text())
    with server.client() as client:
        card = client.get("/model").json()
    assert card["temperature"] == 0.5 and card["threshold"] == 0.37
    assert card["sha256"] == meta["sha256"] and card["spec"] == meta["spec"]
    assert card["device"] == "cpu" and card["precision"] == "fp32"
    assert "golden" not in card


def test_health_and_metrics_exposition(server: LiveServer) -> None:
    with server.client() as client:
        health = client.get("/health")
        metrics = client.get("/metrics")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["device"] == "cpu"
    assert metrics.headers["content-type"].startswith("text/plain")
    for family in (
        "cxr_http_requests_total",
        "cxr_http_request_duration_seconds_bucket",
        "cxr_batch_size_bucket",
        "cxr_queue_depth",
        "cxr_inference_duration_seconds_bucket",
    ):
        assert family in metrics.text
    assert 'cxr_http_requests_total{endpoint="/health",method="GET",status="200"}' in metrics.text


def test_ops_probes_answer_head_like_get(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load balancers sometimes probe with HEAD: it was 405."""
    probes = {"/health": 503, "/livez": 200, "/v2/health/ready": 503, "/v2/health/live": 200}  # while draining
    with server.client() as client:
        for path in probes:
            head = client.head(path)
            assert head.status_code == client.get(path).status_code == 200 and head.content == b"", path
        service = server.app.state.service
        draining = service.health().model_copy(update={"status": "draining"})
        monkeypatch.setattr(service, "health", lambda: draining)
        for path, status in probes.items():
            assert client.head(path).status_code == client.get(path).status_code == status, path


@pytest.mark.parametrize("path", ["/predict", "/explain"])
def test_a_repeated_file_field_is_refused_not_cut_to_its_last_part(server: LiveServer, path: str) -> None:
    """Two `file` parts were scored as the last one alone."""
    files = [("file", ("a.jpg", encode(synthetic_xray(seed=1)))), ("file", ("b.jpg", encode(synthetic_xray(seed=2))))]
    with server.client() as client:
        response = client.post(path, files=files)
        spec = client.get("/openapi.json").json()
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "multiple_files" and "/predict/batch" in error["message"]
    documented = spec["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]["examples"]
    assert "multiple_files" in documented


def test_openapi_documents_examples_and_errors(server: LiveServer) -> None:
    with server.client() as client:
        docs = client.get("/docs")
        spec = client.get("/openapi.json").json()
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schemas = spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            ok = operation["responses"]["200"]["content"]
            media = next(iter(ok.values()))
            ref = media.get("schema", {}).get("$ref", "")
            example = media.get("example") or schemas.get(ref.rsplit("/", 1)[-1], {}).get("examples")
            assert example, f"{method.upper()} {path} has no 200 example"
    predict_errors = spec["paths"]["/predict"]["post"]["responses"]
    assert {"400", "401", "413", "415", "422", "500", "503", "504"} <= set(predict_errors)
    examples = predict_errors["413"]["content"]["application/json"]["examples"]
    assert {"payload_too_large", "image_too_large"} <= set(examples)
    assert "too_many_files" in spec["paths"]["/predict/batch"]["post"]["responses"]["413"]["description"]


def test_probability_is_stable_across_batch_composition(server: LiveServer) -> None:
    """A result must not depend on which other requests shared its forward pass."""
    data = encode(synthetic_xray(seed=3))
    with server.client() as client:
        alone = client.post("/predict", files={"file": ("a.jpg", data)}).json()["pneumonia_probability"]
        files = [("files", (f"{i}.jpg", encode(synthetic_xray(seed=20 + i)) if i else data)) for i in range(6)]
        together = client.post("/predict/batch", files=files).json()["results"][0]["pneumonia_probability"]
    assert together == pytest.approx(alone, abs=1e-6)


def test_png_bytes_are_accepted_whatever_the_declared_type(server: LiveServer) -> None:
    buffer = io.BytesIO()
    synthetic_xray(seed=9).save(buffer, "PNG")
    with server.client() as client:
        response = client.post("/predict", files={"file": ("scan.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200
