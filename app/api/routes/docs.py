"""The OpenAPI docs page, served with Swagger UI from this service's own files; never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from app.api.static_pages import page

router = APIRouter(include_in_schema=False)


@router.get("/docs", response_class=HTMLResponse)
async def docs() -> HTMLResponse:
    """Swagger UI over ``openapi.json``; the Authorize button takes the ``X-API-Key`` when one is set."""
    return page("docs.html")
