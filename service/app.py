"""The HTTP API: ``create_app(settings)`` builds a FastAPI app serving one exported model.

The app is assembled here from parts that each hold one concern: routers (``service.routes``), the
classification pipeline (``service.classification``), uploads, errors, metrics middleware and the
reloader. Shared objects live on ``app.state`` and reach routes through ``service.dependencies``.
Routes are thin: read the body (size-limited), hand decode + inference to a worker thread (never the
event loop), return a typed result. Every error is ``{"error": {"code", "message"}}``.

Example:
    >>> from fastapi.testclient import TestClient
    >>> from service.app import create_app
    >>> with TestClient(create_app()) as client:  # doctest: +SKIP
    ...     client.post("/classify", files={"file": open("can.jpg", "rb")}).json()["verdict"]
    'normal'
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from service.capture.writer import CaptureWriter
from service.classification import Pipeline
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import MetricsMiddleware, RequestIdMiddleware
from service.model import Classifier, GoldenMismatchError, LoadedModel, ModelLoadError
from service.oip import routes as oip
from service.reloading import Reloader
from service.routes import admin, captures, classify, label_studio, operations
from service.settings import Settings

log = logging.getLogger("service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load and warm the model and open the capture folder before the first request; SIGHUP reloads;
    at the end stop the micro-batcher and write the queued captures."""
    state = app.state
    settings: Settings = state.settings
    state.pipeline.start()
    try:
        if state.preloaded is not None:
            model = state.classifier.adopt(state.preloaded)
        else:
            model = await anyio.to_thread.run_sync(state.classifier.load)
        state.metrics.set_model(model)
    except ModelLoadError as exc:
        if isinstance(exc, GoldenMismatchError):
            state.metrics.golden_mismatches.labels("startup").inc()
        if settings.require_model:
            log.error("cannot start: %s", exc)
            raise
        log.warning("starting without a model (503 until a reload succeeds): %s", exc)
        state.metrics.set_model(None)
    if state.captures is not None:
        await anyio.to_thread.run_sync(state.captures.start)
        log.info("capturing photos into %s", settings.capture_dir)
    loop = asyncio.get_running_loop()
    if state.handle_sighup:
        loop.add_signal_handler(signal.SIGHUP, state.reloader.on_sighup)
        log.info("SIGHUP reloads the model from %s", settings.model_dir)
    try:
        yield
    finally:
        if state.handle_sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        await anyio.to_thread.run_sync(state.classifier.close)
        await anyio.to_thread.run_sync(state.pipeline.close)
        if state.captures is not None:
            await anyio.to_thread.run_sync(state.captures.close)


def create_app(
    settings: Settings | None = None, *, handle_sighup: bool = False, preloaded: LoadedModel | None = None
) -> FastAPI:
    """Build the app. The model loads in the lifespan (use ``with TestClient(app)`` in tests), unless
    ``preloaded`` (``python -m service`` loads it first, so a refused model is one line and exit 2)."""
    settings = settings or Settings()
    metrics = Metrics(drift_window=settings.drift_window)
    classifier = Classifier(settings, observer=metrics.observe_inference)
    app = FastAPI(
        title="DeepMAD recycling-bin classifier",
        version="1.0.0",
        description=(
            "POST a photo of an item; get `normal` (recyclable, with the class to route it to) or "
            "`anomalous` (trash). Scores are DeepMAD distances: higher = more anomalous."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.classifier = classifier
    app.state.captures = CaptureWriter(settings, metrics, settings.capture_dir) if settings.capture_dir else None
    app.state.pipeline = Pipeline(settings, classifier, metrics, app.state.captures)
    app.state.reloader = Reloader(classifier, metrics)
    app.state.handle_sighup = handle_sighup
    app.state.preloaded = preloaded
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 404 carries an X-Request-ID
    install_error_handlers(app)
    for module in (classify, operations, admin, captures, label_studio, oip):
        app.include_router(module.router)
    return app
