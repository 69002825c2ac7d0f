"""``POST /explain``: the heatmap drawn over the image as the model saw it, or the same as JSON."""

from __future__ import annotations

import re
import string
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Header, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from app.api.deps import ApiKeyGuard, OneFile, ServiceDep
from app.api.errors import IMAGE_ERRORS, SERVICE_ERRORS, error_responses
from app.api.schemas import Prediction
from app.core.coded_error import CodedError
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


PNG, JSON = "image/png", "application/json"
_VARY = {"Vary": "Accept"}  # the representation depends on it (RFC 9110 12.5.5)


class NotAcceptableError(CodedError):
    code = "not_acceptable"
    default_message = "the Accept header refuses both image/png and application/json; /explain answers one of them"


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """``(range, q)`` of each well-formed media range in an Accept header, in order; a bad q drops its range."""
    ranges = []
    for element in accept.lower().split(","):
        media, *parameters = (part.strip() for part in element.split(";"))
        if media.count("/") != 1:
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":  # RFC 9110 12.4.2: 0 to 1 with at most three decimals
                valid = re.fullmatch(r"0(\.\d{0,3})?|1(\.0{0,3})?", value.strip())
                q = float(value) if valid else -1.0
                break  # what follows q are accept-ext parameters
        if q >= 0:
            ranges.append((media, q))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, float]]) -> tuple[float, int, int]:
    """``(q, specificity, -position)`` of the most specific range that matches ``media_type`` (RFC 9110 12.5.1)."""
    kind = media_type.split("/")[0]
    best = (0.0, -1, 0)
    for position, (media, q) in enumerate(ranges):
        specificity = {media_type: 2, f"{kind}/*": 1, "*/*": 0}.get(media, -1)
        if specificity > best[1]:
            best = (q, specificity, -position)
    return best


def negotiate(accept: str | None) -> str:
    """The representation of /explain for this Accept header: the PNG or the JSON.

    The one with the higher q wins; on equal q the one the client names more specifically (``application/json``
    over ``*/*``), then the one it lists first; the PNG when nothing tells them apart. No Accept header, or
    none that parses, means the PNG. Both refused (q=0, or not covered by any range) is 406 ``not_acceptable``
    (RFC 9110 15.5.7), rather than a representation the client said it cannot use.
    """
    ranges = _media_ranges(accept or "")
    if not ranges:
        return PNG
    png, json = _quality(PNG, ranges), _quality(JSON, ranges)
    if max(png[0], json[0]) == 0:
        raise NotAcceptableError()
    return JSON if json > png else PNG


@router.post(
    "/explain",
    summary="Show where the score came from",
    response_model=Prediction,
    response_model_exclude_unset=True,
    dependencies=[OneFile],
    responses={
        200: _PNG_DOC,
        **error_responses(*IMAGE_ERRORS, "explain_unsupported", "multiple_files", "not_acceptable", *SERVICE_ERRORS),
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
    `/predict?explain=true` instead (q-values count; an Accept that refuses both is 406 `not_acceptable`)."""
    representation = negotiate(accept)  # before the decode: a 406 costs nothing
    data = await file.read()
    if representation == JSON:
        prediction = await service.predict(data, explain=True)
        return JSONResponse(prediction.model_dump(mode="json", exclude_unset=True), headers=_VARY)
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
        **_VARY,
    }
    if prediction.input_guard is not None:  # absent with CXR_INPUT_GUARD=off, as input_guard is null in JSON
        guard = prediction.input_guard
        headers["X-Input-Guard-Score"] = repr(guard.score)
        headers["X-Input-Guard-Threshold"] = repr(guard.threshold)
        headers["X-Input-Guard-Passed"] = "true" if guard.passed else "false"
    if prediction.warning is not None:
        headers["X-Warning"] = quote(prediction.warning, safe=_HEADER_SAFE)
    return Response(explanation.png, media_type="image/png", headers=headers)
