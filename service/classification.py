"""Image bytes -> typed ``Classification``: decode, score (one ORT call or the micro-batcher), shape.

``to_classifications`` is the one place where the graph's outputs become answers (verdict at the
threshold in use, or ``no_item`` where the frame check before the graph found no item; probability
from the calibration centred on it, nearest class, distances by name).
``Pipeline`` runs it for every route that classifies, the product's and the Open Inference Protocol's:
decoding happens in a pool of ``decode_concurrency`` worker threads (with ``decode_inline``, on the event
loop instead), every result is counted in the metrics, and every answered photo is offered to the
capture writer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from service.capture.format import new_id
from service.capture.writer import SKIPPED, CaptureWriter
from service.errors import ApiError
from service.imaging import ImageError, load_image
from service.metrics import Metrics
from service.model import Classifier, LoadedModel, Scores
from service.no_item import Reason as NoItemReason
from service.no_item import check_items
from service.schemas import BatchItem, Classification, ErrorDetail
from service.settings import Settings
from service.uploads import Upload

T = TypeVar("T")
BatchInput = Upload | tuple[str | None, ApiError]  # a readable part, or (filename, why it was refused)


def to_classifications(
    model: LoadedModel, scores: Scores, ids: list[str], no_item: list[bool] | None = None
) -> list[Classification]:
    """One ``Classification`` per row of the graph's outputs; a non-finite score is a 500, never an answer.
    A row marked in ``no_item`` (the frame check found no item) is ``no_item`` whatever its score."""
    names = model.manifest.class_names
    calibration = model.calibration
    results = []
    for row, value, nearest, result_id, empty in zip(
        scores.distances.tolist(),
        scores.score.tolist(),
        scores.nearest.tolist(),
        ids,
        no_item or [False] * len(ids),
        strict=True,
    ):
        if not math.isfinite(value):
            raise ApiError(500, "non_finite_score", "the model produced a non-finite score")
        results.append(
            Classification(
                id=result_id,
                verdict="no_item" if empty else "anomalous" if value >= model.threshold else "normal",
                score=value,
                score_rule=model.manifest.score.rule,
                threshold=model.threshold,
                probability=calibration.probability(value) if calibration else None,
                nearest_class=names[nearest] if 0 <= nearest < len(names) else str(nearest),
                distances=dict(zip(names, row, strict=True)),
                model=model.ref,
            )
        )
    return results


class PhotoError(Exception):
    """Photo ``index`` of a request that must decode whole did not decode; ``error`` says why."""

    def __init__(self, index: int, error: ImageError):
        super().__init__(error.message)
        self.index, self.error = index, error


class Pipeline:
    """The one data plane of every route that classifies (``/classify``, ``/classify/batch``, the Open
    Inference Protocol's ``infer``): decode, score, answers counted in the metrics, photos offered to the
    capture writer, so a fix to any step reaches them all. The lifespan ``start``s and ``close``s its
    worker threads.
    """

    def __init__(self, settings: Settings, classifier: Classifier, metrics: Metrics, captures: CaptureWriter | None):
        self.settings, self.classifier, self.metrics, self.captures = settings, classifier, metrics, captures
        self.workers: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.workers = ThreadPoolExecutor(self.settings.decode_concurrency, thread_name_prefix="decode")

    def close(self) -> None:
        """After the last request: wait for the worker threads to finish what they run."""
        if self.workers is not None:
            self.workers.shutdown(wait=True)
            self.workers = None

    async def classify(self, model: LoadedModel, upload: Upload, result_id: str) -> Classification:
        """One photo (``/classify``); a decode error is raised as it is."""
        try:
            return (await self.classify_photos(model, [upload], [result_id]))[0]
        except PhotoError as exc:
            raise exc.error from None

    async def classify_photos(self, model: LoadedModel, uploads: list[Upload], ids: list[str]) -> list[Classification]:
        """Photos that must all decode (else ``PhotoError`` for the first that does not), in one ORT call;
        one photo with micro-batching on waits for its batch without holding a thread."""
        photos = [upload.data for upload in uploads]
        if self.classifier.batcher is None or len(photos) > 1:
            answers = await self._off_loop(self._classify_photos, model, photos, ids)
        else:
            images, reasons = await self._off_loop(self._decode_and_check, model, photos)
            answers = self._answers(model, await self.classifier.score_async(model, images), ids, reasons)
        await self._capture(model, list(zip(uploads, answers, strict=True)))
        return answers

    async def classify_images(self, model: LoadedModel, images: np.ndarray, ids: list[str]) -> list[Classification]:
        """Ready model inputs (no decode); they are not photos, so there is nothing to label: ``skipped``."""
        answers = await self._off_loop(self._score, model, images, ids)
        if self.captures is not None:
            for answer in answers:
                answer.capture = SKIPPED
        return answers

    async def rescore(self, model: LoadedModel, photos: list[bytes], ids: list[str]) -> list[Classification]:
        """Photos the bin captured earlier, scored by ``model`` (Label Studio's pre-annotations): not the bin's
        own classifications, so neither counted in the metrics (verdicts, drift) nor captured again; a photo
        that does not decode raises ``PhotoError``."""
        return await self._off_loop(self._rescore, model, photos, ids)

    def _rescore(self, model: LoadedModel, photos: list[bytes], ids: list[str]) -> list[Classification]:
        images = self._decode_all(model, photos)
        no_item = [reason is not None for reason in self._check(images)]
        return to_classifications(model, self.classifier.score(model, images), ids, no_item)

    async def classify_batch(self, model: LoadedModel, items: list[BatchInput]) -> list[BatchItem]:
        """Several images in one ORT call; each item has its own id and its own result or 4xx error."""
        results = await self._off_loop(self._classify_many, model, items)
        answered = [
            (upload, item.result)
            for upload, item in zip(items, results, strict=True)
            if isinstance(upload, Upload) and item.result is not None
        ]
        await self._capture(model, answered)
        return results

    async def _capture(self, model: LoadedModel, answered: list[tuple[Upload, Classification]]) -> None:
        """Each answer's ``capture`` says what became of its photo (left ``off`` without a capture folder)."""
        if self.captures is not None and answered:
            await self.captures.capture(model, answered)

    async def _off_loop(self, work: Callable[..., T], *args: object) -> T:
        """``work`` in one of the worker threads (at most ``decode_concurrency`` photos decoded at once, so
        memory stays bounded under load); with ``decode_inline``, on the event loop itself (no thread
        hand-off, but every other request waits while it runs). asyncio's executor rather than
        ``anyio.to_thread``: its limiter, cancel scope and context lookups were a fifth of the event
        loop's CPU per request (py-spy, docs/performance.md)."""
        if self.settings.decode_inline:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(self.workers, work, *args)

    def decode(self, model: LoadedModel, data: bytes) -> np.ndarray:
        height, width, channels = model.input_shape
        start = time.perf_counter()
        array = load_image(data, height, width, channels, self.settings.max_pixels)
        self.metrics.decode_seconds.observe(time.perf_counter() - start)
        return array

    def _decode_all(self, model: LoadedModel, photos: list[bytes]) -> np.ndarray:
        arrays = []
        for index, photo in enumerate(photos):
            try:
                arrays.append(self.decode(model, photo))
            except ImageError as exc:
                raise PhotoError(index, exc) from None
        return np.stack(arrays)

    def _check(self, images: np.ndarray) -> list[NoItemReason | None]:
        """Per image, why it holds no item (``service.no_item``), or None: an item, or the check is off.
        Run on the model inputs before the graph; the graph still scores every frame, so a ``no_item``
        answer keeps its score and distances (and a capture its sidecar's fields)."""
        if not self.settings.no_item_check:
            return [None] * len(images)
        return [check.reason for check in check_items(images)]

    def _decode_and_check(
        self, model: LoadedModel, photos: list[bytes]
    ) -> tuple[np.ndarray, list[NoItemReason | None]]:
        images = self._decode_all(model, photos)
        return images, self._check(images)

    def _answers(
        self, model: LoadedModel, scores: Scores, ids: list[str], reasons: list[NoItemReason | None]
    ) -> list[Classification]:
        results = to_classifications(model, scores, ids, [reason is not None for reason in reasons])
        for result, reason in zip(results, reasons, strict=True):
            self.metrics.observe_result(result.verdict, result.nearest_class, result.score, result.threshold, reason)
        return results

    def _score(self, model: LoadedModel, images: np.ndarray, ids: list[str]) -> list[Classification]:
        reasons = self._check(images)
        return self._answers(model, self.classifier.score(model, images), ids, reasons)

    def _classify_photos(self, model: LoadedModel, photos: list[bytes], ids: list[str]) -> list[Classification]:
        return self._score(model, self._decode_all(model, photos), ids)

    def _classify_many(self, model: LoadedModel, items: list[BatchInput]) -> list[BatchItem]:
        out: list[BatchItem] = []
        arrays, positions = [], []
        for index, item in enumerate(items):
            if isinstance(item, tuple):
                filename, error = item
                out.append(
                    BatchItem(id=new_id(), index=index, filename=filename, status=error.status, error=error.detail)
                )
                continue
            entry = BatchItem(id=new_id(), index=index, filename=item.filename, status=200)
            out.append(entry)
            try:
                arrays.append(self.decode(model, item.data))
                positions.append(index)
            except ImageError as exc:
                entry.status, entry.error = exc.status, ErrorDetail(code=exc.code, message=exc.message)
        if arrays:
            ids = [out[index].id for index in positions]
            scored = self._score(model, np.stack(arrays), ids)
            for index, result in zip(positions, scored, strict=True):
                out[index].result = result
        return out
