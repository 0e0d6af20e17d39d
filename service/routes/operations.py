"""Operations: liveness, readiness, the model being served, Prometheus metrics, the upload page."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from service.dependencies import ClassifierDep, MetricsDep, ModelDep
from service.errors import ERRORS
from service.metrics import CONTENT_TYPE_LATEST
from service.schemas import GoldenInfo, Health, InputInfo, ModelInfo, Readiness, ScoreInfo

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()
NEEDS_MODEL = {"responses": {503: ERRORS[503]}, "tags": ["ops"]}
"""Decorator arguments of the operations routes that answer 503 until a model is loaded."""


@cache
def static_page(name: str) -> str:
    return (STATIC_DIR / name).read_text(encoding="utf-8")


@router.get("/healthz", response_model=Health, summary="The process is alive", tags=["ops"])
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, summary="A model is loaded and warmed up", **NEEDS_MODEL)
async def readyz(model: ModelDep) -> Readiness:
    return Readiness(status="ready", model=model.ref, detail=None)


@router.get("/model", response_model=ModelInfo, summary="The model being served (manifest subset)", **NEEDS_MODEL)
async def model_info(model: ModelDep, classifier: ClassifierDep) -> ModelInfo:
    manifest = model.manifest
    data = manifest.training_data
    return ModelInfo(
        name=manifest.name,
        version=manifest.version,
        method=manifest.method,
        class_names=manifest.class_names,
        input=InputInfo(**manifest.input.model_dump()),
        backbone=manifest.backbone.model_dump() if manifest.backbone else None,
        score=ScoreInfo(**manifest.score.model_dump(), description=manifest.score.description),
        threshold=model.threshold,
        threshold_source="override" if model.threshold_overridden else "manifest",
        manifest_threshold=manifest.threshold.value,
        threshold_rule=manifest.threshold.rule,
        calibrated=model.calibration is not None,
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
        golden=GoldenInfo(status=model.golden.status, detail=model.golden.detail, largest_gap=model.golden.worst),
        last_load_error=classifier.last_error,
    )


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    tags=["ops"],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, summary="Upload page", tags=["ui"])
async def index() -> HTMLResponse:
    return HTMLResponse(static_page("index.html"), headers={"Cache-Control": "no-cache"})
