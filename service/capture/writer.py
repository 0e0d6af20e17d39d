"""Capture policy and the background writer: which answers keep their photo, written off the request path.

Policy (each a setting): every anomalous item; every item whose score lies within ``capture_margin``
of the threshold (uncertain, the labels that teach most); a sampled fraction ``capture_normal_rate`` of
the confident normals and of the frames answered ``no_item``. ``CaptureWriter.offer`` decides and
enqueues without blocking; one thread writes through ``CaptureStore`` in batches (group commit). A full
queue or a failed write drops the capture, counts it in ``deepmad_captures_total{outcome}`` and logs at
most once a minute; the answer's ``capture`` says what became of its photo (``queued``; in durable mode,
``capture_mode=durable``, the answer waits until it is ``written``), and nothing else in the answer changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.capture.format import CaptureModel, Reason, Sidecar, image_extension, utc_timestamp
from service.capture.io import PIPE_BYTES, BatchWriterProcess
from service.capture.store import CaptureStore
from service.metrics import Metrics
from service.model import LoadedModel
from service.schemas import CaptureOutcome, Classification
from service.settings import Settings
from service.uploads import Upload

log = logging.getLogger("service.captures")

LOG_INTERVAL_S = 60.0
GIL_FREE_CHUNK = 2047  # hashlib releases the GIL for updates of 2048 bytes or more
SKIPPED = CaptureOutcome(status="skipped")


def capture_reason(result: Classification, margin: float, normal_rate: float, rng: random.Random) -> Reason | None:
    """Why this answer's photo is kept, or None: anomalous, then uncertain, then a sampled normal. A
    ``no_item`` frame is sampled like a confident normal (an operator sees what the check turns away;
    a covered lens does not fill the folder), its score's distance to gamma meaning nothing."""
    if result.verdict == "anomalous":
        return "anomalous"
    if result.verdict == "normal" and abs(result.score - result.threshold) <= margin:
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
    """What the request path hands over: the answer and the bytes; the writer builds the sidecar. In
    durable mode, ``waiter`` is the request's future, settled on its event loop once the batch is on disk."""

    result: Classification
    model: CaptureModel
    time: str
    content_type: str | None
    reason: Reason
    data: bytes
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None


_STOP = object()
MAX_BATCH_ITEMS = 64
MAX_BATCH_BYTES = PIPE_BYTES // 2  # a batch goes to the helper process in one pipe write


def _settle(pairs: list[tuple[asyncio.Future, CaptureOutcome]]) -> None:
    """On the event loop: answer the durable requests of one batch (one wake-up for all of them)."""
    for future, outcome in pairs:
        if not future.done():  # the client may have gone away meanwhile
            future.set_result(outcome)


class CaptureWriter:
    """Owns the capture store, the bounded queue and the writer thread (``start`` / ``close``).

    The thread takes whatever is queued as one batch (group commit) and hands it to a helper process
    (``service.capture.io``) that makes it durable with one fsync per folder; see that module for why."""

    def __init__(self, settings: Settings, metrics: Metrics, root: Path):
        self.settings, self.metrics = settings, metrics
        self.durable = settings.capture_mode == "durable"
        self._files = BatchWriterProcess()
        self.store = CaptureStore(root, settings.capture_max_bytes, self._files.write)
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
        """Open the folder (clearing what a killed writer left), start the helper process and the thread."""
        self.store.open()
        self._files.start()
        self._thread = threading.Thread(target=self._loop, name="capture-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued (answering durable requests), then stop the thread and the helper."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        leftovers = []  # offered while the writer stopped: written here rather than left waiting
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        jobs = [job for job in leftovers if job is not _STOP]
        if jobs:
            self._write_batch(jobs)
            with self._pending_lock:
                self._pending -= len(jobs)
        self._files.close()

    async def capture(self, model: LoadedModel, answered: list[tuple[Upload, Classification]]) -> None:
        """Offer each answered photo and put the outcome in its answer; in durable mode, wait until the
        queued ones are on disk (their status is then ``written``, or ``dropped`` with the reason)."""
        loop = asyncio.get_running_loop() if self.durable else None
        offered = [(result, self.offer(model, upload, result, loop)) for upload, result in answered]
        for result, outcome in offered:
            result.capture = await outcome if isinstance(outcome, asyncio.Future) else outcome

    def offer(
        self,
        model: LoadedModel,
        upload: Upload,
        result: Classification,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> CaptureOutcome | asyncio.Future:
        """Decide and enqueue (never blocks, never raises): the outcome, or with ``loop`` (durable mode) a
        future of it for a queued photo."""
        try:
            reason = capture_reason(result, self.settings.capture_margin, self.settings.capture_normal_rate, self._rng)
            if reason is None:
                return SKIPPED
            waiter = (loop, loop.create_future()) if loop is not None else None
            job = _Job(
                result=result,
                model=CaptureModel(name=model.ref.name, version=model.ref.version, sha256=model.manifest.model_sha256),
                time=utc_timestamp(dt.datetime.now(dt.timezone.utc)),
                content_type=upload.content_type,
                reason=reason,
                data=upload.data,
                waiter=waiter,
            )
            with self._pending_lock:
                self._queue.put_nowait(job)
                self._pending += 1
            return waiter[1] if waiter else CaptureOutcome(status="queued", id=result.id)
        except queue.Full:
            self._count("queue_full")
            self._log.warning("queue_full", "capture queue full (%d): capture dropped", self._queue.maxsize)
            return CaptureOutcome(status="dropped", reason="queue_full")
        except Exception:  # the answer must not change whatever happens here
            self._count("error")
            log.exception("capture of %s failed before it was queued", result.id)
            return CaptureOutcome(status="dropped", reason="error")

    def _count(self, outcome: str) -> None:
        self.metrics.captures.labels(outcome).inc()

    def _loop(self) -> None:
        while True:
            jobs = self._take_batch()
            stop = jobs[-1] is _STOP
            batch = jobs[:-1] if stop else jobs
            try:
                if batch:
                    self._write_batch(batch)
            finally:
                with self._pending_lock:
                    self._pending -= len(batch)
            if stop:
                return

    def _take_batch(self) -> list:
        """The next job (waiting for it), then whatever else is queued, up to a batch's size (or the stop)."""
        jobs = [self._queue.get()]
        size = 0
        while jobs[-1] is not _STOP and len(jobs) < MAX_BATCH_ITEMS:
            size += len(jobs[-1].data)
            if size >= MAX_BATCH_BYTES:
                break
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _write_batch(self, jobs: list[_Job]) -> None:
        """Build the sidecars, write them as one group commit, count each outcome, settle the waiters."""
        start = time.perf_counter()
        try:
            items = [(self._sidecar(job), job.data) for job in jobs]
            evictions = self.store.evictions
            results = self.store.add_batch(items)
            self.metrics.capture_evictions.inc(self.store.evictions - evictions)
        except Exception as exc:  # disk full, permissions, a vanished folder: drop, count, keep serving
            results = [("write_error", str(exc))] * len(jobs)
        settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, CaptureOutcome]]] = {}
        for job, (outcome, detail) in zip(jobs, results, strict=True):
            self._count(outcome)
            if outcome == "write_error":
                self._log.warning("write_error", "capture %s not written: %s", job.result.id, detail)
            elif outcome == "budget_full":
                self._log.warning(
                    "budget_full",
                    "capture budget of %d bytes is full of labelled captures: new captures are dropped",
                    self.store.max_bytes,
                )
            if job.waiter is not None:
                answer = (
                    CaptureOutcome(status="written", id=job.result.id)
                    if outcome == "written"
                    else CaptureOutcome(status="dropped", reason=outcome)
                )
                settled.setdefault(job.waiter[0], []).append((job.waiter[1], answer))
        self.metrics.capture_batch_seconds.observe(time.perf_counter() - start)
        for loop, pairs in settled.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, pairs)

    @staticmethod
    def _sidecar(job: _Job) -> Sidecar:
        result = job.result
        return Sidecar(
            id=result.id,
            time=job.time,
            image=f"{result.id}.{image_extension(job.data)}",
            image_sha256=sha256_holding_gil(job.data),
            image_bytes=len(job.data),
            content_type=job.content_type,
            model=job.model,
            score=result.score,
            threshold=result.threshold,
            verdict=result.verdict,
            nearest_class=result.nearest_class,
            distances=result.distances,
            reason=job.reason,
        )


def sha256_holding_gil(data: bytes) -> str:
    """sha256 in updates of under 2048 bytes, which hashlib runs without releasing the GIL: the writer
    thread would otherwise wait up to the switch interval (5 ms) for it back behind the busy event loop."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), GIL_FREE_CHUNK):
        digest.update(view[start : start + GIL_FREE_CHUNK])
    return digest.hexdigest()
