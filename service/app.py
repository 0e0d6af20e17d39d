"""The HTTP API: ``create_app(settings)`` builds a FastAPI app serving one exported model.

Routes are thin: read the body (size-limited), hand decode + inference to a worker thread (never the
event loop), shape the JSON. Every error is ``{"error": {"code", "message"}}`` with a 4xx for bad
input, 503 without a model; see ``ERRORS`` for the codes each route documents in OpenAPI.

Example:
    >>> from fastapi.testclient import TestClient
    >>> from service.app import create_app
    >>> with TestClient(create_app()) as client:  # doctest: +SKIP
    ...     client.post("/classify", files={"file": open("can.jpg", "rb")}).json()["verdict"]
    'normal'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import oip, schemas
from service.imaging import ImageError, load_image
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.model import Classifier, LoadedModel, ModelLoadError, Scores
from service.settings import Settings

log = logging.getLogger("service")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # boundary lines and part headers around a file
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
VERDICT_KEY = "deepmad.verdict"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _doc(description: str) -> dict[str, Any]:
    return {"model": schemas.ErrorBody, "description": description}


ERRORS = {
    400: _doc("not an image, empty, truncated or corrupt (codes: empty_body, not_an_image, truncated_image)"),
    413: _doc("bytes or pixels over the limit (codes: too_large, too_many_pixels, too_many_files)"),
    415: _doc("unsupported content type or image kind (codes: unsupported_media_type, animated_image)"),
    422: _doc("malformed form: missing field `file`, or not a file (codes: missing_field, invalid_form)"),
    503: _doc("no model loaded (code: not_ready)"),
}
ADMIN_ERRORS = {
    401: _doc("missing or wrong admin token (code: unauthorized)"),
    403: _doc("admin actions are disabled: no admin token configured (code: admin_disabled)"),
    500: _doc("the model folder could not be loaded; the previous model keeps serving (code: reload_failed)"),
}
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


class MetricsMiddleware:
    """Counts every HTTP request by route template, status and verdict, and times it (pure ASGI: cheap)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            verdict = scope.get(VERDICT_KEY, "none")
            self.metrics.requests.labels(endpoint, str(status), verdict).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, *, handle_sighup: bool = False) -> FastAPI:
    """Build the app. The model loads in the lifespan (use ``with TestClient(app)`` in tests)."""
    settings = settings or Settings()
    metrics = Metrics(drift_window=settings.drift_window)
    classifier = Classifier(settings, observer=metrics.observe_inference)
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    background: set[asyncio.Task[None]] = set()
    limiter_box: list[anyio.CapacityLimiter] = []

    def limiter() -> anyio.CapacityLimiter:
        if not limiter_box:
            limiter_box.append(anyio.CapacityLimiter(settings.decode_concurrency))
        return limiter_box[0]

    async def reload(trigger: str) -> tuple[LoadedModel | None, LoadedModel]:
        previous = classifier.model
        try:
            model = await anyio.to_thread.run_sync(classifier.load)
        except ModelLoadError as exc:
            metrics.reload_failures.labels(trigger).inc()
            serving = f"{previous.manifest.name} {previous.manifest.version}" if previous else "no model"
            log.error("reload (%s) failed, still serving %s: %s", trigger, serving, exc)
            raise
        metrics.reloads.labels(trigger).inc()
        metrics.set_model(model)
        log.info("reload (%s): now serving %s %s", trigger, model.manifest.name, model.manifest.version)
        return previous, model

    async def reload_quietly(trigger: str) -> None:
        with contextlib.suppress(ModelLoadError):  # logged and counted in reload()
            await reload(trigger)

    def on_sighup() -> None:
        task = asyncio.get_running_loop().create_task(reload_quietly("sighup"))
        background.add(task)
        task.add_done_callback(background.discard)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limiter()
        try:
            model = await anyio.to_thread.run_sync(classifier.load)
            metrics.set_model(model)
        except ModelLoadError as exc:
            if settings.require_model:
                log.error("cannot start: %s", exc)
                raise
            log.warning("starting without a model (503 until a reload succeeds): %s", exc)
            metrics.set_model(None)
        loop = asyncio.get_running_loop()
        if handle_sighup:
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            log.info("SIGHUP reloads the model from %s", settings.model_dir)
        try:
            yield
        finally:
            if handle_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await anyio.to_thread.run_sync(classifier.close)

    app = FastAPI(
        title="DeepMAD recycling-bin classifier",
        version="1.0.0",
        description=(
            "POST a photo of an item; get `normal` (recyclable, with the class to route it to) or "
            "`anomalous` (trash). Scores are DeepMAD distances: higher = more anomalous."
        ),
        lifespan=lifespan,
    )
    app.state.settings, app.state.classifier, app.state.metrics = settings, classifier, metrics
    app.state.limiter = limiter  # shared with the Open Inference Protocol routes (service/oip.py)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ---- errors: one JSON shape everywhere ----
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            str(exc.detail),
            getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")

    # ---- helpers ----
    def current_model() -> LoadedModel:
        model = classifier.model
        if model is None:
            raise ApiError(503, "not_ready", f"no model loaded: {classifier.last_error or 'loading'}")
        return model

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"the body is {declared} bytes; the limit is {limit}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, "too_large", f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_form(request: Request, body: bytes, max_files: int) -> list[tuple[str, str | UploadFile]]:
        async def once() -> AsyncIterator[bytes]:
            yield body

        parser = MultiPartParser(Headers(scope=request.scope), once(), max_files=max_files, max_fields=100)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(422, "invalid_form", f"malformed multipart body: {exc.message}") from None
        return list(form.multi_items())

    async def upload_bytes(upload: UploadFile) -> tuple[str | None, bytes]:
        content_type = (upload.content_type or "").split(";")[0].strip().lower()
        if content_type and not content_type.startswith(RAW_IMAGE_TYPES):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"part {upload.filename!r} has content type {content_type!r}; send an image/*",
            )
        data = await upload.read()
        await upload.close()
        if len(data) > settings.max_upload_bytes:
            raise ApiError(
                413, "too_large", f"the image is {len(data)} bytes; the limit is {settings.max_upload_bytes}"
            )
        return upload.filename, data

    def decode(model: LoadedModel, data: bytes) -> np.ndarray:
        height, width, channels = model.input_shape
        start = time.perf_counter()
        array = load_image(data, height, width, channels, settings.max_pixels)
        metrics.decode_seconds.observe(time.perf_counter() - start)
        return array

    def score(model: LoadedModel, batch: np.ndarray) -> list[dict[str, Any]]:
        return shape(model, classifier.score(model, batch))

    def shape(model: LoadedModel, scores: Scores) -> list[dict[str, Any]]:
        manifest = model.manifest
        names = manifest.class_names
        ref = {"name": manifest.name, "version": manifest.version}
        results = []
        for row, value, nearest in zip(
            scores.distances.tolist(), scores.score.tolist(), scores.nearest.tolist(), strict=True
        ):
            if not math.isfinite(value):
                raise ApiError(500, "non_finite_score", "the model produced a non-finite score")
            verdict = "anomalous" if value >= model.threshold else "normal"
            nearest_class = names[nearest] if 0 <= nearest < len(names) else str(nearest)
            calibration = manifest.calibration
            results.append(
                {
                    "verdict": verdict,
                    "score": value,
                    "threshold": model.threshold,
                    "probability": calibration.probability(value) if calibration else None,
                    "nearest_class": nearest_class,
                    "distances": dict(zip(names, row, strict=True)),
                    "model": ref,
                }
            )
            metrics.observe_result(verdict, nearest_class, value, model.threshold)
        return results

    def classify_one(model: LoadedModel, data: bytes) -> dict[str, Any]:
        return score(model, decode(model, data)[None])[0]

    def classify_many(model: LoadedModel, items: list[tuple[str | None, bytes | ApiError]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        arrays, positions = [], []
        for index, (filename, data) in enumerate(items):
            entry: dict[str, Any] = {
                "index": index,
                "filename": filename,
                "status": 200,
                "result": None,
                "error": None,
            }
            out.append(entry)
            if isinstance(data, ApiError):
                entry.update(status=data.status, error={"code": data.code, "message": data.message})
                continue
            try:
                arrays.append(decode(model, data))
                positions.append(index)
            except ImageError as exc:
                entry.update(status=exc.status, error={"code": exc.code, "message": exc.message})
        if arrays:
            for index, result in zip(positions, score(model, np.stack(arrays)), strict=True):
                out[index]["result"] = result
        return out

    # ---- routes ----
    @app.post(
        "/classify",
        response_model=schemas.Classification,
        responses=ERRORS,
        openapi_extra=SINGLE_BODY,
        summary="Classify one photo",
        tags=["classify"],
    )
    async def classify(request: Request) -> Response:
        model = current_model()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            body = await read_body(request, settings.max_upload_bytes + MULTIPART_OVERHEAD)
            fields = await parse_form(request, body, max_files=1)
            uploads = [value for key, value in fields if key == "file"]
            if not uploads:
                raise ApiError(422, "missing_field", "the multipart body has no field named `file`")
            if not isinstance(uploads[0], UploadFile):
                raise ApiError(422, "invalid_form", "the field `file` must be a file upload, not text")
            _, data = await upload_bytes(uploads[0])
        elif content_type.startswith(RAW_IMAGE_TYPES):
            data = await read_body(request, settings.max_upload_bytes)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {content_type or 'none'!r}: send multipart/form-data with a `file` "
                "field, or the raw image with an image/* content type",
            )
        if classifier.batcher is None:
            result = await anyio.to_thread.run_sync(classify_one, model, data, limiter=limiter())
        else:  # decode in a worker thread; wait for the micro-batch on the event loop, holding no thread
            array = await anyio.to_thread.run_sync(decode, model, data, limiter=limiter())
            result = shape(model, await classifier.score_async(model, array[None]))[0]
        request.scope[VERDICT_KEY] = result["verdict"]
        return JSONResponse(result)

    @app.post(
        "/classify/batch",
        response_model=schemas.BatchResponse,
        responses=ERRORS,
        openapi_extra=BATCH_BODY,
        summary="Classify several photos; per-item results and errors",
        tags=["classify"],
    )
    async def classify_batch(request: Request) -> Response:
        model = current_model()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {content_type or 'none'!r}: send multipart/form-data with `files` fields",
            )
        body = await read_body(request, settings.max_batch_bytes)
        fields = await parse_form(request, body, max_files=settings.max_batch_items + 1)
        uploads = [value for key, value in fields if key in ("files", "file")]
        if not uploads:
            raise ApiError(422, "missing_field", "the multipart body has no `files` (or `file`) fields")
        if len(uploads) > settings.max_batch_items:
            raise ApiError(413, "too_many_files", f"at most {settings.max_batch_items} files per batch")
        files = [upload for upload in uploads if isinstance(upload, UploadFile)]
        if len(files) != len(uploads):
            raise ApiError(422, "invalid_form", "every `files` field must be a file upload, not text")
        items: list[tuple[str | None, bytes | ApiError]] = []
        for upload in files:
            try:
                items.append(await upload_bytes(upload))
            except ApiError as exc:
                items.append((upload.filename, exc))
        results = await anyio.to_thread.run_sync(classify_many, model, items, limiter=limiter())
        request.scope[VERDICT_KEY] = "batch"
        manifest = model.manifest
        return JSONResponse({"results": results, "model": {"name": manifest.name, "version": manifest.version}})

    @app.get("/healthz", response_model=schemas.Health, summary="The process is alive", tags=["ops"])
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=schemas.Readiness,
        responses={503: ERRORS[503]},
        summary="A model is loaded and warmed up",
        tags=["ops"],
    )
    async def readyz() -> Response:
        model = current_model()
        return JSONResponse(
            {
                "status": "ready",
                "model": {"name": model.manifest.name, "version": model.manifest.version},
                "detail": None,
            }
        )

    @app.get(
        "/model",
        response_model=schemas.ModelInfo,
        responses={503: ERRORS[503]},
        summary="The model being served (manifest subset)",
        tags=["ops"],
    )
    async def model_info() -> schemas.ModelInfo:
        model = current_model()
        manifest = model.manifest
        data = manifest.training_data
        return schemas.ModelInfo(
            name=manifest.name,
            version=manifest.version,
            method=manifest.method,
            class_names=manifest.class_names,
            input=schemas.InputInfo(**manifest.input.model_dump()),
            threshold=model.threshold,
            threshold_source="override" if model.threshold_overridden else "manifest",
            manifest_threshold=manifest.threshold.value,
            threshold_rule=manifest.threshold.rule,
            calibrated=manifest.calibration is not None,
            hyperparameters=manifest.hyperparameters,
            test_metrics=manifest.test_metrics.model_dump(mode="json"),
            training_data={
                "source": data.source,
                "normal_classes": data.normal_classes,
                "anomaly_classes": data.anomaly_classes,
                "counts": data.counts,
                "sha256": data.sha256,
            },
            model_sha256=manifest.model_sha256,
            created_at=manifest.created_at,
            loaded_at=model.loaded_at,
            providers=list(model.providers),
        )

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        tags=["ops"],
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, summary="Upload page", tags=["ui"])
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"Cache-Control": "no-cache"})

    @app.post(
        "/admin/reload",
        response_model=schemas.ReloadResponse,
        responses=ADMIN_ERRORS,
        summary="Load the model folder again (token: `Authorization: Bearer <token>` or `X-Admin-Token`)",
        tags=["admin"],
    )
    async def admin_reload(request: Request) -> Response:
        if not settings.admin_token:
            raise ApiError(403, "admin_disabled", "admin actions are disabled: set DEEPMAD_ADMIN_TOKEN")
        given = request.headers.get("x-admin-token", "")
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not secrets.compare_digest(given.encode(), settings.admin_token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})
        try:
            previous, model = await reload("http")
        except ModelLoadError as exc:
            serving = classifier.model
            still = f"{serving.manifest.name} {serving.manifest.version}" if serving else "no model"
            raise ApiError(500, "reload_failed", f"{exc} (still serving {still})") from None
        return JSONResponse(
            {
                "status": "reloaded",
                "model": {"name": model.manifest.name, "version": model.manifest.version},
                "previous": {"name": previous.manifest.name, "version": previous.manifest.version}
                if previous
                else None,
                "model_sha256": model.manifest.model_sha256,
            }
        )

    app.include_router(oip.router)
    return app
