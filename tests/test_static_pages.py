"""Pages the service serves itself: no external URL anywhere in them, strict CSP, intact vendored files."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from starlette.routing import BaseRoute

from app.api.static_pages import STATIC_DIR
from tests.live_server import LiveServer, live_server, serving_settings

# Attributes that make a browser fetch, navigate to or submit to a URL.
URL_ATTRIBUTES = frozenset({"src", "href", "action", "formaction", "srcset", "poster", "data", "manifest", "ping"})
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""")


class UrlCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if not value:
                continue
            if name == "srcset":
                self.urls.extend(candidate.split()[0] for candidate in value.split(",") if candidate.strip())
            elif name in URL_ATTRIBUTES:
                self.urls.append(value)
            elif name == "style":
                self.urls.extend(m[0] or m[1] for m in CSS_URL.findall(value))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


def is_external(base: str, url: str) -> bool:
    """True when ``url``, resolved against the page, leaves the page's origin (or is protocol-relative)."""
    if url.startswith(("data:", "#")):
        return False
    resolved = urlsplit(urljoin(base, url))
    return url.startswith("//") or (resolved.scheme, resolved.netloc) != tuple(urlsplit(base)[:2])


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[LiveServer]:
    with live_server(serving_settings(tiny_weights, api_key="k")) as running:
        yield running


def get_paths(routes: Iterable[BaseRoute]) -> Iterator[str]:
    """Parameterless GET paths, including those of included routers (FastAPI nests them as ``original_router``)."""
    for route in routes:
        if (included := getattr(route, "original_router", None)) is not None:
            yield from get_paths(included.routes)
        elif "GET" in (getattr(route, "methods", None) or ()) and "{" not in getattr(route, "path", "{"):
            yield route.path  # type: ignore[attr-defined]


def html_pages(server: LiveServer, client: httpx.Client) -> dict[str, httpx.Response]:
    """Every parameterless GET route of the app whose answer is HTML (following redirects)."""
    pages = {}
    for path in get_paths(server.app.routes):
        response = client.get(path, follow_redirects=True)
        if response.headers.get("content-type", "").startswith("text/html"):
            pages[path] = response
    return pages


def test_no_served_page_refers_to_an_external_url(server: LiveServer) -> None:
    with server.client(headers={"X-API-Key": "k"}) as client:
        pages = html_pages(server, client)
        assert "/docs" in pages
        for path, response in pages.items():
            base = str(response.url)
            collector = UrlCollector()
            collector.feed(response.text)
            assert collector.inline_scripts == 0, f"{path} has an inline script"
            external = [url for url in collector.urls if is_external(base, url)]
            assert external == [], f"{path} refers to {external}"
            # Every local asset the page uses exists, and its stylesheets fetch nothing from elsewhere either.
            for url in collector.urls:
                if url.startswith(("data:", "#")):
                    continue
                asset = client.get(urljoin(base, url))
                assert asset.status_code == 200, f"{path}: {url} -> {asset.status_code}"
                if asset.headers["content-type"].startswith("text/css"):
                    css_urls = [m[0] or m[1] for m in CSS_URL.findall(asset.text)]
                    assert [u for u in css_urls if is_external(str(asset.url), u)] == [], url


def test_every_page_has_a_strict_content_security_policy(server: LiveServer) -> None:
    with server.client(headers={"X-API-Key": "k"}) as client:
        for path, response in html_pages(server, client).items():
            policy = dict(
                directive.strip().split(" ", 1) for directive in response.headers["content-security-policy"].split(";")
            )
            assert policy["default-src"] == "'self'", path
            assert "http" not in response.headers["content-security-policy"], path  # no other origin anywhere
            for directive, sources in policy.items():
                assert "'unsafe-inline'" not in sources and "'unsafe-eval'" not in sources, (path, directive)
            assert policy["frame-ancestors"] == "'none'"
            assert response.headers["x-content-type-options"] == "nosniff"


def test_the_collector_finds_external_urls() -> None:
    """The check above can fail: an external script, stylesheet, image or protocol-relative link is found."""
    page = (
        '<link rel="stylesheet" href="https://cdn.example/x.css"><script src="//cdn.example/x.js"></script>'
        '<img srcset="a.png 1x, https://cdn.example/b.png 2x"><div style="background:url(http://cdn.example/c.png)">'
    )
    collector = UrlCollector()
    collector.feed(page)
    base = "http://127.0.0.1:8000/docs"
    assert [u for u in collector.urls if is_external(base, u)] == [
        "https://cdn.example/x.css",
        "//cdn.example/x.js",
        "https://cdn.example/b.png",
        "http://cdn.example/c.png",
    ]
    assert not is_external(base, "static/swagger-ui/swagger-ui.css")


def test_static_files_are_served_without_path_escapes(server: LiveServer) -> None:
    with server.client() as client:
        css = client.get("/static/swagger-ui/swagger-ui.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        assert css.headers["x-content-type-options"] == "nosniff"
        assert (
            client.get("/static/swagger-ui/swagger-ui.css", headers={"If-None-Match": css.headers["etag"]}).status_code
            == 304
        )
        for probe in ("/static/../static_pages.py", "/static/%2e%2e/static_pages.py", "/static/nope.js"):
            response = client.get(probe)
            assert response.status_code == 404, probe
            assert response.json()["error"]["code"] == "not_found"


def test_vendored_swagger_ui_matches_its_checksums() -> None:
    """The vendored Swagger UI is byte-for-byte the npm release named in its SOURCE file (see README)."""
    folder = STATIC_DIR / "swagger-ui"
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    assert {"LICENSE", "NOTICE", "swagger-ui-bundle.js", "swagger-ui.css"} <= set(listed)
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    unlisted = {p.name for p in folder.iterdir()} - set(listed) - {"SHA256SUMS", "SOURCE.md"}
    assert unlisted == set()
