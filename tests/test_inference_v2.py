"""Open Inference Protocol (KServe V2) through the real ``tritonclient`` HTTP client and a real uvicorn server.

Expected probabilities come from ``/predict`` (parity) and from an independent reference computation
(preprocess, load_model, pneumonia_probability), never from the V2 code itself. Malformed bodies are
sent raw with httpx, and a property test throws random framings at the binary extension.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from app.core.artifacts import load_model
from app.core.decision import decide, pneumonia_probability
from app.core.preprocessing import preprocess
from tests.conftest import TEST_INPUT_SIZE, encode, export_tiny_model, synthetic_xray
from tests.live_server import LiveServer, connect, live_server, metric_samples, serving_settings, wait_for

KEY = "v2-test-key"
MAX_UPLOAD = 400_000
MAX_IMAGES = 6
TEMPERATURE, THRESHOLD = 0.5, 0.37


def key() -> dict[str, str]:
    """A fresh dict each call: tritonclient writes Inference-Header-Content-Length into the one it is given."""
    return {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("v2"), seed=11, temperature=TEMPERATURE, threshold=THRESHOLD)


@pytest.fixture(scope="module")
def server(weights: Path) -> Iterator[LiveServer]:
    overrides = {"api_key": KEY, "max_upload_bytes": MAX_UPLOAD, "max_batch_files": MAX_IMAGES, "max_wait_ms": 50}
    with live_server(serving_settings(weights, **overrides)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60.0) as connected:
        yield connected


@pytest.fixture(scope="module")
def model(weights: Path) -> tuple[str, str]:
    meta = load_model(weights).metadata
    return meta.name, meta.version


@pytest.fixture(scope="module")
def reference(weights: Path) -> Callable[[torch.Tensor], list[float]]:
    """P(pneumonia) computed without any serving code, from uint8[N,1,S,S] pixels."""
    loaded = load_model(weights)

    def probabilities(pixels: torch.Tensor) -> list[float]:
        with torch.inference_mode():
            return pneumonia_probability(loaded.network(pixels), loaded.metadata.temperature).tolist()

    return probabilities


IMAGES = [
    encode(synthetic_xray(seed=1), "JPEG"),
    encode(synthetic_xray(120, 90, seed=2, mode="RGB"), "JPEG", progressive=True),
    encode(Image.fromarray(np.asarray(synthetic_xray(seed=3), np.uint16) * 257), "PNG"),
    encode(synthetic_xray(64, 190, seed=4), "PNG"),  # tall, within the 3:1 a chest film can have
]


def pixels_of(images: list[bytes]) -> torch.Tensor:
    return torch.stack([preprocess(data, TEST_INPUT_SIZE) for data in images])


def image_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(data) for data in images]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def pixels_input(pixels: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def outputs(binary: bool) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probability", "label")]


def predict_endpoint(server: LiveServer, images: list[bytes]) -> list[dict[str, Any]]:
    with server.client(headers=key()) as http:
        return [http.post("/predict", files={"file": ("x", data)}).json() for data in images]


def raw_infer(server: LiveServer, body: bytes | dict[str, Any], **headers: str | bytes) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    with server.client() as http:
        return http.post(f"/v2/models/{load_name(server)}/infer", content=content, headers={**key(), **headers})


def load_name(server: LiveServer) -> str:
    with server.client() as http:
        return http.get("/health").json()["model"]["name"]


def refused(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- server, model, health --------------------------------------------------------------------------


def test_server_metadata_and_health_are_open(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "cxr-pneumonia" and "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client: triton.InferenceServerClient, model: tuple[str, str]) -> None:
    name, version = model
    meta = client.get_model_metadata(name, headers=key())
    assert meta["name"] == name and meta["versions"] == [version]
    assert meta["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "UINT8", "shape": [-1, 1, TEST_INPUT_SIZE, TEST_INPUT_SIZE]},
    ]
    assert meta["outputs"] == [
        {"name": "probability", "datatype": "FP32", "shape": [-1]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert client.get_model_metadata(name, model_version=version, headers=key()) == meta
    assert client.is_model_ready(name, headers=key()) and client.is_model_ready(name, version, headers=key())
    assert not client.is_model_ready("resnet50", headers=key())


def test_unknown_model_or_version_is_404_in_protocol_shape(
    server: LiveServer, client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    error = refused(lambda: client.get_model_metadata("resnet50", headers=key()))
    assert error.status() == "404" and "resnet50" in error.message() and model[0] in error.message()
    error = refused(lambda: client.infer(model[0], [image_input(IMAGES[:1])], model_version="v9", headers=key()))
    assert error.status() == "404" and "'v9'" in error.message()
    with server.client(headers=key()) as http:
        body = http.get("/v2/models/resnet50").json()
        assert body == {"error": body["error"], "code": "unknown_model"} and isinstance(body["error"], str)
        unrouted = http.get("/v2/repository/index")
    assert unrouted.status_code == 404 and unrouted.json()["code"] == "not_found"


def test_protocol_probes_log_at_debug_like_health(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    """KServe and Kubernetes poll /v2/health/* every few seconds; those lines must not drown real traffic."""
    with caplog.at_level(logging.DEBUG, logger="app.access"), server.client() as http:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            assert http.get(path).status_code == 200

        def levels() -> dict[str, int]:
            return {record.path: record.levelno for record in caplog.records if record.name == "app.access"}

        wait_for(lambda: len(levels()) == 3)
    assert levels() == {"/v2/health/live": logging.DEBUG, "/v2/health/ready": logging.DEBUG, "/v2": logging.INFO}


def test_api_key_guards_model_routes_not_health(server: LiveServer, client: triton.InferenceServerClient) -> None:
    name = load_name(server)
    for call in [
        lambda: client.get_model_metadata(name),
        lambda: client.infer(name, [image_input(IMAGES[:1])]),
        lambda: client.infer(name, [image_input(IMAGES[:1])], headers={"X-API-Key": "wrong"}),
    ]:
        error = refused(call)
        assert error.status() == "401" and "X-API-Key" in error.message()
    assert client.is_server_ready() and client.is_server_live()


def test_openapi_documents_no_validation_error_on_model_routes(server: LiveServer) -> None:
    """FastAPI documented a 422 HTTPValidationError ({"detail": [...]}) that a string path segment never causes."""
    with server.client() as http:
        spec = http.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    model_routes = {path: methods["get"] for path, methods in spec["paths"].items() if "get" in methods}
    model_routes = {path: operation for path, operation in model_routes.items() if "{model_name}" in path}
    assert len(model_routes) == 4
    for path, operation in model_routes.items():
        assert set(operation["responses"]) == {"200", "401", "404", "503"}, path
        declared = {param["name"] for param in operation["parameters"] if param["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), path


def send_and_close(server: LiveServer, head: bytes, body: bytes) -> bytes:
    """Send a request whose body stops early, then whatever the server answers before it closes."""
    with connect(server) as sock:
        sock.sendall(head + body)
        time.sleep(0.2)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


@pytest.mark.parametrize("framing", ["cut", "bad chunk"])
def test_a_body_that_stops_early_is_400_without_a_traceback(
    server: LiveServer, caplog: pytest.LogCaptureFixture, framing: str
) -> None:
    """A client gone mid-body (or chunked framing uvicorn refuses) was an "unhandled error" traceback and a 500."""
    route = 'endpoint="/v2/models/{model_name}/infer",method="POST"'

    def counted(status: int) -> float:
        with server.client() as http:
            samples = metric_samples(http.get("/metrics").text, "cxr_http_requests_total")
        return samples.get(f'{{{route},status="{status}"}}', 0.0)

    before = counted(400), counted(500)
    head = f"POST /v2/models/{load_name(server)}/infer HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
    head += "Content-Type: application/json\r\n"
    if framing == "cut":
        send_and_close(server, f"{head}Content-Length: 100000\r\n\r\n".encode(), b'{"inputs": [')
    else:
        answer = send_and_close(server, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(), b'4\r\n{"in\r\nzz\r\n')
        assert answer.startswith(b"HTTP/1.1 400") and b'"bad_request"' in answer
    wait_for(lambda: counted(400) + counted(500) > sum(before))  # the request has been answered and counted
    assert (counted(400), counted(500)) == (before[0] + 1, before[1])
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


# --- inference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_batch_of_images_matches_predict_and_the_reference(
    server: LiveServer,
    client: triton.InferenceServerClient,
    model: tuple[str, str],
    reference: Callable[[torch.Tensor], list[float]],
    binary: bool,
) -> None:
    result = client.infer(
        model[0], [image_input(IMAGES, binary)], outputs=outputs(binary), request_id=f"study-{binary}", headers=key()
    )
    response = result.get_response()
    assert response["id"] == f"study-{binary}" and (response["model_name"], response["model_version"]) == model
    assert all(("data" in out) != binary for out in response["outputs"])
    probabilities = result.as_numpy("probability")
    # tritonclient gives BYTES from binary data as bytes, from JSON as str.
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(IMAGES),)
    via_predict = predict_endpoint(server, IMAGES)
    assert probabilities.tolist() == pytest.approx([p["pneumonia_probability"] for p in via_predict], abs=1e-6)
    assert labels == [p["label"] for p in via_predict]
    expected = reference(pixels_of(IMAGES))
    assert probabilities.tolist() == pytest.approx(expected, abs=1e-5)
    assert labels == [decide(p, THRESHOLD).label for p in expected]
    assert response["parameters"]["threshold"] == pytest.approx(THRESHOLD)


def test_default_request_is_all_outputs_in_binary(client: triton.InferenceServerClient, model: tuple[str, str]) -> None:
    result = client.infer(model[0], [image_input(IMAGES[:2])], headers=key())
    response = result.get_response()
    assert "id" not in response
    assert [(out["name"], "binary_data_size" in out["parameters"]) for out in response["outputs"]] == [
        ("probability", True),
        ("label", True),
    ]
    assert result.as_numpy("probability").shape == (2,)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_preprocessed_pixels_score_like_the_encoded_images(
    client: triton.InferenceServerClient, model: tuple[str, str], binary: bool
) -> None:
    pixels = pixels_of(IMAGES).numpy()
    by_pixels = client.infer(model[0], [pixels_input(pixels, binary)], outputs=outputs(binary), headers=key())
    by_images = client.infer(model[0], [image_input(IMAGES)], headers=key())
    assert by_pixels.as_numpy("probability").tolist() == pytest.approx(
        by_images.as_numpy("probability").tolist(), abs=1e-6
    )
    labels = [label if isinstance(label, bytes) else label.encode() for label in by_pixels.as_numpy("label")]
    assert labels == by_images.as_numpy("label").tolist()


def test_one_bad_image_fails_the_request_naming_it_and_nothing_is_scored(
    server: LiveServer, client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    with server.client() as http:
        before = metric_samples(http.get("/metrics").text, "cxr_predictions_total")
    batch = [IMAGES[0], IMAGES[1][: len(IMAGES[1]) // 3], IMAGES[2]]
    error = refused(lambda: client.infer(model[0], [image_input(batch)], headers=key()))
    assert error.status() == "422" and error.message().startswith("item 1 of 3: ") and "corrupt" in error.message()
    error = refused(lambda: client.infer(model[0], [image_input([IMAGES[0], b"%PDF-1.7 not an x-ray"])], headers=key()))
    assert error.status() == "415" and error.message().startswith("item 1 of 2: ")
    with server.client() as http:
        after = metric_samples(http.get("/metrics").text, "cxr_predictions_total")
        rejected = metric_samples(http.get("/metrics").text, "cxr_rejected_images_total")
    assert after == before, "the good images of a failed request must not be scored"
    assert rejected['{code="corrupt_image"}'] >= 1 and rejected['{code="unsupported_media_type"}'] >= 1


def test_input_guard_refuses_the_request_naming_the_image_and_reports_its_verdict(
    server: LiveServer, client: triton.InferenceServerClient, model: tuple[str, str], weights: Path
) -> None:
    with server.client() as http:
        before = metric_samples(http.get("/metrics").text, "cxr_predictions_total")
    blank = encode(Image.new("L", (300, 300), 255))
    error = refused(lambda: client.infer(model[0], [image_input([IMAGES[0], blank, IMAGES[2]])], headers=key()))
    assert error.status() == "422" and error.message().startswith("item 1 of 3: refused: input guard score")
    with server.client() as http:
        assert metric_samples(http.get("/metrics").text, "cxr_predictions_total") == before
    parameters = client.infer(model[0], [image_input(IMAGES)], headers=key()).get_response()["parameters"]
    guard = load_model(weights).metadata.guard
    assert guard is not None and parameters["input_guard_threshold"] == pytest.approx(guard.threshold)
    assert 0 < parameters["input_guard_max_score"] <= guard.threshold and "warning" not in parameters


def test_pixels_of_the_wrong_size_or_type_are_refused(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    small = np.zeros((1, 1, TEST_INPUT_SIZE // 2, TEST_INPUT_SIZE // 2), np.uint8)
    error = refused(lambda: client.infer(model[0], [pixels_input(small)], headers=key()))
    assert error.status() == "400" and f"uint8[N, 1, {TEST_INPUT_SIZE}, {TEST_INPUT_SIZE}]" in error.message()
    floats = triton.InferInput("pixels", [1, 1, TEST_INPUT_SIZE, TEST_INPUT_SIZE], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 1, TEST_INPUT_SIZE, TEST_INPUT_SIZE), np.float32))
    error = refused(lambda: client.infer(model[0], [floats], headers=key()))
    assert error.status() == "400" and "must be UINT8" in error.message()


def test_too_many_images_and_oversized_bodies(client: triton.InferenceServerClient, model: tuple[str, str]) -> None:
    error = refused(lambda: client.infer(model[0], [image_input([IMAGES[0]] * (MAX_IMAGES + 1))], headers=key()))
    assert error.status() == "413" and f"at most {MAX_IMAGES}" in error.message()
    huge = np.zeros((MAX_IMAGES, 1, 260, 260), np.uint8)  # 405,600 bytes: refused before the body is read
    assert huge.nbytes > MAX_UPLOAD
    error = refused(lambda: client.infer(model[0], [pixels_input(huge)], headers=key()))
    assert error.status() == "413" and str(MAX_UPLOAD) in error.message()


def test_gzip_requests_inflate_within_the_body_limit(
    server: LiveServer, client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    plain = client.infer(model[0], [image_input(IMAGES[:2])], headers=key())
    packed = client.infer(model[0], [image_input(IMAGES[:2])], headers=key(), request_compression_algorithm="gzip")
    assert packed.as_numpy("probability").tolist() == plain.as_numpy("probability").tolist()
    bomb = gzip.compress(b"{" + b" " * (MAX_UPLOAD * 4))
    response = raw_infer(server, bomb, **{"Content-Encoding": "gzip"})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"


# --- hostile bodies ---------------------------------------------------------------------------------


def image_request(**changes: Any) -> dict[str, Any]:
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(IMAGES[0]).decode()]}
    return {"inputs": [tensor | changes]}


MALFORMED: dict[str, tuple[Callable[[], tuple[bytes | dict[str, Any], dict[str, Any]]], int, str, str]] = {
    "not json": (lambda: (b"{inputs: [", {}), 400, "bad_request", "Invalid JSON"),
    "no inputs": (lambda: ({"inputs": []}, {}), 400, "bad_request", "inputs"),
    "header longer than body": (lambda: (b"{}", {"Inference-Header-Content-Length": "99"}), 400, "bad_request", "99"),
    "header not a number": (lambda: (b"{}", {"Inference-Header-Content-Length": "-1"}), 400, "bad_request", "'-1'"),
    # Was a 500: "²" (a latin-1 header byte) passes str.isdigit() but not int().
    "header a superscript digit": (
        lambda: (b"{}", {"Inference-Header-Content-Length": b"\xb2"}),
        400,
        "bad_request",
        "'²'",
    ),
    "unknown input": (lambda: (image_request(name="scan"), {}), 400, "invalid_request", "'scan'"),
    "two inputs": (
        lambda: ({"inputs": image_request()["inputs"] * 2}, {}),
        400,
        "invalid_request",
        "exactly one input",
    ),
    "wrong count": (lambda: (image_request(shape=[2]), {}), 400, "invalid_request", "carries 1"),
    "empty batch": (lambda: (image_request(shape=[0], data=[]), {}), 400, "invalid_request", "no image"),
    "bad base64": (lambda: (image_request(data=["not base64!"]), {}), 400, "invalid_request", "base64"),
    "number as bytes": (lambda: (image_request(data=[7]), {}), 400, "invalid_request", "base64 string"),
    "2-d image input": (lambda: (image_request(shape=[1, 1]), {}), 400, "invalid_request", "[-1]"),
    "sequence parameter": (
        lambda: (image_request() | {"parameters": {"sequence_id": 3}}, {}),
        400,
        "invalid_request",
        "'sequence_id'",
    ),
    "flag not a bool": (
        lambda: (image_request() | {"parameters": {"binary_data_output": 1}}, {}),
        400,
        "invalid_request",
        "must be a bool",
    ),
    "unknown output": (
        lambda: (image_request() | {"outputs": [{"name": "heatmap"}]}, {}),
        400,
        "invalid_request",
        "'heatmap'",
    ),
    "pixel out of range": (
        lambda: (
            {"inputs": [{"name": "pixels", "shape": [1, 1, 1, 2], "datatype": "UINT8", "data": [[[[0, 256]]]]}]},
            {},
        ),
        400,
        "invalid_request",
        "[0, 255]",
    ),
    "pixel not an integer": (
        lambda: ({"inputs": [{"name": "pixels", "shape": [2], "datatype": "UINT8", "data": [1, 2.5]}]}, {}),
        400,
        "invalid_request",
        "integers",
    ),
    "brotli body": (lambda: (image_request(), {"Content-Encoding": "br"}), 400, "bad_request", "'br'"),
}


def framed(header: dict[str, Any], binary: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + binary, {"Inference-Header-Content-Length": str(len(text))}


BINARY_TENSOR = {"name": "image", "shape": [1], "datatype": "BYTES"}
MALFORMED |= {
    "binary size beyond body": (
        lambda: framed({"inputs": [BINARY_TENSOR | {"parameters": {"binary_data_size": 50}}]}, b"\x05\0\0\0abc"),
        400,
        "bad_request",
        "declares 50",
    ),
    "bytes left over": (
        lambda: framed({"inputs": [BINARY_TENSOR | {"parameters": {"binary_data_size": 4}}]}, b"\0\0\0\0xyz"),
        400,
        "bad_request",
        "3 bytes",
    ),
    "frame cut short": (
        lambda: framed({"inputs": [BINARY_TENSOR | {"parameters": {"binary_data_size": 7}}]}, b"\x09\0\0\0abc"),
        400,
        "invalid_request",
        "declares 9",
    ),
    "binary and json data": (
        lambda: framed({"inputs": [image_request()["inputs"][0] | {"parameters": {"binary_data_size": 0}}]}, b""),
        400,
        "invalid_request",
        "both",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_protocol_errors(server: LiveServer, case: str) -> None:
    make, status, code, fragment = MALFORMED[case]
    body, headers = make()
    response = raw_infer(server, body, **headers)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == code and isinstance(error["error"], str) and fragment in error["error"], error


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.binary(max_size=64) | st.just(json.dumps(image_request()).encode()),
    binary=st.binary(max_size=64),
    declared=st.one_of(
        st.none(),
        st.integers(-5, 200).map(str),
        # Any header bytes HTTP allows (visible ASCII and latin-1), as a hostile client could send them.
        st.binary(min_size=1, max_size=5).map(lambda raw: bytes(c for c in raw if c > 0x20 and c != 0x7F) or b"0"),
    ),
)
def test_random_framings_never_crash_the_server(
    server: LiveServer, header: bytes, binary: bytes, declared: Any
) -> None:
    headers = {} if declared is None else {"Inference-Header-Content-Length": declared}
    response = raw_infer(server, header + binary, **headers)
    assert response.status_code in (200, 400, 413, 415, 422), response.text
    assert response.status_code == 200 or set(response.json()) == {"error", "code"}
