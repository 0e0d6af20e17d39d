"""Golden scores: an artifact whose graph computes something else on this CPU is refused, at the first
start and at every reload (the old model keeps serving); an artifact from before golden scores loads."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.golden import reference_inputs, session_run, verify
from service.manifest import Manifest, write_manifest
from service.model import GoldenMismatchError, load_model
from service.settings import Settings
from tests.conftest import REPO_ROOT, SHIPPED_MODEL
from tests.service_support import copy_model, run_server, service_env, wait_for
from tests.test_service_process import counter

INT8_MODEL = SHIPPED_MODEL.parent / "trashnet-int8"
TOKEN = "golden-token"
PINNED_REFERENCE_SHA = "2ce43b17cefd069c"


def shifted_golden(model: Path, shift: float) -> None:
    """Move the manifest's first golden score by ``shift`` (what another CPU's kernels would do to it)."""
    manifest = Manifest.load(model)
    scores = list(manifest.golden.score)
    scores[0] += shift
    write_manifest(model, manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"score": scores})}))


def test_reference_inputs_are_the_same_bytes_everywhere():
    images = reference_inputs(32, 32, 3, seed="deepmad-golden-v1", count=8)
    # Pinned: a change of the generator would make every shipped manifest's golden scores meaningless.
    assert hashlib.sha256(images.tobytes()).hexdigest()[:16] == PINNED_REFERENCE_SHA
    assert not np_equal(images, reference_inputs(32, 32, 3, seed="other", count=8))
    assert len({img.tobytes() for img in images}) == 8 and images.std() > 30  # eight distinct, not flat


def np_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("artifact", [SHIPPED_MODEL, INT8_MODEL], ids=["fp32", "int8"])
def test_shipped_artifacts_prove_themselves_on_this_cpu(artifact: Path):
    model = load_model(artifact, Settings())
    assert model.manifest.golden is not None and model.golden.status == "verified"
    golden = model.manifest.golden
    assert len(set(golden.score)) == golden.count  # not one constant answer


def test_a_moved_score_is_a_mismatch_within_tolerance_is_not():
    model = load_model(INT8_MODEL, Settings())
    golden = model.manifest.golden
    run = model.session
    inside = golden.model_copy(update={"score": [golden.score[0] + 0.5 * golden.atol, *golden.score[1:]]})
    assert verify(session_run(run), model.input_shape, inside).status == "verified"
    # 0.3 score units: a third of what the saturating kernels moved the old INT8 graph on average.
    moved = golden.model_copy(update={"score": [golden.score[0] + 0.3, *golden.score[1:]]})
    check = verify(session_run(run), model.input_shape, moved)
    assert check.status == "mismatch" and "1 of" in check.detail and check.worst == pytest.approx(0.3, abs=1e-3)


def test_manifest_without_golden_scores_loads_and_says_so(tmp_path: Path):
    old = copy_model(SHIPPED_MODEL, tmp_path / "old")
    manifest = Manifest.load(old)
    write_manifest(old, manifest.model_copy(update={"golden": None}))
    with TestClient(create_app(Settings(model_dir=old))) as client:
        info = client.get("/model").json()
    assert info["golden"]["status"] == "absent" and "not checked" in info["golden"]["detail"]
    with TestClient(create_app(Settings(model_dir=SHIPPED_MODEL))) as client:
        assert client.get("/model").json()["golden"]["status"] == "verified"


def test_mismatch_refused_by_the_library_and_by_an_app_without_require_model(tmp_path: Path):
    bad = copy_model(SHIPPED_MODEL, tmp_path / "bad")
    shifted_golden(bad, 0.5)
    with pytest.raises(GoldenMismatchError, match="golden scores mismatch"):
        load_model(bad, Settings())
    with TestClient(create_app(Settings(model_dir=bad, require_model=False))) as client:
        assert client.get("/readyz").status_code == 503
        assert counter(client, "deepmad_model_golden_mismatch_total", trigger="startup") == 1


def test_reload_with_mismatched_golden_keeps_the_old_model(tmp_path: Path):
    live = copy_model(SHIPPED_MODEL, tmp_path / "live")
    with TestClient(create_app(Settings(model_dir=live, admin_token=TOKEN))) as client:
        shifted_golden(live, -0.5)
        answer = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 500 and "golden scores mismatch" in answer.json()["error"]["message"]
        info = client.get("/model").json()
        assert info["golden"]["status"] == "verified"  # the old model, still serving
        assert "golden scores mismatch" in info["last_load_error"]
        assert counter(client, "deepmad_model_golden_mismatch_total", trigger="http") == 1
        assert counter(client, "deepmad_reload_failures_total", trigger="http") == 1


@pytest.mark.slow
def test_process_refuses_a_mismatched_artifact_at_start_with_one_line(tmp_path: Path):
    bad = copy_model(INT8_MODEL, tmp_path / "bad")
    shifted_golden(bad, 1.0)
    result = subprocess.run(
        [sys.executable, "-m", "service", "--model-dir", str(bad), "--port", "0"],
        cwd=REPO_ROOT, env=service_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "golden scores mismatch" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_process_sighup_with_mismatched_golden_keeps_serving(tmp_path: Path, trashnet_dir: Path):
    live = copy_model(SHIPPED_MODEL, tmp_path / "live")
    photo = (trashnet_dir / "glass" / "glass10.jpg").read_bytes()
    headers = {"content-type": "image/jpeg"}
    with run_server(live, tmp_path) as server, server.client() as client:
        before = client.post("/classify", content=photo, headers=headers).json()
        shifted_golden(live, 0.5)
        server.sighup()
        assert wait_for(lambda: counter(client, "deepmad_model_golden_mismatch_total", trigger="sighup") == 1)
        assert "golden scores mismatch" in server.log()
        assert "golden scores mismatch" in client.get("/model").json()["last_load_error"]
        after = client.post("/classify", content=photo, headers=headers).json()
        assert after["score"] == before["score"] and server.process.poll() is None


@pytest.mark.slow
def test_golden_cli_adds_golden_scores_without_touching_graph_or_metrics(tmp_path: Path):
    older = copy_model(SHIPPED_MODEL, tmp_path / "older")
    shipped = Manifest.load(SHIPPED_MODEL)
    write_manifest(older, shipped.model_copy(update={"golden": None}))
    command = [sys.executable, "-m", "training.golden", "--model", str(older)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rewritten = Manifest.load(older)
    assert rewritten.model_dump(exclude={"golden"}) == shipped.model_dump(exclude={"golden"})
    assert rewritten.golden.score == pytest.approx(shipped.golden.score, abs=1e-5)
    assert load_model(older, Settings()).golden.status == "verified"
    missing = subprocess.run([*command[:-1], str(tmp_path / "none")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ")
