"""A real Label Studio round trip: our tasks imported into the label-studio server, labelled through its
API, exported through its API and applied back onto the capture store by ``flywheel.captures``.

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

from flywheel.captures import LS_CHOICES, LS_IMAGE, read_capture
from tests.capture_support import open_model, write_capture
from tests.conftest import REPO_ROOT
from tests.service_support import free_port, model_dir, photo_subset

LABEL_STUDIO = REPO_ROOT / ".venv-label-studio" / "bin" / "label-studio"
TOKEN = "deepmad-roundtrip-token"  # the legacy API token the server gives its first user
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


def choice(label: str) -> list[dict]:
    return [{"from_name": LS_CHOICES, "to_name": LS_IMAGE, "type": "choices", "value": {"choices": [label]}}]


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
    return created(client.post(f"/api/tasks/{task['id']}/annotations/", json={"result": choice(label), **extra}))


def label_like_an_operator(client: httpx.Client, tasks: dict[str, dict], truth: dict[str, str]) -> dict[str, str]:
    """The true label on four tasks (two trash), a wrong label corrected afterwards, one annotation
    cancelled (a skip), the rest left alone; returns the labels an import must apply."""
    labelled = {capture_id: truth[capture_id] for capture_id in ("c000", "c002", "c005", "c007")}
    for capture_id, label in labelled.items():
        annotate(client, tasks[capture_id], label)
    wrong = annotate(client, tasks["c001"], "trash")
    fixed = client.patch(f"/api/annotations/{wrong['id']}/", json={"result": choice(truth["c001"])})
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
