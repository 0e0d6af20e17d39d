"""Image bytes -> typed ``Classification``: decode, score (one ORT call or the micro-batcher), shape.

``to_classifications`` is the one place where the graph's outputs become answers (verdict at the
threshold in use, probability from the calibration centred on it, nearest class, distances by name).
``Pipeline`` runs it for the routes: decoding happens in worker threads bounded by a capacity limiter
(with ``decode_inline``, on the event loop instead), and every result is counted in the metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import numpy as np

from service.capture_format import new_id
from service.errors import ApiError
from service.imaging import ImageError, load_image
from service.metrics import Metrics
from service.model import Classifier, LoadedModel, Scores
from service.schemas import BatchItem, Classification, ErrorDetail
from service.settings import Settings
from service.uploads import Upload

T = TypeVar("T")
BatchInput = Upload | tuple[str | None, ApiError]  # a readable part, or (filename, why it was refused)


def to_classifications(model: LoadedModel, scores: Scores, ids: list[str]) -> list[Classification]:
    """One ``Classification`` per row of the graph's outputs; a non-finite score is a 500, never an answer."""
    names = model.manifest.class_names
    calibration = model.calibration
    results = []
    for row, value, nearest, result_id in zip(
        scores.distances.tolist(), scores.score.tolist(), scores.nearest.tolist(), ids, strict=True
    ):
        if not math.isfinite(value):
            raise ApiError(500, "non_finite_score", "the model produced a non-finite score")
        results.append(
            Classification(
                id=result_id,
                verdict="anomalous" if value >= model.threshold else "normal",
                score=value,
                threshold=model.threshold,
                probability=calibration.probability(value) if calibration else None,
                nearest_class=names[nearest] if 0 <= nearest < len(names) else str(nearest),
                distances=dict(zip(names, row, strict=True)),
                model=model.ref,
            )
        )
    return results


class Pipeline:
    """Classifies uploads for the routes; ``start`` (in the app's lifespan) makes the thread limiter."""

    def __init__(self, settings: Settings, classifier: Classifier, metrics: Metrics):
        self.settings, self.classifier, self.metrics = settings, classifier, metrics
        self.limiter: anyio.CapacityLimiter | None = None

    def start(self) -> None:
        # anyio's limiter belongs to a running event loop, so it is made in the lifespan, not here.
        self.limiter = anyio.CapacityLimiter(self.settings.decode_concurrency)

    async def classify(self, model: LoadedModel, upload: Upload, result_id: str) -> Classification:
        """One image; decoding in a worker thread, then (micro-batching on) the wait holds no thread."""
        if self.classifier.batcher is None:
            return await self._off_loop(self._classify_one, model, upload.data, result_id)
        array = await self._off_loop(self.decode, model, upload.data)
        return self._shape(model, await self.classifier.score_async(model, array[None]), [result_id])[0]

    async def classify_batch(self, model: LoadedModel, items: list[BatchInput]) -> list[BatchItem]:
        """Several images in one ORT call; each item has its own id and its own result or 4xx error."""
        return await self._off_loop(self._classify_many, model, items)

    async def _off_loop(self, work: Callable[..., T], *args: object) -> T:
        """``work`` in a worker thread under the limiter; with ``decode_inline``, on the event loop itself
        (no thread hand-off, but every other request waits while it runs)."""
        if self.settings.decode_inline:
            return work(*args)
        return await anyio.to_thread.run_sync(work, *args, limiter=self.limiter)

    def decode(self, model: LoadedModel, data: bytes) -> np.ndarray:
        height, width, channels = model.input_shape
        start = time.perf_counter()
        array = load_image(data, height, width, channels, self.settings.max_pixels)
        self.metrics.decode_seconds.observe(time.perf_counter() - start)
        return array

    def _shape(self, model: LoadedModel, scores: Scores, ids: list[str]) -> list[Classification]:
        results = to_classifications(model, scores, ids)
        for result in results:
            self.metrics.observe_result(result.verdict, result.nearest_class, result.score, result.threshold)
        return results

    def _classify_one(self, model: LoadedModel, data: bytes, result_id: str) -> Classification:
        return self._shape(model, self.classifier.score(model, self.decode(model, data)[None]), [result_id])[0]

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
            scored = self._shape(model, self.classifier.score(model, np.stack(arrays)), ids)
            for index, result in zip(positions, scored, strict=True):
                out[index].result = result
        return out
