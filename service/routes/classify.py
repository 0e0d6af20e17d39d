"""``POST /classify`` (one photo) and ``POST /classify/batch`` (several, per-item results and errors)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.dependencies import ModelDep, PipelineDep, SettingsDep
from service.errors import ERRORS
from service.middleware import VERDICT_KEY
from service.schemas import BatchResponse, Classification
from service.uploads import batch_uploads, single_upload

router = APIRouter(tags=["classify"])

BINARY = {"type": "string", "format": "binary"}
SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image: multipart field `file`, or the raw bytes with an image/* content type",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {"file": BINARY}},
            },
            "image/jpeg": {"schema": BINARY},
            "image/png": {"schema": BINARY},
            "application/octet-stream": {"schema": BINARY},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "several images, each a multipart field `files` (or `file`)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": BINARY, "minItems": 1}},
                },
            },
        },
    }
}


@router.post(
    "/classify",
    response_model=Classification,
    responses=ERRORS,
    openapi_extra=SINGLE_BODY,
    summary="Classify one photo",
)
async def classify(request: Request, model: ModelDep, pipeline: PipelineDep, settings: SettingsDep) -> Classification:
    upload = await single_upload(request, settings)
    result = await pipeline.classify(model, upload)
    request.scope[VERDICT_KEY] = result.verdict
    return result


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Classify several photos; per-item results and errors",
)
async def classify_batch(
    request: Request, model: ModelDep, pipeline: PipelineDep, settings: SettingsDep
) -> BatchResponse:
    items = await batch_uploads(request, settings)
    results = await pipeline.classify_batch(model, items)
    request.scope[VERDICT_KEY] = "batch"
    return BatchResponse(results=results, model=model.ref)
