"""One error shape for the whole API: ``{"error": {"code", "message"}}``, and the OpenAPI docs of it.

``ApiError`` is raised by routes and dependencies; ``install_error_handlers`` maps it, the image
function's ``ImageError``, FastAPI's validation errors and Starlette's 404/405 to that shape, and turns
anything unexpected into a logged 500 without a traceback in the body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import schemas
from service.imaging import ImageError

log = logging.getLogger("service")


class ApiError(Exception):
    """A failed request: HTTP status, stable machine-readable code, human-readable message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    @property
    def detail(self) -> schemas.ErrorDetail:
        return schemas.ErrorDetail(code=self.code, message=self.message)


QUOTE_LIMIT = 40


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of what a client sent, cut to a short prefix: an error body never echoes a huge field back."""
    text = str(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def error_doc(description: str) -> dict[str, Any]:
    return {"model": schemas.ErrorBody, "description": description}


ERRORS = {
    400: error_doc("not an image, empty, truncated or corrupt (codes: empty_body, not_an_image, truncated_image)"),
    413: error_doc("bytes or pixels over the limit (codes: too_large, too_many_pixels, too_many_files)"),
    415: error_doc("unsupported content type or image kind (codes: unsupported_media_type, animated_image)"),
    422: error_doc("malformed form: missing field `file`, or not a file (codes: missing_field, invalid_form)"),
    503: error_doc("no model loaded (code: not_ready)"),
}
ADMIN_ERRORS = {
    401: error_doc("missing or wrong admin token (code: unauthorized)"),
    403: error_doc("admin actions are disabled: no admin token configured (code: admin_disabled)"),
    500: error_doc("the model folder could not be loaded; the previous model keeps serving (code: reload_failed)"),
}


def install_error_handlers(app: FastAPI) -> None:
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
        codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
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
