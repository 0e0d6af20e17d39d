"""Numbered model versions behind one folder path the service reads, swapped atomically.

``models/trashnet`` (the service's ``--model-dir``) becomes a symlink to ``models/trashnet.versions/NNNN``.
A version is copied into a hidden temporary sibling, fsynced, then renamed to its number, so the service
never sees a half-copied folder; switching versions replaces the symlink in one ``rename``. The first
switch of a plain folder keeps that folder as version 0001 and exchanges it for the symlink with Linux's
``renameat2(RENAME_EXCHANGE)`` (atomic as well). ``history.json`` lists the versions made current, in
order, so a rollback returns to the one before. Every decision is a JSON record in
``models/trashnet.decisions/``.

The service reads ``manifest.json`` and ``model.onnx`` through the symlink and checks the graph's sha256
against the manifest; it resolves the link once per load, so one load never mixes two versions.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flywheel.errors import UserError
from service.fileio import sha256_file, write_atomic
from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest

ARTIFACT_FILES = (MODEL_FILE, MANIFEST_FILE)
HISTORY_FILE = "history.json"
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    result = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def check_artifact(folder: Path) -> Manifest:
    """A model folder whose manifest parses and whose graph has the manifest's sha256."""
    for name in ARTIFACT_FILES:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} is missing; a model folder holds {' and '.join(ARTIFACT_FILES)}")
    try:
        manifest = Manifest.load(folder)
    except ValueError as exc:
        raise UserError(f"{folder / MANIFEST_FILE} is not a valid manifest: {str(exc).splitlines()[0]}") from None
    if sha256_file(folder / MODEL_FILE) != manifest.model_sha256:
        raise UserError(f"{folder / MODEL_FILE} does not have the sha256 its manifest names")
    return manifest


class ModelStore:
    """The versions, history and decision records of the model folder ``current``."""

    def __init__(self, current: Path):
        self.current = Path(os.path.abspath(current))
        self.versions = self.current.with_name(f"{self.current.name}.versions")
        self.decisions = self.current.with_name(f"{self.current.name}.decisions")

    # ---- state ----

    def history(self) -> list[str]:
        path = self.versions / HISTORY_FILE
        return json.loads(path.read_text())["current"] if path.is_file() else []

    def current_version(self) -> str | None:
        """The version folder's number the symlink points at (None for a plain, unmanaged folder)."""
        if not self.current.is_symlink():
            return None
        return Path(os.readlink(self.current)).name

    def _write_history(self, history: list[str]) -> None:
        write_atomic(self.versions / HISTORY_FILE, (json.dumps({"current": history}, indent=2) + "\n").encode())

    @property
    def lock_path(self) -> Path:
        return self.current.with_name(f".{self.current.name}.lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One promotion or rollback at a time per model folder (an flock, so a killed holder frees it).

        flywheel.promote holds it from reading the current model to the reload, so a candidate is always
        judged against the model it replaces.
        """
        with open(self.lock_path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- changes (call inside ``locked``) ----

    def add_version(self, source: Path) -> str:
        """Copy an artifact into the next numbered version: temp sibling, fsync, rename."""
        self.versions.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name) for p in self.versions.iterdir() if p.is_dir() and p.name.isdigit()]
        number = f"{max(numbers, default=0) + 1:04d}"
        staging = self.versions / f".{number}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name in ARTIFACT_FILES:
            shutil.copyfile(source / name, staging / name)
            fsync_path(staging / name)
        fsync_path(staging)
        check_artifact(staging)
        os.rename(staging, self.versions / number)
        fsync_path(self.versions)
        return number

    def switch_to(self, number: str) -> None:
        """Point ``current`` at version ``number`` in one atomic step."""
        link = self.current.with_name(f".{self.current.name}.link-{os.getpid()}")
        link.unlink(missing_ok=True)
        os.symlink(Path(self.versions.name) / number, link)
        if self.current.is_symlink() or not self.current.exists():
            os.replace(link, self.current)
        elif exchange(link, self.current):  # ``current`` was a plain folder: it now sits at ``link``
            shutil.rmtree(link)
        else:  # no renameat2: a moment without ``current`` (a reload then keeps the old model serving)
            old = self.current.with_name(f".{self.current.name}.old-{os.getpid()}")
            os.rename(self.current, old)
            os.replace(link, self.current)
            shutil.rmtree(old)
        fsync_path(self.current.parent)

    def promote(self, candidate: Path) -> tuple[str, str]:
        """Keep the current model as a numbered version, add the candidate, switch; (previous, new)."""
        history = self.history()
        previous = self.current_version()
        if previous is None:  # a plain folder: it becomes the first version
            previous = self.add_version(self.current)
            history = [previous]
        new = self.add_version(candidate)
        self.switch_to(new)
        self._write_history([*history, new])
        return previous, new

    def rollback(self) -> tuple[str, str]:
        """Switch back to the version that was current before this one; (from, to)."""
        history, now = self.history(), self.current_version()
        if now is None or len(history) < 2 or history[-1] != now:
            raise UserError(f"{self.current} has no previous version to roll back to (history {history})")
        target = history[-2]
        check_artifact(self.versions / target)
        self.switch_to(target)
        self._write_history(history[:-1])
        return now, target

    def record(self, decision: dict[str, Any]) -> Path:
        """Write one decision as ``<decisions>/<UTC time>-<decision>.json`` (atomically)."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.decisions / f"{stamp}-{decision['decision']}.json"
        write_atomic(path, (json.dumps(decision, indent=2) + "\n").encode())
        return path
