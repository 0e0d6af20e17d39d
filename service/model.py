"""The exported model behind one class: load (sha256-checked, validated, warmed up), score, reload.

``LoadedModel`` is one immutable artifact with its engine's sessions (``service/engines.py``: ONNX Runtime or
OpenVINO, ``DEEPMAD_ENGINE``); ``Classifier`` holds the
current one and swaps it atomically on reload, so a request that started on the old model finishes on
it, and a failed reload leaves the old model serving. All encoders live in one graph: scoring a batch
is exactly one ``session.run``. With ``microbatch_max_items > 1`` the ``Classifier`` also gathers
concurrent requests into one call (``MicroBatcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from service.engines import EngineError, Session, open_sessions
from service.golden import GoldenCheck, one_at_a_time, session_run, verify
from service.manifest import INPUT_NAME, MANIFEST_FILE, MODEL_FILE, OUTPUT_NAMES, Calibration, Manifest, sha256_file
from service.schemas import ModelRef
from service.settings import Settings

log = logging.getLogger("service.model")


class ModelLoadError(RuntimeError):
    """The model folder cannot be served: missing, corrupt, or not following the artifact contract."""


class EngineLoadError(ModelLoadError):
    """The configured engine is not installed here, or refuses the graph (``service/engines.py``)."""


class GoldenMismatchError(ModelLoadError):
    """The graph loads but, on this CPU and provider, does not reproduce its manifest's golden outputs."""


@dataclass(frozen=True)
class Scores:
    """The graph's outputs for a batch of N images."""

    distances: np.ndarray  # float32 [N, k]
    score: np.ndarray  # float32 [N]
    nearest: np.ndarray  # int64 [N]


class RunsInFlight:
    """How many ``LoadedModel.run`` calls are under way, and how many of each kind have started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.lone = self.busy = 0  # calls that started alone / beside another one

    @contextlib.contextmanager
    def started(self) -> Iterator[bool]:
        """Count this call in; yields whether it started alone."""
        with self._lock:
            self.running += 1
            alone = self.running == 1
            if alone:
                self.lone += 1
            else:
                self.busy += 1
        try:
            yield alone
        finally:
            with self._lock:
                self.running -= 1


@dataclass(frozen=True)
class LoadedModel:
    """One served artifact with the values in effect for it (threshold, calibration, reference).

    ``busy_session`` (CPU only, ``busy_intra_op_threads``) is the same graph with fewer intra-op threads,
    for calls that start while another is running: ORT's threads help one photo's latency, but photos
    scored side by side each already have a core, and splitting every operator between threads then only
    adds synchronisation (measured in docs/performance-log.md). Both come from ``settings.engine``; ``engine``
    names it and its version."""

    model_dir: Path
    manifest: Manifest
    session: Session
    threshold: float
    threshold_overridden: bool
    calibration: Calibration | None  # centred on ``threshold``: p >= 0.5 iff anomalous, override or not
    ref: ModelRef  # {name, version}, as every response names the model
    providers: tuple[str, ...]
    loaded_at: str
    golden: GoldenCheck  # the golden scores recomputed here at load (or why they were not)
    engine: str  # "onnxruntime-1.32.0", "openvino-2026.4.1"
    busy_session: Session | None = None
    runs: RunsInFlight = field(default_factory=RunsInFlight, compare=False, repr=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.manifest.input
        return spec.height, spec.width, spec.channels

    def run(self, batch: np.ndarray) -> Scores:
        """Score a uint8 [N, H, W, C] batch with one engine call (on ``busy_session`` when another
        call is under way)."""
        if self.busy_session is None:
            distances, score, nearest = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        else:
            with self.runs.started() as alone:
                session = self.session if alone else self.busy_session
                distances, score, nearest = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return Scores(np.asarray(distances), np.asarray(score), np.asarray(nearest))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 256 * 1024


def limit_heap_retention() -> None:
    """Blocks of 256 KB and more from mmap, returned to the system when freed (glibc only; a no-op elsewhere).

    glibc otherwise raises its mmap threshold after the first large free, and from then on keeps every freed
    graph-loading buffer and decoded photo in per-thread heaps: about 40 MB of the serving process's peak
    (bench/footprint.py). For the process that serves, called before the model loads."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def load_model(model_dir: str | Path, settings: Settings) -> LoadedModel:
    """Read, verify, open and warm up ``model_dir``; raise ModelLoadError with a one-line reason.

    A symlinked ``model_dir`` (``flywheel.promote`` switches versions by replacing a symlink) is resolved
    once, so the manifest and the graph of one load always come from the same version folder.
    """
    model_dir = Path(model_dir).resolve()
    manifest_path, model_path = model_dir / MANIFEST_FILE, model_dir / MODEL_FILE
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist (set DEEPMAD_MODEL_DIR or --model-dir)")
    for path in (manifest_path, model_path):
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; a model folder holds {MODEL_FILE} and {MANIFEST_FILE}")
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as exc:
        raise ModelLoadError(f"{manifest_path} is not a valid manifest: {exc}") from None

    # The engine reads the file itself: handing it the bytes costs their size twice more at load (Python's copy
    # and the binding's: +30 MB of peak for the Lite0 model, bench/footprint.py). The hash is checked first and
    # the same manifest's golden scores then check the graph that was loaded, so a file changed in between is
    # refused, not served.
    digest = sha256_file(model_path)
    if digest != manifest.model_sha256:
        raise ModelLoadError(
            f"{model_path} has sha256 {digest}, but the manifest says {manifest.model_sha256}: "
            "the model file is corrupt or belongs to another manifest"
        )

    try:
        sessions = open_sessions(settings, model_path)
    except EngineError as exc:
        raise EngineLoadError(str(exc)) from None
    session, busy_session = sessions.lone, sessions.busy
    _check_signature(session, manifest, model_path)
    golden = _check_golden(session, manifest, model_path)  # per engine: each engine proves its own outputs
    if busy_session is not None:
        _check_golden(busy_session, manifest, model_path)  # it must prove itself too
    threshold = float(manifest.threshold.value if settings.threshold is None else settings.threshold)
    model = LoadedModel(
        model_dir=model_dir,
        manifest=manifest,
        session=session,
        threshold=threshold,
        threshold_overridden=settings.threshold is not None,
        calibration=effective_calibration(manifest.calibration, threshold),
        ref=ModelRef(name=manifest.name, version=manifest.version),
        providers=tuple(session.get_providers()),
        loaded_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        golden=golden,
        engine=sessions.engine,
        busy_session=busy_session,
    )
    _warm_up(model)
    log.info(
        "loaded model %s %s (%s) from %s with %s on %s, threshold %.6g; golden scores %s: %s",
        manifest.name,
        manifest.version,
        manifest.method,
        model_dir,
        model.engine,
        ",".join(model.providers),
        model.threshold,
        golden.status,
        golden.detail,
    )
    return model


def effective_calibration(calibration: Calibration | None, threshold: float) -> Calibration | None:
    """The manifest's logistic moved to the threshold in use, keeping its scale (its spread of scores).

    The manifest centres it on its own gamma; with ``--threshold`` the verdict moves, so the centre moves
    with it, or verdict and probability would disagree for every score between the two thresholds.
    """
    if calibration is None or calibration.center == threshold:
        return calibration
    return calibration.model_copy(update={"center": threshold})


def _check_signature(session: Session, manifest: Manifest, model_path: Path) -> None:
    inputs = {item.name: item for item in session.get_inputs()}
    outputs = {item.name for item in session.get_outputs()}
    if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != "tensor(uint8)":
        raise ModelLoadError(f"{model_path} must take a uint8 input named {INPUT_NAME!r}; it has {list(inputs)}")
    shape = inputs[INPUT_NAME].shape
    spec = manifest.input
    expected = [spec.height, spec.width, spec.channels]
    fixed = zip(shape[1:], expected, strict=False)
    if len(shape) != 4 or any(isinstance(got, int) and got != want for got, want in fixed):
        raise ModelLoadError(f"{model_path} input shape {shape} does not match the manifest's [N, {expected}]")
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ModelLoadError(f"{model_path} lacks outputs {missing}; the contract is {list(OUTPUT_NAMES)}")


def _check_golden(session: Session, manifest: Manifest, model_path: Path) -> GoldenCheck:
    """Recompute the manifest's golden outputs with this session; GoldenMismatchError when they moved."""
    spec = manifest.input
    try:
        check = verify(one_at_a_time(session_run(session)), (spec.height, spec.width, spec.channels), manifest.golden)
    except Exception as exc:  # the engine's own error types
        raise ModelLoadError(f"golden-score run of {model_path} failed: {exc}") from None
    if check.status == "mismatch":
        raise GoldenMismatchError(f"{model_path} refused: golden scores mismatch: {check.detail}")
    return check


def _warm_up(model: LoadedModel) -> None:
    """One run at batch 1 and one at batch 2 (allocations, CUDA kernels), checking the output shapes."""
    height, width, channels = model.input_shape
    k = len(model.manifest.class_names)
    for n in (1, 2):
        try:
            scores = model.run(np.zeros((n, height, width, channels), dtype=np.uint8))
        except Exception as exc:
            raise ModelLoadError(f"warm-up run of {model.model_dir} failed: {exc}") from None
        if scores.distances.shape != (n, k) or scores.score.shape != (n,) or scores.nearest.shape != (n,):
            raise ModelLoadError(
                f"warm-up of {model.model_dir}: outputs have shapes {scores.distances.shape}, "
                f"{scores.score.shape}, {scores.nearest.shape}; expected ({n}, {k}), ({n},), ({n},) "
                f"for the manifest's {k} classes"
            )
        if not np.all(np.isfinite(scores.score)):
            raise ModelLoadError(f"warm-up of {model.model_dir} produced non-finite scores")


Observer = Callable[[float, int], None]  # (seconds of one ORT call, images in it)


@dataclass
class _Job:
    model: LoadedModel
    batch: np.ndarray
    future: Future


_STOP = object()


class MicroBatcher:
    """Gathers score requests from many threads into one ORT call per batch, on one worker thread.

    The worker takes the first queued job, then adds jobs already queued, up to ``max_items`` images.
    When the previous batch held more than one job (concurrent traffic), it also waits up to ``wait_s``
    after the first job for more; a lone client never waits, so latency at concurrency 1 is one
    thread hand-off above a direct call. Jobs for different models (a reload in between) never share a
    batch. Each caller gets its own rows back, or the exception of its batch.

    Example:
        >>> batcher = MicroBatcher(max_items=8, wait_s=0.002)  # doctest: +SKIP
        >>> scores = batcher.submit(model, images).result()  # images: uint8 [n, H, W, C]
        >>> batcher.close()
    """

    def __init__(self, max_items: int, wait_s: float = 0.0, observer: Observer | None = None):
        self.max_items, self.wait_s, self.observer = max_items, wait_s, observer
        self.batch_sizes: list[int] = []  # images per ORT call, most recent last (bounded)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="microbatcher", daemon=True)
        self._thread.start()

    def submit(self, model: LoadedModel, batch: np.ndarray) -> Future:
        """Queue a uint8 [n, H, W, C] batch; the future resolves to its ``Scores`` (n rows)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError("the micro-batcher is closed"))
            else:
                self._queue.put(_Job(model, batch, future))
        return future

    def close(self) -> None:
        """Score what is queued, then stop the worker; later submissions fail at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        pending: object = None
        busy = False  # the last batch gathered several jobs: traffic is concurrent, worth waiting for
        while True:
            first = pending if pending is not None else self._queue.get()
            pending = None
            if first is _STOP:
                return
            jobs, count = [first], len(first.batch)
            deadline = time.monotonic() + (self.wait_s if busy else 0.0)
            while count < self.max_items:
                timeout = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP or job.model is not first.model or count + len(job.batch) > self.max_items:
                    pending = job
                    break
                jobs.append(job)
                count += len(job.batch)
            busy = len(jobs) > 1
            self._run(jobs, count)

    def _run(self, jobs: list[_Job], count: int) -> None:
        try:
            batch = jobs[0].batch if len(jobs) == 1 else np.concatenate([job.batch for job in jobs])
            start = time.perf_counter()
            scores = jobs[0].model.run(batch)
            if self.observer:
                self.observer(time.perf_counter() - start, count)
        except BaseException as exc:  # every waiting caller gets the error; the worker keeps serving
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.batch_sizes = [*self.batch_sizes[-999:], count]
        offset = 0
        for job in jobs:
            rows = slice(offset, offset + len(job.batch))
            offset = rows.stop
            job.future.set_result(Scores(scores.distances[rows], scores.score[rows], scores.nearest[rows]))


class Classifier:
    """Holds the model being served; ``model`` is read without a lock (a reference swap is atomic).

    ``score`` (from a worker thread) and ``score_async`` (from the event loop) run one ORT call, or,
    with ``settings.microbatch_max_items > 1``, hand the images to the ``MicroBatcher``. ``observer``
    is told the duration and size of every ORT call.
    """

    def __init__(self, settings: Settings, observer: Observer | None = None):
        self.settings = settings
        self.observer = observer
        self._model: LoadedModel | None = None
        self._reload_lock = threading.Lock()
        self.last_error: str | None = None
        self.batcher: MicroBatcher | None = None
        if settings.microbatch_max_items > 1:
            wait_s = settings.microbatch_wait_ms / 1000
            self.batcher = MicroBatcher(settings.microbatch_max_items, wait_s, observer)

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self, model_dir: str | Path | None = None) -> LoadedModel:
        """Load ``model_dir`` (default: the configured one) and serve it; on failure keep the old one."""
        with self._reload_lock:
            try:
                model = load_model(model_dir or self.settings.model_dir, self.settings)
            except ModelLoadError as exc:
                self.last_error = str(exc)
                raise
            self._model = model
            self.last_error = None
            return model

    def adopt(self, model: LoadedModel) -> LoadedModel:
        """Serve a model loaded before the app started (``python -m service``'s pre-flight load)."""
        with self._reload_lock:
            self._model = model
            self.last_error = None
            return model

    def score(self, model: LoadedModel, batch: np.ndarray) -> Scores:
        """Score a prepared uint8 [N, H, W, C] batch on ``model`` (the one the request started with)."""
        if self.batcher is not None:
            return self.batcher.submit(model, batch).result()
        return self._run(model, batch)

    async def score_async(self, model: LoadedModel, batch: np.ndarray) -> Scores:
        """``score`` for the event loop: awaits the micro-batcher, or runs in a worker thread."""
        if self.batcher is not None:
            return await asyncio.wrap_future(self.batcher.submit(model, batch))
        return await asyncio.to_thread(self._run, model, batch)

    def close(self) -> None:
        """Stop the micro-batcher's worker (queued jobs are scored first)."""
        if self.batcher is not None:
            self.batcher.close()

    def _run(self, model: LoadedModel, batch: np.ndarray) -> Scores:
        start = time.perf_counter()
        scores = model.run(batch)
        if self.observer:
            self.observer(time.perf_counter() - start, len(batch))
        return scores
