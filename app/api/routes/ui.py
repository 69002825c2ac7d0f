"""The web page at ``/ui`` (and ``/`` leading to it); with ``CXR_UI=off`` only ``/`` remains, leading to /docs.

The page itself holds no secret: it calls the same ``/predict``, ``/predict/batch`` and ``/explain``
as any client, with the API key the user types into it (kept in the page's memory only).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

from app.api.static_pages import page

router = APIRouter(include_in_schema=False)
docs_home = APIRouter(include_in_schema=False)


@router.get("/ui", response_class=HTMLResponse)
async def web_page() -> HTMLResponse:
    return page("ui.html")


# Relative Location headers, so the redirect stays under a proxy's path prefix.
@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("ui", status_code=307)


@docs_home.get("/")
async def home_without_ui() -> RedirectResponse:
    return RedirectResponse("docs", status_code=307)
