"""Real Label Studio round trips against one label-studio server: tasks exported by ``flywheel.captures``,
labelled through Label Studio's API, exported and applied back onto the capture store; and the bin's
service connected as the project's ML backend, its pre-annotations stored by Label Studio and the
annotations landing on the captures through the webhook, with no file export.

label-studio pins packages that clash with ours, so it lives in its own venv (.venv-label-studio, made by
``make test``); the server runs on 127.0.0.1 with SQLite in a temporary data folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flywheel.captures import local_files_prefix, read_capture
from service.label_studio import LS_IMAGE, choice_result, config_choices, labeling_config
from tests.capture_support import open_model, write_capture
from tests.conftest import REPO_ROOT
from tests.service_support import free_port, model_dir, photo_subset, run_server, wait_for

LABEL_STUDIO = REPO_ROOT / ".venv-label-studio" / "bin" / "label-studio"
TOKEN = "deepmad-roundtrip-token"  # the legacy API token the server gives its first user
OPERATOR_TOKEN = "deepmad-roundtrip-operator"  # the bin's operator token, which Label Studio sends to the backend
START_TIMEOUT_S = 900  # migrating a fresh SQLite database took 115 s on a loaded 2-core machine
DAY = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.timezone.utc)

pytestmark = pytest.mark.skipif(
    not LABEL_STUDIO.is_file(),
    reason=f"{LABEL_STUDIO.parent.parent.name} is absent (label-studio's own venv; `make test` creates it)",
)


@dataclass
class LabelStudio:
    url: str
    document_root: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {TOKEN}"}, timeout=120)


def server_env(data_dir: Path, document_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPMAD_", "DJANGO_", "LABEL_STUDIO_"))}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        DJANGO_DB="sqlite",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(document_root),
        LATEST_VERSION_CHECK="false",
        COLLECT_ANALYTICS="false",
        # The bin's service is on 127.0.0.1 here (on a site, a LAN address): Label Studio refuses both for an
        # ML backend and a webhook unless told the address is meant.
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        WEBHOOK_TIMEOUT="30",  # default 1 s: a label's fsync on a busy 2-core machine may take longer
    )
    return env


def wait_for_server(process: subprocess.Popen, log: Path) -> str:
    """The server's URL once /health answers; it may move off a taken port, so the log names it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"label-studio exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        found = re.search(r"Starting development server at (http://[^/\s]+)/", log.read_text())
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(1)
    pytest.fail(f"label-studio did not answer /health in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    """``label-studio start`` with its first user and API token made on the command line (no prompts)."""
    root = tmp_path_factory.mktemp("label-studio")
    document_root = root / "served"
    document_root.mkdir()
    log = root / "server.log"
    command = [
        str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(free_port()),
        "--username", "operator@example.com", "--password", "roundtrip-password", "--user-token", TOKEN,
        "--enable-legacy-api-token",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=server_env(root / "data", document_root),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        url = wait_for_server(process, log)
        print(f"label-studio answered after {time.monotonic() - started:.0f} s")
        yield LabelStudio(url, document_root, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def captures_cli(*args: object) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "flywheel.captures", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def created(response: httpx.Response) -> dict:
    assert response.status_code == 201, response.text[:500]
    return response.json()


def import_tasks(client: httpx.Client, captures: Path, tasks_file: Path) -> dict[str, dict]:
    """A project with docs/label-studio.xml, a Local Files storage on the store, our tasks: capture id -> task."""
    config = (REPO_ROOT / "docs" / "label-studio.xml").read_text()
    project = created(client.post("/api/projects", json={"title": "bin captures", "label_config": config}))
    storage = {"project": project["id"], "path": str(captures), "title": "captures", "use_blob_urls": False}
    created(client.post("/api/storages/localfiles", json=storage))
    tasks = json.loads(tasks_file.read_text())
    imported = created(client.post(f"/api/projects/{project['id']}/import", json=tasks))
    assert (imported["task_count"], imported["prediction_count"]) == (len(tasks), len(tasks))
    listed = client.get("/api/tasks", params={"project": project["id"], "page_size": 100}).json()["tasks"]
    return {task["data"]["capture_id"]: task for task in listed}


def annotate(client: httpx.Client, task: dict, label: str, **extra: object) -> dict:
    return created(client.post(f"/api/tasks/{task['id']}/annotations/", json={"result": choice_result(label), **extra}))


def label_like_an_operator(client: httpx.Client, tasks: dict[str, dict], truth: dict[str, str]) -> dict[str, str]:
    """The true label on four tasks (two trash), a wrong label corrected afterwards, one annotation
    cancelled (a skip), the rest left alone; returns the labels an import must apply."""
    labelled = {capture_id: truth[capture_id] for capture_id in ("c000", "c002", "c005", "c007")}
    for capture_id, label in labelled.items():
        annotate(client, tasks[capture_id], label)
    wrong = annotate(client, tasks["c001"], "trash")
    fixed = client.patch(f"/api/annotations/{wrong['id']}/", json={"result": choice_result(truth["c001"])})
    assert fixed.status_code == 200, fixed.text[:500]
    labelled["c001"] = truth["c001"]
    annotate(client, tasks["c003"], "metal", was_cancelled=True)
    return labelled


def test_tasks_labelled_in_label_studio_land_on_their_captures(label_studio: LabelStudio, trashnet_dir: Path):
    model = open_model(model_dir())
    captures = label_studio.document_root / "captures"
    recyclable, trash = photo_subset(trashnet_dir, per_class=1, trash=3)
    truth = {}
    for i, photo in enumerate(recyclable + trash):
        side = write_capture(captures, model, photo, capture_id=f"c{i:03d}", when=DAY + dt.timedelta(minutes=i))
        truth[side["id"]] = photo.parent.name
    assert [truth[c] for c in ("c005", "c006", "c007")] == ["trash"] * 3
    work = label_studio.document_root.parent
    tasks_file, export_file = work / "tasks.json", work / "export.json"
    exported = captures_cli("export", "--captures", captures, "--out", tasks_file, "--format", "label-studio")
    assert exported["tasks"] == len(truth)

    with label_studio.client() as client:
        tasks = import_tasks(client, captures, tasks_file)
        assert set(tasks) == set(truth)
        for capture_id, task in tasks.items():  # Label Studio serves each task's photo out of the store
            image = client.get(task["data"][LS_IMAGE])
            assert image.status_code == 200, (task["data"][LS_IMAGE], image.status_code)
            assert image.content == (captures / "2026-11-28" / f"{capture_id}.jpg").read_bytes()
        labelled = label_like_an_operator(client, tasks, truth)
        project = tasks["c000"]["project"]
        export = client.get(
            f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": True}
        )
        assert export.status_code == 200, export.text[:500]
        export_file.write_bytes(export.content)

    counts = captures_cli("import-label-studio", export_file, "--captures", captures)
    assert counts == {
        "tasks": len(truth),
        "labelled": len(labelled),
        "unchanged": 0,
        "not_annotated": len(truth) - len(labelled),
        "unknown_capture": 0,
    }
    for capture_id in truth:
        sidecar = read_capture(captures / "2026-11-28" / f"{capture_id}.json").sidecar
        assert sidecar.label == labelled.get(capture_id), capture_id
        assert (sidecar.label_source == "label-studio") == (capture_id in labelled)


def connect_backend(client: httpx.Client, project: int, url: str) -> dict:
    """The bin as the project's ML backend (Basic auth, the operator token as password); the webhook Label
    Studio made for it gets the token as a header, the one step Label Studio's UI does not do for us."""
    backend = created(
        client.post(
            "/api/ml",
            json={
                "project": project,
                "url": url,
                "title": "bin",
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": "label-studio",
                "basic_auth_pass": OPERATOR_TOKEN,
            },
        )
    )
    hooks = [
        hook for hook in client.get("/api/webhooks/", params={"project": project}).json() if hook["project"] == project
    ]
    assert [hook["url"] for hook in hooks] == [f"{url}/webhook"]
    patched = client.patch(
        f"/api/webhooks/{hooks[0]['id']}/", json={"headers": {"Authorization": f"Bearer {OPERATOR_TOKEN}"}}
    )
    assert patched.status_code == 200, patched.text[:500]
    return backend


def test_the_bin_as_label_studios_ml_backend(label_studio: LabelStudio, trashnet_dir: Path, tmp_path: Path):
    model = open_model(model_dir())
    captures = label_studio.document_root / "bin"
    recyclable, trash = photo_subset(trashnet_dir, per_class=1, trash=2)
    sides = {}
    for i, photo in enumerate(recyclable + trash):
        side = write_capture(captures, model, photo, capture_id=f"b{i:03d}", when=DAY + dt.timedelta(minutes=i))
        sides[side["id"]] = {**side, "truth": photo.parent.name}
    prefix = local_files_prefix(captures)
    # Tasks without predictions of their own, so that the pre-annotations
    # must come from the backend. One task names its capture only by the image's file name.
    tasks = [{"data": {LS_IMAGE: f"{prefix}2026-11-28/{c}.jpg", "capture_id": c}} for c in sides if c != "b006"]
    tasks.append({"data": {LS_IMAGE: f"{prefix}2026-11-28/b006.jpg"}})

    service = run_server(model_dir(), tmp_path, "--capture-dir", str(captures), DEEPMAD_OPERATOR_TOKEN=OPERATOR_TOKEN)
    with service as bin_service, label_studio.client() as client:
        backend_url = f"{bin_service.url}/label-studio"
        served = httpx.get(f"{backend_url}/config", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        labels = config_choices(served.text)
        assert labels == ["cardboard", "glass", "metal", "paper", "plastic", "trash"]

        # A project whose labelling config lacks a model's label cannot connect; its /setup says why.
        short = created(
            client.post("/api/projects", json={"title": "short", "label_config": labeling_config(labels[:-1])})
        )
        refused = client.post("/api/ml", json={"project": short["id"], "url": backend_url, "title": "bin"})
        assert refused.status_code == 400 and "authentication" in refused.text, refused.text[:500]  # no token
        refused = client.post(
            "/api/ml",
            json={"project": short["id"], "url": backend_url, "title": "bin", "auth_method": "BASIC_AUTH",
                  "basic_auth_user": "label-studio", "basic_auth_pass": OPERATOR_TOKEN},
        )  # fmt: skip
        assert refused.status_code == 400 and "422" in refused.text, refused.text[:500]

        # The project's config: the served model's labels, plus "battery", a new category the site adds on purpose.
        config = labeling_config([*labels, "battery"])
        project = created(client.post("/api/projects", json={"title": "bin backend", "label_config": config}))["id"]
        storage = {"project": project, "path": str(captures), "title": "bin", "use_blob_urls": False}
        created(client.post("/api/storages/localfiles", json=storage))
        imported = created(client.post(f"/api/projects/{project}/import", json=tasks))
        assert (imported["task_count"], imported["prediction_count"]) == (len(sides), 0)
        backend = connect_backend(client, project, backend_url)
        assert (backend["state"], backend["model_version"]) == ("CO", "trashnet 1.3.0")

        started = time.monotonic()
        retrieved = client.post(
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        assert retrieved.status_code == 200, retrieved.text[:500]
        print(f"predictions for {len(sides)} tasks retrieved in {time.monotonic() - started:.1f} s")
        listed = client.get("/api/tasks", params={"project": project, "page_size": 100}).json()["tasks"]
        by_capture = {task["data"][LS_IMAGE].rsplit("/", 1)[1].split(".")[0]: task for task in listed}
        predictions = client.get("/api/predictions/", params={"task__project": project}).json()
        assert len(predictions) == len(sides)
        for prediction in predictions:
            capture_id = next(c for c, task in by_capture.items() if task["id"] == prediction["task"])
            side = sides[capture_id]
            expected = side["nearest_class"] if side["verdict"] == "normal" else "trash"
            assert prediction["model_version"] == "trashnet 1.3.0"
            assert prediction["result"] == choice_result(expected), capture_id
            assert prediction["score"] == pytest.approx(abs(side["score"] - side["threshold"]), abs=1e-5)

        # Operators label: the truth on four tasks (one of them named by its image only), one label
        # corrected, one skipped, one new category, the rest left alone.
        labelled = {c: sides[c]["truth"] for c in ("b000", "b002", "b005", "b006")}
        for capture_id, label in labelled.items():
            annotate(client, by_capture[capture_id], label)
        wrong = annotate(client, by_capture["b001"], "trash")
        fixed = client.patch(f"/api/annotations/{wrong['id']}/", json={"result": choice_result(sides["b001"]["truth"])})
        assert fixed.status_code == 200, fixed.text[:500]
        labelled["b001"] = sides["b001"]["truth"]
        annotate(client, by_capture["b003"], "metal", was_cancelled=True)
        annotate(client, by_capture["b004"], "battery")
        labelled["b004"] = "battery"

    def sidecar(capture_id: str):
        return read_capture(captures / "2026-11-28" / f"{capture_id}.json").sidecar

    assert wait_for(lambda: all(sidecar(c).label == label for c, label in labelled.items()), timeout=30), {
        c: sidecar(c).label for c in sides
    }
    for capture_id in sides:
        side = sidecar(capture_id)
        assert side.label == labelled.get(capture_id), capture_id
        assert (side.label_source == "label-studio") == (capture_id in labelled)
    assert "refused" not in bin_service.log()
