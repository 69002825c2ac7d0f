"""Build the FastAPI application for a given configuration; the model loads in its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRouter
from starlette.routing import BaseRoute, Mount, Route

from app import SERVICE_NAME, __version__
from app.api.deps import ApiKeyGuard
from app.api.errors import install_error_handlers
from app.api.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    JsonCorsMiddleware,
    MultipartLimitsMiddleware,
    RequestContextMiddleware,
    StartupFailureMiddleware,
)
from app.api.routes import docs, explain, inference_v2, model, ops, predict, ui
from app.api.service import Service
from app.api.static_pages import mount_assets
from app.api.telemetry import Metrics
from app.core.artifacts import ModelLoadError
from app.core.decode_pool import DecoderFailedError
from app.core.engine import EngineError
from app.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load once per process; a model that cannot be verified, or decoder workers that cannot start, stop the
    process with a one-line reason instead of serving."""
    service: Service = app.state.service
    try:
        await service.start()
    except (ModelLoadError, EngineError, DecoderFailedError) as exc:
        app.state.startup_error = str(exc)
        raise
    yield
    await service.stop()


ROUTERS: tuple[APIRouter, ...] = (
    predict.router,
    explain.router,
    model.router,
    ops.router,
    docs.router,
    inference_v2.health_router,
    inference_v2.router,
)


def key_protected_routes(routers: Iterable[APIRouter]) -> list[BaseRoute]:
    """The routes whose routers declare ``ApiKeyGuard``: the one list the API-key middleware enforces."""
    return [route for router in routers if ApiKeyGuard in router.dependencies for route in router.routes]


def served_routes(app: FastAPI, routers: Iterable[APIRouter]) -> list[Route | Mount]:
    """Every route and mount of ``app``, flat, in routing order: the templates metrics label requests with.

    ``app.routes`` holds each included router as one entry that names no path, so their routes are
    taken from the routers themselves.
    """
    candidates = [*app.routes, *(route for router in routers for route in router.routes)]
    return [route for route in candidates if isinstance(route, Route | Mount)]


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Make the OpenAPI schema say what this instance enforces, so schema-driven clients agree with it.

    Without ``CXR_API_KEY`` no route needs a key, so no operation may declare the key scheme as a
    requirement; the batch size limit comes from the settings.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            if settings.api_key is None:
                schema.get("components", {}).pop("securitySchemes", None)
                for operations in schema["paths"].values():
                    for operation in operations.values():
                        operation.pop("security", None)
            for body in schema.get("components", {}).get("schemas", {}).values():
                files = body.get("properties", {}).get("files")
                if files is not None and files.get("type") == "array":
                    files["maxItems"] = settings.max_batch_files
        return app.openapi_schema  # type: ignore[return-value]  # set by build()

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics(settings.max_batch_size)
    app = FastAPI(
        title=SERVICE_NAME,
        summary="Pneumonia probability for chest X-rays from a verified VGG16 model, with dynamic GPU batching.",
        version=__version__,
        lifespan=lifespan,
        # FastAPI's own docs pages load Swagger UI and ReDoc from a CDN; routes/docs.py serves our copy.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = Service(settings, metrics)
    routers = (*ROUTERS, ui.router if settings.ui else ui.docs_home)
    for router in routers:
        app.include_router(router)
    mount_assets(app)
    install_error_handlers(app)
    _document_limits(app, settings)
    # Added innermost first: the request context wraps everything, so 413s and CORS rejections are logged too.
    app.add_middleware(MultipartLimitsMiddleware, max_parts=settings.max_batch_files)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.body_timeout_s,
        retry_after_s=settings.retry_after_s,
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, settings=settings, protected=key_protected_routes(ROUTERS))
    if settings.cors_origins:
        app.add_middleware(
            JsonCorsMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID", "Retry-After", *explain.PREDICTION_HEADERS],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        retry_after_s=settings.retry_after_s,
        routes=served_routes(app, routers),
    )
    app.add_middleware(StartupFailureMiddleware)
    return app
