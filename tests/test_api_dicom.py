"""DICOM uploads through a real uvicorn server: parity with PNG, the response's source, error codes, privacy."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid

from app.api.errors import ERRORS
from app.core.artifacts import load_model
from app.core.dicom import DicomPolicy
from app.logs import JsonFormatter
from app.settings import SettingsError, load_settings
from tests.conftest import encode, synthetic_xray
from tests.dicom_files import PATIENT_ID, PATIENT_NAME, LutSpec, Spec, chest_stored, dicom_bytes, expected_display
from tests.live_server import LiveServer, live_server, metric_samples, serving_settings

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
PARITY = {
    "cr_mono1_jpeg_lossless": Spec(syntax=uid.JPEGLosslessSV1, photometric="MONOCHROME1", modality="CR"),
    "dx_16bit_j2k_window": Spec(syntax=uid.JPEG2000Lossless, bits_stored=16, window=(30000, 40000)),
    "rle_rescale": Spec(syntax=uid.RLELossless, rescale=(2.0, -50.0)),
    "jpeg_ls_voi_lut": Spec(syntax=uid.JPEGLSLossless, voi_lut=LutSpec(0, 12, tuple(4095 - i for i in range(4096)))),
    "bare_implicit_8bit": Spec(preamble=False, syntax=uid.ImplicitVRLittleEndian, bits_stored=8),
}


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    # DICOM decoding is what this module tests; the input guard has its own tests (test_input_guard.py), and the
    # tiny random model's guard, fitted on JPEG synthetics, refuses these windowed 12/16-bit renderings.
    with live_server(serving_settings(tiny_weights, max_pixels=1_000_000, input_guard="off")) as running:
        yield running


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels, "L"), "PNG")


def post(server: LiveServer, data: bytes, name: str = "IM000001", content_type: str = "application/dicom") -> dict:
    with server.client() as client:
        response = client.post("/predict", files={"file": (name, data, content_type)})
    body = response.json()
    body["status"] = response.status_code
    return body


@pytest.mark.parametrize("name", sorted(PARITY))
def test_dicom_prediction_equals_the_png_of_its_display_pixels(server: LiveServer, name: str) -> None:
    spec = PARITY[name]
    stored = chest_stored(spec)
    # Detected by content: no extension, and a declared type that lies.
    from_dicom = post(server, dicom_bytes(spec, stored), name="IM000001", content_type="image/jpeg")
    from_png = post(server, png(expected_display(stored, spec)), name="same.png", content_type="image/png")
    assert from_dicom["status"] == 200 and from_png["status"] == 200, (from_dicom, from_png)
    assert abs(from_dicom["pneumonia_probability"] - from_png["pneumonia_probability"]) <= 1e-6
    assert from_dicom["label"] == from_png["label"]
    source = from_dicom["source"]
    assert (source["format"], source["width"], source["height"]) == ("DICOM", 96, 80)
    assert source["details"]["transfer_syntax"] == uid.UID(spec.syntax).name
    assert source["details"]["photometric_interpretation"] == spec.photometric
    assert from_png["source"] == {"format": "PNG", "width": 96, "height": 80, "details": {}}


def test_jpeg_source_is_reported_too(server: LiveServer) -> None:
    body = post(server, encode(synthetic_xray(120, 90)), name="a.jpg", content_type="image/jpeg")
    assert body["source"] == {"format": "JPEG", "width": 120, "height": 90, "details": {}}


def _rgb() -> bytes:
    planes = np.repeat(chest_stored(Spec(bits_stored=8))[None], 3, axis=0)
    return dicom_bytes(Spec(bits_stored=8, samples=3, photometric="RGB"), planes)


REFUSED = {
    "ct": (lambda: (PYDICOM_FILES / "CT_small.dcm").read_bytes(), "unsupported_modality"),
    "mr_rle": (lambda: (PYDICOM_FILES / "MR_small_RLE.dcm").read_bytes(), "unsupported_modality"),
    "lateral": (lambda: dicom_bytes(Spec(view="LL")), "not_frontal_view"),
    "for_processing": (lambda: dicom_bytes(Spec(intent="FOR PROCESSING")), "not_for_presentation"),
    "two_frames": (lambda: dicom_bytes(Spec(frames=2), np.stack([chest_stored(Spec())] * 2)), "multi_frame"),
    "rgb": (_rgb, "not_monochrome"),
    "truncated": (lambda: dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1))[:-600], "corrupt_image"),
    "malformed": (lambda: bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + bytes(40), "corrupt_image"),
    "huge_header": (lambda: dicom_bytes(Spec(extra={"Rows": 40000, "Columns": 40000})), "image_too_large"),
    "mpeg2": (lambda: dicom_bytes(Spec(syntax=uid.MPEG2MPML), frame=bytes(64)), "unsupported_media_type"),
    "deflated": (lambda: (PYDICOM_FILES / "image_dfl.dcm").read_bytes(), "unsupported_media_type"),
    "report": (lambda: (PYDICOM_FILES / "test-SR.dcm").read_bytes(), "unsupported_modality"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_dicom_files_get_their_code_and_status(server: LiveServer, case: str) -> None:
    make, code = REFUSED[case]
    body = post(server, make())
    assert body["status"] == ERRORS[code][0], body
    assert body["error"]["code"] == code and body["error"]["message"]


def test_unsupported_syntax_message_names_it(server: LiveServer) -> None:
    body = post(server, REFUSED["mpeg2"][0]())
    assert body["error"]["message"] == "the DICOM transfer syntax MPEG2 Main Profile / Main Level is not supported"


def test_batch_mixes_dicom_jpeg_and_refusals(server: LiveServer) -> None:
    good = dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1))
    files = [
        ("files", ("1.2.840.1", good, "application/octet-stream")),
        ("files", ("ct", REFUSED["ct"][0](), "application/dicom")),
        ("files", ("chest.jpg", encode(synthetic_xray()), "image/jpeg")),
        ("files", ("lateral.dcm", REFUSED["lateral"][0](), "application/dicom")),
    ]
    with server.client() as client:
        response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["source"]["format"] == "DICOM" and results[2]["source"]["format"] == "JPEG"
    assert [item.get("error", {}).get("code") for item in results] == [
        None,
        "unsupported_modality",
        None,
        "not_frontal_view",
    ]
    assert results[0]["pneumonia_probability"] == pytest.approx(post(server, good)["pneumonia_probability"], abs=1e-6)


def test_metadata_checks_follow_the_settings(tiny_weights: Path) -> None:
    settings = serving_settings(
        tiny_weights,
        dicom_check_modality=False,
        dicom_check_view_position=False,
        dicom_check_presentation_intent=False,
        input_guard="off",  # a CT slice and a lateral view are what the guard refuses; the DICOM switches are tested
    )
    with live_server(settings) as relaxed:
        for case in ("ct", "lateral", "for_processing"):
            body = post(relaxed, REFUSED[case][0]())
            assert body["status"] == 200, (case, body)
        assert post(relaxed, REFUSED["two_frames"][0]())["error"]["code"] == "multi_frame"  # not a switchable check


def test_openapi_lists_the_dicom_error_codes(server: LiveServer) -> None:
    with server.client() as client:
        spec = client.get("/openapi.json").json()
    examples = spec["paths"]["/predict"]["post"]["responses"]["422"]["content"]["application/json"]["examples"]
    assert {"unsupported_modality", "not_frontal_view", "not_for_presentation", "multi_frame", "not_monochrome"} <= set(
        examples
    )
    assert "source" in spec["components"]["schemas"]["Prediction"]["properties"]
    v2_examples = spec["paths"]["/v2/models/{model_name}/infer"]["post"]["responses"]["422"]["content"]
    assert "not_frontal_view" in v2_examples["application/json"]["examples"]


def test_patient_data_appears_in_no_log_line_response_or_metric(
    tiny_weights: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Every log record of a live server at DEBUG, its stdout/stderr, responses and metrics: no patient data."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(logging.DEBUG)
    handler.setFormatter(JsonFormatter())  # the service's own format, extras included
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    uploads = [
        dicom_bytes(Spec()),
        dicom_bytes(Spec(syntax=uid.RLELossless)),
        dicom_bytes(Spec(modality=PATIENT_NAME)),
        dicom_bytes(Spec(view=PATIENT_NAME)),
        dicom_bytes(Spec(intent=PATIENT_NAME)),
        dicom_bytes(Spec(photometric=PATIENT_NAME[:16])),
        dicom_bytes(Spec(window=(2000, 1000), voi_function=PATIENT_NAME[:16])),
        dicom_bytes(Spec(extra={"PatientName": PATIENT_NAME * 5})),
        dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1))[:-700],
        dicom_bytes(Spec())[:900],
    ]
    bodies: list[str] = []
    try:
        with live_server(serving_settings(tiny_weights, log_level="DEBUG")) as running, running.client() as client:
            for data in uploads:
                bodies.append(client.post("/predict", files={"file": ("upload", data)}).text)
            files = [("files", (f"f{i}", data)) for i, data in enumerate(uploads)]
            bodies.append(client.post("/predict/batch", files=files).text)
            metrics = client.get("/metrics").text
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
    captured = capfd.readouterr()
    assert any('"message": "POST /predict 422"' in line for line in lines), "the requests were not logged"
    assert sum(metric_samples(metrics, "cxr_rejected_images_total").values()) > 0
    everything = "\n".join([*lines, *bodies, metrics, captured.out, captured.err]).lower()
    for secret in (PATIENT_NAME[:10], "marguerite", PATIENT_ID, "19470312"):
        assert secret.lower() not in everything


def test_dicom_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODALITY", "VIEW_POSITION", "PRESENTATION_INTENT"):
        monkeypatch.delenv(f"CXR_DICOM_CHECK_{name}", raising=False)
    assert load_settings().dicom_policy() == DicomPolicy()
    monkeypatch.setenv("CXR_DICOM_CHECK_VIEW_POSITION", "false")
    assert load_settings().dicom_policy() == DicomPolicy(check_view_position=False)
    monkeypatch.setenv("CXR_DICOM_CHECK_MODALITY", "maybe")
    with pytest.raises(SettingsError, match="CXR_DICOM_CHECK_MODALITY"):
        load_settings()


def test_open_inference_protocol_takes_dicom_bytes_too(server: LiveServer, tiny_weights: Path) -> None:
    """/v2 decodes BYTES images exactly as /predict does: same probability, same refusals (all or nothing)."""
    name = load_model(tiny_weights).metadata.name
    good = dicom_bytes(Spec(syntax=uid.JPEGLosslessSV1, photometric="MONOCHROME1"))

    def infer(*images: bytes) -> httpx.Response:
        data = [base64.b64encode(image).decode() for image in images]
        body = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}]}
        with server.client() as client:
            return client.post(f"/v2/models/{name}/infer", json=body)

    response = infer(good)
    assert response.status_code == 200, response.text
    [probability] = next(out for out in response.json()["outputs"] if out["name"] == "probability")["data"]
    assert probability == pytest.approx(post(server, good)["pneumonia_probability"], abs=1e-6)
    refused = infer(good, REFUSED["lateral"][0]())
    assert refused.status_code == 422 and refused.json()["code"] == "not_frontal_view"
    assert refused.json()["error"].startswith("item 1 of 2: ")
