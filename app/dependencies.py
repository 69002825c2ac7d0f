"""Request dependencies: the service instance and the optional API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from app.errors import ApiError
from app.service import Service

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required on prediction and model routes when CXR_API_KEY is set."
)


def get_service(request: Request) -> Service:
    return request.app.state.service


async def require_api_key(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> None:
    """Constant-time comparison, so response timing does not leak how much of a guessed key was right."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise ApiError("unauthorized", "a valid X-API-Key header is required")


ServiceDep = Annotated[Service, Depends(get_service)]
