"""Request dependencies: the only way routes get the settings, the service, the metrics and the key check.

As in tiangolo's full-stack FastAPI template (``api/deps.py``): typed ``Annotated`` aliases, so
a route declares what it needs in its signature and never reaches into ``app.state`` itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from app.api.errors import UnauthorizedError
from app.api.service import Service
from app.api.telemetry import Metrics
from app.core.coded_error import CodedError
from app.settings import Settings

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="Required on prediction and model routes when CXR_API_KEY is set."
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]) -> None:
    """Marks a route as protected (the middleware reads this mark) and documents the header in OpenAPI.

    ``ApiKeyMiddleware`` has already refused bad keys before the body was read; this is the
    second line for any path the middleware might not see.
    """
    if not settings.api_key_accepts(key):
        raise UnauthorizedError()


ApiKeyGuard = Depends(require_api_key)


class MultipleFilesError(CodedError):
    code = "multiple_files"


async def require_one_file(request: Request) -> None:
    """Refuse a repeated ``file`` field, which FastAPI would silently cut to its last part.

    Runs after FastAPI has parsed the form, whose parsed copy Starlette keeps on the request.
    """
    count = len((await request.form()).getlist("file"))
    if count > 1:
        raise MultipleFilesError(
            f"{count} files in the field 'file'; {request.url.path} takes one image: send several to /predict/batch"
        )


OneFile = Depends(require_one_file)
