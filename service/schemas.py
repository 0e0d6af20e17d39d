"""Request/response bodies of the HTTP API (pydantic v2); the OpenAPI schema is generated from these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.capture.format import ID_PATTERN, Sidecar, Verdict
from service.categories import MAX_CLASSES, NAME_RULE, RESERVED

REQUEST_ID_DOC = (
    "request id (also the X-Request-ID header): a valid incoming X-Request-ID, else a new uuid4 hex; "
    "the id a bin controller reports back with POST /feedback"
)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. not_an_image, too_large")
    message: str = Field(description="human-readable explanation")


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


class ModelRef(BaseModel):
    name: str
    version: str


CaptureStatus = Literal["off", "skipped", "queued", "written", "dropped"]
DropReason = Literal["queue_full", "budget_full", "duplicate_id", "write_error", "error"]


def _is_none(value: object) -> bool:
    return value is None


class CaptureOutcome(BaseModel):
    """What became of this answer's photo, so a client need not read /metrics to know it was kept."""

    status: CaptureStatus = Field(
        description="off: capture not configured; skipped: the capture policy did not keep this photo; "
        "queued: handed to the background writer (DEEPMAD_CAPTURE_MODE=queued; a kill -9 can still lose it); "
        "written: on disk, fsynced (DEEPMAD_CAPTURE_MODE=durable); dropped: not kept, see reason"
    )
    # exclude_if: {"status": "off"} rather than {"status": "off", "id": null, "reason": null}
    id: str | None = Field(
        None, exclude_if=_is_none, description="the capture's id (the answer's id), when queued or written"
    )
    reason: DropReason | None = Field(
        None,
        exclude_if=_is_none,
        description="why it was dropped: queue_full (the writer is behind), budget_full (only labelled captures "
        "left in the byte budget), duplicate_id (this id was captured before), write_error (disk), error",
    )


CAPTURE_OFF = CaptureOutcome(status="off")


class Classification(BaseModel):
    id: str = Field(description=REQUEST_ID_DOC)
    verdict: Verdict = Field(
        description="no_item: the frame holds no item (empty chamber, covered lens, lights off, blinding light; "
        "image statistics before the graph, whatever the score); else anomalous iff score >= threshold"
    )
    score: float = Field(
        description="distance to the nearest class centre (score_rule min_distance), or that minus the distance to the "
        "nearest centre of labelled anomalies (min_distance_minus_anomaly_centres); higher = more anomalous"
    )
    score_rule: str = Field(description="how the model makes its score from distances (GET /model: score)")
    threshold: float = Field(description="gamma in use (the manifest's, or the configured override)")
    probability: float | None = Field(
        None, description="probability-like anomaly value from the manifest's calibration; null if none"
    )
    nearest_class: str = Field(description="class whose centre is nearest: where a normal item goes")
    distances: dict[str, float] = Field(description="distance to each normal class's centre")
    model: ModelRef
    capture: CaptureOutcome = Field(
        default_factory=lambda: CAPTURE_OFF, description="what became of the photo: kept for labelling or not"
    )


class BatchItem(BaseModel):
    id: str = Field(description="this item's own id (its capture's id; also in `result`)")
    index: int = Field(description="position of the file in the request")
    filename: str | None = None
    status: int = Field(description="HTTP status this item would have had on its own (200 or 4xx)")
    result: Classification | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    id: str = Field(description="the request's id (also the X-Request-ID header)")
    results: list[BatchItem]
    model: ModelRef


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model: ModelRef | None = None
    detail: str | None = Field(None, description="why not ready (the last load error)")


class InputInfo(BaseModel):
    height: int
    width: int
    channels: int


class GoldenInfo(BaseModel):
    status: Literal["verified", "absent"] = Field(
        description="verified: this CPU/provider reproduced the manifest's golden scores at load; absent: an "
        "older manifest without them (not checked). A mismatch is never served."
    )
    detail: str
    largest_gap: float | None = Field(None, description="largest |output here - golden output|")


class ScoreInfo(BaseModel):
    rule: str = Field(description="min_distance, or min_distance_minus_anomaly_centres")
    anomaly_centres: int = Field(description="centres of labelled anomalies inside the graph (0: none)")
    description: str


class ModelInfo(BaseModel):
    name: str
    version: str
    method: str
    class_names: list[str]
    input: InputInfo
    backbone: dict[str, Any] | None = Field(
        default=None,
        description="the pretrained network in the graph (name, weights sha256, tuned blocks, the fine-tuned "
        "weights' sha256); null: none",
    )
    score: ScoreInfo
    threshold: float = Field(description="gamma in use")
    threshold_source: Literal["manifest", "override"]
    manifest_threshold: float
    threshold_rule: str
    calibrated: bool = Field(description="whether responses carry a probability")
    hyperparameters: dict[str, Any]
    test_metrics: dict[str, Any]
    training_data: dict[str, Any] = Field(description="source, classes, counts and hash (no paths)")
    model_sha256: str
    created_at: str
    loaded_at: str
    providers: list[str]
    golden: GoldenInfo
    last_load_error: str | None = Field(
        None, description="why the last reload was refused (e.g. a golden-score mismatch); null after a good load"
    )


class ReloadResponse(BaseModel):
    status: Literal["reloaded"] = "reloaded"
    model: ModelRef
    previous: ModelRef | None = None
    model_sha256: str


class FeedbackRequest(BaseModel):
    id: str = Field(pattern=ID_PATTERN.pattern, description="the `id` of a /classify answer")
    label: str = Field(
        description="one of the model's class names, its anomaly label, or a pending new category "
        "(GET /captures/categories); any other label is a new category and needs `new_category: true`"
    )
    new_category: bool = Field(
        False,
        description="confirms that `label` is a category the model does not know yet (a typo never becomes a "
        f"class): it must be {NAME_RULE}, not one of {list(RESERVED)}, and leave at most {MAX_CLASSES} classes "
        "(the model's plus the pending ones); ignored for a label already known or pending",
    )


class CaptureList(BaseModel):
    total: int = Field(description="captures matching the filters")
    offset: int
    limit: int
    labels: list[str] = Field(description="valid labels: the model's class names, then its anomaly label")
    anomaly_labels: list[str] = Field(description="the label(s) meaning 'not a recyclable' (trash)")
    pending_categories: list[str] = Field(
        default_factory=list, description="new categories on labelled captures that the model does not know yet"
    )
    items: list[Sidecar]


class PendingCategory(BaseModel):
    name: str
    photos: int = Field(description="captures labelled with it (the export needs enough for training and audit)")


class Categories(BaseModel):
    """The classes a label may name, the new categories waiting for a retrain, and the rules for a new one."""

    classes: list[str] = Field(description="the model's class names (GET /model: class_names)")
    anomaly_labels: list[str]
    pending: list[PendingCategory] = Field(description="labels on captures that the model does not know yet")
    max_classes: int = Field(description="classes a model may serve: the model's plus the pending ones")
    name_rule: str
    name_pattern: str
    reserved: list[str] = Field(description="names a category may not take")
    min_train_photos: int = Field(description="photos of a new category the export needs in the training tree")
    min_audit_photos: int = Field(description="photos of a new category the export and the gate need in the audit")
