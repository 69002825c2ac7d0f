"""Scoring endpoints: one image, or several sharing the service's batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from app.api.deps import ApiKeyGuard, ServiceDep, SettingsDep
from app.api.errors import TooManyFilesError, error_responses
from app.api.schemas import BatchResponse, Prediction

router = APIRouter(tags=["prediction"], dependencies=[ApiKeyGuard])

_SERVICE_ERRORS = (
    "unauthorized",
    "payload_too_large",
    "bad_request",
    "missing_field",
    "validation_error",
    "internal_error",
    "inference_failed",
    "not_ready",
    "overloaded",
    "shutting_down",
    "timeout",
)


@router.post(
    "/predict",
    summary="Classify one chest X-ray",
    responses=error_responses(
        "empty_file", "image_too_large", "unsupported_media_type", "corrupt_image", "not_chest_xray", *_SERVICE_ERRORS
    ),
)
async def predict(
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="A JPEG (8/12-bit, any colour model) or PNG (8/16-bit) image.")],
) -> Prediction:
    """P(pneumonia), calibrated with the model's temperature, the label at its decision threshold, and the input
    guard's verdict; an image that does not resemble a frontal chest X-ray is refused (422 not_chest_xray)."""
    return await service.predict(await file.read())


@router.post(
    "/predict/batch",
    summary="Classify several chest X-rays",
    responses=error_responses("too_many_files", *_SERVICE_ERRORS),
)
async def predict_batch(
    service: ServiceDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile], File(description="Repeat the `files` field once per image.")],
) -> BatchResponse:
    """Results in upload order; a file that is not a usable image gets its own error entry, the rest are scored."""
    limit = settings.max_batch_files
    if len(files) > limit:
        raise TooManyFilesError(f"{len(files)} files uploaded; at most {limit} per batch")
    uploads = [(upload.filename, await upload.read()) for upload in files]
    return BatchResponse(results=await service.predict_many(uploads))
