"""The Open Inference Protocol's JSON objects (pydantic v2; the OpenAPI schema comes from these) and names."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SERVER_NAME = "deepmad-bin"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
PHOTO_INPUT, IMAGE_INPUT = "photo", "image"
OUTPUTS = ("distances", "score", "nearest", "nearest_class", "verdict", "id")
DATATYPES = {
    "distances": "FP32",
    "score": "FP32",
    "nearest": "INT64",
    "nearest_class": "BYTES",
    "verdict": "BYTES",
    "id": "BYTES",
}
LITTLE_ENDIAN = {"FP32": "<f4", "INT64": "<i8"}


class OipError(Exception):
    """A request the protocol answers with ``{"error": message}`` and ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


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
