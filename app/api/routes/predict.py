"""Scoring endpoints: one image, or several sharing the service's batches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from app.api.deps import ApiKeyGuard, OneFile, ServiceDep, SettingsDep
from app.api.errors import IMAGE_ERRORS, SERVICE_ERRORS, TooManyFilesError, error_responses
from app.api.schemas import BatchResponse, Prediction

router = APIRouter(tags=["prediction"], dependencies=[ApiKeyGuard])

Explain = Annotated[
    bool,
    Query(
        description="Add a `heatmap`: the class activation map of the score (compact-head models only, "
        "else 422 `explain_unsupported`). Requests without it do no extra work."
    ),
]


@router.post(
    "/predict",
    summary="Classify one chest X-ray",
    dependencies=[OneFile],
    responses=error_responses(*IMAGE_ERRORS, "explain_unsupported", "multiple_files", *SERVICE_ERRORS),
    response_model_exclude_unset=True,  # `heatmap` only when asked for
)
async def predict(
    service: ServiceDep,
    file: Annotated[
        UploadFile,
        File(
            description="A JPEG (8/12/16-bit or lossless, any colour model), PNG (8/16-bit) or DICOM (single-frame "
            "grayscale CR/DX radiograph) file, recognised by content; not empty.",
            json_schema_extra={"minLength": 1},
        ),
    ],
    explain: Explain = False,
) -> Prediction:
    """P(pneumonia), calibrated with the model's temperature, the label at its decision threshold, and the input
    guard's verdict; an image that does not resemble a frontal chest X-ray is refused (422 not_chest_xray)."""
    return await service.predict(await file.read(), explain)


@router.post(
    "/predict/batch",
    summary="Classify several chest X-rays",
    responses=error_responses("explain_unsupported", *SERVICE_ERRORS),
    response_model_exclude_unset=True,
)
async def predict_batch(
    service: ServiceDep,
    settings: SettingsDep,
    files: Annotated[
        list[UploadFile],
        File(
            # Not minLength on the items: an empty file in a batch is that file's own error entry, not a 4xx.
            description="Repeat the `files` field once per image (at least one, at most CXR_MAX_BATCH_FILES); "
            "an empty file gets its own `empty_file` entry.",
            json_schema_extra={"minItems": 1},
        ),
    ],
    explain: Explain = False,
) -> BatchResponse:
    """Results in upload order; a file that is not a usable image gets its own error entry, the rest are scored."""
    limit = settings.max_batch_files
    if len(files) > limit:
        raise TooManyFilesError(f"{len(files)} files uploaded; at most {limit} per batch")
    uploads = [(upload.filename, await upload.read()) for upload in files]
    return BatchResponse(results=await service.predict_many(uploads, explain))
