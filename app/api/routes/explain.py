"""``POST /explain``: the heatmap drawn over the image as the model saw it, or the same as JSON."""

from __future__ import annotations

import string
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Header, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from app.api.deps import ApiKeyGuard, ServiceDep
from app.api.errors import error_responses
from app.api.routes.predict import IMAGE_ERRORS, SERVICE_ERRORS
from app.api.schemas import Prediction
from app.core.overlay import DEFAULT_OPACITY

router = APIRouter(tags=["prediction"], dependencies=[ApiKeyGuard])

# The prediction travels in headers next to the PNG; CORS exposes them (app/api/factory.py).
PREDICTION_HEADERS = (
    "X-Label",
    "X-Pneumonia-Probability",
    "X-Threshold",
    "X-Model-Name",
    "X-Model-Version",
    "X-Model-Sha256",
    "X-Heatmap-Scale",
    "X-Input-Guard-Score",
    "X-Input-Guard-Threshold",
    "X-Input-Guard-Passed",
    "X-Warning",
)
_HEADER_SAFE = "".join(sorted(set(string.printable) - set(string.whitespace) - {"%"}))
_PNG_DOC: dict[str, Any] = {
    "description": "PNG overlay, or for `Accept: application/json` the prediction with its `heatmap`.",
    "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    "headers": {name: {"schema": {"type": "string"}} for name in PREDICTION_HEADERS},
}


def wants_json(accept: str | None) -> bool:
    """JSON when the client lists ``application/json`` and not ``image/png``; the PNG otherwise (also for ``*/*``)."""
    types = {part.split(";")[0].strip().lower() for part in (accept or "").split(",")}
    return "application/json" in types and "image/png" not in types


@router.post(
    "/explain",
    summary="Show where the score came from",
    response_model=Prediction,
    response_model_exclude_unset=True,
    responses={
        200: _PNG_DOC,
        **error_responses(*IMAGE_ERRORS, "explain_unsupported", *SERVICE_ERRORS),
    },
)
async def explain(
    service: ServiceDep,
    file: Annotated[
        UploadFile, File(description="An image, as for /predict; not empty.", json_schema_extra={"minLength": 1})
    ],
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="Heatmap opacity at its strongest cell.")] = (
        DEFAULT_OPACITY
    ),
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The input as the model saw it (squashed to its square input, stretched back to the upload's aspect ratio,
    at most 512 px on the long side) with the class activation map blended over it: red cells pushed the score
    towards PNEUMONIA, blue towards NORMAL, full colour at the map's largest |value| (`X-Heatmap-Scale`).
    The prediction is in the `X-*` headers. `Accept: application/json` returns the JSON of
    `/predict?explain=true` instead."""
    data = await file.read()
    if wants_json(accept):
        prediction = await service.predict(data, explain=True)
        return JSONResponse(prediction.model_dump(mode="json", exclude_unset=True))
    explanation = await service.explain(data, opacity)
    prediction = explanation.prediction
    headers = {
        "X-Label": prediction.label,
        "X-Pneumonia-Probability": repr(prediction.pneumonia_probability),
        "X-Threshold": repr(prediction.threshold),
        # model.json is free text: percent-encode anything a header cannot carry.
        "X-Model-Name": quote(prediction.model.name, safe=_HEADER_SAFE),
        "X-Model-Version": quote(prediction.model.version, safe=_HEADER_SAFE),
        "X-Model-Sha256": prediction.model.sha256,
        "X-Heatmap-Scale": repr(explanation.scale),
        "Cache-Control": "no-store",
    }
    if prediction.input_guard is not None:  # absent with CXR_INPUT_GUARD=off, as input_guard is null in JSON
        guard = prediction.input_guard
        headers["X-Input-Guard-Score"] = repr(guard.score)
        headers["X-Input-Guard-Threshold"] = repr(guard.threshold)
        headers["X-Input-Guard-Passed"] = "true" if guard.passed else "false"
    if prediction.warning is not None:
        headers["X-Warning"] = quote(prediction.warning, safe=_HEADER_SAFE)
    return Response(explanation.png, media_type="image/png", headers=headers)
