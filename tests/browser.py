"""Real-browser test harness: Debian's chromium driven by playwright, with the network fenced to 127.0.0.1.

Playwright only drives the browser here; it never downloads one (``playwright install`` is never run):
the system chromium (``apt-get install chromium``) is launched by path, with a fresh profile per test.
Every request the pages make is routed through :class:`OffHostGuard`: loopback requests go through,
anything else is aborted and recorded, so a test can assert that nothing tried to leave the host.
Console errors (which is where Chromium reports Content-Security-Policy violations) and uncaught
page exceptions are recorded too.

Without chromium a test skips with the reason locally, and fails in CI (``CI=true``), where
``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in CI containers, where the setuid sandbox is unavailable
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
ALLOWED_HOST = "127.0.0.1"


def chromium_executable() -> str:
    """The system chromium, or skip (locally) / fail (CI) with the reason."""
    path = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
    reason = None
    if path is None:
        reason = "chromium is not installed (Debian: apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"real-browser tests must run in CI: {reason}")
        pytest.skip(reason)
    assert path is not None
    return path


@dataclass
class OffHostGuard:
    """Lets requests to 127.0.0.1 through and aborts (and records) every other one."""

    allowed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def handle(self, route: object, request: object) -> None:
        url: str = request.url  # type: ignore[attr-defined]
        if urlsplit(url).hostname == ALLOWED_HOST:
            self.allowed.append(url)
            route.continue_()  # type: ignore[attr-defined]
        else:
            self.blocked.append(url)
            route.abort("blockedbyclient")  # type: ignore[attr-defined]


@dataclass
class BrowserSession:
    """One browser profile with one page, and everything the page tried or complained about."""

    page: object
    guard: OffHostGuard
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    screenshots: Path = Path()

    def screenshot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        print(f"screenshot: {path}")
        return path

    def assert_clean(self, expected_errors: tuple[str, ...] = ()) -> None:
        """No request left the host, no CSP violation or other console error, no uncaught exception.

        ``expected_errors``: substrings of console errors the test caused on purpose (a 401 it provoked).
        """
        assert self.guard.blocked == [], f"requests outside {ALLOWED_HOST} were attempted: {self.guard.blocked}"
        unexpected = [m for m in self.console_errors if not any(part in m for part in expected_errors)]
        assert unexpected == [], f"console errors: {unexpected}"
        assert self.page_errors == [], f"uncaught page errors: {self.page_errors}"
        assert self.guard.allowed, "the guard saw no request at all: it is not wired to the page"


@contextmanager
def chromium_page(tmp_path: Path) -> Iterator[BrowserSession]:
    """A fresh chromium profile under ``tmp_path`` and one page in it, fenced to 127.0.0.1."""
    executable = chromium_executable()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # CI machines are small and shared: wait, but never forever

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": 1280, "height": 900},
        )
        try:
            guard = OffHostGuard()
            context.route("**/*", guard.handle)
            page = context.new_page()
            session = BrowserSession(page, guard, screenshots=tmp_path)
            page.on("console", lambda msg: msg.type == "error" and session.console_errors.append(msg.text))
            page.on("pageerror", lambda exc: session.page_errors.append(str(exc)))
            page.set_default_timeout(30_000)
            yield session
        finally:
            context.close()
