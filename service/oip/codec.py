"""The Open Inference Protocol's wire format, both ways: a request body -> the one input tensor it carries
(photos or ready images), and answers -> the response (JSON, or with the binary tensor data extension).

Everything between (decode, scoring, metrics, capture) is the product's ``Pipeline``; this module only
translates, and every malformed request ends here as an ``OipError`` (the protocol's ``{"error"}``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from service.errors import quoted
from service.model import LoadedModel
from service.oip.types import (
    DATATYPES,
    HEADER_LENGTH,
    IMAGE_INPUT,
    LITTLE_ENDIAN,
    OUTPUTS,
    PHOTO_INPUT,
    InferRequest,
    ModelMetadata,
    OipError,
    RequestInput,
    TensorMetadata,
)
from service.schemas import Classification
from service.settings import Settings

# JSON envelope around a UINT8 batch: brackets, commas and up to three digits per value.
JSON_BYTES_PER_VALUE = 4


def model_metadata(model: LoadedModel) -> ModelMetadata:
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


class Tensor:
    """The request's one input: photos (a list of encoded images) or images (uint8 N x H x W x C)."""

    def __init__(self, name: str, payload: list[bytes] | np.ndarray):
        self.name, self.payload = name, payload


def body_limit(settings: Settings, model: LoadedModel) -> int:
    height, width, channels = model.input_shape
    as_json = settings.max_batch_items * height * width * channels * JSON_BYTES_PER_VALUE
    return max(settings.max_batch_bytes, as_json)


async def read_body(request: Request, limit: int) -> bytes:
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


def split_body(request: Request, body: bytes) -> tuple[InferRequest, bytes]:
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


def the_input(parsed: InferRequest, binary: bytes, settings: Settings, model: LoadedModel) -> Tensor:
    if len(parsed.inputs) != 1:
        raise OipError(400, f"send exactly one input, {PHOTO_INPUT!r} (BYTES) or {IMAGE_INPUT!r} (UINT8)")
    item = parsed.inputs[0]
    raw = _binary_part(item, binary)
    if any(dim < 0 for dim in item.shape):
        raise OipError(400, f"input {quoted(item.name)} has a negative dimension in shape {item.shape}")
    if item.name == PHOTO_INPUT:
        return Tensor(PHOTO_INPUT, _photos(item, raw, settings))
    if item.name == IMAGE_INPUT:
        return Tensor(IMAGE_INPUT, _images(item, raw, settings, model))
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


def requested_outputs(parsed: InferRequest) -> list[tuple[str, bool]]:
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


def _results(model: LoadedModel, answers: list[Classification]) -> dict[str, np.ndarray]:
    """The graph's outputs (back from the answers, which hold them exactly), plus verdict, class name and id
    (for POST /feedback) per item."""
    names = model.manifest.class_names
    return {
        "distances": np.asarray([[a.distances[name] for name in names] for a in answers], dtype=np.float32),
        "score": np.asarray([answer.score for answer in answers], dtype=np.float32),
        "nearest": np.asarray([_class_index(names, answer.nearest_class) for answer in answers], dtype=np.int64),
        "nearest_class": np.asarray([answer.nearest_class for answer in answers], dtype=object),
        "verdict": np.asarray([answer.verdict for answer in answers], dtype=object),
        "id": np.asarray([answer.id for answer in answers], dtype=object),
    }


def _class_index(names: list[str], nearest_class: str) -> int:
    """The graph's ``nearest`` output (an index the manifest does not name is answered as its number)."""
    return names.index(nearest_class) if nearest_class in names else int(nearest_class)


def capture_parameters(answers: list[Classification]) -> dict[str, str]:
    """The capture outcomes as the protocol's scalar parameters: ``capture_status`` (and, when any photo was
    dropped, ``capture_reason``), one comma-separated entry per item in input order."""
    outcomes = [answer.capture for answer in answers]
    parameters = {"capture_status": ",".join(outcome.status for outcome in outcomes)}
    if any(outcome.reason for outcome in outcomes):
        parameters["capture_reason"] = ",".join(outcome.reason or "" for outcome in outcomes)
    return parameters


def _encode(wanted: list[tuple[str, bool]], results: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Each wanted output as its JSON entry, and the binary blobs of those asked for as binary, in order."""
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
    return outputs, blobs


def respond(
    model: LoadedModel, parsed: InferRequest, wanted: list[tuple[str, bool]], answers: list[Classification]
) -> Response:
    """The inference response: the JSON header, then any binary outputs (Inference-Header-Content-Length)."""
    outputs, blobs = _encode(wanted, _results(model, answers))
    manifest = model.manifest
    answer: dict[str, Any] = {
        "model_name": manifest.name,
        "model_version": manifest.version,
        "parameters": {"threshold": model.threshold, **capture_parameters(answers)},
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
