"""The model card of the weights this instance serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import ServiceDep, require_api_key
from app.api.errors import error_responses
from app.api.schemas import ModelCard

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])


@router.get("/model", summary="Model card", responses=error_responses("unauthorized", "not_ready"))
async def model_card(service: ServiceDep) -> ModelCard:
    """Identity, decision threshold, calibration temperature, evaluation metrics and provenance."""
    return service.model_card()
