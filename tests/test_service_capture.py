"""Capture, request ids, operator labels and the capture listing, against real uvicorn processes and real files.

The photos are real TrashNet photos; thresholds are chosen from the model's own scores on them, so the
tests hold for any exported model (``DEEPMAD_TEST_MODEL_DIR``). No timed assertions: a test waits for
``deepmad_capture_pending`` to reach 0 (every capture offered before the last answer has been written
or dropped) and then checks exactly.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from flywheel.captures import LS_LOCAL_FILES, import_label_studio, label_studio_tasks
from service.app import create_app
from service.capture.store import CaptureStore
from service.capture.writer import capture_reason
from service.capture_format import Sidecar
from service.fileio import write_atomic
from service.label_studio import LS_CHOICES, LS_IMAGE
from service.labels import anomaly_labels, valid_labels
from service.manifest import Manifest
from service.schemas import Classification, ModelRef
from service.settings import Settings
from tests.conftest import REPO_ROOT
from tests.service_support import photo_subset, run_server, service_env, wait_for, without_id

pytestmark = pytest.mark.slow

TOKEN = "operator-test-token"
ADMIN = "admin-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIDECAR_KEYS = {
    "id", "time", "image", "image_sha256", "image_bytes", "content_type", "model", "score", "threshold",
    "verdict", "nearest_class", "distances", "reason", "label", "labelled_at", "label_source",
}  # fmt: skip
TIME_PATTERN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(scope="module")
def photos(trashnet_dir: Path) -> list[Path]:
    recyclable, trash = photo_subset(trashnet_dir, per_class=2, trash=6)
    return recyclable + trash


@pytest.fixture(scope="module")
def reference(model: Path, photos: list[Path]) -> dict[str, dict]:
    """Each photo's answer from an in-process app without capture: what every answer must stay."""
    with TestClient(create_app(Settings(model_dir=model))) as client:
        answers = {p.name: client.post("/classify", content=p.read_bytes(), headers=JPEG).json() for p in photos}
    scores = [answer["score"] for answer in answers.values()]
    assert np.std(scores) > 0, "constant scores: the model is not looking at the image"
    return answers


JPEG = {"content-type": "image/jpeg"}


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def drained(client: httpx.Client) -> None:
    """Wait until the writer has handled every capture offered so far."""
    assert wait_for(lambda: metric(client, "deepmad_capture_pending") == 0), "capture writer did not drain"


def captures(client: httpx.Client, **params: object) -> dict:
    response = client.get("/captures", headers=AUTH, params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return response.json()


def classify(client: httpx.Client, path: Path, **headers: str) -> httpx.Response:
    response = client.post("/classify", content=path.read_bytes(), headers={**JPEG, **headers})
    assert response.status_code == 200, response.text
    return response


def capture_flags(folder: Path, *extra: str) -> tuple[str, ...]:
    return ("--capture-dir", str(folder), "--operator-token", TOKEN, "--admin-token", ADMIN, *extra)


def visible_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and not path.name.startswith(".")]


# ---- the policy ----


def test_policy_keeps_anomalous_and_uncertain_only(
    model: Path, photos: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    """With no sampling, exactly the anomalous photos and those within the margin of the threshold."""
    scores = np.array([reference[p.name]["score"] for p in photos])
    threshold = float(np.quantile(scores, 0.6))
    margin = float((threshold - np.quantile(scores, 0.2)) / 2)
    flags = capture_flags(tmp_path / "captures", "--threshold", str(threshold), "--capture-margin", str(margin))
    with run_server(model, tmp_path, *flags, "--capture-normal-rate", "0") as server, server.client() as client:
        answers = {p.name: classify(client, p).json() for p in photos}
        drained(client)
        listed = {item["id"]: item for item in captures(client)["items"]}
    expected = {
        answer["id"]: "anomalous" if answer["score"] >= threshold else "uncertain"
        for answer in answers.values()
        if answer["score"] >= threshold or abs(answer["score"] - threshold) <= margin
    }
    assert set(expected.values()) == {"anomalous", "uncertain"}, "the photos must exercise both reasons"
    assert len(expected) < len(photos), "some confident normal photos must be left out"
    assert {capture_id: item["reason"] for capture_id, item in listed.items()} == expected
    for name, answer in answers.items():  # capture never changes an answer (the threshold is overridden here)
        assert {key: answer[key] for key in ("score", "distances", "nearest_class", "model")} == {
            key: reference[name][key] for key in ("score", "distances", "nearest_class", "model")
        }


def test_normal_sample_rate_is_a_fraction() -> None:
    """capture_reason samples confident normals at the configured rate (two-sided binomial, alpha 1e-4)."""
    result = Classification(
        id="x", verdict="normal", score=1.0, score_rule="min_distance", threshold=5.0, probability=0.01,
        nearest_class="glass", distances={"glass": 1.0}, model=ModelRef(name="m", version="1"),
    )  # fmt: skip
    rng = random.Random(7)
    n = 4000
    kept = sum(capture_reason(result, margin=0.5, normal_rate=0.05, rng=rng) == "sampled" for _ in range(n))
    sd = (n * 0.05 * 0.95) ** 0.5
    assert abs(kept - n * 0.05) < 4 * sd, kept
    assert capture_reason(result, margin=0.5, normal_rate=0.0, rng=rng) is None
    assert capture_reason(result, margin=4.0, normal_rate=0.0, rng=rng) == "uncertain"
    anomalous = result.model_copy(update={"verdict": "anomalous", "score": 6.0})
    assert capture_reason(anomalous, margin=0.0, normal_rate=0.0, rng=rng) == "anomalous"


# ---- the byte budget ----


def test_budget_evicts_oldest_unlabelled_and_never_a_labelled_one(
    model: Path, trashnet_dir: Path, tmp_path: Path
) -> None:
    photos = sorted((trashnet_dir / "metal").glob("*.jpg"))[:10]
    budget = 4 * (max(p.stat().st_size for p in photos) + 2000)
    folder = tmp_path / "captures"
    flags = capture_flags(folder, "--threshold", "0", "--capture-max-bytes", str(budget))
    with run_server(model, tmp_path, *flags) as server, server.client() as client:
        ids = []
        for photo in photos[:3]:
            ids.append(classify(client, photo).json()["id"])
            drained(client)
        for capture_id in (ids[0], ids[2]):
            assert client.post("/feedback", headers=AUTH, json={"id": capture_id, "label": "metal"}).status_code == 200
        for photo in photos[3:8]:
            ids.append(classify(client, photo).json()["id"])
            drained(client)
        listing = captures(client, order="oldest")
        kept = [item["id"] for item in listing["items"]]
        assert ids[0] in kept and ids[2] in kept, "a labelled capture was evicted"
        unlabelled = [capture_id for capture_id in ids if capture_id not in (ids[0], ids[2])]
        evicted = [capture_id for capture_id in unlabelled if capture_id not in kept]
        assert evicted and evicted == unlabelled[: len(evicted)], "not the oldest unlabelled first"
        assert metric(client, "deepmad_capture_evictions_total") == len(evicted)
        assert metric(client, "deepmad_capture_bytes") <= budget

        # Label everything left: a new capture has nowhere to go and is dropped, not a label evicted.
        for capture_id in kept:
            client.post("/feedback", headers=AUTH, json={"id": capture_id, "label": "metal"}).raise_for_status()
        dropped = classify(client, photos[8]).json()["id"]
        drained(client)
        assert metric(client, "deepmad_captures_total", outcome="budget_full") == 1
        after = [item["id"] for item in captures(client, order="oldest")["items"]]
        assert after == kept and dropped not in after
    on_disk = {path.stem for path in visible_files(folder) if path.suffix == ".json"}
    assert on_disk == set(kept)
    assert sum(path.stat().st_size for path in visible_files(folder)) <= budget


def test_a_label_written_by_another_process_is_never_evicted(trashnet_dir: Path, tmp_path: Path) -> None:
    """The exporter's Label Studio import rewrites sidecars behind the service's back."""
    photos = sorted((trashnet_dir / "paper").glob("*.jpg"))[:6]
    store = CaptureStore(tmp_path, max_bytes=3 * (max(p.stat().st_size for p in photos) + 2000))
    store.open()

    def sidecar(index: int, photo: Path) -> Sidecar:
        data = photo.read_bytes()
        return Sidecar(
            id=f"item-{index}", time=f"2026-11-29T00:00:0{index}.000000Z", image=f"item-{index}.jpg",
            image_sha256=hashlib.sha256(data).hexdigest(), image_bytes=len(data), content_type="image/jpeg",
            model={"name": "m", "version": "1", "sha256": "0" * 64}, score=1.0, threshold=2.0, verdict="normal",
            nearest_class="paper", distances={"paper": 1.0}, reason="sampled",
        )  # fmt: skip

    assert store.add(sidecar(0, photos[0]), photos[0].read_bytes()) == "written"
    path = tmp_path / "2026-11-29" / "item-0.json"
    labelled = Sidecar.model_validate_json(path.read_bytes()).model_copy(
        update={"label": "trash", "labelled_at": "2026-11-29T00:01:00.000000Z", "label_source": "label-studio"}
    )
    write_atomic(path, labelled.to_bytes(), sync_folder=True)
    outcomes = [store.add(sidecar(i, photo), photo.read_bytes()) for i, photo in enumerate(photos[1:], start=1)]
    assert outcomes == ["written"] * 5
    assert Sidecar.model_validate_json(path.read_bytes()).label == "trash"
    assert store.evictions >= 2 and store.used_bytes <= store.max_bytes


def test_a_rewrite_with_the_same_mtime_is_still_listed(trashnet_dir: Path, tmp_path: Path) -> None:
    """A filesystem with coarse timestamps (FAT: 2 s) can give the import's rewrite the old mtime."""
    photo = sorted((trashnet_dir / "glass").glob("*.jpg"))[0]
    data = photo.read_bytes()
    store = CaptureStore(tmp_path, max_bytes=10 * len(data))
    store.open()
    sidecar = Sidecar(
        id="item-0", time="2026-11-29T00:00:00.000000Z", image="item-0.jpg",
        image_sha256=hashlib.sha256(data).hexdigest(), image_bytes=len(data), content_type="image/jpeg",
        model={"name": "m", "version": "1", "sha256": "0" * 64}, score=1.0, threshold=2.0, verdict="normal",
        nearest_class="glass", distances={"glass": 1.0}, reason="sampled",
    )  # fmt: skip
    assert store.add(sidecar, data) == "written"
    assert [item.label for item in store.list()[1]] == [None] and store.list(labelled=False)[0] == 1
    path = tmp_path / "2026-11-29" / "item-0.json"
    before = path.stat()
    labelled = sidecar.model_copy(update={"label": "glass", "labelled_at": sidecar.time, "label_source": "import"})
    write_atomic(path, labelled.to_bytes(), sync_folder=True)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert [item.label for item in store.list()[1]] == ["glass"]
    assert store.list(labelled=True)[0] == 1 and store.list(labelled=False)[0] == 0


# ---- concurrency and crashes ----


def test_32_concurrent_clients_with_capture_on_get_no_errors(
    model: Path, photos: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    """A small queue may drop captures under this load; it must never fail or change an answer."""
    flags = capture_flags(tmp_path / "captures", "--capture-normal-rate", "1", "--capture-queue-size", "8")
    jobs = [photos[i % len(photos)] for i in range(128)]
    with run_server(model, tmp_path, *flags) as server, httpx.Client(base_url=server.url, timeout=60) as client:

        def send(photo: Path) -> tuple[Path, int, dict]:
            response = client.post("/classify", content=photo.read_bytes(), headers=JPEG)
            return photo, response.status_code, response.json()

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(send, jobs))
        assert [status for _, status, _ in results] == [200] * len(jobs)
        for photo, _, answer in results:
            assert without_id(answer) == without_id(reference[photo.name])
        assert len({answer["id"] for _, _, answer in results}) == len(jobs)
        drained(client)
        written = metric(client, "deepmad_captures_total", outcome="written")
        queue_full = metric(client, "deepmad_captures_total", outcome="queue_full")
        assert written + queue_full == len(jobs) and written > 0
        assert captures(client)["total"] == written
        assert metric(client, "deepmad_requests_total", endpoint="/classify", status="500", verdict="none") == 0


def kill_9_once(server, stream: Callable[[int], None], clients: int, stop: threading.Event, when) -> None:
    """``clients`` threads run ``stream(k)`` against ``server``; SIGKILL it once ``when()`` holds."""
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(when, timeout=60)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_kill_9_mid_capture_stream_leaves_no_partial_capture(model: Path, photos: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    uploads = {hashlib.sha256(p.read_bytes()).hexdigest() for p in photos}
    stop = threading.Event()
    with run_server(model, tmp_path, *capture_flags(folder, "--threshold", "0")) as server:

        def stream(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for i in range(200):
                    if stop.is_set():
                        return
                    try:
                        client.post("/classify", content=photos[(offset + i) % len(photos)].read_bytes(), headers=JPEG)
                    except httpx.TransportError:
                        return  # the server is gone

        kill_9_once(server, stream, 4, stop, lambda: len(list(folder.rglob("*.json"))) >= 12)
    sidecars = [path for path in visible_files(folder) if path.suffix == ".json"]
    assert len(sidecars) >= 12
    for path in visible_files(folder):
        if path.suffix == ".json":
            sidecar = Sidecar.model_validate_json(path.read_bytes())  # complete, valid JSON
            image = path.parent / sidecar.image
            assert hashlib.sha256(image.read_bytes()).hexdigest() == sidecar.image_sha256
        else:  # an image, possibly without its sidecar yet: still never a partial file
            assert hashlib.sha256(path.read_bytes()).hexdigest() in uploads, f"partial image {path}"

    # Restarted on the same folder: leftovers are cleared, every capture is listed.
    with run_server(model, tmp_path, *capture_flags(folder)) as server, server.client() as client:
        assert captures(client)["total"] == len(sidecars)
    assert not [path for path in folder.rglob(".*") if path.is_file()]
    images = [path for path in visible_files(folder) if path.suffix != ".json"]
    assert len(images) == len(sidecars)


# ---- ids, labels, listing, images: one server capturing everything ----


@pytest.fixture(scope="module")
def labelled_server(model: Path, photos: list[Path], reference: dict[str, dict], tmp_path_factory):
    """Captures every photo (sampling 1) at the median score, so both verdicts occur."""
    tmp_path = tmp_path_factory.mktemp("captures")
    threshold = float(np.median([answer["score"] for answer in reference.values()]))
    flags = capture_flags(tmp_path / "captures", "--capture-normal-rate", "1", "--threshold", str(threshold))
    with run_server(model, tmp_path, *flags) as server, server.client() as client:
        answers = {p.name: classify(client, p).json() for p in photos}
        drained(client)
        yield server, client, answers, tmp_path / "captures"


def test_request_id_is_reused_when_valid(labelled_server, photos: list[Path]) -> None:
    _, client, _, _ = labelled_server
    response = classify(client, photos[0], **{"X-Request-ID": "bin-7.item_0001"})
    assert response.json()["id"] == response.headers["x-request-id"] == "bin-7.item_0001"
    for bad in ("has space", "-leading-dash", "x" * 129, "../etc", "ünï".encode()):
        response = client.post("/classify", content=photos[0].read_bytes(), headers={**JPEG, "X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", response.json()["id"]), bad
        assert response.headers["x-request-id"] == response.json()["id"]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:3]]
    batch = client.post("/classify/batch", files=files, headers={"X-Request-ID": "batch-42"})
    body = batch.json()
    assert body["id"] == batch.headers["x-request-id"] == "batch-42"
    item_ids = [item["id"] for item in body["results"]]
    assert len(set(item_ids)) == 3 and "batch-42" not in item_ids
    assert [item["result"]["id"] for item in body["results"]] == item_ids
    missing = client.get("/nope")
    assert missing.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", missing.headers["x-request-id"])


def cookie_client(server) -> httpx.Client:
    """A client that sends the review page's cookie and no Authorization header."""
    return httpx.Client(base_url=server.url, timeout=30, cookies={"deepmad_operator_token": TOKEN})


def test_feedback_auth_and_errors(labelled_server, photos: list[Path], manifest: Manifest) -> None:
    server, client, answers, folder = labelled_server
    capture_id = answers[photos[1].name]["id"]
    body = {"id": capture_id, "label": "glass"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ADMIN}"}):
        response = client.post("/feedback", json=body, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    # The image cookie never authorises a label.
    with cookie_client(server) as with_cookie:
        assert with_cookie.post("/feedback", json=body).status_code == 401
    unknown = client.post("/feedback", json={"id": "never-seen", "label": "glass"}, headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_id"
    bad_label = client.post("/feedback", json={"id": capture_id, "label": "banana"}, headers=AUTH)
    assert bad_label.status_code == 422 and bad_label.json()["error"]["code"] == "invalid_label"
    # An error body quotes a short prefix of what was sent, never all of it.
    huge = client.post("/feedback", json={"id": capture_id, "label": "x" * 100_000}, headers=AUTH)
    assert huge.status_code == 422 and huge.json()["error"]["code"] == "invalid_label"
    assert len(huge.content) < 2_000 and "100000 characters" in huge.text, huge.text[:300]
    huge_id = client.post("/feedback", json={"id": "y" * 100_000, "label": "glass"}, headers=AUTH)
    assert huge_id.status_code in (404, 422) and len(huge_id.content) < 2_000, huge_id.text[:300]
    for malformed in ({"id": capture_id}, {"id": "../x", "label": "glass"}, "not json"):
        kwargs = {"content": malformed} if isinstance(malformed, str) else {"json": malformed}
        response = client.post("/feedback", headers={**AUTH, "content-type": "application/json"}, **kwargs)
        assert response.status_code in (400, 422) and set(response.json()) == {"error"}

    path = next(folder.rglob(f"{capture_id}.json"))
    assert client.post("/feedback", json=body, headers=AUTH).status_code == 200
    first = json.loads(path.read_text())
    assert (first["label"], first["label_source"]) == ("glass", "feedback") and TIME_PATTERN.match(first["labelled_at"])
    anomaly = valid_labels(manifest)[-1]
    relabel = client.post("/feedback", json={"id": capture_id, "label": anomaly}, headers=AUTH)
    assert relabel.status_code == 200 and relabel.json()["label"] == anomaly
    assert json.loads(path.read_text())["label"] == anomaly


def test_feedback_and_captures_are_off_without_capture_or_token(model: Path, tmp_path: Path) -> None:
    for settings, code in (
        (Settings(model_dir=model, operator_token=TOKEN), "capture_disabled"),
        (Settings(model_dir=model, capture_dir=tmp_path / "c"), "operator_disabled"),
    ):
        with TestClient(create_app(settings)) as client:
            for response in (
                client.post("/feedback", json={"id": "a", "label": "glass"}, headers=AUTH),
                client.get("/captures", headers=AUTH),
                client.get("/captures/a/image", headers=AUTH),
            ):
                assert response.status_code == 403 and response.json()["error"]["code"] == code


def test_captures_listing_filters_order_and_paging(labelled_server, photos: list[Path]) -> None:
    _, client, answers, folder = labelled_server
    everything = captures(client, order="oldest")
    ids = [item["id"] for item in everything["items"]]
    assert set(answers[p.name]["id"] for p in photos) <= set(ids)
    assert everything["labels"][-1] in everything["anomaly_labels"]
    for item in everything["items"]:
        assert set(item) == SIDECAR_KEYS and TIME_PATTERN.match(item["time"])
        sidecar_path = folder / item["time"][:10] / f"{item['id']}.json"
        image = (sidecar_path.parent / item["image"]).read_bytes()
        assert hashlib.sha256(image).hexdigest() == item["image_sha256"] and len(image) == item["image_bytes"]
    assert ids == sorted(ids, key=lambda i: next(x["time"] for x in everything["items"] if x["id"] == i))
    assert [item["id"] for item in captures(client, order="newest")["items"]] == ids[::-1]

    uncertain = captures(client, order="uncertain")["items"]
    gaps = [abs(item["score"] - item["threshold"]) for item in uncertain]
    assert gaps == sorted(gaps) and len(set(gaps)) > 1

    verdicts = {item["verdict"] for item in everything["items"]}
    assert verdicts == {"normal", "anomalous"}
    for verdict in verdicts:
        listed = captures(client, verdict=verdict)
        assert listed["items"] and all(item["verdict"] == verdict for item in listed["items"])
        assert listed["total"] == sum(item["verdict"] == verdict for item in everything["items"])

    target = answers[photos[2].name]["id"]
    client.post("/feedback", json={"id": target, "label": "cardboard"}, headers=AUTH).raise_for_status()
    labelled = captures(client, labelled="true")["items"]
    unlabelled = captures(client, labelled="false")["items"]
    assert target in {item["id"] for item in labelled} and all(item["label"] for item in labelled)
    assert target not in {item["id"] for item in unlabelled} and not any(item["label"] for item in unlabelled)
    assert len(labelled) + len(unlabelled) == everything["total"]

    pages, offset = [], 0
    while True:
        page = client.get("/captures", headers=AUTH, params={"order": "oldest", "limit": 5, "offset": offset}).json()
        assert page["total"] == everything["total"] and len(page["items"]) <= 5
        if not page["items"]:
            break
        pages.extend(item["id"] for item in page["items"])
        offset += 5
    assert pages == ids
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"order": "random"}, {"verdict": "maybe"}):
        response = client.get("/captures", headers=AUTH, params=params)
        assert response.status_code == 422 and set(response.json()) == {"error"}
    assert client.get("/captures").status_code == 401


def test_capture_image_route(labelled_server, photos: list[Path]) -> None:
    server, client, answers, _ = labelled_server
    capture_id = answers[photos[0].name]["id"]
    response = client.get(f"/captures/{capture_id}/image", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == photos[0].read_bytes()
    with cookie_client(server) as with_cookie:
        by_cookie = with_cookie.get(f"/captures/{capture_id}/image")
    assert by_cookie.status_code == 200 and by_cookie.content == response.content
    assert client.get(f"/captures/{capture_id}/image").status_code == 401
    assert client.get("/captures/never-seen/image", headers=AUTH).status_code == 404

    buffer = io.BytesIO()
    Image.open(photos[0]).save(buffer, format="PNG")
    png = client.post("/classify", files={"file": ("x.png", buffer.getvalue(), "image/png")}).json()
    drained(client)
    image = client.get(f"/captures/{png['id']}/image", headers=AUTH)
    assert image.headers["content-type"] == "image/png" and image.content == buffer.getvalue()
    listed = next(item for item in captures(client)["items"] if item["id"] == png["id"])
    assert listed["image"] == f"{png['id']}.png" and listed["content_type"] == "image/png"
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    assert listed["time"][:10] in (day, (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).strftime("%Y-%m-%d"))


def label_studio_export(task: dict, task_id: int, label: str) -> dict:
    """A task as Label Studio's JSON export holds it after an annotator chose ``label``."""
    choice = {"from_name": LS_CHOICES, "to_name": LS_IMAGE, "type": "choices", "value": {"choices": [label]}}
    annotation = {"id": 1000 + task_id, "completed_by": 1, "was_cancelled": False, "result": [choice]}
    return {"id": task_id, "data": task["data"], "annotations": [annotation], "predictions": task["predictions"]}


def test_labels_imported_from_label_studio_show_without_a_restart(
    model: Path, manifest: Manifest, photos: list[Path], tmp_path: Path
) -> None:
    """``flywheel.captures import-label-studio`` rewrites sidecars behind the running service's back."""
    folder = tmp_path / "captures"
    with run_server(model, tmp_path, *capture_flags(folder, "--threshold", "0")) as server, server.client() as client:
        ids = [classify(client, photo).json()["id"] for photo in photos[:4]]
        drained(client)
        assert {item["id"]: item["label"] for item in captures(client)["items"]} == dict.fromkeys(ids)
        tasks = label_studio_tasks(folder, manifest, LS_LOCAL_FILES, include_labelled=False)
        assert sorted(task["data"]["capture_id"] for task in tasks) == sorted(ids)
        chosen = {ids[0]: valid_labels(manifest)[0], ids[1]: anomaly_labels(manifest)[0]}
        export = [
            label_studio_export(task, n, chosen[task["data"]["capture_id"]])
            for n, task in enumerate(tasks, start=1)
            if task["data"]["capture_id"] in chosen
        ]
        export_file = tmp_path / "export.json"
        export_file.write_text(json.dumps(export))
        counts = import_label_studio(export_file, folder, valid_labels(manifest))
        assert counts["labelled"] == 2

        listed = {item["id"]: item for item in captures(client)["items"]}
        assert {capture_id: listed[capture_id]["label"] for capture_id in ids} == {**dict.fromkeys(ids), **chosen}
        assert {listed[capture_id]["label_source"] for capture_id in chosen} == {"label-studio"}
        assert {item["id"] for item in captures(client, labelled=True)["items"]} == set(chosen)
        assert {item["id"] for item in captures(client, labelled=False)["items"]} == set(ids) - set(chosen)
        # The listing agrees with the sidecars on disk.
        for capture_id, label in chosen.items():
            assert json.loads(next(folder.rglob(f"{capture_id}.json")).read_text())["label"] == label


def test_unwritable_capture_dir_is_one_line_at_startup(model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    command = [sys.executable, "-m", "service", "--model-dir", str(model), "--capture-dir", str(blocker / "captures")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=service_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: capture folder") and len(result.stderr.strip().splitlines()) == 1


def test_a_failing_disk_drops_counts_and_logs_once(model: Path, photos: list[Path], tmp_path: Path) -> None:
    """The day's folder cannot be made (a file is in the way): answers unchanged, 3 drops counted, 1 log line."""
    folder = tmp_path / "captures"
    folder.mkdir()
    now = dt.datetime.now(dt.timezone.utc)
    for day in (now, now + dt.timedelta(days=1)):  # a run across midnight meets the same obstacle
        (folder / day.strftime("%Y-%m-%d")).write_text("a file where the day's folder should be")
    with run_server(model, tmp_path, *capture_flags(folder, "--threshold", "0")) as server, server.client() as client:
        answers = [classify(client, photo).json() for photo in photos[:3]]
        drained(client)
        assert metric(client, "deepmad_captures_total", outcome="write_error") == 3
        assert metric(client, "deepmad_captures_total", outcome="written") == 0
        assert all(answer["verdict"] == "anomalous" for answer in answers)
        assert captures(client)["total"] == 0
        log = server.log()
    assert log.count("not written") == 1, log


# ---- the capture outcome in every answer ----


def infer_photos(client: httpx.Client, photos: list[Path]) -> dict:
    """An Open Inference Protocol v2 request with the photos as a BYTES input (JSON, base64)."""
    data = [base64.b64encode(photo.read_bytes()).decode() for photo in photos]
    body = {"inputs": [{"name": "photo", "shape": [len(data)], "datatype": "BYTES", "data": data}]}
    response = client.post("/v2/models/trashnet/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_answers_say_off_and_skipped_and_queued(
    model: Path, photos: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    """Capture off: ``off``; on, queued mode: ``queued`` with the answer's id for a kept photo, ``skipped`` for
    one the policy leaves out; the v2 response says the same in ``parameters``."""
    assert {answer["capture"]["status"] for answer in reference.values()} == {"off"}
    scores = sorted(answer["score"] for answer in reference.values())
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    folder = tmp_path / "captures"
    flags = capture_flags(folder, "--threshold", str(threshold), "--capture-margin", "0", "--capture-normal-rate", "0")
    with run_server(model, tmp_path, *flags) as server, server.client() as client:
        answers = [classify(client, photo).json() for photo in photos]
        v2 = infer_photos(client, photos[:2])
        drained(client)
        listed = {item["id"] for item in captures(client)["items"]}
    for answer in answers:
        kept = answer["verdict"] == "anomalous"
        assert answer["capture"] == ({"status": "queued", "id": answer["id"]} if kept else {"status": "skipped"})
    assert {answer["capture"]["status"] for answer in answers} == {"queued", "skipped"}
    ids = {answer["id"] for answer in answers if answer["capture"]["status"] == "queued"}
    v2_kept = [v == "anomalous" for v in next(o for o in v2["outputs"] if o["name"] == "verdict")["data"]]
    assert v2["parameters"]["capture_status"] == ",".join("queued" if kept else "skipped" for kept in v2_kept)
    assert "capture_reason" not in v2["parameters"]
    v2_ids = next(o for o in v2["outputs"] if o["name"] == "id")["data"]
    assert listed == ids | {i for i, kept in zip(v2_ids, v2_kept, strict=True) if kept}


def test_durable_answers_come_once_written_and_a_full_queue_says_dropped(
    model: Path, photos: list[Path], tmp_path: Path
) -> None:
    """Durable mode: a ``written`` answer's files are on disk when it arrives (no waiting for the writer);
    with a queue of 2, a batch of 16 photos cannot all be queued: the rest say ``dropped``/``queue_full``."""
    folder = tmp_path / "captures"
    flags = capture_flags(folder, "--threshold", "0", "--capture-queue-size", "2")
    with run_server(model, tmp_path, *flags, DEEPMAD_CAPTURE_MODE="durable") as server, server.client() as client:
        for photo in photos[:3]:
            answer = classify(client, photo).json()
            assert answer["capture"] == {"status": "written", "id": answer["id"]}
            sidecar = Sidecar.model_validate_json(next(folder.glob(f"*/{answer['id']}.json")).read_bytes())
            image = (folder / sidecar.time[:10] / sidecar.image).read_bytes()
            assert image == photo.read_bytes() and hashlib.sha256(image).hexdigest() == sidecar.image_sha256
        assert infer_photos(client, photos[:1])["parameters"]["capture_status"] == "written"
        jobs = [photos[i % len(photos)] for i in range(16)]
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in jobs]
        batch = client.post("/classify/batch", files=files).json()["results"]
        outcomes = [item["result"]["capture"] for item in batch]
        dropped = [o for o in outcomes if o["status"] == "dropped"]
        assert dropped and all(o == {"status": "dropped", "reason": "queue_full"} for o in dropped)
        written = {o["id"] for o in outcomes if o["status"] == "written"}
        assert len(written) + len(dropped) == 16
        assert metric(client, "deepmad_captures_total", outcome="queue_full") == len(dropped)
        on_disk = {path.stem for path in folder.glob("*/*.json")}
        assert written <= on_disk and not {item["id"] for item in batch} - written & on_disk


def test_kill_9_under_durable_capture_load_keeps_every_written_answer(
    model: Path, photos: list[Path], tmp_path: Path
) -> None:
    """Every capture a client was told is ``written`` survives a SIGKILL mid-stream with its sidecar and its
    sha256; after a restart no temporary file or image without a sidecar is left."""
    folder = tmp_path / "captures"
    acknowledged: dict[str, Path] = {}  # capture id -> the photo sent
    lock, stop = threading.Lock(), threading.Event()
    flags = capture_flags(folder, "--threshold", "0", "--capture-queue-size", "1024")
    with run_server(model, tmp_path, *flags, DEEPMAD_CAPTURE_MODE="durable") as server:

        def stream(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for i in range(400):
                    photo = photos[(offset + i) % len(photos)]
                    if stop.is_set():
                        return
                    try:
                        answer = client.post("/classify", content=photo.read_bytes(), headers=JPEG).json()
                    except httpx.TransportError:
                        return  # the server is gone
                    if answer["capture"]["status"] == "written":
                        with lock:
                            acknowledged[answer["capture"]["id"]] = photo

        kill_9_once(server, stream, 6, stop, lambda: len(acknowledged) >= 40)
    assert len(acknowledged) >= 40
    for capture_id, photo in acknowledged.items():
        sidecar = Sidecar.model_validate_json(next(folder.glob(f"*/{capture_id}.json")).read_bytes())
        image = (folder / sidecar.time[:10] / sidecar.image).read_bytes()
        assert (
            sidecar.image_sha256 == hashlib.sha256(image).hexdigest() == hashlib.sha256(photo.read_bytes()).hexdigest()
        )

    with run_server(model, tmp_path, *capture_flags(folder)) as server, server.client() as client:
        listed = {item["id"] for item in captures(client)["items"]}
    assert set(acknowledged) <= listed
    assert not [path for path in folder.rglob(".*") if path.is_file()], "a temporary file survived the restart"
    sidecars = {path.stem for path in visible_files(folder) if path.suffix == ".json"}
    images = {path.stem for path in visible_files(folder) if path.suffix != ".json"}
    assert images == sidecars == listed
