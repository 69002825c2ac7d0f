"""Request dependencies: the service instance and the optional API key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from app.api.errors import UNAUTHORIZED_MESSAGE, ApiError
from app.api.service import Service

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required on prediction and model routes when CXR_API_KEY is set."
)


def get_service(request: Request) -> Service:
    return request.app.state.service


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> None:
    """Guards the routes and documents the header in OpenAPI; ApiKeyMiddleware already refused bad keys."""
    if not request.app.state.settings.api_key_accepts(key):
        raise ApiError("unauthorized", UNAUTHORIZED_MESSAGE)


ServiceDep = Annotated[Service, Depends(get_service)]
