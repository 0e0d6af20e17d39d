"""Operator routes behind the operator token: label captures, list them, fetch their photos; the review page.

Auth: ``Authorization: Bearer <DEEPMAD_OPERATOR_TOKEN>`` (separate from the admin token). The read-only
GET routes also accept the cookie ``deepmad_operator_token`` so that the review page's ``<img>`` tags
load photos: the page sets it with ``Path=/captures; SameSite=Strict`` (never sent cross-site, never
sent to other routes) after asking for the token once; POST /feedback takes the header only, so a
cookie can never label anything. Without a capture folder these routes answer 403 ``capture_disabled``,
without an operator token 403 ``operator_disabled`` (as admin routes do without an admin token).
"""

from __future__ import annotations

import threading
from typing import Annotated
from urllib.parse import unquote

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from service.auth import basic_password, bearer_or_header, same_token
from service.capture.format import CONTENT_TYPES, Sidecar, Verdict
from service.capture.store import CaptureNotFoundError, Order
from service.capture.writer import CaptureWriter
from service.categories import (
    MAX_CLASSES,
    MIN_AUDIT_PHOTOS,
    MIN_TRAIN_PHOTOS,
    NAME_PATTERN,
    NAME_RULE,
    RESERVED,
    CategoryError,
    check_label,
    pending_categories,
)
from service.dependencies import CapturesDep, ClassifierDep, ModelDep, SettingsDep
from service.errors import ApiError, error_doc, quoted
from service.labels import anomaly_labels, valid_labels
from service.manifest import Manifest
from service.routes.operations import static_page
from service.schemas import CaptureList, Categories, FeedbackRequest, PendingCategory

router = APIRouter(tags=["captures"])

OPERATOR_COOKIE = "deepmad_operator_token"
OPERATOR_ERRORS = {
    401: error_doc("missing or wrong operator token (code: unauthorized)"),
    403: error_doc(
        "disabled: no capture folder (code: capture_disabled) or no operator token configured (code: operator_disabled)"
    ),
}


def check_operator(
    request: Request, settings: SettingsDep, captures: CapturesDep, allow_cookie: bool, allow_basic: bool = False
) -> CaptureWriter:
    """The capture writer if the request carries the operator token: in a header, else (``allow_cookie``) the
    review page's cookie, else (``allow_basic``) as HTTP Basic auth's password (Label Studio's ML backend auth)."""
    if captures is None:
        raise ApiError(403, "capture_disabled", "capture is off: set DEEPMAD_CAPTURE_DIR (or --capture-dir)")
    if not settings.operator_token:
        raise ApiError(403, "operator_disabled", "operator actions are disabled: set DEEPMAD_OPERATOR_TOKEN")
    given = bearer_or_header(request, "x-operator-token")
    if not given and allow_cookie:
        given = unquote(request.cookies.get(OPERATOR_COOKIE, ""))
    if not given and allow_basic:
        given = basic_password(request)
    if not same_token(given, settings.operator_token):
        raise ApiError(401, "unauthorized", "missing or wrong operator token", headers={"WWW-Authenticate": "Bearer"})
    return captures


def operator(request: Request, settings: SettingsDep, captures: CapturesDep) -> CaptureWriter:
    """The capture writer, for a request carrying the operator token in a header."""
    return check_operator(request, settings, captures, allow_cookie=False)


def operator_reader(request: Request, settings: SettingsDep, captures: CapturesDep) -> CaptureWriter:
    """The capture writer, for a read-only request with the token in a header or the review page's cookie."""
    return check_operator(request, settings, captures, allow_cookie=True)


Operator = Annotated[CaptureWriter, Depends(operator)]
OperatorReader = Annotated[CaptureWriter, Depends(operator_reader)]


@router.post(
    "/feedback",
    response_model=Sidecar,
    responses={
        400: error_doc("the body is not JSON (code: invalid_body)"),
        **OPERATOR_ERRORS,
        404: error_doc("no capture has this id (code: unknown_id)"),
        409: error_doc(f"a new category beyond {MAX_CLASSES} classes (code: too_many_categories)"),
        422: error_doc(
            "a label outside the model's labels and the pending categories without `new_category: true` (code: "
            "invalid_label; the message names the known labels), a new category that breaks the name rule "
            "(code: invalid_category), or a malformed body"
        ),
    },
    summary="Label a captured photo (relabelling overwrites), or add a new category; 200 once the label is on disk",
)
async def feedback(body: FeedbackRequest, captures: Operator, model: ModelDep) -> Sidecar:
    return (await record_labels(captures, model.manifest, [body], "feedback"))[0]


CATEGORY_STATUS = {"too_many_categories": 409}  # else 422
_labelling = threading.Lock()  # one check-then-write at a time: two new categories cannot both pass the limit


async def record_labels(
    captures: CaptureWriter, manifest: Manifest, requests: list[FeedbackRequest], source: str
) -> list[Sidecar]:
    """The service's one label writer (POST /feedback, the Label Studio webhook): every request is checked
    (a label the model knows, a pending category or a confirmed new one under the rules of
    ``service.categories``; a capture that exists) before any is written, so a bad one leaves nothing
    written; returns once every sidecar is on disk."""

    def write() -> list[Sidecar]:
        with _labelling:
            known = set(valid_labels(manifest))  # the store's label count is read only for another label
            unknown = any(request.label not in known for request in requests)
            pending = pending_categories(manifest, captures.store.label_counts()) if unknown else []
            for request in requests:
                try:
                    check = check_label(manifest, pending, request.label, request.new_category)
                except CategoryError as exc:
                    raise ApiError(CATEGORY_STATUS.get(exc.code, 422), exc.code, exc.message) from None
                if check.kind == "new":
                    pending.append(check.label)
            missing = [request.id for request in requests if request.id not in captures.store]
            if missing:
                raise ApiError(404, "unknown_id", f"no capture with id {missing[0]!r} (not captured, or evicted)")
            return [captures.store.label(request.id, request.label, source) for request in requests]

    try:
        return await anyio.to_thread.run_sync(write)
    except CaptureNotFoundError as exc:  # evicted between the check and the write
        raise ApiError(404, "unknown_id", f"no capture with id {exc.args[0]!r} (evicted meanwhile)") from None


@router.get(
    "/captures/categories",
    response_model=Categories,
    responses=OPERATOR_ERRORS,
    summary="The classes a label may name, the new categories waiting for a retrain, and the rules for one",
)
async def categories(captures: OperatorReader, model: ModelDep) -> Categories:
    counts = await anyio.to_thread.run_sync(captures.store.label_counts)
    manifest = model.manifest
    return Categories(
        classes=manifest.class_names,
        anomaly_labels=anomaly_labels(manifest),
        pending=[PendingCategory(name=name, photos=counts[name]) for name in pending_categories(manifest, counts)],
        max_classes=MAX_CLASSES,
        name_rule=NAME_RULE,
        name_pattern=NAME_PATTERN.pattern,
        reserved=list(RESERVED),
        min_train_photos=MIN_TRAIN_PHOTOS,
        min_audit_photos=MIN_AUDIT_PHOTOS,
    )


@router.get(
    "/captures",
    response_model=CaptureList,
    responses=OPERATOR_ERRORS,
    summary="List captures: filters, `order=uncertain` (closest to the threshold first), paging",
)
async def list_captures(
    captures: OperatorReader,
    classifier: ClassifierDep,
    labelled: bool | None = None,
    verdict: Verdict | None = None,
    order: Order = "newest",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> CaptureList:
    total, items = await anyio.to_thread.run_sync(
        lambda: captures.store.list(labelled=labelled, verdict=verdict, order=order, limit=limit, offset=offset)
    )
    model = classifier.model
    counts = await anyio.to_thread.run_sync(captures.store.label_counts) if model else {}
    return CaptureList(
        total=total,
        offset=offset,
        limit=limit,
        labels=valid_labels(model.manifest) if model else [],
        anomaly_labels=anomaly_labels(model.manifest) if model else [],
        pending_categories=pending_categories(model.manifest, counts) if model else [],
        items=items,
    )


@router.get(
    "/captures/{capture_id}/image",
    response_class=Response,
    responses={
        **OPERATOR_ERRORS,
        200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
        404: error_doc("no capture has this id (code: unknown_id)"),
    },
    summary="The captured photo, as uploaded",
)
async def capture_image(capture_id: str, captures: OperatorReader) -> Response:
    try:
        path = captures.store.image_path(capture_id)
        data = await anyio.Path(path).read_bytes()  # whole, so an eviction mid-response cannot cut it short
    except (CaptureNotFoundError, FileNotFoundError):
        raise ApiError(404, "unknown_id", f"no capture with id {quoted(capture_id)}") from None
    media_type = CONTENT_TYPES.get(path.suffix.lstrip("."), "application/octet-stream")
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/review", response_class=HTMLResponse, summary="Review page: label captures", tags=["ui"])
async def review() -> HTMLResponse:
    return HTMLResponse(static_page("review.html"), headers={"Cache-Control": "no-cache"})
