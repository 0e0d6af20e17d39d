"""Capture policy and the background writer: which answers keep their photo, written off the request path.

Policy (each a setting): every anomalous item; every item whose score lies within ``capture_margin``
of the threshold (uncertain, the labels that teach most); a sampled fraction ``capture_normal_rate`` of
the confident normals. ``CaptureWriter.offer`` decides and enqueues without blocking; one thread
writes through ``CaptureStore``. A full queue or a failed write drops the capture, counts it in
``deepmad_captures_total{outcome}`` and logs at most once a minute; the answer is never affected.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.capture_store import CaptureModel, CaptureStore, Reason, Sidecar, image_extension, utc_timestamp
from service.metrics import Metrics
from service.model import LoadedModel
from service.schemas import Classification
from service.settings import Settings
from service.uploads import Upload

log = logging.getLogger("service.captures")

LOG_INTERVAL_S = 60.0


def capture_reason(result: Classification, margin: float, normal_rate: float, rng: random.Random) -> Reason | None:
    """Why this answer's photo is kept, or None: anomalous, then uncertain, then a sampled normal."""
    if result.verdict == "anomalous":
        return "anomalous"
    if abs(result.score - result.threshold) <= margin:
        return "uncertain"
    if normal_rate > 0 and rng.random() < normal_rate:
        return "sampled"
    return None


class ThrottledLog:
    """Logs a warning at most once per interval per kind, saying how many were not logged in between."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self.interval_s) < self.interval_s:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return
            quiet = self._quiet.pop(kind, 0)
            self._last[kind] = now
        suffix = f" ({quiet} more since the last such message)" if quiet else ""
        log.warning(message + suffix, *args)


@dataclass(frozen=True)
class _Job:
    sidecar: Sidecar
    data: bytes


_STOP = object()


class CaptureWriter:
    """Owns the capture store, the bounded queue and the one writer thread (``start`` / ``close``)."""

    def __init__(self, settings: Settings, metrics: Metrics, root: Path):
        self.settings, self.metrics = settings, metrics
        self.store = CaptureStore(root, settings.capture_max_bytes)
        self._queue: queue.Queue = queue.Queue(maxsize=settings.capture_queue_size)
        self._rng = random.Random()
        self._log = ThrottledLog()
        self._pending = 0  # queued or being written
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        metrics.capture_bytes.set_function(lambda: self.store.used_bytes)
        metrics.capture_pending.set_function(lambda: self._pending)
        metrics.captures_stored.set_function(lambda: len(self.store))

    def start(self) -> None:
        """Open the folder (clearing what a killed writer left) and start the writer thread."""
        self.store.open()
        self._thread = threading.Thread(target=self._loop, name="capture-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def offer(self, model: LoadedModel, upload: Upload, result: Classification) -> Reason | None:
        """Decide and enqueue (never blocks, never raises); returns the reason if the photo is queued."""
        try:
            reason = capture_reason(result, self.settings.capture_margin, self.settings.capture_normal_rate, self._rng)
            if reason is None:
                return None
            sidecar = Sidecar(
                id=result.id,
                time=utc_timestamp(dt.datetime.now(dt.timezone.utc)),
                image="",  # named by the writer, which sniffs the format off the request path
                image_sha256="",
                image_bytes=len(upload.data),
                content_type=upload.content_type,
                model=CaptureModel(name=model.ref.name, version=model.ref.version, sha256=model.manifest.model_sha256),
                score=result.score,
                threshold=result.threshold,
                verdict=result.verdict,
                nearest_class=result.nearest_class,
                distances=result.distances,
                reason=reason,
            )
            with self._pending_lock:
                self._queue.put_nowait(_Job(sidecar, upload.data))
                self._pending += 1
            return reason
        except queue.Full:
            self._count("queue_full")
            self._log.warning("queue_full", "capture queue full (%d): capture dropped", self._queue.maxsize)
        except Exception:  # the answer must not change whatever happens here
            self._count("error")
            log.exception("capture of %s failed before it was queued", result.id)
        return None

    def _count(self, outcome: str) -> None:
        self.metrics.captures.labels(outcome).inc()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                self._write(job)
            finally:
                with self._pending_lock:
                    self._pending -= 1

    def _write(self, job: _Job) -> None:
        try:
            sidecar = job.sidecar.model_copy(
                update={
                    "image": f"{job.sidecar.id}.{image_extension(job.data)}",
                    "image_sha256": hashlib.sha256(job.data).hexdigest(),
                }
            )
            evictions = self.store.evictions
            outcome = self.store.add(sidecar, job.data)
            self.metrics.capture_evictions.inc(self.store.evictions - evictions)
        except Exception as exc:  # disk full, permissions, a vanished folder: drop, count, keep serving
            self._count("write_error")
            self._log.warning("write_error", "capture %s not written: %s", job.sidecar.id, exc)
            return
        self._count(outcome)
        if outcome == "budget_full":
            self._log.warning(
                "budget_full",
                "capture budget of %d bytes is full of labelled captures: new captures are dropped",
                self.store.max_bytes,
            )
