"""The Open Inference Protocol's ``/v2`` routes (the protocol: ``service.oip``): health, metadata, infer.

``infer`` is read -> decode -> score -> capture -> metrics through the same ``Pipeline`` call that
``/classify`` makes; the codec translates the protocol's tensors to photos (or ready images) and the
answers back.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from service.capture.format import new_id
from service.classification import PhotoError, Pipeline
from service.dependencies import ClassifierDep, PipelineDep, RequestIdDep
from service.errors import ApiError, quoted
from service.imaging import ImageError
from service.middleware import VERDICT_KEY
from service.model import Classifier, LoadedModel
from service.oip import codec
from service.oip.types import (
    EXTENSIONS,
    PHOTO_INPUT,
    SERVER_NAME,
    InferRequest,
    InferResponse,
    Live,
    ModelMetadata,
    OipError,
    ProtocolErrorBody,
    Ready,
    ServerMetadata,
)
from service.uploads import Upload


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class OipRoute(APIRoute):
    """Routes whose errors take the protocol's shape instead of the product's ``{"error": {code, message}}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OipError as exc:
                return error_response(exc.status, exc.message)
            except (ImageError, ApiError) as exc:
                return error_response(exc.status, exc.message)

        return handle


def _error(description: str) -> dict[str, Any]:
    return {"model": ProtocolErrorBody, "description": description}


NOT_FOUND = {404: _error("no model of this name (or version)")}
NOT_READY = {503: _error("no model loaded")}
INFER_ERRORS = {
    400: _error("bad request: JSON, datatype, shape, data, or a photo that is not a decodable image"),
    413: _error("over a limit: request bytes, photo bytes, pixels, or batch items"),
    415: _error("an animated image"),
    **NOT_FOUND,
    **NOT_READY,
}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` substituted in place (for a hand-declared request body)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return walk(schema)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "an inference request; with the header Inference-Header-Content-Length, the JSON is "
        "followed by the binary tensor data",
        "content": {"application/json": {"schema": _inline_refs(InferRequest.model_json_schema())}},
    }
}

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=OipRoute)


# ---- the served model ----


def _ready_model(classifier: Classifier) -> LoadedModel:
    model = classifier.model
    if model is None:
        raise OipError(503, f"no model loaded: {classifier.last_error or 'loading'}")
    return model


def _named_model(classifier: Classifier, name: str, model_version: str | None) -> LoadedModel:
    model = _ready_model(classifier)
    manifest = model.manifest
    if name != manifest.name:
        raise OipError(404, f"unknown model {quoted(name)}; this server serves {manifest.name!r}")
    if model_version is not None and model_version != manifest.version:
        raise OipError(
            404, f"model {quoted(name)} has no version {quoted(model_version)}; it serves {manifest.version!r}"
        )
    return model


# ---- health and metadata ----


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    try:
        package_version = version("deepmad-bin")
    except PackageNotFoundError:
        package_version = "unknown"
    return ServerMetadata(name=SERVER_NAME, version=package_version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Live, summary="The server answers")
async def server_live() -> Live:
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, responses=NOT_READY, summary="A model is loaded and warmed up")
async def server_ready(classifier: ClassifierDep) -> Ready:
    _ready_model(classifier)
    return Ready(ready=True)


@router.get("/models/{name}/ready", response_model=Ready, responses={**NOT_FOUND, **NOT_READY})
async def model_ready(classifier: ClassifierDep, name: str) -> Ready:
    _named_model(classifier, name, None)
    return Ready(ready=True)


@router.get("/models/{name}/versions/{model_version}/ready", response_model=Ready, responses={**NOT_FOUND, **NOT_READY})
async def model_version_ready(classifier: ClassifierDep, name: str, model_version: str) -> Ready:
    _named_model(classifier, name, model_version)
    return Ready(ready=True)


@router.get("/models/{name}", response_model=ModelMetadata, responses={**NOT_FOUND, **NOT_READY})
async def model_metadata(classifier: ClassifierDep, name: str) -> ModelMetadata:
    return codec.model_metadata(_named_model(classifier, name, None))


@router.get(
    "/models/{name}/versions/{model_version}", response_model=ModelMetadata, responses={**NOT_FOUND, **NOT_READY}
)
async def model_version_metadata(classifier: ClassifierDep, name: str, model_version: str) -> ModelMetadata:
    return codec.model_metadata(_named_model(classifier, name, model_version))


# ---- inference ----


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    summary="Classify photos (BYTES) or ready model inputs (UINT8)",
)
async def infer(request: Request, name: str, pipeline: PipelineDep, request_id: RequestIdDep) -> Response:
    return await _infer(request, pipeline, request_id, name, None)


@router.post(
    "/models/{name}/versions/{model_version}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    summary="Classify with a named model version",
)
async def infer_version(
    request: Request, name: str, model_version: str, pipeline: PipelineDep, request_id: RequestIdDep
) -> Response:
    return await _infer(request, pipeline, request_id, name, model_version)


async def _infer(
    request: Request, pipeline: Pipeline, request_id: str, name: str, model_version: str | None
) -> Response:
    """Read and decode the protocol's tensor, then the Pipeline call ``/classify`` makes, then encode."""
    model, settings = _named_model(pipeline.classifier, name, model_version), pipeline.settings
    body = await codec.read_body(request, codec.body_limit(settings, model))
    parsed, binary = codec.split_body(request, body)
    tensor = codec.the_input(parsed, binary, settings, model)
    wanted = codec.requested_outputs(parsed)
    n = len(tensor.payload)
    ids = [request_id] if n == 1 else [new_id() for _ in range(n)]  # batch items: own ids, as /classify/batch
    if tensor.name == PHOTO_INPUT:
        uploads = [Upload(filename=None, content_type=None, data=photo) for photo in tensor.payload]
        try:
            answers = await pipeline.classify_photos(model, uploads, ids)
        except PhotoError as exc:
            raise OipError(exc.error.status, f"photo {exc.index}: {exc.error.message}") from None
    else:
        answers = await pipeline.classify_images(model, tensor.payload, ids)
    request.scope[VERDICT_KEY] = answers[0].verdict if n == 1 else "batch"
    return codec.respond(model, parsed, wanted, answers)
