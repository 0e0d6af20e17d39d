"""FastAPI dependencies: what a route needs, taken from ``app.state`` (set once by ``create_app``).

They are ``async def`` because they only read attributes: FastAPI runs a plain ``def`` dependency in
its thread pool, which costs a thread hand-off per dependency and request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.capture.writer import CaptureWriter
from service.classification import Pipeline
from service.errors import ApiError
from service.metrics import Metrics
from service.middleware import REQUEST_ID_KEY
from service.model import Classifier, LoadedModel
from service.reloading import Reloader
from service.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_classifier(request: Request) -> Classifier:
    return request.app.state.classifier


async def get_pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline


async def get_reloader(request: Request) -> Reloader:
    return request.app.state.reloader


async def get_captures(request: Request) -> CaptureWriter | None:
    """The capture writer, or None when no capture folder is configured (capture off)."""
    return request.app.state.captures


async def request_id(request: Request) -> str:
    """This request's id (``RequestIdMiddleware``: a valid incoming X-Request-ID, else a new one)."""
    return request.scope[REQUEST_ID_KEY]


async def current_model(classifier: Annotated[Classifier, Depends(get_classifier)]) -> LoadedModel:
    """The model this request is served by (a reload mid-request does not change it), or 503."""
    model = classifier.model
    if model is None:
        raise ApiError(503, "not_ready", f"no model loaded: {classifier.last_error or 'loading'}")
    return model


@dataclass(frozen=True)
class ClassifyContext:
    """What ``/classify`` and ``/classify/batch`` need, read straight from ``app.state`` by their endpoints
    (``service.routes.direct``: FastAPI's per-request dependency solving is what those routes skip)."""

    model: LoadedModel
    pipeline: Pipeline
    settings: Settings
    request_id: str


async def classify_context(request: Request) -> ClassifyContext:
    state = request.app.state
    model = await current_model(state.classifier)
    return ClassifyContext(model, state.pipeline, state.settings, await request_id(request))


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ReloaderDep = Annotated[Reloader, Depends(get_reloader)]
ModelDep = Annotated[LoadedModel, Depends(current_model)]
CapturesDep = Annotated[CaptureWriter | None, Depends(get_captures)]
RequestIdDep = Annotated[str, Depends(request_id)]
