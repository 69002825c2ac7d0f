"""The model card of the weights this instance serves."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ApiKeyGuard, ServiceDep
from app.api.errors import error_responses
from app.api.schemas import ModelCard

router = APIRouter(tags=["model"], dependencies=[ApiKeyGuard])


@router.get("/model", summary="Model card", responses=error_responses("unauthorized", "not_ready"))
async def model_card(service: ServiceDep) -> ModelCard:
    """Identity, decision threshold, calibration temperature, evaluation metrics and provenance."""
    return service.model_card()
