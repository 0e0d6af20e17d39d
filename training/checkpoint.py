"""Resumable training state, written atomically after every epoch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from service.manifest import write_atomic
from training.errors import UserError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"--resume given but no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: tell the user which
        raise UserError(f"checkpoint {path} cannot be read ({exc}); delete it to start afresh") from None
