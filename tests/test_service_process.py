"""``python -m service`` as a real uvicorn process on 127.0.0.1: serving, SIGHUP reload, startup errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.manifest import Manifest, write_manifest
from service.settings import Settings
from tests.conftest import REPO_ROOT
from tests.service_support import (
    copy_model,
    corrupt_model,
    model_dir,
    photo_subset,
    run_server,
    service_env,
    wait_for,
    without_id,
)

pytestmark = pytest.mark.slow


def counter(server_client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(server_client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_process_serves_same_answers_as_testclient(tmp_path: Path, trashnet_dir: Path) -> None:
    model = model_dir()
    recyclable, trash = photo_subset(trashnet_dir, per_class=2, trash=4)
    paths = recyclable + trash
    with TestClient(create_app(Settings(model_dir=model))) as local:
        expected = [
            local.post("/classify", files={"file": (p.name, p.read_bytes(), "image/jpeg")}).json() for p in paths
        ]
    with run_server(model, tmp_path) as server, server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        got = [client.post("/classify", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()
               for p in paths]  # fmt: skip
        batch = client.post(
            "/classify/batch", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        ).json()["results"]
        bad = client.post("/classify", files={"file": ("a.jpg", b"nope", "image/jpeg")})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"
        big = client.post("/classify", content=b"\xff" * (11 << 20), headers={"content-type": "image/jpeg"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
        chunked = client.post(
            "/classify", content=iter([b"\xff" * (1 << 20)] * 12), headers={"content-type": "image/jpeg"}
        )
        assert chunked.status_code == 413  # no Content-Length: counted while streaming
        assert client.get("/readyz").status_code == 200  # the connection pool recovers after an early 413
        assert client.get("/").status_code == 200
    for want, single, item in zip(expected, got, batch, strict=True):
        assert without_id(single) == without_id(want)
        assert item["result"]["verdict"] == want["verdict"]
        assert item["result"]["score"] == pytest.approx(want["score"], rel=1e-5, abs=1e-6)


def test_sighup_reloads_and_failed_reload_keeps_serving(tmp_path: Path, trashnet_dir: Path) -> None:
    source = model_dir()
    live = copy_model(source, tmp_path / "live")
    photo = (trashnet_dir / "cardboard" / "cardboard1.jpg").read_bytes()
    headers = {"content-type": "image/jpeg"}
    with run_server(live, tmp_path) as server, server.client() as client:
        before = client.post("/classify", content=photo, headers=headers).json()

        corrupt_model(live)
        server.sighup()
        assert wait_for(lambda: counter(client, "deepmad_reload_failures_total", trigger="sighup") == 1), server.log()
        assert "reload (sighup) failed" in server.log()
        assert client.get("/readyz").status_code == 200
        assert without_id(client.post("/classify", content=photo, headers=headers).json()) == without_id(before)

        copy_model(source, live)
        manifest = Manifest.load(live)
        write_manifest(live, manifest.model_copy(update={"version": f"{manifest.version}-hup"}))
        server.sighup()
        assert wait_for(lambda: counter(client, "deepmad_reloads_total", trigger="sighup") == 1), server.log()
        assert client.get("/model").json()["version"] == f"{manifest.version}-hup"
        after = client.post("/classify", content=photo, headers=headers).json()
        assert after["model"]["version"] == f"{manifest.version}-hup"
        assert after["score"] == pytest.approx(before["score"])
        assert server.process.poll() is None


def test_bad_model_dir_is_a_clear_startup_error(tmp_path: Path) -> None:
    broken = copy_model(model_dir(), tmp_path / "broken")
    corrupt_model(broken)
    for folder, words in ((tmp_path / "missing", "no model at"), (broken, "sha256")):
        result = subprocess.run(
            [sys.executable, "-m", "service", "--model-dir", str(folder), "--port", "0"],
            cwd=REPO_ROOT, env=service_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert words in result.stderr and "Traceback" not in result.stderr
