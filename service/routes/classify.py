"""``POST /classify`` (one photo) and ``POST /classify/batch`` (several, per-item results and errors).

Both answer with ids (the request's, from ``RequestIdMiddleware``; batch items get their own); the
``Pipeline`` (the one data plane, shared with the Open Inference Protocol) offers each answered photo to
the capture writer, which decides and queues without waiting (in durable
capture mode the answer waits until the photo is on disk); each answer's ``capture`` says the outcome.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.dependencies import classify_context
from service.errors import ERRORS
from service.middleware import VERDICT_KEY
from service.routes.direct import DirectRoute
from service.schemas import BatchResponse, Classification
from service.uploads import batch_uploads, single_upload

router = APIRouter(tags=["classify"], route_class=DirectRoute)  # the endpoints take the request alone

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
ID_HEADER = {"X-Request-ID": {"description": "the request's id", "schema": {"type": "string"}}}
RESPONSES = {200: {"headers": ID_HEADER}, **ERRORS}


def documented(response_model: type, body: dict, summary: str) -> dict:
    """The OpenAPI parts of a classify route: its answer, the shared errors, the hand-declared body."""
    return {"response_model": response_model, "responses": RESPONSES, "openapi_extra": body, "summary": summary}


@router.post("/classify", **documented(Classification, SINGLE_BODY, "Classify one photo"))
async def classify(request: Request) -> Classification:
    context = await classify_context(request)
    upload = await single_upload(request, context.settings)
    result = await context.pipeline.classify(context.model, upload, context.request_id)
    request.scope[VERDICT_KEY] = result.verdict
    return result


BATCH_SUMMARY = "Classify several photos; per-item results and errors"


@router.post("/classify/batch", **documented(BatchResponse, BATCH_BODY, BATCH_SUMMARY))
async def classify_batch(request: Request) -> BatchResponse:
    context = await classify_context(request)
    items = await batch_uploads(request, context.settings)
    results = await context.pipeline.classify_batch(context.model, items)
    request.scope[VERDICT_KEY] = "batch"
    return BatchResponse(id=context.request_id, results=results, model=context.model.ref)
