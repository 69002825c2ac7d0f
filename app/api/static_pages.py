"""The pages the service serves itself (API docs, web page) and their assets, with no CDN and a strict CSP.

Hospital networks rarely reach the internet, and a page that quietly loads code from a third-party
origin is what a security review flags; so every script, style and image a page uses ships in
``app/api/assets/static/`` and is served under ``/static/``. Pages live apart from the assets (in
``assets/pages/``) so an HTML file can never be served without its security headers. All URLs in
pages are relative: they resolve behind a reverse proxy whatever host and port it exposes.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.responses import Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

ASSETS_DIR = Path(__file__).with_name("assets")
STATIC_DIR = ASSETS_DIR / "static"
PAGES_DIR = ASSETS_DIR / "pages"
STATIC_PATH = "/static"

# Scripts, styles, fetches and fonts only from this origin; no inline script, no eval, no frames, no plugins.
# img-src adds data: for the SVG icons inside Swagger UI's stylesheet (inline data, never a request).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Assets(StaticFiles):
    """Starlette's static files (ETag, If-None-Match, range requests, no path escapes) plus safe headers.

    ``no-cache`` means "revalidate", so a browser keeps the 1.7 MB Swagger UI bundle across visits
    but picks up new files right after an upgrade.
    """

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_assets(app: FastAPI) -> None:
    app.mount(STATIC_PATH, Assets(directory=STATIC_DIR, follow_symlink=False), name="static")


@cache
def _page_text(name: str) -> str:
    return (PAGES_DIR / name).read_text(encoding="utf-8")


def page(name: str) -> HTMLResponse:
    """An HTML page from ``assets/pages/`` with the security headers every page gets."""
    return HTMLResponse(_page_text(name), headers=PAGE_HEADERS)
