"""Label Studio's ML backend protocol under ``/label-studio``: the bin's model pre-annotates, labels flow back.

A Label Studio project connects to ``http://<bin>:8000/label-studio`` (Settings > Model, or POST /api/ml)
and calls the documented routes: ``GET /health``, ``POST /setup`` (the project's labelling config is
checked against the served model's labels), ``POST /predict`` (each task is mapped to its capture and
the stored photo is scored by the served model: the choice is the nearest class for a ``normal`` verdict,
the anomaly label otherwise, exactly what the bin would do with the item) and ``POST /webhook`` (the
hook Label Studio makes for an ML backend: ``ANNOTATION_CREATED``, ``ANNOTATIONS_CREATED`` and
``ANNOTATION_UPDATED`` become labels on the captures through ``record_labels``, the writer behind POST
/feedback, so the same rules hold for both). ``GET /config`` is the labelling config for the served model.

Auth is the operator token, as for /feedback: Label Studio sends it as the password of HTTP Basic auth
(the connection's ``auth_method: BASIC_AUTH``, any user name) to the protocol routes and as a header of
the webhook (``Authorization: Bearer``), which the operator adds to the webhook that Label Studio made.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service.capture.store import CaptureNotFoundError
from service.capture.writer import CaptureWriter
from service.classification import PhotoError
from service.dependencies import CapturesDep, ModelDep, PipelineDep, SettingsDep
from service.errors import ApiError, error_doc, quoted
from service.label_studio import (
    LS_CHOICES,
    LS_IMAGE,
    LabelStudioError,
    annotation_choice,
    choice_result,
    config_choices,
    labeling_config,
    task_capture_id,
)
from service.labels import anomaly_labels, valid_labels
from service.model import LoadedModel
from service.routes.captures import OPERATOR_ERRORS, check_operator, record_labels
from service.schemas import Classification, FeedbackRequest

log = logging.getLogger("service.label_studio")

router = APIRouter(prefix="/label-studio", tags=["label-studio"])
NOT_JSON = {400: error_doc("the body is not JSON (code: invalid_body)")}

LABEL_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
PREDICT_BATCH = 32  # photos read and scored at once: Label Studio may ask for every task of a project in one call


def backend_operator(request: Request, settings: SettingsDep, captures: CapturesDep) -> CaptureWriter:
    """The capture writer, for Label Studio carrying the operator token (Basic auth's password, or a header)."""
    return check_operator(request, settings, captures, allow_cookie=False, allow_basic=True)


BackendOperator = Annotated[CaptureWriter, Depends(backend_operator)]


class SetupRequest(BaseModel):
    """What Label Studio sends when a project connects (``MLApi.setup``); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)

    project: str = Field(description="Label Studio's project uid: `<id>.<created timestamp>`")
    label_config: str = Field(alias="schema", description="the project's labelling config (XML)")


class Task(BaseModel):
    """A Label Studio task: the fields the bin reads (``data.capture_id`` or ``data.image``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Annotation(BaseModel):
    """An annotation as Label Studio's webhook sends it: the fields the bin reads."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: int | None = None
    task: int | None = Field(None, description="the id of its task")
    result: list[dict[str, Any]] = Field(default_factory=list)
    was_cancelled: bool = False


class Project(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    label_config: str | None = None


class PredictRequest(BaseModel):
    """What Label Studio sends for pre-annotations (``MLApi.make_predictions``): the tasks; its project and
    labelling config are not needed (``/setup`` checked the config)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    tasks: list[Task]


class WebhookRequest(BaseModel):
    """A Label Studio webhook delivery (``send_payload``): the action and the objects it is about."""

    model_config = ConfigDict(extra="ignore", strict=True)

    action: str = Field(description=f"{', '.join(LABEL_ACTIONS)} write labels; any other is acknowledged")
    annotation: Annotation | list[Annotation] | None = None
    task: Task | list[Task] | None = None
    project: Project | None = Field(None, description="the project, with its `label_config`")


class LabelledTask(BaseModel):
    task: int | None
    capture_id: str
    label: str


class WebhookResponse(BaseModel):
    action: str
    labelled: list[LabelledTask] = Field(description="labels written on captures (on disk before this answer)")
    not_labelled: int = Field(description="annotations without a label choice: skipped, or another control")


def model_version(model: LoadedModel) -> str:
    """The version Label Studio files predictions under: a promoted model gets fresh pre-annotations."""
    return f"{model.ref.name} {model.ref.version}"


def predicted_label(model: LoadedModel, result: Classification) -> str:
    """What the bin does with the item: route it to its nearest class, or reject it as the anomaly label."""
    return result.nearest_class if result.verdict == "normal" else anomaly_labels(model.manifest)[0]


@router.get("/health", responses=OPERATOR_ERRORS, summary="Label Studio's health check of the ML backend")
async def health(captures: BackendOperator, model: ModelDep) -> dict[str, str]:
    return {"status": "UP", "model_version": model_version(model)}


@router.post(
    "/setup",
    responses={
        **NOT_JSON,
        **OPERATOR_ERRORS,
        422: error_doc("the labelling config lacks a model's label (code: label_config)"),
    },
    summary="A project connects: its labelling config must offer every label of the served model",
)
async def setup(body: SetupRequest, captures: BackendOperator, model: ModelDep) -> dict[str, str]:
    try:
        choices = config_choices(body.label_config)
    except LabelStudioError as exc:
        raise ApiError(422, "label_config", f"project {body.project}: {exc}; use GET /label-studio/config") from None
    missing = [label for label in valid_labels(model.manifest) if label not in choices]
    if missing:
        raise ApiError(
            422,
            "label_config",
            f"project {body.project}: the labelling config has no choice for {missing} of the served model; "
            "use GET /label-studio/config",
        )
    return {"model_version": model_version(model)}


@router.post(
    "/predict",
    responses={**NOT_JSON, **OPERATOR_ERRORS},
    summary="Pre-annotations: each task's capture scored by the served model (no prediction for a task "
    "whose capture is gone)",
)
async def predict(
    body: PredictRequest, captures: BackendOperator, model: ModelDep, pipeline: PipelineDep
) -> dict[str, Any]:
    version = model_version(model)
    results: list[list[dict[str, Any]]] = [[] for _ in body.tasks]
    for start in range(0, len(body.tasks), PREDICT_BATCH):
        found = await anyio.to_thread.run_sync(_stored_photos, captures, body.tasks[start : start + PREDICT_BATCH])
        batch = [(start + offset, capture_id, photo) for offset, (capture_id, photo) in enumerate(found) if photo]
        while batch:
            try:
                answers = await pipeline.rescore(model, [photo for _, _, photo in batch], [c for _, c, _ in batch])
            except PhotoError as exc:  # one damaged capture: no prediction for it, the rest still get theirs
                log.warning("label-studio: capture %s does not decode (%s): no prediction", batch[exc.index][1], exc)
                del batch[exc.index]
                continue
            for (index, _, _), answer in zip(batch, answers, strict=True):
                results[index] = [
                    {
                        "model_version": version,
                        "score": round(abs(answer.score - answer.threshold), 6),
                        "result": choice_result(predicted_label(model, answer)),
                    }
                ]
            break
    return {"results": results, "model_version": version}


def _stored_photos(captures: CaptureWriter, tasks: list[Task]) -> list[tuple[str, bytes | None]]:
    """(capture id, photo bytes or None) per task: None where the task names no capture the store holds."""
    found = []
    for task in tasks:
        capture_id = task_capture_id(task.model_dump()) or ""
        try:
            found.append((capture_id, captures.store.image_path(capture_id).read_bytes()))
        except (CaptureNotFoundError, FileNotFoundError):
            log.warning("label-studio: task %s names no stored capture (%r): no prediction", task.id, capture_id)
            found.append((capture_id, None))
    return found


@router.post(
    "/webhook",
    response_model=WebhookResponse,
    responses={
        **NOT_JSON,
        **OPERATOR_ERRORS,
        404: error_doc("a task's capture is not in the capture folder (code: unknown_task)"),
        422: error_doc(
            "no task in the delivery (missing_task), a task naming no capture (unknown_task), an annotation "
            "that cannot be read (invalid_annotation), or a label the model refuses (invalid_label)"
        ),
    },
    summary="Label Studio's webhook: new or changed annotations become labels on their captures",
)
async def webhook(body: WebhookRequest, captures: BackendOperator, model: ModelDep) -> WebhookResponse:
    if body.action not in LABEL_ACTIONS:
        return WebhookResponse(action=body.action, labelled=[], not_labelled=0)
    try:
        pairs = _annotated_tasks(body)
        configured = _configured_choices(body)
        requests, labelled, skipped = [], [], 0
        for annotation, task in pairs:
            label = annotation_choice(annotation.model_dump())
            if label is None:
                skipped += 1
                continue
            capture_id = task_capture_id(task.model_dump())
            if capture_id is None:
                raise ApiError(
                    422,
                    "unknown_task",
                    f"task {task.id} names no capture: no data.capture_id and no data.{LS_IMAGE} file name",
                )
            if capture_id not in captures.store:
                raise ApiError(
                    404,
                    "unknown_task",
                    f"task {task.id}: capture {quoted(capture_id)} is not in the capture folder (not captured, "
                    "or evicted)",
                )
            requests.append(FeedbackRequest(id=capture_id, label=label, new_category=label in configured))
            labelled.append(LabelledTask(task=task.id, capture_id=capture_id, label=label))
        await record_labels(captures, model.manifest, requests, "label-studio")
    except LabelStudioError as exc:
        raise _refused(body.action, ApiError(422, "invalid_annotation", str(exc))) from None
    except ApiError as exc:
        raise _refused(body.action, exc) from None
    return WebhookResponse(action=body.action, labelled=labelled, not_labelled=skipped)


def _refused(action: str, error: ApiError) -> ApiError:
    """Label Studio does not look at a webhook's answer: the service's log says why nothing was written."""
    log.warning("label-studio webhook %s refused, nothing written: %s (%s)", action, error.message, error.code)
    return error


def _configured_choices(body: WebhookRequest) -> list[str]:
    """The choices of the project's labelling config, as the delivery carries it. A label the model does
    not know counts as a confirmed new category when it is one of them: someone added it to the project's
    labelling config on purpose (the confirmation POST /feedback takes as ``new_category: true``)."""
    config = body.project.label_config if body.project is not None else None
    return config_choices(config) if config is not None else []


def _annotated_tasks(body: WebhookRequest) -> list[tuple[Annotation, Task]]:
    """(annotation, its task) pairs of a delivery: one annotation and its task, or lists matched by task id."""
    if body.task is None or body.task == []:
        raise ApiError(
            422,
            "missing_task",
            f"the {body.action} delivery carries no task (the webhook must send its payload: send_payload true)",
        )
    if body.annotation is None:
        raise ApiError(422, "invalid_annotation", f"the {body.action} delivery carries no annotation")
    annotations = body.annotation if isinstance(body.annotation, list) else [body.annotation]
    tasks = body.task if isinstance(body.task, list) else [body.task]
    by_id = {task.id: task for task in tasks}
    pairs = []
    for annotation in annotations:
        task = by_id.get(annotation.task) if len(tasks) > 1 else tasks[0]
        if task is None or annotation.task not in (None, task.id):
            raise ApiError(
                422,
                "missing_task",
                f"annotation {annotation.id} is about task {annotation.task}, which the delivery does not carry",
            )
        pairs.append((annotation, task))
    return pairs


@router.get(
    "/config",
    response_class=Response,
    responses={**OPERATOR_ERRORS, 200: {"content": {"application/xml": {"schema": {"type": "string"}}}}},
    summary=f"The labelling config for the served model: one image ({LS_IMAGE}), one choice ({LS_CHOICES}) per label",
)
async def config(captures: BackendOperator, model: ModelDep) -> Response:
    return Response(labeling_config(valid_labels(model.manifest)), media_type="application/xml")
