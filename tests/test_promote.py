"""flywheel.promote on real artifacts: a worse model is refused, a good one is swapped in, reloaded
into a running service without a failed request, and rolled back."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flywheel.model_store import ModelStore
from service.manifest import Manifest, write_manifest
from tests.capture_support import tree_files
from tests.conftest import REPO_ROOT
from tests.service_support import copy_model, corrupt_model, model_dir, photo_subset, run_server

TOKEN = "promote-test-token"


def promote_env(token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMAD_") or k == "DEEPMAD_DATA_ROOT"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if token:
        env["DEEPMAD_ADMIN_TOKEN"] = token
    return env


def promote(*args: object, token: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flywheel.promote", *map(str, args)],
        cwd=REPO_ROOT,
        env=promote_env(token),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def audit(tmp_path_factory, trashnet_dir: Path) -> Path:
    """An audit class-folder tree of real photos: 8 per recyclable class, 16 trash."""
    root = tmp_path_factory.mktemp("audit")
    recyclable, trash = photo_subset(trashnet_dir, per_class=8, trash=16)
    for photo in recyclable + trash:
        (root / photo.parent.name).mkdir(exist_ok=True)
        shutil.copyfile(photo, root / photo.parent.name / photo.name)
    return root


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    """A really worse model: the same recipe stopped after 1 autoencoder epoch and 0 encoder epochs."""
    out = tmp_path_factory.mktemp("untrained") / "model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.fit",
            "--dataset",
            "trashnet",
            "--max-train-per-class",
            "30",
            "--ae-epochs",
            "1",
            "--epochs",
            "0",
            "--threads",
            "1",
            "--quiet",
            "--version",
            "0.0.1-untrained",
            "--out",
            str(out),
            "--checkpoint",
            str(out.parent / "checkpoint.pt"),
        ],  # fmt: skip
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return out


def relabelled_copy(source: Path, target: Path, version: str) -> Path:
    """The current graph under a new version: exactly as good, so the gate (not worse) lets it through."""
    copy_model(source, target)
    manifest = Manifest.load(target)
    write_manifest(target, manifest.model_copy(update={"version": version}))
    return target


def test_a_worse_candidate_is_refused_and_nothing_changes(tmp_path: Path, audit: Path, untrained: Path):
    models = tmp_path / "models"
    current = copy_model(model_dir(), models / "trashnet")
    before = tree_files(models)
    result = promote("--candidate", untrained, "--current", current, "--audit", audit)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "refused: AUC" in result.stdout
    for row in ("AUC (recyclables vs trash)", "TPR at normal-reject", "routing accuracy", "trash (n=16)"):
        assert row in result.stdout
    after = tree_files(models)
    records = [name for name in after if name.startswith("trashnet.decisions/")]
    assert len(records) == 1 and records[0].endswith("-refused.json")
    unchanged = {k: v for k, v in after.items() if k not in records and k != ".trashnet.lock"}
    assert unchanged == before  # byte-identical, no version made (the lock file is the store's, empty)
    assert not current.is_symlink()
    record = json.loads(after[records[0]])
    metrics = record["metrics"]
    assert record["decision"] == "refused" and record["reason"].startswith("AUC")
    assert metrics["current"]["auc"] > 0.75 and metrics["candidate"]["auc"] < metrics["current"]["auc"] - 0.1
    assert metrics["current"]["score_std"] > 0.1  # not a collapsed model
    assert metrics["current"]["routing_accuracy"] > metrics["candidate"]["routing_accuracy"]
    assert metrics["candidate"]["n_reject_matched"] == metrics["current"]["n_reject_matched"]


def test_promotion_reload_and_rollback_against_a_running_service(tmp_path: Path, audit: Path):
    shipped = model_dir()
    current = copy_model(shipped, tmp_path / "models" / "trashnet")
    original = tree_files(current)
    candidate = relabelled_copy(shipped, tmp_path / "candidate", "9.9.9-candidate")
    photo = next((audit / "glass").iterdir()).read_bytes()
    with run_server(current, tmp_path, DEEPMAD_ADMIN_TOKEN=TOKEN) as server, server.client() as client:
        version = Manifest.load(shipped).version
        assert client.get("/model").json()["version"] == version
        # A bin keeps classifying all through the promotion and the rollback: no request may fail.
        statuses: list[int] = []
        stop = threading.Event()

        def classify_until_stopped() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as bin_client:
                while not stop.is_set() and len(statuses) < 5000:
                    answer = bin_client.post("/classify", files={"file": ("item.jpg", photo, "image/jpeg")})
                    statuses.append(answer.status_code)

        traffic = threading.Thread(target=classify_until_stopped)
        traffic.start()
        try:
            result = promote(
                "--candidate", candidate, "--current", current, "--audit", audit, "--reload-url", server.url,
                token=TOKEN,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            assert client.get("/model").json()["version"] == "9.9.9-candidate"
            assert current.is_symlink() and os.readlink(current) == "trashnet.versions/0002"
            assert tree_files(tmp_path / "models" / "trashnet.versions" / "0001") == original

            back = promote("--current", current, "--rollback", "--reload-url", server.url, token=TOKEN)
            assert back.returncode == 0, back.stdout + back.stderr
            assert client.get("/model").json()["version"] == version
            assert os.readlink(current) == "trashnet.versions/0001" and tree_files(current) == original
        finally:
            stop.set()
            traffic.join(timeout=60)
        assert statuses and set(statuses) == {200}

        again = promote("--current", current, "--rollback", "--reload-url", server.url, token=TOKEN)
        assert again.returncode == 2 and "no previous version" in again.stderr
    records = sorted((tmp_path / "models" / "trashnet.decisions").glob("*.json"))
    decisions = [json.loads(path.read_text()) for path in records]
    assert [d["decision"] for d in decisions] == ["promoted", "rolled-back"]
    promoted, rolled_back = decisions
    assert promoted["reload"]["ok"] and promoted["reload"]["serving"] == "9.9.9-candidate"
    assert promoted["previous_version"] == "0001" and promoted["new_version"] == "0002"
    assert promoted["metrics"]["candidate"]["auc"] == promoted["metrics"]["current"]["auc"]
    assert rolled_back["to_version"] == "0001" and rolled_back["reload"]["serving"] == version
    assert not [p for p in (tmp_path / "models").rglob(".*") if p.name != ".trashnet.lock"]  # no temp left behind


def start_promote(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flywheel.promote", *map(str, args)],
        cwd=REPO_ROOT,
        env=promote_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def blocked_on(lock: Path) -> int:
    """How many processes wait for the flock on ``lock`` (the ``->`` lines of /proc/locks for its inode)."""
    inode = f":{lock.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


def test_parallel_promotions_are_judged_one_after_the_other(tmp_path: Path, audit: Path):
    """Two promotions started together: the second is judged against the model the first swapped in."""
    shipped = model_dir()
    current = copy_model(shipped, tmp_path / "models" / "trashnet")
    candidates = {v: relabelled_copy(shipped, tmp_path / v, v) for v in ("9.1.0-first", "9.2.0-second")}
    store = ModelStore(current)
    # The test holds the store's lock until both runs wait for it, so they truly run at the same time:
    # whatever a run reads before taking the lock, it has read while the other run was also alive.
    with open(store.lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = [start_promote("--candidate", c, "--current", current, "--audit", audit) for c in candidates.values()]
        while blocked_on(store.lock_path) < 2:
            exited = [run for run in runs if run.poll() is not None]
            assert not exited, exited[0].communicate()[0]
            time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    decisions = [json.loads(p.read_text()) for p in (tmp_path / "models" / "trashnet.decisions").glob("*.json")]
    first, second = sorted(decisions, key=lambda d: d["new_version"])
    assert (first["previous_version"], first["new_version"]) == ("0001", "0002")
    assert (second["previous_version"], second["new_version"]) == ("0002", "0003")
    assert first["metrics"]["current"]["model"]["version"] == Manifest.load(shipped).version
    # The second gate compared its candidate with the first one's, not with the model both started from.
    assert second["metrics"]["current"]["model"]["version"] == first["metrics"]["candidate"]["model"]["version"]
    assert store.history() == ["0001", "0002", "0003"] and os.readlink(current) == "trashnet.versions/0003"
    assert Manifest.load(current).version == second["metrics"]["candidate"]["model"]["version"]
    assert {Manifest.load(store.versions / n).version for n in ("0002", "0003")} == set(candidates)


def test_bad_input_exits_2(tmp_path: Path, audit: Path):
    current = copy_model(model_dir(), tmp_path / "models" / "trashnet")
    broken = copy_model(model_dir(), tmp_path / "broken")
    corrupt_model(broken)
    cases = [
        (("--candidate", broken, "--current", current, "--audit", audit), None, "sha256"),
        (("--candidate", current, "--current", current, "--audit", audit), None, "current model folder"),
        (("--candidate", model_dir(), "--current", current, "--audit", tmp_path / "none"), None, "does not exist"),
        (
            ("--candidate", model_dir(), "--current", current, "--audit", audit, "--reload-url", "http://x"),
            None,
            "TOKEN",
        ),
        (("--current", current, "--rollback"), None, "no previous version"),
    ]
    for args, token, message in cases:
        result = promote(*args, token=token)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1
    few = tmp_path / "few-trash"
    shutil.copytree(audit, few)
    for extra in sorted((few / "trash").iterdir())[4:]:
        extra.unlink()
    result = promote("--candidate", model_dir(), "--current", current, "--audit", few)
    assert result.returncode == 2 and "holds 4 trash photos" in result.stderr and result.stderr.count("\n") == 1
    only_trash = tmp_path / "only-trash" / "trash"
    only_trash.mkdir(parents=True)
    shutil.copyfile(next((audit / "trash").iterdir()), only_trash / "t.jpg")
    result = promote("--candidate", model_dir(), "--current", current, "--audit", only_trash.parent)
    assert result.returncode == 2 and "needs normal and trash photos" in result.stderr
    assert not current.is_symlink() and not (tmp_path / "models" / "trashnet.versions").exists()


@pytest.mark.parametrize("gamma", [1e9, -1e9])
def test_a_candidate_whose_gamma_passes_or_rejects_everything_is_refused(tmp_path: Path, audit: Path, gamma: float):
    current = copy_model(model_dir(), tmp_path / "models" / "trashnet")
    candidate = copy_model(model_dir(), tmp_path / "candidate")
    manifest = Manifest.load(candidate)
    threshold = manifest.threshold.model_copy(update={"value": gamma})
    write_manifest(candidate, manifest.model_copy(update={"threshold": threshold}))
    result = promote("--candidate", candidate, "--current", current, "--audit", audit)
    assert result.returncode == 3, result.stdout + result.stderr
    expected = "refused: trash caught at gamma 0.0000" if gamma > 0 else "refused: normal-reject rate at gamma 1.0000"
    assert expected in result.stdout
    assert not current.is_symlink()


def test_a_candidate_that_rejects_far_more_than_its_manifest_claims_is_refused(tmp_path: Path, audit: Path):
    """Current and candidate act alike (both thresholds lowered the same way), so only the candidate's own
    claim (5% of held-out recyclables rejected) catches that it rejects about a third of the audit's."""
    lowered = {}
    for name, folder in (("current", tmp_path / "models" / "trashnet"), ("candidate", tmp_path / "candidate")):
        lowered[name] = copy_model(model_dir(), folder)
        manifest = Manifest.load(folder)
        gamma = manifest.calibration.normal_score_quantiles[len(manifest.calibration.normal_score_quantiles) // 2]
        threshold = manifest.threshold.model_copy(update={"value": gamma})
        write_manifest(folder, manifest.model_copy(update={"threshold": threshold}))
    result = promote("--candidate", lowered["candidate"], "--current", lowered["current"], "--audit", audit)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "its manifest's own claim 0.05" in result.stdout, result.stdout
    assert not lowered["current"].is_symlink()


def test_rollback_of_a_missing_current_exits_2_with_one_line(tmp_path: Path):
    result = promote("--current", tmp_path / "missing" / "trashnet", "--rollback")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
