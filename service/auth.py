"""Bearer tokens from request headers, compared in constant time (admin and operator routes)."""

from __future__ import annotations

import base64
import binascii
import secrets

from fastapi import Request


def bearer_or_header(request: Request, header: str) -> str:
    """The token from ``Authorization: Bearer <token>``, else from ``header``; empty if neither."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get(header, "")


def basic_password(request: Request) -> str:
    """The password of ``Authorization: Basic`` (the user name is not checked); empty if none or malformed."""
    auth = request.headers.get("authorization", "")
    if auth[:6].lower() != "basic ":
        return ""
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def same_token(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())
