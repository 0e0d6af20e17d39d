"""``python -m training.quantize`` as a user runs it: bad input is one error line and exit 2; a good run
writes an artifact the service loads, with gamma chosen by training's rule on the INT8 graph's own
validation scores and golden scores made here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.quantize import rank_correlation
from flywheel.metrics import choose_gamma
from service.manifest import Manifest
from service.model import load_model
from service.settings import Settings
from tests.conftest import REPO_ROOT, SHIPPED_MODEL
from training.quantize import METHODS, rebuild_task

pytestmark = pytest.mark.slow


def quantize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.quantize", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    return errors[0]


def test_missing_model_folder_is_one_line(tmp_path: Path):
    line = one_error_line(quantize("--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")))
    assert "nowhere" in line and "not a folder" in line
    assert not (tmp_path / "out").exists()


def test_missing_data_is_one_line(tmp_path: Path):
    line = one_error_line(
        quantize("--model", str(SHIPPED_MODEL), "--out", str(tmp_path / "out"), "--data", str(tmp_path / "no-data"))
    )
    assert "no-data" in line
    assert not (tmp_path / "out").exists()


def test_writes_a_servable_int8_artifact_with_gamma_from_its_own_validation_scores(tmp_path: Path, trashnet_dir: Path):
    out = tmp_path / "int8"
    result = quantize("--model", str(SHIPPED_MODEL), "--out", str(out), "--data", str(trashnet_dir))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    model = load_model(out, Settings())  # sha256 and golden scores checked here, on this CPU
    assert model.golden.status == "verified" and model.manifest.golden.atol > 0.01  # the INT8 tolerance
    manifest, source = model.manifest, Manifest.load(SHIPPED_MODEL)
    assert manifest.version == f"{source.version}+int8"
    assert manifest.test_metrics.auc >= source.test_metrics.auc - 0.005
    task = rebuild_task(source, trashnet_dir)
    val_scores = model.run(task.val.images).score
    expected = choose_gamma(val_scores, source.hyperparameters["reject_rate"])
    assert manifest.threshold.value == pytest.approx(expected.value, rel=1e-6)
    assert manifest.threshold.value != pytest.approx(source.threshold.value, rel=1e-4)  # re-chosen, not copied
    assert np.std(val_scores) > 0.5


def test_nncf_makes_an_int8_artifact_that_ranks_photos_like_fp32_on_both_engines(tmp_path: Path, trashnet_dir: Path):
    """``--method nncf`` on the pretrained graph with 10 calibration photos (the AUC gate opened: this checks
    the path, bench.engines measures the recipe): a QDQ graph the service loads (golden scores verified on
    ONNX Runtime, whose outputs they are), whose scores of real validation photos rank as the fp32 graph's on
    ONNX Runtime and on OpenVINO (0.82 measured here; a graph quantized wrongly ranks near 0). OpenVINO's
    true INT8 kernels move scores up to ~0.09 from ONNX Runtime's on this graph, about the golden tolerance,
    so its golden check is not asserted here (docs/performance.md, "INT8 and bf16 of the pretrained graph")."""
    import onnx

    from bench.int8_no_vnni import bare_run

    lite0 = REPO_ROOT / "models" / "trashnet-lite0"
    out = tmp_path / "lite0-int8"
    result = quantize("--method", "nncf", "--model", str(lite0), "--out", str(out), "--data", str(trashnet_dir),
                      "--calibration", "10", "--max-auc-drop", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    ops = {node.op_type for node in onnx.load(out / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    photos = rebuild_task(Manifest.load(lite0), trashnet_dir).val.images
    fp32 = load_model(lite0, Settings()).run(photos).score
    model = load_model(out, Settings())
    assert model.golden.status == "verified", model.golden.detail
    assert model.manifest.test_metrics.extra["quantization"] == METHODS["nncf"]
    assert model.manifest.test_metrics.extra["calibration_photos"] == 10
    assert rank_correlation(fp32, model.run(photos).score) > 0.7
    assert rank_correlation(fp32, bare_run(out / "model.onnx", "openvino")(photos)[1]) > 0.7


def test_the_recipes_bench_compares_each_recipe_with_fp32_on_the_selection_split(trashnet_dir: Path):
    """``bench.int8_recipes``: one row per graph; the shipped 7-bit recipe ranks the selection photos as the
    FP32 graph does (0.998 measured on the test split), and the full-range recipe is flagged as CPU-dependent."""
    recipes = ["7-bit weights (shipped for 32x32)", "8-bit weights (U8S8 full range)"]
    command = [sys.executable, "-m", "bench.int8_recipes", "--model-dir", str(SHIPPED_MODEL), "--rounds", "1"]
    command += ["--data", str(trashnet_dir), "--calibration", "64", *[arg for r in recipes for arg in ("--recipe", r)]]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.count("|") == 8]
    rows = {cells[0].strip(): cells[1:] for cells in table}
    assert set(rows) == {"graph", "---", "fp32", *recipes}, result.stdout
    fp32_auc, fp32_corr = float(rows["fp32"][0]), float(rows["fp32"][1])
    assert fp32_corr == 1.0 and 0.55 < fp32_auc < 1.0  # trash above recyclables, not a collapsed score
    shipped = rows[recipes[0]]
    assert float(shipped[1]) > 0.95 and abs(float(shipped[0]) - fp32_auc) < 0.03, result.stdout
    assert rows[recipes[0]][-1].strip() == "yes" and rows[recipes[1]][-1].strip().startswith("no")
    assert "test not read" in result.stdout


def test_the_engines_bench_puts_each_graph_on_each_engine_beside_ort_fp32(trashnet_dir: Path):
    """``bench.engines`` on the 32x32 model: one row per graph and engine, fp32 on OpenVINO f32 reads ONNX
    Runtime's AUC, the NNCF graph ranks like fp32, and the summary line carries the load average."""
    graph = "NNCF, overflow fix on every layer"
    command = [sys.executable, "-m", "bench.engines", "--model-dir", str(SHIPPED_MODEL), "--data", str(trashnet_dir),
               "--calibration", "10", "--rounds", "1", "--graph", graph, "--engine", "openvino f32"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:-1] for line in result.stdout.splitlines()
            if line.count("|") == 11 and "---" not in line and "graph" not in line}  # fmt: skip
    assert set(rows) == {(g, e) for g in ("fp32", graph) for e in ("onnxruntime", "openvino f32")}, result.stdout
    fp32_auc = float(rows[("fp32", "onnxruntime")][1])
    assert 0.55 < fp32_auc < 1.0 and abs(float(rows[("fp32", "openvino f32")][1]) - fp32_auc) < 1e-3
    assert float(rows[(graph, "openvino f32")][3]) > 0.8, result.stdout  # rank correlation to fp32
    assert "test not read" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("summary: ")]
    assert len(summary) == 1 and "load_average=" in summary[0]
