"""The capture contract (``service.capture_format``, docs/capture-format.md) seen from both sides.

The service writes captures and the exporter (``flywheel.captures``) reads them; both go through one
module, and these tests write with one side and read with the other, so a side that drifts fails here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flywheel.captures import SHA_PREFIX, import_label_studio, iter_captures
from service.capture.store import CaptureStore
from service.capture_format import Sidecar, read_sidecar
from service.label_studio import LS_CHOICES, LS_IMAGE
from service.labels import valid_labels
from service.manifest import Manifest
from tests.conftest import REPO_ROOT
from tests.service_support import photo_subset, run_server, wait_for
from training.errors import UserError

TOKEN = "format-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JPEG = {"content-type": "image/jpeg"}


def pending(client: httpx.Client) -> float:
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("deepmad_capture_pending ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_what_the_service_writes_the_exporter_reads(model: Path, manifest: Manifest, trashnet_dir: Path, tmp_path):
    """A running service captures and labels photos; the export side reads the same sidecars and exports them."""
    recyclable, trash = photo_subset(trashnet_dir, per_class=1, trash=2)
    photos = recyclable + trash
    folder = tmp_path / "captures"
    flags = ("--capture-dir", str(folder), "--operator-token", TOKEN, "--capture-normal-rate", "1")
    with run_server(model, tmp_path, *flags, "--threshold", "0") as server, server.client() as client:
        for n, photo in enumerate(photos):
            answer = client.post("/classify", content=photo.read_bytes(), headers={**JPEG, "X-Request-ID": f"p-{n}"})
            assert answer.status_code == 200, answer.text
        assert wait_for(lambda: pending(client) == 0), "capture writer did not drain"
        labels = {"p-0": photo_label(photos[0]), "p-5": photo_label(photos[5])}
        for capture_id, label in labels.items():
            response = client.post("/feedback", json={"id": capture_id, "label": label}, headers=AUTH)
            assert response.status_code == 200, response.text
        listed = client.get("/captures", headers=AUTH, params={"limit": 100}).json()["items"]

    read = {capture.id: capture for capture in iter_captures(folder)}
    assert sorted(read) == sorted(f"p-{n}" for n in range(len(photos)))
    assert {item["id"]: item for item in listed} == {key: c.sidecar.model_dump(mode="json") for key, c in read.items()}
    for n, photo in enumerate(photos):
        capture = read[f"p-{n}"]
        assert capture.image_path.read_bytes() == photo.read_bytes()
        assert capture.sidecar.image_sha256 == hashlib.sha256(photo.read_bytes()).hexdigest()
        assert capture.label == labels.get(capture.id)
        assert capture.sidecar_path.parent == folder / capture.sidecar.time[:10]

    tree = tmp_path / "tree"
    command = [sys.executable, "-m", "flywheel.captures", "export", "--captures", str(folder), "--out", str(tree)]
    result = subprocess.run([*command, "--audit-share", "0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["written"] == 2
    exported = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    expected = {f"{labels[c]}/{read[c].sidecar.image_sha256[:SHA_PREFIX]}.jpg" for c in labels}
    assert exported == expected


def photo_label(photo: Path) -> str:
    return photo.parent.name


def sidecar(capture_id: str, data: bytes, **extra: object) -> Sidecar:
    return Sidecar(
        id=capture_id, time="2026-11-29T00:00:01.000000Z", image=f"{capture_id}.jpg",
        image_sha256=hashlib.sha256(data).hexdigest(), image_bytes=len(data), content_type="image/jpeg",
        model={"name": "m", "version": "1", "sha256": "0" * 64}, score=1.5, threshold=2.0, verdict="normal",
        nearest_class="paper", distances={"paper": 1.5}, reason="sampled", **extra,
    )  # fmt: skip


def test_a_label_from_the_exporter_reads_back_in_the_service(manifest: Manifest, trashnet_dir: Path, tmp_path):
    """import-label-studio writes the bytes the service would write: unknown fields kept, UTF-8 unescaped."""
    data = sorted((trashnet_dir / "paper").glob("*.jpg"))[0].read_bytes()
    store = CaptureStore(tmp_path, max_bytes=10**8)
    store.open()
    assert store.add(sidecar("bin-1", data, site="Köln Süd"), data) == "written"
    label = valid_labels(manifest)[1]
    choice = {"from_name": LS_CHOICES, "to_name": LS_IMAGE, "type": "choices", "value": {"choices": [label]}}
    export = [{"id": 1, "data": {"capture_id": "bin-1"}, "annotations": [{"id": 9, "result": [choice]}]}]
    (tmp_path / "export.json").write_text(json.dumps(export))
    assert import_label_studio(tmp_path / "export.json", tmp_path, valid_labels(manifest))["labelled"] == 1

    path = tmp_path / "2026-11-29" / "bin-1.json"
    written = path.read_bytes()
    assert "Köln Süd".encode() in written and written == read_sidecar(path).to_bytes()
    (listed,) = store.list()[1]
    assert (listed.label, listed.label_source, listed.model_extra) == (label, "label-studio", {"site": "Köln Süd"})
    before = read_sidecar(path)
    relabelled = store.label("bin-1", label, "label-studio")  # the service's own labelling: the same bytes
    assert path.read_bytes() == written.replace(before.labelled_at.encode(), relabelled.labelled_at.encode())


def test_both_sides_count_the_same_folders_and_files(trashnet_dir: Path, tmp_path):
    """Day folders only (a volume's lost+found is left alone), and a sidecar must name its own file."""
    data = sorted((trashnet_dir / "paper").glob("*.jpg"))[0].read_bytes()
    lost = tmp_path / "lost+found"
    lost.mkdir()
    (lost / "stray.jpg").write_bytes(data)  # an image without a sidecar: in a day folder, open() removes it
    (lost / "found.jpg").write_bytes(data)
    (lost / "found.json").write_bytes(sidecar("found", data).to_bytes())
    store = CaptureStore(tmp_path, max_bytes=10**8)
    store.open()
    assert (lost / "stray.jpg").is_file() and len(store) == 0 and list(iter_captures(tmp_path)) == []

    assert store.add(sidecar("good", data), data) == "written"
    day = tmp_path / "2026-11-29"
    (day / "renamed.json").write_bytes(sidecar("other", data).to_bytes())  # its id names another file
    reopened = CaptureStore(tmp_path, max_bytes=10**8)
    reopened.open()
    assert [item.id for item in reopened.list()[1]] == ["good"]
    with pytest.raises(UserError, match="renamed.json"):
        list(iter_captures(tmp_path))
    assert read_sidecar(day / "good.json").margin == 0.5
