"""The Open Inference Protocol v2 (KServe / Triton REST) beside the product's own API, on the same model.

Clients the model-serving world already has (tritonclient, KServe's InferenceRESTClient, curl) talk to
the classifier without knowing its JSON. Routes under ``/v2``:

* ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``;
* ``GET /v2/models/{name}[/versions/{version}]`` (model metadata) and ``.../ready``;
* ``POST /v2/models/{name}[/versions/{version}]/infer``.

The model's name and version are the manifest's (``trashnet``, ``1.3.0``). Inputs, exactly one per
request:

* ``photo``, ``BYTES`` [N] (or [N, 1]): encoded photos (JPEG, PNG, ...), decoded by the service's one
  image function with the upload limits (bytes, pixels). In the JSON body each element is the photo
  base64-encoded (JSON strings cannot hold raw bytes); with the binary extension, the raw bytes.
* ``image``, ``UINT8`` [N, H, W, C]: ready model inputs, as the ONNX graph takes them.

N is at most the ``max_batch_items`` setting. Outputs: ``distances`` FP32 [N, k] (one column per
class, in the manifest's order), ``score`` FP32 [N], ``nearest`` INT64 [N], ``nearest_class`` BYTES
[N], ``verdict`` BYTES [N] (``normal`` / ``anomalous``: score >= threshold) and ``id`` BYTES [N] (the
answer's id for ``POST /feedback``: the request's X-Request-ID for one item, a new id per item of a
batch, as ``/classify`` and ``/classify/batch``); the response's ``parameters.threshold`` is the
threshold in use. Photos are offered to the capture writer like ``/classify``'s uploads, and
``parameters.capture_status`` says what became of each (``capture_reason`` when one was dropped).

The binary tensor data extension is supported both ways (tritonclient uses it by default): the
request header ``Inference-Header-Content-Length`` gives the JSON's length, the tensors follow it in
input order, each sized by its ``parameters.binary_data_size`` (BYTES elements as a 4-byte
little-endian length + the bytes). Outputs come back binary when the request asks for it
(``parameters.binary_data_output`` or an output's ``parameters.binary_data``).

Errors are the protocol's ``{"error": "<message>"}``: 400 bad request (datatype, shape, data, corrupt
photo), 404 unknown model or version, 413 over a size limit, 503 no model loaded.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.capture import SKIPPED
from service.capture_format import new_id
from service.classification import Pipeline, to_classifications
from service.dependencies import CapturesDep, ClassifierDep, MetricsDep, PipelineDep, RequestIdDep, SettingsDep
from service.errors import ApiError, quoted
from service.imaging import ImageError
from service.metrics import Metrics
from service.middleware import VERDICT_KEY
from service.model import Classifier, LoadedModel, Scores
from service.schemas import Classification
from service.settings import Settings
from service.uploads import Upload

SERVER_NAME = "deepmad-bin"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
PHOTO_INPUT, IMAGE_INPUT = "photo", "image"
OUTPUTS = ("distances", "score", "nearest", "nearest_class", "verdict", "id")
# JSON envelope around a UINT8 batch: brackets, commas and up to three digits per value.
JSON_BYTES_PER_VALUE = 4


class OipError(Exception):
    """A request the protocol answers with ``{"error": message}`` and ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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


# ---- the protocol's JSON objects (pydantic v2; the OpenAPI schema comes from these) ----


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class RequestInput(Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = Field(None, description="row-major; omitted when the tensor travels as binary data")


class RequestOutput(Strict):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(Strict):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ProtocolErrorBody(BaseModel):
    error: str


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


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


def model_metadata_of(model: LoadedModel) -> ModelMetadata:
    manifest = model.manifest
    height, width, channels = model.input_shape
    k = len(manifest.class_names)
    return ModelMetadata(
        name=manifest.name,
        versions=[manifest.version],
        platform="onnxruntime_onnx",
        inputs=[
            TensorMetadata(name=PHOTO_INPUT, datatype="BYTES", shape=[-1]),
            TensorMetadata(name=IMAGE_INPUT, datatype="UINT8", shape=[-1, height, width, channels]),
        ],
        outputs=[
            TensorMetadata(name="distances", datatype="FP32", shape=[-1, k]),
            TensorMetadata(name="score", datatype="FP32", shape=[-1]),
            TensorMetadata(name="nearest", datatype="INT64", shape=[-1]),
            TensorMetadata(name="nearest_class", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="verdict", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="id", datatype="BYTES", shape=[-1]),
        ],
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses={**NOT_FOUND, **NOT_READY})
async def model_metadata(classifier: ClassifierDep, name: str) -> ModelMetadata:
    return model_metadata_of(_named_model(classifier, name, None))


@router.get(
    "/models/{name}/versions/{model_version}", response_model=ModelMetadata, responses={**NOT_FOUND, **NOT_READY}
)
async def model_version_metadata(classifier: ClassifierDep, name: str, model_version: str) -> ModelMetadata:
    return model_metadata_of(_named_model(classifier, name, model_version))


# ---- inference ----


class _Hooks:
    """What an inference request feeds besides its answer: metrics, the capture writer, the request's id."""

    def __init__(self, metrics: MetricsDep, captures: CapturesDep, request_id: RequestIdDep):
        self.metrics, self.captures, self.request_id = metrics, captures, request_id


Hooks = Annotated[_Hooks, Depends(_Hooks)]


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    summary="Classify photos (BYTES) or ready model inputs (UINT8)",
)
async def infer(request: Request, name: str, settings: SettingsDep, pipeline: PipelineDep, hooks: Hooks) -> Response:
    return await _infer(request, settings, pipeline, hooks, name, None)


@router.post(
    "/models/{name}/versions/{model_version}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    summary="Classify with a named model version",
)
async def infer_version(
    request: Request, name: str, model_version: str, settings: SettingsDep, pipeline: PipelineDep, hooks: Hooks
) -> Response:
    return await _infer(request, settings, pipeline, hooks, name, model_version)


async def _infer(
    request: Request, settings: Settings, pipeline: Pipeline, hooks: _Hooks, name: str, model_version: str | None
) -> Response:
    model = _named_model(pipeline.classifier, name, model_version)
    body = await _read_body(request, _body_limit(settings, model))
    parsed, binary = _split_body(request, body)
    tensor = _the_input(parsed, binary, settings, model)
    wanted = _requested_outputs(parsed)
    run = _score_photos if tensor.name == PHOTO_INPUT else _score_images
    scores = await anyio.to_thread.run_sync(run, pipeline, model, tensor.payload, limiter=pipeline.limiter)
    n = len(scores.score)
    ids = [hooks.request_id] if n == 1 else [new_id() for _ in range(n)]  # batch items: own ids, as /classify/batch
    answers = _answers(hooks.metrics, model, scores, ids)
    if tensor.name == PHOTO_INPUT and hooks.captures is not None:  # photos worth labelling, as /classify
        uploads = [Upload(filename=None, content_type=None, data=photo) for photo in tensor.payload]
        await hooks.captures.capture(model, list(zip(uploads, answers, strict=True)))
    elif hooks.captures is not None:  # ready tensors are not photos: nothing to label
        for answer in answers:
            answer.capture = SKIPPED
    results = _results(scores, answers)
    request.scope[VERDICT_KEY] = results["verdict"][0] if len(results["verdict"]) == 1 else "batch"
    return _respond(model, parsed, wanted, results, capture_parameters(answers))


def capture_parameters(answers: list[Classification]) -> dict[str, str]:
    """The capture outcomes as the protocol's scalar parameters: ``capture_status`` (and, when any photo was
    dropped, ``capture_reason``), one comma-separated entry per item in input order."""
    outcomes = [answer.capture for answer in answers]
    parameters = {"capture_status": ",".join(outcome.status for outcome in outcomes)}
    if any(outcome.reason for outcome in outcomes):
        parameters["capture_reason"] = ",".join(outcome.reason or "" for outcome in outcomes)
    return parameters


class _Tensor:
    """The request's one input: photos (a list of encoded images) or images (uint8 N x H x W x C)."""

    def __init__(self, name: str, payload: list[bytes] | np.ndarray):
        self.name, self.payload = name, payload


def _body_limit(settings: Settings, model: LoadedModel) -> int:
    height, width, channels = model.input_shape
    as_json = settings.max_batch_items * height * width * channels * JSON_BYTES_PER_VALUE
    return max(settings.max_batch_bytes, as_json)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OipError(413, f"the request is {declared} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise OipError(413, f"the request is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _split_body(request: Request, body: bytes) -> tuple[InferRequest, bytes]:
    """The JSON header (all of the body without the binary extension) and the binary tensor data."""
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise OipError(
                400, f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        return InferRequest.model_validate_json(json_part), binary
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()
        )
        raise OipError(400, f"not an inference request: {problems}") from None


def _the_input(parsed: InferRequest, binary: bytes, settings: Settings, model: LoadedModel) -> _Tensor:
    if len(parsed.inputs) != 1:
        raise OipError(400, f"send exactly one input, {PHOTO_INPUT!r} (BYTES) or {IMAGE_INPUT!r} (UINT8)")
    item = parsed.inputs[0]
    raw = _binary_part(item, binary)
    if any(dim < 0 for dim in item.shape):
        raise OipError(400, f"input {quoted(item.name)} has a negative dimension in shape {item.shape}")
    if item.name == PHOTO_INPUT:
        return _Tensor(PHOTO_INPUT, _photos(item, raw, settings))
    if item.name == IMAGE_INPUT:
        return _Tensor(IMAGE_INPUT, _images(item, raw, settings, model))
    raise OipError(
        400, f"unknown input {quoted(item.name)}; this model takes {PHOTO_INPUT!r} (BYTES) or {IMAGE_INPUT!r} (UINT8)"
    )


def _binary_part(item: RequestInput, binary: bytes) -> bytes | None:
    size = item.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise OipError(400, f"the body carries {len(binary)} bytes of binary data that no input claims")
        if item.data is None:
            raise OipError(400, f"input {quoted(item.name)} has neither `data` nor parameters.binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise OipError(
            400, f"input {quoted(item.name)}: binary_data_size {size!r}, but {len(binary)} bytes follow the JSON"
        )
    return binary


def _batch_size(item: RequestInput, settings: Settings) -> int:
    if not item.shape or item.shape[0] < 1:
        raise OipError(400, f"input {quoted(item.name)} needs a batch dimension of at least 1, got shape {item.shape}")
    if item.shape[0] > settings.max_batch_items:
        raise OipError(413, f"{item.shape[0]} items in one request; the limit is {settings.max_batch_items}")
    return item.shape[0]


def _photos(item: RequestInput, raw: bytes | None, settings: Settings) -> list[bytes]:
    if item.datatype != "BYTES":
        raise OipError(400, f"input {PHOTO_INPUT!r} is BYTES (encoded photos), not {item.datatype}")
    n = _batch_size(item, settings)
    if any(dim != 1 for dim in item.shape[1:]):
        raise OipError(400, f"input {PHOTO_INPUT!r} has shape [N] or [N, 1], got {item.shape}")
    photos = _length_prefixed(raw) if raw is not None else [_base64(value, i) for i, value in enumerate(_flat(item))]
    if len(photos) != n:
        raise OipError(400, f"input {PHOTO_INPUT!r} has shape {item.shape} but {len(photos)} elements")
    for index, photo in enumerate(photos):
        if len(photo) > settings.max_upload_bytes:
            raise OipError(413, f"photo {index} is {len(photo)} bytes; the limit is {settings.max_upload_bytes}")
    return photos


def _length_prefixed(raw: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise OipError(400, "BYTES binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise OipError(400, "BYTES binary data ends inside an element")
        out.append(raw[offset : offset + length])
        offset += length
    return out


def _base64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise OipError(400, f"photo {index}: in JSON, a BYTES element is a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise OipError(400, f"photo {index} is not valid base64") from None


def _flat(item: RequestInput) -> list[Any]:
    """``data`` flattened: the protocol allows it flat or nested to the tensor's shape."""
    out: list[Any] = []
    stack = [iter(item.data or [])]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _images(item: RequestInput, raw: bytes | None, settings: Settings, model: LoadedModel) -> np.ndarray:
    if item.datatype != "UINT8":
        raise OipError(400, f"input {IMAGE_INPUT!r} is UINT8, not {item.datatype}")
    expected = list(model.input_shape)
    n = _batch_size(item, settings)
    if list(item.shape[1:]) != expected:
        raise OipError(400, f"input {IMAGE_INPUT!r} has shape [N, {', '.join(map(str, expected))}], got {item.shape}")
    count = math.prod(item.shape)
    if raw is not None:
        if len(raw) != count:
            raise OipError(400, f"input {IMAGE_INPUT!r} of shape {item.shape} needs {count} bytes, got {len(raw)}")
        values = np.frombuffer(raw, dtype=np.uint8)
    else:
        flat = _flat(item)
        if len(flat) != count:
            raise OipError(400, f"input {IMAGE_INPUT!r} of shape {item.shape} needs {count} values, got {len(flat)}")
        if not all(type(v) is int and 0 <= v <= 255 for v in flat):
            raise OipError(400, f"input {IMAGE_INPUT!r}: UINT8 values are integers 0..255")
        values = np.asarray(flat, dtype=np.uint8)
    return values.reshape(n, *expected)


def _requested_outputs(parsed: InferRequest) -> list[tuple[str, bool]]:
    """(output name, as binary) in the order asked, or every output."""
    default_binary = parsed.parameters.get("binary_data_output") is True
    if parsed.outputs is None:
        return [(name, default_binary) for name in OUTPUTS]
    wanted = []
    for output in parsed.outputs:
        if output.name not in OUTPUTS:
            raise OipError(400, f"unknown output {quoted(output.name)}; this model has {list(OUTPUTS)}")
        if "classification" in output.parameters:
            raise OipError(400, "the classification extension is not supported; ask for `nearest_class`")
        wanted.append((output.name, output.parameters.get("binary_data", default_binary) is True))
    return wanted


def _score_photos(pipeline: Pipeline, model: LoadedModel, photos: list[bytes]) -> Scores:
    """Each photo through the service's image function (pixel limit, decode timing), then one ORT call."""
    arrays = []
    for index, photo in enumerate(photos):
        try:
            arrays.append(pipeline.decode(model, photo))
        except ImageError as exc:
            raise OipError(exc.status, f"photo {index}: {exc.message}") from None
    return _score_images(pipeline, model, np.stack(arrays))


def _score_images(pipeline: Pipeline, model: LoadedModel, images: np.ndarray) -> Scores:
    return pipeline.classifier.score(model, images)


def _answers(metrics: Metrics, model: LoadedModel, scores: Scores, ids: list[str]) -> list[Classification]:
    """The product's answers (one verdict rule; a non-finite score is a 500), each counted in the metrics."""
    answers = to_classifications(model, scores, ids)
    for answer in answers:
        metrics.observe_result(answer.verdict, answer.nearest_class, answer.score, answer.threshold)
    return answers


def _results(scores: Scores, answers: list[Classification]) -> dict[str, np.ndarray]:
    """The graph's outputs as they came, plus verdict, class name and id (for POST /feedback) per item."""
    return {
        "distances": np.asarray(scores.distances, dtype=np.float32),
        "score": np.asarray(scores.score, dtype=np.float32),
        "nearest": np.asarray(scores.nearest, dtype=np.int64),
        "nearest_class": np.asarray([answer.nearest_class for answer in answers], dtype=object),
        "verdict": np.asarray([answer.verdict for answer in answers], dtype=object),
        "id": np.asarray([answer.id for answer in answers], dtype=object),
    }


DATATYPES = {
    "distances": "FP32",
    "score": "FP32",
    "nearest": "INT64",
    "nearest_class": "BYTES",
    "verdict": "BYTES",
    "id": "BYTES",
}
LITTLE_ENDIAN = {"FP32": "<f4", "INT64": "<i8"}


def _respond(
    model: LoadedModel,
    parsed: InferRequest,
    wanted: list[tuple[str, bool]],
    results: dict[str, np.ndarray],
    parameters: dict[str, str],
) -> Response:
    outputs, blobs = [], []
    for name, as_binary in wanted:
        values, datatype = results[name], DATATYPES[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if as_binary:
            if datatype == "BYTES":
                blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in values.ravel().tolist())
            else:
                blob = values.astype(LITTLE_ENDIAN[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.ravel().tolist()
        outputs.append(entry)
    manifest = model.manifest
    answer: dict[str, Any] = {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "parameters": {"threshold": model.threshold, **parameters},
        "outputs": outputs,
    }
    if parsed.id is not None:
        answer["id"] = parsed.id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
