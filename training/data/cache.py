"""Decoded arrays cached on disk, keyed by content, so a second run does not decode again.

The shared data folder is read-only, so the cache lives in DEEPMAD_CACHE_DIR (default
~/.cache/deepmad-bin). A key covers the file list with sizes and modification times, the target shape
and the image function's version; any change re-decodes.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.fileio import write_atomic

# Bump when service.imaging changes what it produces for the same file.
IMAGE_FUNCTION_VERSION = "1"


def cache_dir() -> Path:
    configured = os.environ.get("DEEPMAD_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "deepmad-bin"


def files_key(files: list[Path], *parts: object) -> str:
    digest = hashlib.sha256(IMAGE_FUNCTION_VERSION.encode())
    for part in parts:
        digest.update(repr(part).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def cached_array(key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``<cache>/<key>.npy`` or build it and store it atomically."""
    path = cache_dir() / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    array = build()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomic(path, buffer.getvalue())
    return array
