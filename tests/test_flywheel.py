"""bench.flywheel: the fixed TrashNet split it measures on, and one small end-to-end round."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.flywheel import add_to_tree, folder_exposure, trashnet_splits
from flywheel.captures import iter_captures
from service.imaging import load_image_file
from service.manifest import Manifest
from tests.capture_support import open_model, write_capture
from tests.conftest import REPO_ROOT
from tests.service_support import model_dir
from training.data import load_dataset, make_task
from training.data.folders import TRASHNET_NORMAL


def test_the_split_is_the_shipped_models_test_split(trashnet_dir: Path):
    splits = trashnet_splits(trashnet_dir)
    counts = Manifest.load(model_dir()).training_data.counts
    test = Counter(label for _, label in splits.test)
    assert {k: test[k] for k in TRASHNET_NORMAL} == {k: counts["test"][k] for k in TRASHNET_NORMAL}
    assert test["trash"] == counts["test"]["anomalous"] and len(splits.held_trash) == 60
    assert len(splits.train) == sum(counts["train"][k] for k in TRASHNET_NORMAL)
    streamed = {p for p, _ in splits.train + splits.val} | set(splits.held_trash)
    assert not streamed & {p for p, _ in splits.test}
    # Exactly the photos of training.fit's own test split, in its order (decoded through the cache).
    task = make_task(load_dataset("trashnet", trashnet_dir), list(TRASHNET_NORMAL), None, 0, 0.5, True)
    decoded = np.stack([load_image_file(path, 32, 32, 3) for path, _ in splits.test])
    assert np.array_equal(decoded, task.test.images)
    assert np.array_equal(np.array([label == "trash" for _, label in splits.test]), task.test_anomalous)


@pytest.mark.slow
def test_exported_captures_retrain_with_outlier_exposure(tmp_path: Path, trashnet_dir: Path):
    """Labelled trash captures, exported into a seeded tree, are the exposure pool of training.fit."""
    splits = trashnet_splits(trashnet_dir)
    tree, captures = tmp_path / "data", tmp_path / "captures"
    add_to_tree(tree, [p for name in TRASHNET_NORMAL for p in [q for q in splits.train if q[1] == name][:15]])
    model = open_model(model_dir())
    assert folder_exposure(11) is None  # too few to leave selection and test trash in the folder's split
    holdout, exposure = folder_exposure(12)
    for n, photo in enumerate(splits.held_trash[:12]):
        write_capture(captures, model, photo, capture_id=f"trash{n}", label="trash")
    export = subprocess.run(
        [sys.executable, "-m", "flywheel.captures", "export", "--captures", str(captures), "--out", str(tree),
         "--audit-share", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    assert json.loads(export.stdout)["written"] == 12
    out = tmp_path / "candidate"
    fit = subprocess.run(
        [
            sys.executable, "-m", "training.fit", "--dataset", "folder", "--data", str(tree),
            "--normal", ",".join(TRASHNET_NORMAL), "--anomaly-holdout", str(holdout), "--outlier-exposure",
            "--exposure-from-train", str(exposure), "--ae-epochs", "1", "--epochs", "1", "--threads", "1", "--quiet",
            "--out", str(out), "--checkpoint", str(tmp_path / "checkpoint.pt"),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    manifest = Manifest.load(out)
    assert manifest.class_names == list(TRASHNET_NORMAL)
    assert manifest.training_data.anomaly_classes == ["trash"]
    counts = manifest.training_data.counts
    # 12 trash photos: 8 in the folder's training split (all exposure), 1 in validation (unused), 3 in its
    # test split: 2 held out (1 of them for selection) and 1 left for its own test AUC.
    assert exposure == 8 and counts["train"]["outlier_exposure"] == 8
    assert counts["selection"]["anomalous"] >= 1 and counts["test"]["anomalous"] >= 1


@pytest.mark.slow
def test_one_flywheel_round_end_to_end(tmp_path: Path, data_dir: Path):
    out = tmp_path / "flywheel"
    command = [
        sys.executable, "-m", "bench.flywheel", "--out", str(out), "--data", str(data_dir / "trashnet"),
        "--rounds", "1", "--per-round", "60", "--trash-share", "0.5", "--labels-per-round", "40",
        "--capture-normal-rate", "1.0", "--seed-per-class", "20", "--ae-epochs", "1", "--epochs", "1",
        "--max-train-per-class", "12", "--threads", "1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = json.loads((out / "flywheel.json").read_text())
    assert (out / "flywheel.png").stat().st_size > 0
    assert summary["test_split"] == {"normal": 410, "trash": 59}
    for order in ("uncertain", "random"):
        start, first = summary["results"][order]
        assert start["labelled"] == 0 and first["labelled"] == 40 and first["captures"] == 60
        labelled = [c for c in iter_captures(out / order / "captures") if c.label is not None]
        assert len(labelled) == 40 and {c.sidecar.label_source for c in labelled} == {"feedback"}
        export = first["export"]
        assert export["labelled"] == 40 and export["written"] + export["audit_written"] + export["duplicates"] == 40
        assert first["gate"]["decision"] in {"promoted", "refused", "not judged"}  # half trash: retrained
        assert first["candidate"]["score_std"] > 0 and 0.0 <= first["candidate"]["auc"] <= 1.0
        if first["gate"]["decision"] == "promoted":
            assert first["serving"]["version"] == first["candidate"]["version"] == "candidate-r1"
        else:
            assert first["serving"]["version"] == start["serving"]["version"] == "round0"


@pytest.mark.slow
def test_a_flywheel_round_retrains_the_pretrained_recipe(tmp_path: Path, data_dir: Path):
    """Capture -> label -> export -> retrain -> gate with DeepMAD heads on Lite0 (small: 64x64, 1 epoch)."""
    out = tmp_path / "flywheel"
    recipe = "--backbone efficientnet-lite0 --input-size 64 --rep-dim 16 --head-hidden 32 --lr 1e-3 --delta 2"
    command = [
        sys.executable, "-m", "bench.flywheel", "--out", str(out), "--data", str(data_dir / "trashnet"),
        "--orders", "uncertain", "--rounds", "1", "--per-round", "60", "--trash-share", "0.5",
        "--labels-per-round", "40", "--capture-normal-rate", "1.0", "--seed-per-class", "12", "--epochs", "2",
        "--max-train-per-class", "12", "--threads", "2", "--recipe", recipe,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    start, first = json.loads((out / "flywheel.json").read_text())["results"]["uncertain"]
    assert Manifest.load(out / "uncertain" / "models" / "bin").backbone.name == "efficientnet-lite0"
    assert first["candidate"] is not None and first["retrain_seconds"] > 0, first
    assert first["gate"]["decision"] in {"promoted", "refused"}, first["gate"]
    candidate = Manifest.load(out / "uncertain" / "candidate-r1")
    assert candidate.backbone.name == "efficientnet-lite0" and candidate.input.height == 64
    assert candidate.training_data.counts["train"].get("outlier_exposure", 0) > 0
