"""``DEEPMAD_ENGINE``: OpenVINO serves the same artifact as ONNX Runtime with the same answers, proves its own
golden scores, and an engine that is missing or refuses the graph stops the start with one line (exit 2) and
leaves the old model serving on reload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.imaging import load_image_file
from service.manifest import Manifest, sha256_file, write_manifest
from service.model import EngineLoadError, load_model
from service.settings import Settings
from tests.conftest import REPO_ROOT, SHIPPED_MODEL
from tests.service_support import copy_model, photo_subset, run_server, service_env
from tests.test_service_process import counter

LITE0_MODEL = REPO_ROOT / "models" / "trashnet-lite0"
INT8_MODEL = REPO_ROOT / "models" / "trashnet-int8"
ENGINES = ("onnxruntime", "openvino")


@pytest.mark.parametrize("artifact", [SHIPPED_MODEL, LITE0_MODEL], ids=["32x32", "lite0-224"])
def test_both_engines_give_the_same_verdicts_and_distances_on_trashnet_photos(artifact: Path, trashnet_dir: Path):
    recyclable, trash = photo_subset(trashnet_dir, per_class=6, trash=10)
    models = {engine: load_model(artifact, Settings(engine=engine)) for engine in ENGINES}
    height, width, channels = models["onnxruntime"].input_shape
    batch = np.stack([load_image_file(path, height, width, channels) for path in recyclable + trash])
    ort_scores, ov_scores = (models[engine].run(batch) for engine in ENGINES)
    # f32 on both: the same function up to float summation order (golden gaps 4e-6 to 2e-5).
    np.testing.assert_allclose(ov_scores.distances, ort_scores.distances, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ov_scores.score, ort_scores.score, rtol=1e-4, atol=1e-3)
    threshold = models["onnxruntime"].threshold
    clear = np.abs(ort_scores.score - threshold) > 1e-3
    assert clear.sum() >= len(batch) - 1
    np.testing.assert_array_equal((ov_scores.score >= threshold)[clear], (ort_scores.score >= threshold)[clear])
    np.testing.assert_array_equal(ov_scores.nearest, ort_scores.nearest)
    assert ort_scores.score[len(recyclable) :].mean() > ort_scores.score[: len(recyclable)].mean()  # not collapsed


@pytest.mark.parametrize("artifact", [SHIPPED_MODEL, LITE0_MODEL, INT8_MODEL], ids=["32x32", "lite0-224", "int8"])
def test_each_engine_proves_the_golden_scores_itself_in_f32(artifact: Path):
    for engine in ENGINES:
        model = load_model(artifact, Settings(engine=engine))
        assert model.golden.status == "verified", (engine, model.golden.detail)
        assert model.engine.startswith(engine)
    openvino = load_model(artifact, Settings(engine="openvino", intra_op_threads=2, busy_intra_op_threads=1))
    assert openvino.providers == ("OpenVINO:CPU:f32",)
    for session in (openvino.session, openvino.busy_session):  # bf16 would be another function: pinned off
        assert str(session.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert openvino.session.get_property("NUM_STREAMS") == 1  # a lone call: one stream with every thread


def refused_graph(tmp_path: Path, version: str = "9.9.9") -> Path:
    """The shipped 32x32 graph with an ``ai.onnx.ml.Scaler`` (scale 1, offset 0) on its distances: the same
    outputs on ONNX Runtime, an operator OpenVINO's ONNX reader has no rule for. Its own manifest (sha256,
    version) so that only the engine can refuse it."""
    import onnx
    from onnx import helper

    graph = onnx.load(SHIPPED_MODEL / "model.onnx")
    for node in graph.graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == "distances":
                    names[i] = "distances_raw"
    graph.graph.node.append(
        helper.make_node("Scaler", ["distances_raw"], ["distances"], domain="ai.onnx.ml", offset=[0.0], scale=[1.0])
    )
    graph.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    folder = tmp_path / "refused"
    folder.mkdir()
    onnx.save(graph, folder / "model.onnx")
    manifest = Manifest.load(SHIPPED_MODEL)
    write_manifest(
        folder, manifest.model_copy(update={"model_sha256": sha256_file(folder / "model.onnx"), "version": version})
    )
    return folder


def start_error(tmp_path: Path, model: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "--model-dir", str(model), "--port", "0", *args]
    return subprocess.run(command, env=service_env(**env), capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_an_engine_that_is_not_installed_stops_the_start_with_one_line(tmp_path: Path):
    shim = tmp_path / "shim" / "openvino"  # first on PYTHONPATH: `import openvino` fails as if not installed
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    pythonpath = f"{tmp_path / 'shim'}:{service_env()['PYTHONPATH']}"
    result = start_error(tmp_path, SHIPPED_MODEL, PYTHONPATH=pythonpath, DEEPMAD_ENGINE="openvino")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: engine openvino is not installed"), result.stderr
    assert "pip install 'deepmad-bin[openvino]'" in lines[0]


def test_an_unknown_engine_or_a_refused_graph_stops_the_start_with_one_line(tmp_path: Path):
    unknown = start_error(tmp_path, SHIPPED_MODEL, "--engine", "tensorrt")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert unknown.stderr.startswith("error: --engine:") and "openvino" in unknown.stderr
    refused = start_error(tmp_path, refused_graph(tmp_path), "--engine", "openvino")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: engine openvino refuses") and "ai.onnx.ml.Scaler" in refused.stderr
    with pytest.raises(EngineLoadError, match="DEEPMAD_ENGINE=onnxruntime"):
        load_model(tmp_path / "refused", Settings(engine="openvino"))
    assert load_model(tmp_path / "refused", Settings()).golden.status == "verified"  # ONNX Runtime serves it


def test_openvino_serves_like_onnxruntime_and_a_refused_reload_keeps_the_old_model(tmp_path: Path, trashnet_dir: Path):
    folder = copy_model(SHIPPED_MODEL, tmp_path / "model")
    photos = [path.read_bytes() for path in sum(photo_subset(trashnet_dir, per_class=1, trash=2), [])]
    answers = {}
    for engine in ENGINES:
        with (
            run_server(folder, tmp_path, DEEPMAD_ENGINE=engine, DEEPMAD_ADMIN_TOKEN="t") as server,
            server.client() as client,
        ):
            info = client.get("/model").json()
            answers[engine] = [
                client.post("/classify", files={"file": ("p.jpg", p, "image/jpeg")}).json() for p in photos
            ]
            if engine == "openvino":
                assert info["providers"] == ["OpenVINO:CPU:f32"] and info["golden"]["status"] == "verified", info
                old_version = info["version"]
                refused = refused_graph(tmp_path)
                for name in ("model.onnx", "manifest.json"):
                    (folder / name).write_bytes((refused / name).read_bytes())
                reply = client.post("/admin/reload", headers={"Authorization": "Bearer t"})
                assert 400 <= reply.status_code < 600 and reply.headers["content-type"] == "application/json"
                error = reply.json()["error"]
                assert error["code"] == "reload_failed" and "engine openvino refuses" in error["message"], error
                assert client.get("/model").json()["version"] == old_version
                again = client.post("/classify", files={"file": ("p.jpg", photos[0], "image/jpeg")}).json()
                assert again["model"]["version"] == old_version and again["score"] == answers[engine][0]["score"]
                assert counter(client, "deepmad_reload_failures_total", trigger="http") == 1
    for ort_answer, ov_answer in zip(answers["onnxruntime"], answers["openvino"], strict=True):
        assert (
            ov_answer["verdict"] == ort_answer["verdict"] and ov_answer["nearest_class"] == ort_answer["nearest_class"]
        )
        assert ov_answer["score"] == pytest.approx(ort_answer["score"], rel=1e-4, abs=1e-3)


def test_the_serving_bench_ends_with_one_summary_line_per_engine():
    from bench.loadgen import LoadResult
    from bench.serve import OURS, engine_summary_lines, ours_name, rivals

    def result(cpu_ms: float) -> LoadResult:
        return LoadResult(32, 1.0, [0.002] * 100, 0, server_cpu_seconds=100 * cpu_ms / 1e3)

    rows = {("jpeg", 32): {OURS: result(12.0), ours_name("openvino"): result(8.0), "fastapi-ort": result(13.0)}}
    costs = {"onnxruntime": {1: 10.0, 8: 9.0}, "openvino": {1: 5.0, 8: 4.5}}
    lines = engine_summary_lines(rows, costs, "jpeg")
    assert lines == [
        "summary: engine=onnxruntime ms_per_photo_b1=10.00 ms_per_photo_b8=9.00 cpu_ms_per_request_c32=12.00 "
        "vs_onnxruntime_b1=1.00 vs_onnxruntime_c32=1.00",
        "summary: engine=openvino ms_per_photo_b1=5.00 ms_per_photo_b8=4.50 cpu_ms_per_request_c32=8.00 "
        "vs_onnxruntime_b1=2.00 vs_onnxruntime_c32=1.50",
    ]
    assert rivals([OURS, ours_name("openvino"), "fastapi-ort", "bare-asgi"]) == ["fastapi-ort"]
