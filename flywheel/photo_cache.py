"""Per-photo arrays cached on disk by content, so a run decodes, extracts and scores only photos it has not seen.

Training keeps decoded photos (``decoded_files``) and backbone features (``training.features``) here, and
the gate its audit scores per graph (``flywheel.promote``); no torch, so the gate runs it beside the service.
The cache lives in DEEPMAD_CACHE_DIR (default ~/.cache/deepmad-bin; the shared data folder is read-only).
Each entry is one small file, ``<cache>/<kind>/<2 hex>/<key>.entry``: a flywheel tree that gains 50
photos costs 50 new entries, where a key over the whole array made every new photo re-decode and
re-extract all of them. One file per entry needs no index or lock; reading one costs ~0.1-0.3 ms, most of
it opening the file (docs/flywheel.md).

Writes are a temporary file in the entry's folder renamed over it, so concurrent runs never see half an
entry (two runs writing one key write the same bytes). They are not fsynced: a cache entry is never the
only copy of anything, and each ends with a CRC-32 of its bytes, so whatever a crash leaves (a truncated
or zero-filled file) is found by its CRC on read and computed again. A cache that cannot be written
(a read-only home in a container) warns once and costs only time.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# Bump when service.imaging changes what it produces for the same file.
IMAGE_FUNCTION_VERSION = "1"
ENTRY_SUFFIX = ".entry"
CHECK_BYTES = 4  # a CRC-32 of the entry's bytes after them: it finds truncation and torn writes, at ~1 GB/s


def cache_dir() -> Path:
    configured = os.environ.get("DEEPMAD_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "deepmad-bin"


class EntryStore:
    """Arrays by key under ``<cache>/<kind>``, one file each: a header line (dtype, shape), the raw bytes in C
    order, then a CRC-32 of everything before it. Not .npy: parsing its header (``ast.literal_eval``) cost
    more than reading the file (0.5 of 0.8 ms per 32x32 photo)."""

    def __init__(self, kind: str):
        self.root = str(cache_dir() / kind)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + ENTRY_SUFFIX)

    def get(self, key: str) -> np.ndarray | None:
        """The entry, or None when it is missing or damaged (a damaged one is removed)."""
        path = self.path(key)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        body, check = data[:-CHECK_BYTES], data[-CHECK_BYTES:]
        if len(data) > CHECK_BYTES and zlib.crc32(body).to_bytes(CHECK_BYTES, "little") == check:
            try:
                header, raw = body.split(b"\n", 1)
                dtype, shape = header.decode("ascii").split(" ")
                dims = tuple(int(d) for d in shape.split(",") if d)
                return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(dims)
            except (ValueError, TypeError):
                pass
        Path(path).unlink(missing_ok=True)
        return None

    def put(self, key: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        header = f"{array.dtype.str} {','.join(map(str, array.shape))}\n".encode("ascii")
        body = header + array.tobytes()
        path = self.path(key)
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            warnings.warn(f"the cache {self.root} cannot be written ({exc}); nothing is cached", stacklevel=2)
            return
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(body + zlib.crc32(body).to_bytes(CHECK_BYTES, "little"))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def cached_rows(
    store: EntryStore, keys: Sequence[str], compute: Callable[[list[int]], np.ndarray]
) -> tuple[np.ndarray | None, list[int]]:
    """Row i is the entry of ``keys[i]``; ``compute(indices)`` makes the rows of the missing keys (each
    distinct key once) and they are stored. Returns (rows stacked, or None for no keys; the computed indices)."""
    rows: list[np.ndarray | None] = [None] * len(keys)
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            continue
        first[key] = i
        rows[i] = store.get(key)
    missing = [i for i in first.values() if rows[i] is None]
    if missing:
        computed = compute(missing)
        for i, row in zip(missing, computed, strict=True):
            store.put(keys[i], row)
            rows[i] = row
    if not keys:
        return None, missing
    return np.stack([rows[first[key]] for key in keys]), missing


def file_key(path: Path, *parts: object) -> str:
    """A file's content (not its name or time) with what it is decoded to."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(repr((IMAGE_FUNCTION_VERSION, *parts)).encode())
    return digest.hexdigest()[:40]


def decoded_files(files: list[Path], shape: tuple[int, int, int], decode: Callable[[Path], np.ndarray]) -> np.ndarray:
    """Every file through ``decode`` (to ``shape``), each file's result cached by its content."""
    rows, _ = cached_rows(
        EntryStore("pixels"), [file_key(path, shape) for path in files], lambda idx: [decode(files[i]) for i in idx]
    )
    return rows if rows is not None else np.empty((0, *shape), dtype=np.uint8)
