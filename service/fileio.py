"""File helpers shared by the service and training: atomic writes and content hashes.

An artifact, a checkpoint, a cache entry or a capture is written to a temporary file in the same
folder, fsync-ed, then renamed over the target, so a reader (the service loading a model, a resumed
run, another worker) never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable: after a crash the new name is there, not the old file."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable_folder(folder: str | Path) -> None:
    """Write (then remove) a probe file in ``folder``, or in its nearest existing parent when it is still to be
    made; raises OSError if that fails. Nothing is left behind.

    A command checks its output folders with this before its work, so a long training or export fails in
    its first second rather than after. A real write is the only check that holds for root, read-only
    mounts and full disks alike (``os.access`` says yes to root everywhere)."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(20, "a file stands where a folder is needed", str(existing))
    fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-check.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


def write_atomic(path: str | Path, data: bytes, *, sync_folder: bool = False) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file.
    ``sync_folder`` also fsyncs the folder, for writes that must survive a power cut once acknowledged
    (a capture, an operator's label)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; an artifact is read by other users (containers)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_folder(path.parent)
