"""The /ui web page in a real browser: upload, label, probability, heatmap, API key; nothing leaves 127.0.0.1."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import imagecodecs
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect

from tests.browser import BrowserSession, chromium_page
from tests.conftest import encode, export_tiny_model, synthetic_xray
from tests.dicom_files import Spec, dicom_bytes
from tests.live_server import LiveServer, live_server, serving_settings

API_KEY = "page-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    weights = export_tiny_model(tmp_path_factory.mktemp("ui"), seed=11, input_size=64)
    # The page's display of the guard is tested with its contract below; real DICOM and 12-bit uploads of the tiny
    # random model would be refused by its guard (fitted on JPEG synthetics), so the server runs without it.
    with live_server(serving_settings(weights, api_key=API_KEY, input_guard="off")) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserSession]:
    with chromium_page(tmp_path) as session:
        yield session


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def heatmap_is_drawn(card: object) -> bool:
    """True when the card's heatmap canvas has at least one visible pixel."""
    return card.locator("canvas.heatmap").evaluate(  # type: ignore[attr-defined]
        """canvas => {
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return canvas.width > 0;
            return false;
        }"""
    )


def api_prediction(server: LiveServer, path: Path) -> dict:
    with server.client(headers={"X-API-Key": API_KEY}) as client:
        return client.post("/predict", files={"file": (path.name, path.read_bytes())}).json()


def test_upload_shows_label_probability_and_heatmap(
    server: LiveServer, browser: BrowserSession, tmp_path: Path
) -> None:
    page = browser.page
    assert page.goto(f"{server.url}/ui").status == 200  # type: ignore[attr-defined]
    expect(page.get_by_test_id("notice")).to_contain_text("Not a medical device")  # type: ignore[attr-defined]
    expect(page.locator("#model-identity")).to_contain_text("sha256")  # type: ignore[attr-defined]
    single = write(tmp_path / "chest.jpeg", encode(synthetic_xray(160, 120, seed=4)))

    # Without the key the service's 401 is shown, not a blank page.
    page.set_input_files("#files", [str(single)])  # type: ignore[attr-defined]
    expect(page.get_by_test_id("status")).to_contain_text("unauthorized")  # type: ignore[attr-defined]

    page.fill("#api-key", API_KEY)  # type: ignore[attr-defined]
    page.set_input_files("#files", [str(single)])  # type: ignore[attr-defined]
    card = page.locator("article.result")  # type: ignore[attr-defined]
    expect(card).to_have_count(1)
    expected = api_prediction(server, single)
    expect(card.get_by_test_id("label")).to_have_text(expected["label"])
    expect(card.get_by_test_id("probability")).to_contain_text(f"{expected['pneumonia_probability']:.4f}")
    expect(card.get_by_test_id("probability")).to_contain_text(f"{expected['threshold']:.4f}")
    expect(card.get_by_test_id("unreliable")).to_be_empty()  # no guard verdict (off here): no warning either
    expect(card).to_have_attribute("data-drawn", "true")
    assert heatmap_is_drawn(card)
    page.locator("#opacity").fill("0.3")  # type: ignore[attr-defined]
    assert card.locator("canvas.heatmap").evaluate("c => c.style.opacity") == "0.3"
    expect(page.locator("#model-identity")).to_contain_text(expected["model"]["sha256"][:12])  # type: ignore[attr-defined]
    browser.screenshot("ui-single")

    # Several files: one /predict/batch request, a card per file in upload order, a bad file on its own card.
    # The 12-bit JPEG and the DICOM file are ones the browser cannot decode: the page shows them as the
    # model saw them (/explain).
    uploads = [
        write(tmp_path / "second.png", encode(synthetic_xray(100, 140, seed=6), "PNG")),
        write(
            tmp_path / "twelve-bit",  # no extension: the service decides by content
            imagecodecs.jpeg8_encode(np.asarray(synthetic_xray(seed=8), np.uint16) * 16, bitspersample=12),
        ),
        write(tmp_path / "IM0001", dicom_bytes(Spec(photometric="MONOCHROME1", modality="DX"))),  # a PACS export
        write(tmp_path / "notes.txt", b"not an image"),
        single,
    ]
    page.set_input_files("#files", [str(path) for path in uploads])  # type: ignore[attr-defined]
    cards = page.locator("article.result")  # type: ignore[attr-defined]
    expect(cards).to_have_count(len(uploads))
    for index, path in enumerate(uploads):
        card = cards.nth(index)
        expect(card.locator(".filename")).to_have_text(path.name)
        if path.suffix == ".txt":
            expect(card.get_by_test_id("error")).to_contain_text("unsupported_media_type")
            continue
        expect(card.get_by_test_id("label")).to_have_text(api_prediction(server, path)["label"])
        expect(card).to_have_attribute("data-drawn", "true")
        assert heatmap_is_drawn(card), path.name
    browser.screenshot("ui-batch")

    paths = [httpx.URL(url).path for url in browser.guard.allowed]
    assert paths.count("/predict") == 2 and paths.count("/predict/batch") == 1  # the 401, then the scored upload
    assert paths.count("/explain") == 2  # only for the files the browser could not decode (12-bit JPEG, DICOM)
    browser.assert_clean(expected_errors=("status of 401",))


def test_page_shows_the_input_guard_and_a_refusal(server: LiveServer, browser: BrowserSession, tmp_path: Path) -> None:
    """The input guard's contract (another branch adds it to every 200): shown when present, refusals shown as such.

    The service's answers are the real ones for the file, with the guard's fields added by the test.
    """
    upload = write(tmp_path / "hand.jpeg", encode(synthetic_xray(90, 120, seed=2)))
    with server.client(headers={"X-API-Key": API_KEY}) as client:
        real = client.post("/predict?explain=true", files={"file": (upload.name, upload.read_bytes())}).json()
    flagged = {
        **real,
        "input_guard": {"score": 0.125, "threshold": 0.5, "passed": False},
        "warning": "this image does not look like a chest X-ray; the prediction may be meaningless",
    }
    refusal = {"error": {"code": "not_chest_xray", "message": "the image does not look like a chest X-ray"}}
    answers = iter([(200, flagged), (422, refusal)])

    def answer(route: object) -> None:
        status, body = next(answers)
        route.fulfill(status=status, json=body)  # type: ignore[attr-defined]

    page = browser.page
    page.route("**/predict?explain=true", answer)  # type: ignore[attr-defined]
    page.goto(f"{server.url}/ui")  # type: ignore[attr-defined]
    page.fill("#api-key", API_KEY)  # type: ignore[attr-defined]
    page.set_input_files("#files", [str(upload)])  # type: ignore[attr-defined]
    card = page.locator("article.result")  # type: ignore[attr-defined]
    guard = card.get_by_test_id("guard")
    expect(guard).to_have_text(
        "Input guard failed: score 0.125, threshold 0.500. "
        "this image does not look like a chest X-ray; the prediction may be meaningless"
    )
    expect(guard).to_have_class("guard failed")
    expect(card.get_by_test_id("label")).to_have_text(real["label"])
    # Flag mode: the label is struck through and said to be unreliable, not shown as a finding.
    expect(card.get_by_test_id("label")).to_have_class(f"label {real['label']} failed-guard")
    expect(card.get_by_test_id("unreliable")).to_have_text(
        "Unreliable: this image does not resemble the chest X-rays the model was trained on."
    )
    expect(card).to_have_attribute("data-drawn", "true")
    browser.screenshot("ui-guard")

    page.set_input_files("#files", [str(upload)])  # type: ignore[attr-defined]
    expect(card.get_by_test_id("error")).to_have_text(
        "the image does not look like a chest X-ray (not_chest_xray, HTTP 422)"
    )
    browser.assert_clean(expected_errors=("status of 422",))


def open_page(server: LiveServer, browser: BrowserSession) -> object:
    page = browser.page
    page.goto(f"{server.url}/ui")  # type: ignore[attr-defined]
    page.fill("#api-key", API_KEY)  # type: ignore[attr-defined]
    return page


def test_an_older_answer_arriving_late_is_dropped_not_mixed_in(
    server: LiveServer, browser: BrowserSession, tmp_path: Path
) -> None:
    """Files chosen while a batch was still running: the batch's late results were added under the new file's
    card, and the status counted them wrong. The older request is now aborted and its answer ignored."""
    older = [
        write(tmp_path / f"older-{index}.jpeg", encode(synthetic_xray(100, 100, seed=20 + index))) for index in (1, 2)
    ]
    newer = write(tmp_path / "newer.jpeg", encode(synthetic_xray(100, 100, seed=30)))
    held: list[object] = []
    page = open_page(server, browser)
    page.route("**/predict/batch?explain=true", lambda route: held.append(route))  # type: ignore[attr-defined]
    page.set_input_files("#files", [str(path) for path in older])  # type: ignore[attr-defined]
    expect(page.get_by_test_id("status")).to_have_text("Scoring 2 files…")  # type: ignore[attr-defined]
    while not held:
        page.wait_for_timeout(50)  # type: ignore[attr-defined]
    page.set_input_files("#files", [str(newer)])  # type: ignore[attr-defined]
    cards = page.locator("article.result")  # type: ignore[attr-defined]
    expect(cards).to_have_count(1)
    expect(cards.first).to_have_attribute("data-drawn", "true")
    late = api_prediction(server, older[0])
    with contextlib.suppress(PlaywrightError):  # the page aborted that request; a browser may refuse the answer
        held[0].fulfill(status=200, json={"results": [{**late, "filename": "older-1.jpeg"}] * 2})  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]
    expect(cards).to_have_count(1)
    expect(cards.first.locator(".filename")).to_have_text("newer.jpeg")
    expect(page.get_by_test_id("status")).to_have_text("1 result.")  # type: ignore[attr-defined]


def test_what_the_page_cannot_send_or_read_is_said_so(
    server: LiveServer, browser: BrowserSession, tmp_path: Path
) -> None:
    """A key fetch cannot send, a proxy's sign-in page instead of an answer, a model without heatmaps, and a batch
    file name the service echoes encoded: each was a misleading "could not be reached", a status stuck at
    "Scoring", every file refused as explain_unsupported, or a mangled name."""
    upload = write(tmp_path / "chest.jpeg", encode(synthetic_xray(100, 120, seed=5)))
    quoted = write(tmp_path / 'say "hi".jpeg', encode(synthetic_xray(110, 100, seed=6)))
    page = open_page(server, browser)
    status = page.get_by_test_id("status")  # type: ignore[attr-defined]

    page.fill("#api-key", API_KEY + "\u2019")  # type: ignore[attr-defined]  # a curly quote pasted along
    page.set_input_files("#files", [str(upload)])  # type: ignore[attr-defined]
    expect(status).to_contain_text("The API key holds characters an HTTP header cannot carry")
    page.fill("#api-key", API_KEY)  # type: ignore[attr-defined]

    def sign_in_page(route: object) -> None:
        route.fulfill(status=200, content_type="text/html", body="<html><body>Sign in</body></html>")  # type: ignore[attr-defined]

    page.route("**/predict?explain=true", sign_in_page)  # type: ignore[attr-defined]
    page.set_input_files("#files", [str(upload)])  # type: ignore[attr-defined]
    expect(status).to_have_text("The service's answer could not be read (HTTP 200).")
    page.unroute("**/predict?explain=true")  # type: ignore[attr-defined]

    unsupported = {"error": {"code": "explain_unsupported", "message": "this model has no heatmap"}}
    page.route("**/predict?explain=true", lambda route: route.fulfill(status=422, json=unsupported))  # type: ignore[attr-defined]
    page.set_input_files("#files", [str(upload)])  # type: ignore[attr-defined]
    card = page.locator("article.result")  # type: ignore[attr-defined]
    expect(card.get_by_test_id("label")).to_have_text(api_prediction(server, upload)["label"])
    expect(card).to_have_attribute("data-drawn", "true")
    assert [httpx.URL(url).path for url in browser.guard.allowed].count("/predict") == 1  # the retry, without explain

    page.set_input_files("#files", [str(upload), str(quoted)])  # type: ignore[attr-defined]
    cards = page.locator("article.result")  # type: ignore[attr-defined]
    expect(cards).to_have_count(2)
    expect(cards.nth(1).locator(".filename")).to_have_text('say "hi".jpeg')
    assert "explain" not in str(browser.guard.allowed[-1])  # this model's answers come without heatmaps now
    browser.assert_clean(expected_errors=("status of 422",))


def png_with_exif_after_the_image_data(width: int, height: int, orientation: int) -> bytes:
    """A PNG whose eXIf chunk follows IDAT: the service applies it, Chromium's decoder does not."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    tiff = exif.tobytes()[len(b"Exif\0\0") :]
    chunk = len(tiff).to_bytes(4, "big") + b"eXIf" + tiff + zlib.crc32(b"eXIf" + tiff).to_bytes(4, "big")
    data = encode(synthetic_xray(width, height, seed=9), "PNG")
    end = data.rindex(b"\0\0\0\0IEND")
    return data[:end] + chunk + data[end:]


def test_a_picture_the_browser_reads_otherwise_is_drawn_by_the_service(
    server: LiveServer, browser: BrowserSession, tmp_path: Path
) -> None:
    """An EXIF orientation the browser ignores (eXIf after IDAT) was drawn sideways under an upright heatmap."""
    upload = write(tmp_path / "rotated.png", png_with_exif_after_the_image_data(120, 90, orientation=6))
    expected = api_prediction(server, upload)
    assert (expected["source"]["width"], expected["source"]["height"]) == (90, 120)  # the service turns it upright
    page = open_page(server, browser)
    page.set_input_files("#files", [str(upload)])  # type: ignore[attr-defined]
    card = page.locator("article.result")  # type: ignore[attr-defined]
    expect(card).to_have_attribute("data-drawn", "true")
    width, height = card.locator("canvas.base").evaluate("c => [c.width, c.height]")  # type: ignore[attr-defined]
    assert height > width  # upright: taller than wide, as the service scored it
    assert [httpx.URL(url).path for url in browser.guard.allowed].count("/explain") == 1
    browser.assert_clean()
