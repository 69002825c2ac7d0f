"""Operational endpoints for orchestrators and scrapers; never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from app.api.deps import MetricsDep, ServiceDep
from app.api.schemas import Health, Liveness

router = APIRouter(tags=["operations"])

_METRICS_EXAMPLE = (
    "# HELP cxr_batch_size Images per forward pass.\n# TYPE cxr_batch_size histogram\n"
    'cxr_batch_size_bucket{le="1.0"} 3.0\ncxr_batch_size_bucket{le="2.0"} 7.0\n'
)


# Load balancers sometimes probe with HEAD: same status, no body (uvicorn drops it); kept out of OpenAPI.
@router.head("/health", include_in_schema=False)
@router.get(
    "/health",
    summary="Readiness: is the model loaded and serving",
    responses={
        503: {
            "model": Health,
            "description": "Loading, draining after SIGTERM, or the last batch failed.",
            "content": {
                "application/json": {
                    "example": {
                        "status": "loading",
                        "device": None,
                        "precision": None,
                        "model": None,
                        "detail": "the model is loading",
                    }
                }
            },
        }
    },
)
async def health(service: ServiceDep, response: Response) -> Health:
    """200 only when requests would be scored now; load balancers should route on this."""
    state = service.health()
    if state.status != "ok":
        response.status_code = 503
    return state


@router.head("/livez", include_in_schema=False)
@router.get("/livez", summary="Liveness: the process and its event loop respond")
async def livez() -> Liveness:
    """Always 200 while the server runs; restart the process only when this fails."""
    return Liveness()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"example": _METRICS_EXAMPLE}}}},
)
async def metrics(registry: MetricsDep) -> Response:
    """Request counts and latency by route, batch sizes, queue depth and forward-pass time."""
    return Response(registry.render(), media_type=registry.content_type)
