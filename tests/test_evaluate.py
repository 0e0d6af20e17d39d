"""The evaluation protocol: combinations, confidence intervals, claims, and the CLI end to end (resume too)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from training.errors import UserError
from training.evaluate import main
from training.evaluation.protocol import parse_combos
from training.evaluation.report import claims, mean_ci

TINY = [
    "--dataset", "fmnist", "--n-normal", "2", "--combos", "0,8", "--seeds", "1", "--max-train-per-class", "30",
    "--max-val-per-class", "10", "--max-test-per-class", "20", "--ae-epochs", "1", "--epochs", "1",
    "--drocc-epochs", "1", "--ascent-steps", "1", "--batch-size", "32", "--threads", "2", "--quiet",
]  # fmt: skip


def evaluate(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.evaluate", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"DEEPMAD_DATA_ROOT": str(data_dir), "PATH": "/usr/bin:/bin"},
    )


def test_combinations():
    assert len(parse_combos("all", 10, 2)) == 45 and len(parse_combos("all", 10, 5)) == 252
    assert parse_combos("3", 10, 2) == parse_combos("3", 10, 2) and len(parse_combos("3", 10, 2)) == 3
    assert parse_combos("8,0; 3,5", 10, 2) == [(0, 8), (3, 5)]
    for bad in ["0,1,2", "0,0", "0,10", "a,b", "46"]:
        with pytest.raises(UserError):
            parse_combos(bad, 10, 2)


def test_confidence_interval_is_student_t():
    mean, half = mean_ci([0.6, 0.7])
    assert mean == pytest.approx(0.65)
    assert half == pytest.approx(12.7062 * 0.0707107 / math.sqrt(2), rel=1e-4)
    assert math.isnan(mean_ci([0.6])[1])


def test_claims_are_paired_per_combination():
    rows = [
        {"method": m, "combo": c, "auc": auc}
        for c, pooled, per_class, mad in [
            ("0-1", 0.70, 0.60, 0.80),
            ("2-3", 0.55, 0.50, 0.65),
            ("4-5", 0.62, 0.61, 0.7),
        ]
        for m, auc in [("deepsvdd", pooled), ("deepsvdd-m", per_class), ("deepmad", mad)]
    ]
    found = {(c["better"], c["worse"]): c for c in claims(rows)}
    assert found[("deepsvdd", "deepsvdd-m")]["wins"] == 3
    assert found[("deepsvdd", "deepsvdd-m")]["mean_difference"] == pytest.approx((0.10 + 0.05 + 0.01) / 3)
    assert found[("deepmad", "deepsvdd")]["combos"] == 3


def test_cli_runs_resumes_and_refuses_mixed_settings(tmp_path: Path, data_dir: Path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    first = evaluate(*TINY, "--methods", "deepmad,deepsvdd-m", "--out", str(out), data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["runs"] == 2 and summary["failures"] == [] and summary["collapsed"] == []
    for name in ["results.json", "results.csv", "summary.md", "auc_per_combo.png", "command.txt"]:
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"deepmad", "deepsvdd-m"}
    assert all(0.0 <= r["auc"] <= 1.0 and r["test_score_unique_share"] > 0.5 for r in rows)
    assert all(r["auc_dempster_shafer"] is not None for r in rows)  # two columns each: Algorithm 1's rule applies
    assert "DeepSVDD(m)" in (out / "summary.md").read_text()

    # Resume and the settings guard in-process (no second torch start-up): nothing trains in either.
    monkeypatch.setenv("DEEPMAD_DATA_ROOT", str(data_dir))
    assert main([*TINY, "--methods", "deepmad,deepsvdd-m", "--out", str(out)]) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().err
    assert main([*TINY, "--epochs", "2", "--methods", "deepmad", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "Traceback" not in error
    assert main([*TINY, "--anomaly-holdout", "0.5", "--methods", "deepmad", "--out", str(out)]) == 2
    assert "other settings (anomaly_holdout)" in capsys.readouterr().err

    # Held-out anomalies: a selection AUC, fewer test anomalies, and with exposure more training images.
    levers = ["--anomaly-holdout", "0.5", "--outlier-exposure", "--augment", "--methods", "deepmad"]
    assert main([*TINY, *levers, "--out", str(tmp_path / "levers")]) == 0
    (lever_run,) = json.loads((tmp_path / "levers" / "results.json").read_text())
    (plain_run,) = [r for r in rows if r["method"] == "deepmad"]
    assert lever_run["outlier_exposure"] and lever_run["config"]["augment"] and not plain_run["config"]["augment"]
    assert 0.0 <= lever_run["selection_auc"] <= 1.0
    assert lever_run["n_test_anomalous"] < plain_run["n_test_anomalous"] and lever_run["n_train"] > plain_run["n_train"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "fmnist", "--methods", "deepmad,isolation-forest"], "unknown method"),
        (["--dataset", "fmnist", "--combos", "0,1,2"], "--combos"),
        (["--dataset", "fmnist", "--n-normal", "10"], "--n-normal"),
        (["--dataset", "cifar100", "--data", "/nonexistent"], "CIFAR-100 not found"),
        (["--dataset", "trashnet", "--exclude-classes", "bananas"], "--exclude-classes"),
        (["--dataset", "fmnist", "--outlier-exposure"], "--anomaly-holdout"),
        (["--dataset", "fmnist", "--anomaly-holdout", "0.5", "--exposure-from-train", "9"], "--outlier-exposure"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path: Path, data_dir: Path, capsys, monkeypatch):
    monkeypatch.setenv("DEEPMAD_DATA_ROOT", str(data_dir))
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error:") and message in error and "Traceback" not in error
