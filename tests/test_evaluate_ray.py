"""--executor ray on a local Ray cluster started on this machine: one task per run, same result as in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_evaluate import TINY, evaluate
from training.evaluation.protocol import RunSpec, run_one

pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_executor_matches_an_in_process_run(tmp_path: Path, data_dir: Path, monkeypatch):
    out = tmp_path / "ray"
    result = evaluate(*TINY, "--methods", "deepsvdd", "--executor", "ray", "--workers", "1", "--out", str(out),
                      data_dir=data_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((out / "results.json").read_text())
    monkeypatch.setenv("DEEPMAD_DATA_ROOT", str(data_dir))
    spec = RunSpec(**{k: row[k] for k in RunSpec.__dataclass_fields__ if k != "normal"}, normal=tuple(row["normal"]))
    local = run_one(spec)
    assert row["pid"] != local["pid"]  # it really ran in a Ray worker
    assert row["auc"] == pytest.approx(local["auc"], abs=1e-6)
