"""The Label Studio ML backend routes (``/label-studio``) in process, with the bodies Label Studio 1.23 sends
(``ml/api_connector.py``, ``webhooks/serializers_for_hooks.py``); the real server's round trip is in
tests/test_label_studio_roundtrip.py."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.capture_format import read_sidecar
from service.label_studio import choice_result, config_choices, labeling_config
from service.labels import valid_labels
from service.settings import Settings
from tests.capture_support import open_model, write_capture
from tests.service_support import photo_subset

TOKEN = "backend-test-token"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"label-studio:{TOKEN}".encode()).decode()}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DAY = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def bin_model(model: Path):
    return open_model(model)


@pytest.fixture
def store(tmp_path: Path, trashnet_dir: Path, bin_model) -> dict[str, dict]:
    """Four captures (three recyclables, one trash) as the bin wrote them: capture id -> sidecar."""
    recyclable, trash = photo_subset(trashnet_dir, per_class=1, trash=1)
    photos = recyclable[:3] + trash
    return {
        f"c{i}": write_capture(tmp_path / "captures", bin_model, p, capture_id=f"c{i}", when=DAY)
        for i, p in enumerate(photos)
    }


@pytest.fixture
def client(model: Path, tmp_path: Path, store) -> Iterator[TestClient]:
    settings = Settings(model_dir=model, capture_dir=tmp_path / "captures", operator_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        yield client


def sidecar(tmp_path: Path, capture_id: str):
    return read_sidecar(tmp_path / "captures" / "2026-11-28" / f"{capture_id}.json")


def task(task_id: int, capture_id: str) -> dict:
    return {
        "id": task_id,
        "project": 1,
        "data": {"image": f"/data/local-files/?d=captures/2026-11-28/{capture_id}.jpg"},
    }


def delivery(action: str, label: str, tasks: list[dict], config: str, **annotation: object) -> dict:
    """A webhook payload as Label Studio sends it (one annotation per task; lists for ANNOTATIONS_CREATED)."""
    annotations = [{"id": 100 + t["id"], "task": t["id"], "result": choice_result(label), **annotation} for t in tasks]
    many = action == "ANNOTATIONS_CREATED"
    return {
        "action": action,
        "annotation": annotations if many else annotations[0],
        "task": tasks if many else tasks[0],
        "project": {"id": 1, "label_config": config},
    }


def test_protocol_routes_need_the_operator_token(client: TestClient):
    for method, path in (("get", "/health"), ("post", "/setup"), ("post", "/predict"), ("post", "/webhook")):
        response = client.request(method, f"/label-studio{path}", json={})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    wrong = {"Authorization": "Basic " + base64.b64encode(b"label-studio:nope").decode()}
    assert client.get("/label-studio/health", headers=wrong).status_code == 401
    assert client.get("/label-studio/health", headers={"Authorization": "Basic !!"}).status_code == 401
    answer = client.get("/label-studio/health", headers=BASIC)
    assert answer.status_code == 200 and answer.json() == {"status": "UP", "model_version": "trashnet 1.3.0"}
    assert client.post("/feedback", json={"id": "c0", "label": "glass"}, headers=BASIC).status_code == 401


def test_setup_checks_the_labelling_config_against_the_served_model(client: TestClient, manifest):
    labels = valid_labels(manifest)
    config = client.get("/label-studio/config", headers=BASIC)
    assert config.status_code == 200 and config_choices(config.text) == labels
    ok = client.post("/label-studio/setup", json={"project": "1.1700000000", "schema": config.text}, headers=BASIC)
    assert ok.status_code == 200 and ok.json() == {"model_version": "trashnet 1.3.0"}
    extra = labeling_config([*labels, "battery"])  # a new category in the project: fine
    assert (
        client.post("/label-studio/setup", json={"project": "1.1", "schema": extra}, headers=BASIC).status_code == 200
    )
    short = client.post(
        "/label-studio/setup", json={"project": "1.1", "schema": labeling_config(labels[1:])}, headers=BASIC
    )
    assert short.status_code == 422
    assert short.json()["error"]["code"] == "label_config" and repr([labels[0]]) in short.json()["error"]["message"]
    broken = client.post("/label-studio/setup", json={"project": "1.1", "schema": "<View>"}, headers=BASIC)
    assert broken.status_code == 422 and "not XML" in broken.json()["error"]["message"]


def test_predict_scores_each_tasks_stored_photo(client: TestClient, store, manifest, tmp_path: Path):
    (tmp_path / "captures" / "2026-11-28" / "c1.jpg").write_bytes(b"not a photo any more")
    tasks = [
        task(1, "c0"),
        {"id": 2, "data": {"image": "http://elsewhere/x.jpg", "capture_id": "c3"}},
        task(3, "gone"),
        task(4, "c1"),
        task(5, "c2"),
    ]
    body = {"tasks": tasks, "project": "1.1", "label_config": labeling_config(valid_labels(manifest))}
    answer = client.post("/label-studio/predict", json=body, headers=BASIC)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert answer.json()["model_version"] == "trashnet 1.3.0" and len(results) == len(tasks)
    for position, capture_id in ((0, "c0"), (1, "c3"), (4, "c2")):
        side = store[capture_id]
        expected = side["nearest_class"] if side["verdict"] == "normal" else "trash"
        (prediction,) = results[position]
        assert prediction["result"] == choice_result(expected)
        assert prediction["model_version"] == "trashnet 1.3.0"
        assert prediction["score"] == pytest.approx(abs(side["score"] - side["threshold"]), abs=1e-5)
    assert results[2] == [] and results[3] == []  # no such capture, a damaged photo: no prediction for those
    scored = [
        sample.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        if family.name == "deepmad_classifications"
        for sample in family.samples
        if sample.name == "deepmad_classifications_total"
    ]
    assert scored and sum(scored) == 0  # stored photos scored again are not the bin's own answers


def test_webhook_labels_land_through_the_feedback_writer(client: TestClient, tmp_path: Path, manifest):
    config = labeling_config(valid_labels(manifest))
    created = client.post(
        "/label-studio/webhook", json=delivery("ANNOTATION_CREATED", "glass", [task(1, "c0")], config), headers=BEARER
    )
    assert created.status_code == 200, created.text
    assert created.json() == {
        "action": "ANNOTATION_CREATED",
        "labelled": [{"task": 1, "capture_id": "c0", "label": "glass"}],
        "not_labelled": 0,
    }
    assert (sidecar(tmp_path, "c0").label, sidecar(tmp_path, "c0").label_source) == ("glass", "label-studio")
    updated = client.post(
        "/label-studio/webhook", json=delivery("ANNOTATION_UPDATED", "metal", [task(1, "c0")], config), headers=BEARER
    )
    assert updated.status_code == 200 and sidecar(tmp_path, "c0").label == "metal"
    bulk = delivery("ANNOTATIONS_CREATED", "trash", [task(2, "c1"), task(3, "c2")], config)
    assert client.post("/label-studio/webhook", json=bulk, headers=BEARER).status_code == 200
    assert [sidecar(tmp_path, c).label for c in ("c1", "c2")] == ["trash", "trash"]
    skipped = delivery("ANNOTATION_CREATED", "paper", [task(4, "c3")], config, was_cancelled=True)
    answer = client.post("/label-studio/webhook", json=skipped, headers=BEARER).json()
    assert answer["labelled"] == [] and answer["not_labelled"] == 1 and sidecar(tmp_path, "c3").label is None
    other = client.post(
        "/label-studio/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}}, headers=BEARER
    )
    assert other.status_code == 200 and other.json()["labelled"] == []


@pytest.mark.parametrize(
    ("change", "status", "code", "named"),
    [
        (lambda body: body.pop("task"), 422, "missing_task", "carries no task"),
        (lambda body: body["task"].update(data={}), 422, "unknown_task", "task 1 names no capture"),
        (lambda body: body["task"]["data"].update(capture_id="nope"), 404, "unknown_task", "'nope'"),
        (lambda body: body["annotation"].update(task=9), 422, "missing_task", "task 9"),
        (
            lambda body: body["annotation"]["result"][0]["value"].update(choices=["a", "b"]),
            422,
            "invalid_annotation",
            "one choice",
        ),
        (lambda body: body["annotation"]["result"][0]["value"].update(choices=["Battery!"]), 422, None, "Battery!"),
    ],
)
def test_bad_webhook_writes_nothing(client: TestClient, tmp_path: Path, manifest, caplog, change, status, code, named):
    body = delivery("ANNOTATION_CREATED", "glass", [task(1, "c0")], labeling_config(valid_labels(manifest)))
    change(body)
    answer = client.post("/label-studio/webhook", json=body, headers=BEARER)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (code is None or error["code"] == code) and named in error["message"]
    assert sidecar(tmp_path, "c0").label is None
    refusals = [r.getMessage() for r in caplog.records if "refused, nothing written" in r.getMessage()]
    assert len(refusals) == 1 and error["message"] in refusals[0]  # Label Studio does not show the answer


def test_bulk_webhook_with_one_unknown_task_writes_none(client: TestClient, tmp_path: Path, manifest):
    body = delivery(
        "ANNOTATIONS_CREATED", "glass", [task(1, "c0"), task(2, "missing")], labeling_config(valid_labels(manifest))
    )
    assert client.post("/label-studio/webhook", json=body, headers=BEARER).status_code == 404
    assert sidecar(tmp_path, "c0").label is None


def test_new_category_counts_as_confirmed_when_the_project_configures_it(client: TestClient, tmp_path: Path, manifest):
    labels = valid_labels(manifest)
    unconfigured = delivery("ANNOTATION_CREATED", "battery", [task(1, "c0")], labeling_config(labels))
    refused = client.post("/label-studio/webhook", json=unconfigured, headers=BEARER)
    assert refused.status_code == 422 and "battery" in refused.json()["error"]["message"]
    assert sidecar(tmp_path, "c0").label is None
    configured = delivery("ANNOTATION_CREATED", "battery", [task(1, "c0")], labeling_config([*labels, "battery"]))
    assert client.post("/label-studio/webhook", json=configured, headers=BEARER).status_code == 200
    assert sidecar(tmp_path, "c0").label == "battery"
    misnamed = delivery("ANNOTATION_CREATED", "Battery!", [task(2, "c1")], labeling_config([*labels, "Battery!"]))
    answer = client.post("/label-studio/webhook", json=misnamed, headers=BEARER)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_category"
    assert sidecar(tmp_path, "c1").label is None
    categories = client.get("/captures/categories", headers=BEARER).json()
    assert [c["name"] for c in categories["pending"]] == ["battery"]
