"""Admin actions behind the admin token: ``POST /admin/reload``."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Depends, Request

from service.dependencies import ClassifierDep, ReloaderDep, SettingsDep
from service.errors import ADMIN_ERRORS, ApiError
from service.model import ModelLoadError
from service.reloading import describe
from service.schemas import ReloadResponse

router = APIRouter(tags=["admin"])


def bearer_or_header(request: Request, header: str) -> str:
    """The token from ``Authorization: Bearer <token>``, else from ``header``."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get(header, "")


def require_admin(request: Request, settings: SettingsDep) -> None:
    if not settings.admin_token:
        raise ApiError(403, "admin_disabled", "admin actions are disabled: set DEEPMAD_ADMIN_TOKEN")
    given = bearer_or_header(request, "x-admin-token")
    if not secrets.compare_digest(given.encode(), settings.admin_token.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses=ADMIN_ERRORS,
    summary="Load the model folder again (token: `Authorization: Bearer <token>` or `X-Admin-Token`)",
    dependencies=[Depends(require_admin)],
)
async def admin_reload(reloader: ReloaderDep, classifier: ClassifierDep) -> ReloadResponse:
    try:
        previous, model = await reloader.reload("http")
    except ModelLoadError as exc:
        raise ApiError(500, "reload_failed", f"{exc} (still serving {describe(classifier.model)})") from None
    return ReloadResponse(
        model=model.ref, previous=previous.ref if previous else None, model_sha256=model.manifest.model_sha256
    )
