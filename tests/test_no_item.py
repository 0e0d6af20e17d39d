"""No item, no recyclable: generated non-item frames answer ``no_item``, real TrashNet photos never do.

Through the real app (TestClient on ``create_app``) and both shipped models' graphs (32x32 and 224x224),
with frames from ``training.data.non_item_frames`` at camera sizes, every kind, some JPEG round-tripped.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.capture.writer import capture_reason
from service.capture_format import read_sidecar, sidecar_paths
from service.imaging import array_to_model_input
from service.no_item import STRUCTURE_THRESHOLD, check_items
from service.schemas import Classification, ModelRef
from service.settings import Settings
from tests.conftest import REPO_ROOT
from tests.service_support import photo_subset, wait_for
from training.data.non_item_frames import KINDS, non_item_frame, non_item_frames

MODELS = ("trashnet", "trashnet-lite0")
CAMERA_SIZES = ((240, 320), (384, 512), (480, 640))
# The flattest photos on TrashNet's training side (a cardboard sheet filling the frame, clear plastic on
# white, a trash photo): the check's threshold sits below them.
FLATTEST = ("cardboard/cardboard110.jpg", "plastic/plastic13.jpg", "plastic/plastic147.jpg", "trash/trash126.jpg")


def encoded(frame: np.ndarray, index: int) -> tuple[str, bytes, str]:
    """Every other frame as PNG, the rest as JPEG (quality 90): what a camera uploads."""
    buffer = io.BytesIO()
    image_format = "PNG" if index % 2 else "JPEG"
    Image.fromarray(frame).save(buffer, format=image_format, quality=90)
    return f"frame{index}.{image_format.lower()}", buffer.getvalue(), f"image/{image_format.lower()}"


def counters(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    return sum(
        value for (metric, pairs), value in samples.items() if metric == name and set(labels.items()) <= set(pairs)
    )


def classify_batch(client: TestClient, files: list[tuple[str, bytes, str]]) -> list[dict]:
    items = []
    for start in range(0, len(files), 32):
        response = client.post("/classify/batch", files=[("files", item) for item in files[start : start + 32]])
        assert response.status_code == 200, response.text
        items += response.json()["results"]
    return items


@pytest.fixture(scope="module")
def frames() -> list[tuple[str, np.ndarray]]:
    """Two frames of every kind at each camera size (78), a third of them JPEG round-tripped first."""
    out = []
    for size in CAMERA_SIZES:
        out += non_item_frames(2 * len(KINDS), size, seed=size[0], jpeg_share=0.33)
    return out


@pytest.fixture(scope="module", params=MODELS)
def client(request: pytest.FixtureRequest):
    with TestClient(create_app(Settings(model_dir=REPO_ROOT / "models" / request.param))) as test_client:
        yield test_client


def test_frames_without_an_item_are_never_normal(client: TestClient, frames: list) -> None:
    """Every kind at every camera size: no frame comes back normal, the check answers no_item for nearly all
    (the rest reach the graph, which rejects them), and /metrics counts them without moving the drift window."""
    before = counters(client)
    items = classify_batch(client, [encoded(frame, i) for i, (_, frame) in enumerate(frames)])
    verdicts = [item["result"]["verdict"] for item in items]
    kinds = [kind for kind, _ in frames]
    assert [kind for kind, verdict in zip(kinds, verdicts, strict=True) if verdict == "normal"] == []
    assert verdicts.count("no_item") >= 0.95 * len(frames)
    assert {kind for kind, verdict in zip(kinds, verdicts, strict=True) if verdict == "no_item"} == set(KINDS)
    for item in items:  # the graph still answered: score and distances as for any photo
        result = item["result"]
        assert result["score"] == pytest.approx(min(result["distances"].values()), rel=1e-5)

    after = counters(client)
    no_item = verdicts.count("no_item")
    assert (
        total(after, "deepmad_classifications_total", verdict="no_item")
        - total(before, "deepmad_classifications_total", verdict="no_item")
        == no_item
    )
    assert total(after, "deepmad_no_item_total") - total(before, "deepmad_no_item_total") == no_item
    scored = len(frames) - no_item  # only frames with an item reach the score histogram and the drift window
    assert total(after, "deepmad_score_count") - total(before, "deepmad_score_count") == scored
    assert total(after, "deepmad_drift_window_scores") - total(before, "deepmad_drift_window_scores") == scored


def test_real_photos_are_items(client: TestClient, trashnet_dir: Path) -> None:
    """A spread of real recyclables and trash, with the flattest training-side photos: none is no_item, and
    each verdict is the graph's (score against gamma)."""
    recyclable, trash = photo_subset(trashnet_dir, 5, 6)
    photos = [*recyclable, *trash, *(trashnet_dir / name for name in FLATTEST)]
    items = classify_batch(client, [(p.name, p.read_bytes(), "image/jpeg") for p in photos])
    for photo, item in zip(photos, items, strict=True):
        result = item["result"]
        expected = "anomalous" if result["score"] >= result["threshold"] else "normal"
        assert result["verdict"] == expected, photo


def test_the_check_is_what_turns_them_away(frames: list) -> None:
    """With DEEPMAD_NO_ITEM_CHECK=false the shipped model calls many of the same frames normal (as it did
    before the check), so the test above measures the check, not the frames."""
    settings = Settings(model_dir=REPO_ROOT / "models" / "trashnet", no_item_check=False)
    with TestClient(create_app(settings)) as client:
        items = classify_batch(client, [encoded(frame, i) for i, (_, frame) in enumerate(frames[:32])])
    verdicts = [item["result"]["verdict"] for item in items]
    assert "no_item" not in verdicts
    assert verdicts.count("normal") >= 8


def test_bad_input_is_still_refused_beside_a_non_item_frame(client: TestClient) -> None:
    """Bad input keeps its 4xx JSON, alone and as one item of a batch beside a frame answered no_item."""
    garbage = client.post("/classify", content=b"not an image", headers={"content-type": "image/jpeg"})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "not_an_image"
    empty = client.post("/classify", content=b"", headers={"content-type": "image/jpeg"})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_body"
    frame = non_item_frame("uniform", (240, 320), np.random.default_rng(1))
    items = classify_batch(client, [("bad.jpg", b"\xff\xd8 truncated", "image/jpeg"), encoded(frame, 1)])
    assert items[0]["status"] == 400 and items[0]["error"]["code"] in {"not_an_image", "truncated_image"}
    assert items[1]["status"] == 200 and items[1]["result"]["verdict"] == "no_item"


def test_open_inference_protocol_answers_no_item(trashnet_dir: Path) -> None:
    """v2 infer: a photo (BYTES) and a ready image (UINT8) without an item answer no_item, a real photo does not."""
    settings = Settings(model_dir=REPO_ROOT / "models" / "trashnet")
    dark = non_item_frame("dark", (384, 512), np.random.default_rng(2))
    photos = [encoded(dark, 1)[1], (trashnet_dir / "glass" / "glass10.jpg").read_bytes()]
    ready = array_to_model_input(non_item_frame("gradient", (384, 512), np.random.default_rng(3)), 32, 32, 3)
    with TestClient(create_app(settings)) as client:
        as_photos = {
            "inputs": [
                {
                    "name": "photo",
                    "datatype": "BYTES",
                    "shape": [2],
                    "data": [base64.b64encode(p).decode() for p in photos],
                }
            ]
        }
        as_image = {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": ready.ravel().tolist()}]
        }
        answers = [client.post("/v2/models/trashnet/infer", json=body) for body in (as_photos, as_image)]
    verdicts = [next(o for o in a.json()["outputs"] if o["name"] == "verdict")["data"] for a in answers]
    assert verdicts[0][0] == "no_item" and verdicts[0][1] in {"normal", "anomalous"}
    assert verdicts[1] == ["no_item"]


def test_micro_batching_keeps_the_check() -> None:
    """With micro-batching on, a lone /classify photo is decoded and checked apart from the scoring."""
    settings = Settings(model_dir=REPO_ROOT / "models" / "trashnet", microbatch_max_items=4)
    frame = non_item_frame("noise", (384, 512), np.random.default_rng(5))
    with TestClient(create_app(settings)) as client:
        assert client.post("/classify", files={"file": encoded(frame, 0)}).json()["verdict"] == "no_item"


def test_a_no_item_frame_is_captured_as_such(tmp_path: Path) -> None:
    """With capture on (every sampled answer kept), a no_item frame's sidecar says no_item, reason sampled."""
    settings = Settings(
        model_dir=REPO_ROOT / "models" / "trashnet", capture_dir=tmp_path / "captures", capture_normal_rate=1.0
    )
    frame = non_item_frame("empty_chamber", (384, 512), np.random.default_rng(4))
    with TestClient(create_app(settings)) as client:
        answer = client.post("/classify", files={"file": encoded(frame, 1)}).json()
        assert answer["verdict"] == "no_item" and answer["capture"]["status"] == "queued"
        assert wait_for(lambda: any(sidecar_paths(tmp_path / "captures")))
    (path,) = sidecar_paths(tmp_path / "captures")
    sidecar = read_sidecar(path)
    assert (sidecar.id, sidecar.verdict, sidecar.reason) == (answer["id"], "no_item", "sampled")
    assert sidecar.score == pytest.approx(answer["score"])


def test_a_no_item_frame_is_never_kept_as_uncertain() -> None:
    """Its score's distance to gamma means nothing: at the threshold itself it is sampled, not uncertain."""
    answer = Classification(
        id="x", verdict="no_item", score=5.0, score_rule="min_distance", threshold=5.0, nearest_class="glass",
        distances={"glass": 5.0}, model=ModelRef(name="m", version="1"),
    )  # fmt: skip
    assert capture_reason(answer, 0.5, 0.0, random.Random(0)) is None
    assert capture_reason(answer, 0.5, 1.0, random.Random(0)) == "sampled"
    normal = answer.model_copy(update={"verdict": "normal"})
    assert capture_reason(normal, 0.5, 0.0, random.Random(0)) == "uncertain"


@pytest.mark.parametrize("size", [32, 224])
def test_check_on_model_inputs(size: int) -> None:
    """The check alone, on model inputs: each kind at the model's own input size, an outline of a few grey
    levels on an empty board, grey (one-channel) inputs and inputs smaller than the grid."""
    rng = np.random.default_rng(size)
    flat = [array_to_model_input(non_item_frame(kind, (384, 512), rng), size, size, 3) for kind in KINDS]
    assert all(check.no_item for check in check_items(np.stack(flat)))

    board = np.full((size, size, 3), 200, dtype=np.uint8)
    board[size // 4 : size // 2, size // 3 : 2 * size // 3] -= 12  # a faint box on the board
    (item,) = check_items(board[None])
    assert not item.no_item and item.structure > STRUCTURE_THRESHOLD

    assert check_items(np.stack(flat)[..., :1])[0].no_item
    assert [c.no_item for c in check_items(np.stack([board[:8, :8], np.zeros((8, 8, 3), np.uint8)]))] == [
        True,
        True,
    ]
    with pytest.raises(ValueError, match="uint8"):
        check_items(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_generator_is_seeded_and_makes_every_kind() -> None:
    first, again = non_item_frames(len(KINDS), (48, 64), seed=7), non_item_frames(len(KINDS), (48, 64), seed=7)
    assert [kind for kind, _ in first] == list(KINDS)
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert all(frame.shape == (48, 64, 3) and frame.dtype == np.uint8 for _, frame in first)
    other = non_item_frames(len(KINDS), (48, 64), seed=8)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    with pytest.raises(ValueError, match="unknown non-item kind"):
        non_item_frame("cat", (8, 8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="jpeg_share"):
        non_item_frames(1, (8, 8), seed=0, jpeg_share=2.0)
