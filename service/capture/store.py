"""The capture folder on disk: write, label, list and evict captures (format: ``service.capture.format``).

A capture (docs/capture-format.md) is an image plus its sidecar, each written atomically
(``.<name>.*.tmp``, fsync, ``os.replace``, fsync the folder), image first; ``add_batch`` does that for
a whole batch at once, one fsync per folder (``service.capture.io``). Files starting with ``.`` and images
without a sidecar are not captures (a ``kill -9`` can leave those; ``open`` removes them).

``CaptureStore`` keeps an index of the sidecars in memory for the byte budget and for listing; it
re-reads a sidecar from disk before evicting it, so a label written by another process (a Label Studio
import) is never evicted, and each listing re-reads the sidecars whose (inode, size, mtime) changed, so
such a label is listed without a restart. One lock orders writes, labels and evictions.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from service.capture.format import (
    SIDECAR_SUFFIX,
    Sidecar,
    SidecarError,
    day_folder,
    day_folders,
    read_sidecar,
    sidecar_path,
    sidecar_paths,
    write_sidecar,
)
from service.capture.io import FSYNC_THREADS, CaptureFiles, Outcome, write_batch

log = logging.getLogger("service.captures")

Order = Literal["newest", "oldest", "uncertain"]
AddOutcome = Literal["written", "budget_full", "duplicate_id"]


def file_stamp(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells a rewritten sidecar from the indexed one with one ``stat``: every writer replaces the file
    (``os.replace``), so its inode changes even where the filesystem's mtime is too coarse to (FAT: 2 s)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class Entry:
    """What the index keeps of one capture: enough to budget, filter and order without reading it."""

    id: str
    folder: Path
    image: str
    time: str
    bytes: int  # image + sidecar on disk
    label: str | None
    verdict: str
    uncertainty: float  # |score - threshold|
    stamp: tuple[int, int, int]  # the sidecar's (inode, size, mtime_ns): a rewrite by another process changes it

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def sidecar_path(self) -> Path:
        return sidecar_path(self.folder, self.id)

    @property
    def image_path(self) -> Path:
        return self.folder / self.image


class CaptureNotFoundError(KeyError):
    pass


class CaptureStore:
    """The capture folder with a byte budget that evicts the oldest unlabelled captures first."""

    def __init__(
        self, root: Path, max_bytes: int, write_files: Callable[[list[CaptureFiles]], list[Outcome]] | None = None
    ):
        self.root, self.max_bytes = Path(root), max_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._write_files = write_files or self._write_here
        self.used_bytes = 0
        self.evictions = 0
        self._index: dict[str, Entry] = {}  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, capture_id: object) -> bool:
        return capture_id in self._index

    def open(self) -> None:
        """Create the root, clear what a killed writer left (temp files, images without a sidecar), index."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")  # fail now, with the path in the message, if the folder is not writable
        probe.unlink()
        with self._lock:
            for folder in day_folders(self.root):
                for path in folder.iterdir():
                    stem, _, suffix = path.name.rpartition(".")
                    leftover = path.name.startswith(".") and path.name.endswith(".tmp")
                    orphan = not path.name.startswith(".") and f".{suffix}" != SIDECAR_SUFFIX
                    if leftover or (orphan and not sidecar_path(folder, stem).exists()):
                        path.unlink(missing_ok=True)
            entries = [entry for path in sidecar_paths(self.root) if (entry := self._read_entry(path))]
            entries.sort(key=lambda entry: entry.time)
            self._index = {entry.id: entry for entry in entries}
            self.used_bytes = sum(entry.bytes for entry in entries)
        log.info("capture folder %s: %d captures, %d bytes", self.root, len(self._index), self.used_bytes)

    def add(self, sidecar: Sidecar, image: bytes) -> AddOutcome:
        """Write one capture (a batch of one); raises OSError when it could not be written."""
        outcome, detail = self.add_batch([(sidecar, image)])[0]
        if outcome == "write_error":
            raise OSError(detail)
        return outcome

    def add_batch(self, items: list[tuple[Sidecar, bytes]]) -> list[tuple[AddOutcome | Literal["write_error"], str]]:
        """Write several captures as one group commit (``service.capture.io``), evicting old unlabelled ones to stay
        in budget; (outcome, detail) per item, in order, each ``written`` only once it is durable.

        An id that is already captured (a client sending the same X-Request-ID twice) is not
        overwritten: its label, if any, belongs to the first photo.
        """
        outcomes: list[tuple[str, str]] = [("", "")] * len(items)
        planned: list[tuple[int, Sidecar, Path, int]] = []
        planned_ids: set[str] = set()
        files: list[CaptureFiles] = []
        with self._lock:
            for index, (sidecar, image) in enumerate(items):
                payload = sidecar.to_bytes()
                size = len(image) + len(payload)
                if sidecar.id in self._index or sidecar.id in planned_ids:
                    outcomes[index] = ("duplicate_id", "")
                elif not self._make_room(size):
                    outcomes[index] = ("budget_full", "")
                else:
                    self.used_bytes += size  # reserved: the next item's room is made around it
                    folder = day_folder(self.root, sidecar.time)
                    planned.append((index, sidecar, folder, size))
                    planned_ids.add(sidecar.id)
                    files.append((str(folder), sidecar.image, image, sidecar_path(folder, sidecar.id).name, payload))
            written = self._write_files(files) if files else []
            for (index, sidecar, folder, size), (outcome, detail) in zip(planned, written, strict=True):
                if outcome == "written":
                    self._index[sidecar.id] = self._entry(sidecar, folder, size, tuple(detail))
                else:
                    self.used_bytes -= size
                outcomes[index] = (outcome, "" if detail is None else str(detail))
        return outcomes  # type: ignore[return-value]

    def _write_here(self, files: list[CaptureFiles]) -> list[Outcome]:
        """The group commit in this process (tests, tools); the service hands it to a helper process."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="capture-fsync")
        return write_batch(files, self._pool, lambda: True)

    def get(self, capture_id: str) -> Sidecar:
        entry = self._index.get(capture_id)
        if entry is None:
            raise CaptureNotFoundError(capture_id)
        try:
            return read_sidecar(entry.sidecar_path)
        except FileNotFoundError:
            raise CaptureNotFoundError(capture_id) from None

    def image_path(self, capture_id: str) -> Path:
        entry = self._index.get(capture_id)
        if entry is None or not entry.image_path.is_file():
            raise CaptureNotFoundError(capture_id)
        return entry.image_path

    def label(self, capture_id: str, label: str, source: str) -> Sidecar:
        """Set (or replace) the label; returns once the rewritten sidecar is on disk (fsync)."""
        with self._lock:
            entry = self._index.get(capture_id)
            if entry is None:
                raise CaptureNotFoundError(capture_id)
            try:
                sidecar = read_sidecar(entry.sidecar_path).with_label(label, source)
            except FileNotFoundError:
                raise CaptureNotFoundError(capture_id) from None
            payload = write_sidecar(entry.sidecar_path, sidecar)
            size = sidecar.image_bytes + len(payload)
            self.used_bytes += size - entry.bytes
            entry.bytes, entry.label = size, label
            entry.stamp = file_stamp(entry.sidecar_path.stat())
            self._make_room(0)  # a label makes its sidecar longer: stay within budget if unlabelled ones allow
        return sidecar

    def list(
        self,
        *,
        labelled: bool | None = None,
        verdict: str | None = None,
        order: Order = "newest",
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[Sidecar]]:
        """(number matching, one page of sidecars); ``uncertain``: closest to the threshold first."""
        with self._lock:
            self._refresh()
            entries = [
                entry
                for entry in self._index.values()
                if (labelled is None or entry.labelled == labelled) and (verdict is None or entry.verdict == verdict)
            ]
        if order == "newest":
            entries.reverse()
        elif order == "uncertain":
            entries.sort(key=lambda entry: (entry.uncertainty, entry.time))
        page = []
        for entry in entries[offset : offset + limit]:
            try:
                page.append(read_sidecar(entry.sidecar_path))
            except FileNotFoundError:  # evicted since
                continue
        return len(entries), page

    def label_counts(self) -> dict[str, int]:
        """Captures per label, labels written by another process included (the pending new categories)."""
        with self._lock:
            self._refresh()
            return dict(Counter(entry.label for entry in self._index.values() if entry.label is not None))

    # ---- internals (called with the lock held) ----

    def _make_room(self, size: int) -> bool:
        if size > self.max_bytes:
            return False
        candidates = (entry for entry in list(self._index.values()) if not entry.labelled)
        while self.used_bytes + size > self.max_bytes:
            entry = next(candidates, None)
            if entry is None:
                return False
            fresh = self._read_entry(entry.sidecar_path)
            if fresh is not None and fresh.labelled:  # labelled by another process since indexed: keep it
                self._index[entry.id] = fresh
                self.used_bytes += fresh.bytes - entry.bytes
                continue
            entry.sidecar_path.unlink(missing_ok=True)  # sidecar first: the capture is gone at once
            entry.image_path.unlink(missing_ok=True)
            del self._index[entry.id]
            self.used_bytes -= entry.bytes
            self.evictions += 1
        return True

    def _refresh(self) -> None:
        """Pick up sidecars written, rewritten or removed by another process (cheap: one stat each)."""
        seen = set()
        for path in sidecar_paths(self.root):
            capture_id = path.stem
            seen.add(capture_id)
            entry = self._index.get(capture_id)
            try:
                stamp = file_stamp(path.stat())
            except FileNotFoundError:
                continue
            if entry is not None and entry.stamp == stamp:
                continue
            fresh = self._read_entry(path)
            if fresh is None:
                continue
            self.used_bytes += fresh.bytes - (entry.bytes if entry else 0)
            self._index[capture_id] = fresh
        for capture_id in [key for key in self._index if key not in seen]:
            self.used_bytes -= self._index.pop(capture_id).bytes

    def _read_entry(self, path: Path) -> Entry | None:
        try:
            stat = path.stat()
            sidecar = read_sidecar(path)
        except FileNotFoundError:
            return None
        except (SidecarError, OSError) as exc:
            log.warning("skipping unreadable capture sidecar %s: %s", path, exc)
            return None
        return self._entry(sidecar, path.parent, sidecar.image_bytes + stat.st_size, file_stamp(stat))

    @staticmethod
    def _entry(sidecar: Sidecar, folder: Path, size: int, stamp: tuple[int, int, int]) -> Entry:
        return Entry(
            id=sidecar.id,
            folder=folder,
            image=sidecar.image,
            time=sidecar.time,
            bytes=size,
            label=sidecar.label,
            verdict=sidecar.verdict,
            uncertainty=abs(sidecar.score - sidecar.threshold),
            stamp=stamp,
        )
