"""Errors a user can fix: the CLIs print their message on one line and exit non-zero, without a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from service.fileio import check_writable_folder


class UserError(Exception):
    """Bad input from the user (unknown data set, missing data, bad class names, unusable device)."""


def require_writable(flag: str, folder: Path) -> None:
    """A UserError naming ``flag`` when nothing can be written in ``folder`` (checked before the work starts)."""
    try:
        check_writable_folder(folder)
    except OSError as exc:
        raise UserError(f"{flag} {folder} is not writable: {exc.strerror or exc}") from None


def run_command(body: Callable[[], int], interrupted: str) -> int:
    """A CLI's exit status: ``body()``'s, 2 with one ``error:`` line for a UserError, 130 with ``interrupted``
    for Ctrl-C or SIGTERM (what `docker stop` and schedulers send, so it stops like Ctrl-C)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def require_artifact(flag: str, folder: Path) -> None:
    """A UserError naming ``flag`` when ``folder`` holds no model.onnx + manifest.json (before any server starts)."""
    missing = [name for name in ("model.onnx", "manifest.json") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{flag} {folder} is not an artifact folder: no {' or '.join(missing)}")


def require_file(flag: str, path: Path) -> None:
    """A UserError naming ``flag`` when ``path`` is not a readable file."""
    if not path.is_file():
        raise UserError(f"{flag} {path} is not a file")
