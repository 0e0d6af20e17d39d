"""Bearer tokens from request headers, compared in constant time (admin and operator routes)."""

from __future__ import annotations

import secrets

from fastapi import Request


def bearer_or_header(request: Request, header: str) -> str:
    """The token from ``Authorization: Bearer <token>``, else from ``header``; empty if neither."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get(header, "")


def same_token(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())
