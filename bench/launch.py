"""The service's app as an ASGI factory, so bench.serve can run it under other servers and worker counts.

``python -m service`` runs one uvicorn process with its automatic choices (httptools + uvloop when
installed). The levers of ``bench.serve`` start the same app, built from the same ``DEEPMAD_*``
settings, under ``uvicorn --factory bench.launch:app`` (``--http h11 --loop asyncio``, ``--workers 2``),
``granian --interface asgi --factory bench.launch:app`` and ``hypercorn 'bench.launch:app()'``.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings


def app() -> FastAPI:
    """A fresh app per worker process, configured from the environment like ``python -m service``."""
    return create_app(Settings())
