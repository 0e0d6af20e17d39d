"""The micro-batcher: each caller gets its own rows under concurrent submission; batches flush by size
and by time; models never share a batch; an error reaches every caller of its batch. No timed asserts:
a gate (an Event inside the fake model's run) makes jobs queue up deterministically."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.model import MicroBatcher, Scores
from service.settings import Settings
from tests.service_support import model_dir, photo_subset

TIMEOUT = 30


class FakeModel:
    """``run`` scores each image by its first pixel; records batch sizes; can hold a call at a gate."""

    def __init__(self, fail: bool = False):
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail

    def run(self, batch: np.ndarray) -> Scores:
        self.sizes.append(len(batch))
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        if self.fail:
            raise RuntimeError("boom")
        first = batch[:, 0, 0, 0].astype(np.float32)
        return Scores(np.stack([first, first + 1], axis=1), first, first.astype(np.int64))


def images(*values: int) -> np.ndarray:
    batch = np.zeros((len(values), 4, 4, 3), dtype=np.uint8)
    batch[:, 0, 0, 0] = values
    return batch


@pytest.fixture
def batcher():
    made: list[MicroBatcher] = []

    def make(**kwargs) -> MicroBatcher:
        made.append(MicroBatcher(**kwargs))
        return made[-1]

    yield make
    for item in made:
        item.close()


def hold_first_call(batcher: MicroBatcher, model: FakeModel):
    """Submit one job and keep the worker inside its ORT call, so the next jobs queue up."""
    model.gate.clear()
    model.entered.clear()
    future = batcher.submit(model, images(0))
    assert model.entered.wait(TIMEOUT)
    return future


def test_concurrent_callers_get_their_own_rows(batcher) -> None:
    model = FakeModel()
    mb = batcher(max_items=8, wait_s=0.001)
    values = list(range(1, 200))

    def call(value: int) -> tuple[int, Scores]:
        return value, mb.submit(model, images(value)).result(TIMEOUT)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, values))
    for value, scores in results:
        assert scores.score.tolist() == [value]
        assert scores.distances.tolist() == [[value, value + 1]]
        assert scores.nearest.tolist() == [value]
    assert sum(model.sizes) == len(values)
    assert max(model.sizes) <= 8


def test_multi_image_jobs_get_their_slices(batcher) -> None:
    model = FakeModel()
    mb = batcher(max_items=16)
    first = hold_first_call(mb, model)
    a, b = mb.submit(model, images(1, 2, 3)), mb.submit(model, images(4, 5))
    model.gate.set()
    assert first.result(TIMEOUT).score.tolist() == [0]
    assert a.result(TIMEOUT).score.tolist() == [1, 2, 3]
    assert b.result(TIMEOUT).score.tolist() == [4, 5]
    assert model.sizes == [1, 5]


def test_flushes_when_full(batcher) -> None:
    model = FakeModel()
    mb = batcher(max_items=4, wait_s=10.0)  # a long wait: only the size limit can flush these quickly
    first = hold_first_call(mb, model)
    futures = [mb.submit(model, images(v)) for v in range(1, 9)]
    model.gate.set()
    first.result(TIMEOUT)
    assert [f.result(TIMEOUT).score.item() for f in futures] == list(range(1, 9))
    assert model.sizes == [1, 4, 4]


def test_flushes_on_time_when_not_full(batcher) -> None:
    model = FakeModel()
    mb = batcher(max_items=100, wait_s=0.01)
    first = hold_first_call(mb, model)
    pair = [mb.submit(model, images(v)) for v in (1, 2)]
    model.gate.set()
    first.result(TIMEOUT)
    [f.result(TIMEOUT) for f in pair]  # a batch of two: the batcher now waits for company
    lone = mb.submit(model, images(7))
    assert lone.result(TIMEOUT).score.tolist() == [7]  # 100 items never come: flushed by the timer
    assert model.sizes == [1, 2, 1]


def test_models_never_share_a_batch(batcher) -> None:
    old, new = FakeModel(), FakeModel()
    mb = batcher(max_items=8)
    first = hold_first_call(mb, old)
    futures = [mb.submit(model, images(v)) for v, model in [(1, old), (2, old), (3, new), (4, old)]]
    old.gate.set()
    first.result(TIMEOUT)
    assert [f.result(TIMEOUT).score.item() for f in futures] == [1, 2, 3, 4]
    assert old.sizes == [1, 2, 1] and new.sizes == [1]


def test_an_error_reaches_every_caller_and_the_worker_survives(batcher) -> None:
    good, bad = FakeModel(), FakeModel(fail=True)
    mb = batcher(max_items=8)
    first = hold_first_call(mb, bad)
    failing = [mb.submit(bad, images(v)) for v in (1, 2)]
    bad.gate.set()
    for future in [first, *failing]:
        with pytest.raises(RuntimeError, match="boom"):
            future.result(TIMEOUT)
    assert mb.submit(good, images(5)).result(TIMEOUT).score.tolist() == [5]


def test_closed_batcher_scores_the_queue_then_refuses(batcher) -> None:
    model = FakeModel()
    mb = batcher(max_items=8)
    first = hold_first_call(mb, model)
    queued = mb.submit(model, images(3))
    closer = threading.Thread(target=mb.close)
    closer.start()
    model.gate.set()
    closer.join(TIMEOUT)
    assert first.result(TIMEOUT).score.tolist() == [0]
    assert queued.result(TIMEOUT).score.tolist() == [3]
    with pytest.raises(RuntimeError, match="closed"):
        mb.submit(model, images(1)).result(TIMEOUT)


# ---- through the API: micro-batching on gives each request the answer it gets with batching off ----


def test_api_with_micro_batching_matches_direct_calls(trashnet_dir) -> None:
    recyclable, trash = photo_subset(trashnet_dir, per_class=3, trash=3)
    photos = [path.read_bytes() for path in recyclable + trash]
    settings = {"model_dir": model_dir(), "intra_op_threads": 1}

    def classify_all(client: TestClient, parallel: int) -> list[dict]:
        def one(data: bytes) -> dict:
            response = client.post("/classify", content=data, headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(one, photos))

    with TestClient(create_app(Settings(**settings))) as client:
        direct = classify_all(client, 1)
    with TestClient(create_app(Settings(**settings, microbatch_max_items=8, microbatch_wait_ms=5))) as client:
        batched = classify_all(client, 8)
        batch_body = client.post(
            "/classify/batch", files=[("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos[:4])]
        ).json()
        metrics = client.get("/metrics").text
    for a, b in zip(direct, batched, strict=True):
        assert a["nearest_class"] == b["nearest_class"] and a["verdict"] == b["verdict"]
        assert b["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-5)
    assert [item["result"]["score"] for item in batch_body["results"]] == pytest.approx(
        [a["score"] for a in direct[:4]], rel=1e-4, abs=1e-5
    )
    assert "deepmad_inference_batch_size_count" in metrics
