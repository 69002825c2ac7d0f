"""The /docs page in a real browser, on a host without internet access (every off-host request blocked)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser import BrowserSession, chromium_page
from tests.live_server import LiveServer, live_server, serving_settings

API_KEY = "docs-test-key"


@pytest.fixture(scope="module")
def keyed_server(tiny_weights: Path) -> Iterator[LiveServer]:
    with live_server(serving_settings(tiny_weights, api_key=API_KEY)) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserSession]:
    with chromium_page(tmp_path) as session:
        yield session


def try_it_out(page: object, operation_id: str) -> object:
    """Open an operation, press "Try it out" then "Execute"; returns the operation's block."""
    block = page.locator(f"#{operation_id}")  # type: ignore[attr-defined]
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    return block


def test_docs_render_and_work_offline_with_an_api_key(keyed_server: LiveServer, browser: BrowserSession) -> None:
    page = browser.page
    response = page.goto(f"{keyed_server.url}/docs")  # type: ignore[attr-defined]
    assert response.status == 200
    # The endpoint list rendered from openapi.json.
    expect(page.locator('.opblock-summary-path[data-path="/predict"]')).to_be_visible()  # type: ignore[attr-defined]
    expect(page.locator('.opblock-summary-path[data-path="/predict/batch"]')).to_be_visible()  # type: ignore[attr-defined]

    health = try_it_out(page, "operations-operations-health_health_get")
    expect(health.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
    body = json.loads(health.locator(".live-responses-table tbody pre.microlight").first.inner_text())
    assert body["status"] == "ok"

    # Authorize with the key, then a protected route answers 200 from the page.
    page.locator(".auth-wrapper .authorize").click()  # type: ignore[attr-defined]
    dialog = page.locator(".dialog-ux")  # type: ignore[attr-defined]
    dialog.locator("input").fill(API_KEY)
    dialog.locator("button.modal-btn.authorize").click()
    expect(dialog.locator("button.modal-btn.authorize")).to_be_hidden()  # now offers "Logout"
    dialog.locator("button.btn-done").click()
    card = try_it_out(page, "operations-model-model_card_model_get")
    expect(card.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
    # The key stays in the page: nothing persisted for the next visitor of this browser profile.
    assert page.evaluate("JSON.stringify(window.localStorage)") == "{}"  # type: ignore[attr-defined]

    browser.screenshot("docs")
    browser.assert_clean()
    assert any(url.endswith("/openapi.json") for url in browser.guard.allowed)
    assert any("/static/swagger-ui/swagger-ui-bundle.js" in url for url in browser.guard.allowed)
