"""The fit CLI end to end on real TrashNet photos: train, export, ORT parity, resume, and its errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from service.golden import FP32_TOLERANCE
from service.imaging import load_image_file
from service.manifest import Manifest, sha256_file, write_manifest
from service.model import load_model
from service.settings import Settings
from tests.conftest import REPO_ROOT
from training.data import load_dataset, make_task
from training.data.folders import TRASHNET_NORMAL
from training.engine import RunOptions
from training.export import check_parity, export_onnx
from training.methods.deepmad import DeepMADConfig, fit_deepmad

SMALL = ["--max-train-per-class", "40", "--batch-size", "64", "--quiet", "--threads", "2"]


def fit(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.fit", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "trashnet-small"
    result = fit(
        "--dataset",
        "trashnet",
        "--ae-epochs",
        "3",
        "--epochs",
        "6",
        "--augment",
        "--out",
        str(out),
        "--checkpoint",
        str(out.parent / "ckpt.pt"),
        *SMALL,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_fit_writes_a_verified_artifact(small_model: Path):
    manifest = Manifest.load(small_model)
    assert manifest.model_sha256 == sha256_file(small_model / "model.onnx")
    assert manifest.class_names == ["cardboard", "glass", "metal", "paper", "plastic"]
    assert manifest.training_data.anomaly_classes == ["trash"]
    assert manifest.input.model_dump() == {"height": 32, "width": 32, "channels": 3}
    assert manifest.hyperparameters["delta"] == 8.2 and manifest.hyperparameters["epochs"] == 6
    assert "--dataset trashnet" in manifest.command
    assert 0.0 < manifest.threshold.normal_reject_rate < 0.15
    assert manifest.calibration.probability(manifest.threshold.value) == pytest.approx(0.5)
    assert manifest.golden is not None and manifest.golden.atol == FP32_TOLERANCE[0]  # an FP32 graph's tolerance
    assert load_model(small_model, Settings()).golden.status == "verified"


def _photos(trashnet_dir: Path, klass: str, count: int) -> np.ndarray:
    files = sorted((trashnet_dir / klass).glob("*.jpg"))[-count:]  # the tail: mostly outside the small train subset
    return np.stack([load_image_file(f, 32, 32, 3) for f in files])


def test_trash_scores_higher_than_recyclables_and_scores_are_not_collapsed(small_model: Path, trashnet_dir: Path):
    session = ort.InferenceSession(str(small_model / "model.onnx"), providers=["CPUExecutionProvider"])
    normal = np.concatenate([_photos(trashnet_dir, k, 20) for k in ["cardboard", "glass", "metal", "paper", "plastic"]])
    trash = _photos(trashnet_dir, "trash", 60)
    normal_scores = session.run(["score"], {"image": normal})[0]
    trash_scores = session.run(["score"], {"image": trash})[0]
    assert trash_scores.mean() > normal_scores.mean()
    everything = np.concatenate([normal_scores, trash_scores])
    # Collapse guard: a network mapping every input to (near) one point gives near-constant scores.
    assert everything.std() > 0.02 * everything.mean()
    assert len(np.unique(np.round(everything, 5))) > 0.9 * len(everything)
    manifest = Manifest.load(small_model)
    assert manifest.test_metrics.auc > 0.5
    assert manifest.test_metrics.extra["test_score_std"] > 0


def test_fit_records_routing_and_the_memorisation_gap(small_model: Path):
    """Routing: the nearest class of every test recyclable, tallied per true class, and its accuracy."""
    manifest = Manifest.load(small_model)
    routing = manifest.test_metrics.routing
    test_counts = manifest.training_data.counts["test"]
    assert routing is not None and 0.0 < routing.accuracy <= 1.0
    assert list(routing.confusion) == manifest.class_names
    for true, row in routing.confusion.items():
        assert list(row) == manifest.class_names
        assert sum(row.values()) == test_counts[true]
        assert routing.per_class[true] == pytest.approx(row[true] / test_counts[true])
    assert routing.n_items == manifest.test_metrics.n_normal
    correct = sum(routing.confusion[name][name] for name in manifest.class_names)
    assert routing.accuracy == pytest.approx(correct / routing.n_items)
    assert routing.accuracy > 1.5 / len(manifest.class_names)  # better than routing everything to one bin
    # The same rule on the validation photos, what routing levers are chosen on.
    assert 1.5 / len(manifest.class_names) < manifest.test_metrics.extra["validation_routing"] <= 1.0
    gap = manifest.test_metrics.distance_gap
    assert gap is not None and gap.gap == pytest.approx(gap.val_median - gap.train_median)
    assert gap.ratio == pytest.approx(gap.val_median / gap.train_median)
    assert set(gap.per_class) == set(manifest.class_names)

    # The shipped-artifact path (ONNX Runtime on the manifest's test split) agrees with training's torch.
    result = subprocess.run(
        [sys.executable, "-m", "training.routing", "--model", str(small_model)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"routing accuracy {routing.accuracy:.3f} on {routing.n_items} test items" in result.stdout


def test_routing_cli_records_routing_in_an_older_manifest(small_model: Path, tmp_path: Path):
    """An artifact made before training wrote routing gets it recorded; its graph is not touched."""
    older = tmp_path / "older"
    shutil.copytree(small_model, older)
    manifest = Manifest.load(older)
    expected = manifest.test_metrics.routing
    manifest.test_metrics.routing = None
    write_manifest(older, manifest)
    graph = sha256_file(older / "model.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "training.routing", "--model", str(older), "--write"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    recorded = Manifest.load(older).test_metrics.routing
    assert recorded is not None and recorded.confusion == expected.confusion
    assert recorded.accuracy == pytest.approx(expected.accuracy)
    assert sha256_file(older / "model.onnx") == graph


def test_routing_cli_without_a_manifest_is_one_line(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "training.routing", "--model", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no manifest.json in {tmp_path}"


def test_onnx_matches_torch_on_real_photos(tmp_path: Path, trashnet_dir: Path):
    """The exported graph against the torch scorer it came from, on photos through the image function."""
    task = make_task(load_dataset("trashnet", trashnet_dir), TRASHNET_NORMAL, max_train_per_class=30, seed=0)
    scorer, _ = fit_deepmad(task, DeepMADConfig(ae_epochs=1, epochs=1, batch_size=32), RunOptions(torch.device("cpu")))
    export_onnx(scorer, tmp_path / "model.onnx")
    images = np.concatenate([_photos(trashnet_dir, k, 16) for k in ["glass", "trash", "paper", "metal"]])
    parity = check_parity(scorer, tmp_path / "model.onnx", images)
    assert parity.n_images == 64
    assert parity.max_abs_distance < 1e-4 and parity.max_abs_score < 1e-4
    assert parity.nearest_agreement == 1.0


def test_resume_after_termination_gives_the_same_model(tmp_path: Path):
    # Ten short encoder epochs: a wide window to interrupt in, even on a loaded machine.
    args = ["--dataset", "trashnet", "--ae-epochs", "1", "--epochs", "10", *SMALL]
    reference = fit(*args, "--out", str(tmp_path / "ref"), "--checkpoint", str(tmp_path / "ref.pt"))
    assert reference.returncode == 0, reference.stderr

    checkpoint = tmp_path / "run.pt"
    command = [
        sys.executable,
        "-m",
        "training.fit",
        *args,
        "--out",
        str(tmp_path / "run"),
        "--checkpoint",
        str(checkpoint),
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # interrupt once an encoder epoch is checkpointed
        if checkpoint.exists():
            try:
                if torch.load(checkpoint, weights_only=False)["enc_epochs_done"] >= 1:
                    break
            except Exception:  # noqa: BLE001 - the file is being replaced; look again
                pass
        time.sleep(0.2)
    # SIGTERM, not SIGINT: a test run in the background (CI) starts children with SIGINT ignored.
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run" / "manifest.json").exists()

    resumed = fit(*args, "--out", str(tmp_path / "run"), "--checkpoint", str(checkpoint), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref_scores = json.loads(reference.stdout)
    run_scores = json.loads(resumed.stdout)
    assert run_scores["test_auc"] == pytest.approx(ref_scores["test_auc"], abs=1e-6)
    assert run_scores["threshold"] == pytest.approx(ref_scores["threshold"], rel=1e-5)

    # Re-exporting the finished run trains nothing and reports the training speed it measured.
    again = fit(*args, "--out", str(tmp_path / "again"), "--checkpoint", str(tmp_path / "ref.pt"), "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["images_per_second"] == ref_scores["images_per_second"]
    assert set(ref_scores["images_per_second"]) == {"autoencoders", "encoders"}


LITE64 = ["--dataset", "trashnet", "--backbone", "efficientnet-lite0", "--input-size", "64"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "imagenet"], "unknown data set"),
        (["--dataset", "trashnet", "--data", "/nonexistent/trashnet"], "not found"),
        (["--dataset", "trashnet", "--normal", "glass,bananas"], "unknown class 'bananas'"),
        (["--dataset", "trashnet", "--normal", "cardboard,glass,metal,paper,plastic,trash"], "every class is normal"),
        (["--dataset", "cifar10", "--normal", "12"], "out of range"),
        (["--dataset", "trashnet", "--device", "tpu"], "--device"),
        (["--dataset", "trashnet", "--epochs", "-1"], "--epochs"),
        (["--dataset", "trashnet", "--resume", "--checkpoint", "/nonexistent/ckpt.pt"], "no checkpoint"),
        (["--dataset", "recycle", "--data", "/nonexistent/recycle.npz"], "not found"),
        (["--dataset", "trashnet", "--threads", "-1"], "--threads must be at least 1"),
        (["--dataset", "trashnet", "--seed", "-1"], "--seed must be at least 0"),
        (["--dataset", "trashnet", "--max-train-per-class", "-5"], "--max-train-per-class must be at least 1"),
        (["--dataset", "trashnet", "--image-size", "0"], "--input-size must be at least 8"),
        (["--dataset", "trashnet", "--backbone", "efficientnet-lite0", "--input-size", "48"], "multiple of 32"),
        (["--dataset", "trashnet", "--backbone", "efficientnet-lite0", "--method", "drocc"], "not drocc"),
        (["--dataset", "trashnet", "--tune-blocks", "1"], "--tune-blocks and --backbone-weights need --backbone"),
        (["--dataset", "trashnet", "--tune-blocks", "all"], "need --backbone"),
        ([*LITE64, "--tune-blocks", "17"], "--tune-blocks must lie between 0 and 16"),
        ([*LITE64, "--backbone-weights", "/nonexistent/backbone.pt"], "is not a file"),
        (["--dataset", "trashnet", "--anomaly-weight", "-1"], "--anomaly-weight must be at least 0"),
        (["--dataset", "trashnet", "--anomaly-centres", "1"], "--anomaly-centres needs --backbone"),
        ([*LITE64, "--anomaly-centres", "1"], "needs at least that many labelled anomalies"),
        ([*LITE64, "--anomaly-holdout", "0.5", "--outlier-exposure", "--anomaly-centres", "31"], "found 30"),
        (["--dataset", "trashnet", "--lr", "-1"], "--lr must be greater than 0"),
        (["--dataset", "trashnet", "--ae-lr", "-0.1"], "--ae-lr must be greater than 0"),
        (["--dataset", "trashnet", "--weight-decay", "-0.5"], "--weight-decay must be at least 0"),
        (["--dataset", "trashnet", "--dropout", "1"], "--dropout must be less than 1"),
        (["--dataset", "trashnet", "--routing-margin", "-1"], "--routing-margin must be at least 0"),
        (
            ["--dataset", "trashnet", "--method", "drocc", "--radius-factor", "0.5"],
            "--radius-factor must be at least 1",
        ),
        (["--dataset", "recycle", "--data", "{tmp}"], "is a folder without recycle_data_shuffled.tar.gz"),
        (["--dataset", "trashnet", "--resume", "--checkpoint", "{tmp}/foreign.pt"], "not a training checkpoint"),
        (["--dataset", "trashnet", "--resume", "--checkpoint", "{tmp}/drocc.pt"], "made with other settings"),
        (["--dataset", "trashnet", "--out", "{tmp}/a-file"], "is a file"),
        (["--dataset", "trashnet", "--out", "{tmp}/a-file/model"], "is not writable"),
        (["--dataset", "trashnet", "--out", "/proc/deepmad-model"], "is not writable"),
        (["--dataset", "trashnet", "--anomaly-holdout", "0.01"], "leaves 0 selection"),
        (["--dataset", "trashnet", "--anomaly-holdout", "0.999"], "and 0 test anomalies"),
    ],
)
def test_bad_input_stops_before_training(args: list[str], message: str, tmp_path: Path):
    """Each bad input: one line, exit 2, no traceback, nothing written, and no epoch run."""
    torch.save({"weights": [1.0]}, tmp_path / "foreign.pt")
    torch.save({"config": {"radius": 8.0}, "model": {}}, tmp_path / "drocc.pt")
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(tmp_path / "new.pt")]
    result = fit(*args, "--quiet", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "train /" not in result.stderr  # stopped before the data summary
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "new.pt").exists()
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_recycle_as_written_names_the_download_offline(tmp_path: Path):
    """`python -m training.fit --dataset recycle` needs no --out; offline it says what to fetch and where."""
    unreachable = "http://127.0.0.1:9/recycle_data_shuffled.tar.gz"  # the discard port: nothing listens
    env = {"DEEPMAD_RECYCLE_URL": unreachable, "DEEPMAD_CACHE_DIR": str(tmp_path / "cache")}
    result = fit("--dataset", "recycle", env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert unreachable in error and str(tmp_path / "cache" / "recycle" / "recycle_data_shuffled.tar.gz") in error


def test_cuda_request_without_cuda_is_a_clear_error(tmp_path: Path):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    result = fit("--dataset", "trashnet", "--device", device, "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2 and "CUDA" in result.stderr and "Traceback" not in result.stderr
