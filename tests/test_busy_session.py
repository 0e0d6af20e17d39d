"""Two ONNX Runtime sessions of one graph: a call that starts alone runs with the configured intra-op
threads (a lone photo's latency), a call that starts while another runs takes the one-thread busy
session. Both give the same outputs, both prove their golden scores at load, and the second session
exists only where it can help (CPU, a different thread count)."""

from __future__ import annotations

import numpy as np
import pytest

from service.engines import wants_busy_session
from service.imaging import load_image_file
from service.model import load_model
from service.settings import Settings
from tests.conftest import SHIPPED_MODEL


@pytest.fixture(scope="module")
def photos(trashnet_dir) -> np.ndarray:
    paths = [trashnet_dir / "glass" / "glass10.jpg", trashnet_dir / "trash" / "trash1.jpg"]
    return np.stack([load_image_file(path, 32, 32, 3) for path in paths])


def test_a_call_beside_another_takes_the_busy_session_and_scores_alike(photos):
    model = load_model(SHIPPED_MODEL, Settings(intra_op_threads=2, busy_intra_op_threads=1))
    assert model.busy_session is not None and model.golden.status == "verified"
    options = model.busy_session.get_session_options(), model.session.get_session_options()
    assert [o.intra_op_num_threads for o in options] == [1, 2]
    lone_before, busy_before = model.runs.lone, model.runs.busy
    alone = model.run(photos)
    with model.runs.started():  # another call under way, as under concurrent load
        beside = model.run(photos)
    # the lone call, the held slot (itself a lone start), and the call beside it
    assert (model.runs.lone - lone_before, model.runs.busy - busy_before) == (2, 1)
    assert model.runs.running == 0
    np.testing.assert_allclose(beside.distances, alone.distances, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(beside.nearest, alone.nearest)
    assert alone.score[1] > alone.score[0]  # trash farther than glass: not a collapsed score


def test_busy_calls_are_counted_under_real_concurrency(photos):
    from concurrent.futures import ThreadPoolExecutor

    model = load_model(SHIPPED_MODEL, Settings(intra_op_threads=2, busy_intra_op_threads=1))
    batch = np.repeat(photos, 16, axis=0)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: model.run(batch), range(40)))
    assert model.runs.busy > 0 and model.runs.running == 0
    for result in results:
        np.testing.assert_allclose(result.score, results[0].score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("intra", "busy", "providers", "wanted"),
    [
        (0, 1, ["CPUExecutionProvider"], True),  # ORT's default threads alone, one beside others
        (2, 1, ["CPUExecutionProvider"], True),
        (1, 1, ["CPUExecutionProvider"], False),  # the same thread count: one session serves both
        (2, 0, ["CPUExecutionProvider"], False),  # switched off
        (2, 1, ["CUDAExecutionProvider", "CPUExecutionProvider"], False),  # a GPU call: CPU threads idle
    ],
)
def test_the_busy_session_exists_only_where_it_can_help(intra, busy, providers, wanted):
    settings = Settings(intra_op_threads=intra, busy_intra_op_threads=busy)
    assert wants_busy_session(settings, providers) is wanted


def test_switched_off_there_is_one_session(photos):
    model = load_model(SHIPPED_MODEL, Settings(busy_intra_op_threads=0))
    assert model.busy_session is None
    with model.runs.started():
        assert model.run(photos).score.shape == (2,)
