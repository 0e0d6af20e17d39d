"""Per-request Prometheus accounting as pure ASGI middleware (cheaper than BaseHTTPMiddleware)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.capture.format import new_id, valid_id
from service.metrics import Metrics

VERDICT_KEY = "deepmad.verdict"  # a route stores the verdict in the ASGI scope for the request counter
REQUEST_ID_KEY = "deepmad.request_id"
REQUEST_ID_HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Gives every request an id (a valid incoming X-Request-ID, else a new one) and echoes it back."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for key, value in scope["headers"] if key == REQUEST_ID_HEADER), b"")
        text = incoming.decode("latin-1")
        request_id = text if valid_id(text) else new_id()
        scope[REQUEST_ID_KEY] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Counts every HTTP request by route template, status and verdict, and times it."""

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
