"""The harness itself: an off-host request and a CSP violation are caught, so the page tests can fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chromium_page
from tests.live_server import live_server, serving_settings


def test_off_host_requests_and_csp_violations_are_caught(tiny_weights: Path, tmp_path: Path) -> None:
    with live_server(serving_settings(tiny_weights)) as server, chromium_page(tmp_path) as session:
        session.page.goto(f"{server.url}/docs")  # type: ignore[attr-defined]
        # Injected after load: an image from another origin (blocked by the guard) and an inline script (by the CSP).
        session.page.evaluate(  # type: ignore[attr-defined]
            """() => {
                const img = document.createElement("img");
                img.src = "https://cdn.example.invalid/pixel.png";
                document.body.appendChild(img);
                const script = document.createElement("script");
                script.textContent = "window.inlineRan = true";
                document.body.appendChild(script);
            }"""
        )
        session.page.wait_for_timeout(500)  # type: ignore[attr-defined]
        assert session.page.evaluate("window.inlineRan === undefined")  # type: ignore[attr-defined]
        with pytest.raises(AssertionError, match=r"cdn\.example\.invalid"):
            session.assert_clean()
        assert any("Content Security Policy" in message for message in session.console_errors)
