"""Section 5.1's analysis: KS h counts behave as defined, and the CLI writes Table 4 and the CDF plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.evaluation.analysis import ks_h, ks_table, main


def test_ks_h_counts_dimensions_whose_distributions_differ():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 20))
    same = rng.normal(size=(300, 20))
    shifted = same.copy()
    shifted[:, :7] += 1.0
    assert ks_h(reference, same) <= 4  # 5% false rejections per dimension, give or take
    assert 7 <= ks_h(reference, shifted) <= 7 + 4
    assert ks_h(reference, reference) == 0


def test_table_rows_pooled_and_per_class():
    rng = np.random.default_rng(1)
    classes = np.repeat(np.arange(4), 50)
    features = rng.normal(size=(200, 2, 6))
    features[classes == 3] += 2.0  # class 3 far from everything on every dimension and column
    per_class = ks_table(features, classes, [0, 1], 4)
    assert list(per_class) == ["0", "1"] and per_class["0"][0] == 0 and per_class["1"][1] == 0
    assert per_class["0"][3] == 6 and per_class["1"][3] == 6
    pooled = ks_table(features[:, :1], classes, [0, 1], 4)
    assert list(pooled) == ["(0,1)"] and pooled["(0,1)"][3] == 6


def test_cli_trains_and_writes_table_and_cdf(tmp_path: Path, data_dir: Path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPMAD_DATA_ROOT", str(data_dir))
    out = tmp_path / "analysis"
    args = ["--dataset", "fmnist", "--normal", "0,8", "--method", "deepmad", "--max-train-per-class", "40",
            "--ae-epochs", "1", "--epochs", "1", "--batch-size", "32", "--per-class", "30"]  # fmt: skip
    args += ["--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "ks.json").read_text())
    assert result["feature_dim"] == 128 and set(result["ks_h"]) == {"0", "8"}
    assert result["ks_h"]["0"][0] == 0 and result["ks_h"]["8"][8] == 0  # a class against itself
    assert max(result["ks_h"]["0"]) > 0
    assert (out / "cdf.png").stat().st_size > 10_000 and "KS(0, -)" in (out / "ks.md").read_text()
    assert "KS(8, -)" in capsys.readouterr().out
