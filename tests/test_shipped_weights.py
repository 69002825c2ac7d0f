"""The model shipped in weights/ loads, verifies, and serves exactly its exported golden outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from app.core.artifacts import WEIGHTS_FILENAME, check_golden, load_model
from app.core.decision import pneumonia_probability
from tests.conftest import encode
from tests.live_server import live_server, serving_settings

SHIPPED = Path(__file__).resolve().parent.parent / "weights"


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED)  # raises on a sha256, architecture or golden mismatch


def test_shipped_model_card_is_complete(shipped) -> None:
    meta = shipped.metadata
    assert (SHIPPED / WEIGHTS_FILENAME).stat().st_size < 100 * 1024 * 1024
    assert meta.spec.head == "compact" and meta.spec.architecture in ("vgg16", "vgg16_bn")
    assert 0.0 < meta.threshold < 1.0 and meta.threshold_method.startswith(("sensitivity", "youden"))
    validation = meta.metrics["validation"]
    for key in ("n", "roc_auc", "accuracy", "sensitivity", "specificity", "tp", "fp", "tn", "fn"):
        assert key in validation
    assert validation["tp"] + validation["fp"] + validation["tn"] + validation["fn"] == validation["n"]
    assert validation["roc_auc"] >= 0.95
    assert meta.provenance["data_hash"] and meta.provenance["input_size"] == meta.spec.input_size


def test_golden_outputs_reproduce_on_cpu(shipped) -> None:
    assert shipped.golden_inputs is not None and len(shipped.golden_inputs) >= 2
    assert check_golden(shipped, shipped.network) < 1e-3


def test_service_returns_golden_probabilities(shipped) -> None:
    """Golden inputs sent as lossless PNGs through a real server give the exported probabilities."""
    assert shipped.golden_inputs is not None and shipped.metadata.golden is not None
    expected = pneumonia_probability(torch.tensor(shipped.metadata.golden.logits), shipped.metadata.temperature)
    with live_server(serving_settings(SHIPPED)) as server, server.client() as client:
        for pixels, want in zip(shipped.golden_inputs, expected.tolist(), strict=True):
            png = encode(Image.fromarray(pixels[0].numpy(), "L"), "PNG")
            response = client.post("/predict", files={"file": ("golden.png", png, "image/png")})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["pneumonia_probability"] == pytest.approx(want, abs=1e-4)
            assert body["label"] == ("PNEUMONIA" if body["pneumonia_probability"] >= body["threshold"] else "NORMAL")
            assert body["model"]["sha256"] == shipped.metadata.sha256
