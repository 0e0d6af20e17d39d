"""The benchmark's peers start as real processes and answer exactly as the service does; the INT8
artifact ranks photos as the FP32 one does."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from bench.serve import OURS, PEERS, BenchInput, check_agreement, classify, make_inputs, ours_spec, server
from service.imaging import load_image_file
from service.model import load_model
from service.settings import Settings
from tests.conftest import SHIPPED_MODEL

pytestmark = pytest.mark.slow
INT8_MODEL = SHIPPED_MODEL.parent / "trashnet-int8"


@pytest.fixture(scope="module")
def inputs(trashnet_dir: Path, tmp_path_factory) -> list[BenchInput]:
    made = make_inputs(trashnet_dir / "glass" / "glass10.jpg", tmp_path_factory.mktemp("bench-inputs"))
    trash = BenchInput("trash jpeg", trashnet_dir / "trash" / "trash1.jpg", "image/jpeg")
    return [*made, trash]


@pytest.fixture(scope="module")
def our_port():
    with server(ours_spec(), SHIPPED_MODEL) as running:
        yield running.port


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer_answers_like_the_service(peer: str, our_port: int, inputs: list[BenchInput]):
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(server(PEERS[peer], SHIPPED_MODEL)).port
        lines = check_agreement({OURS: our_port, peer: port}, inputs)  # SystemExit on any disagreement
        assert len(lines) == len(inputs)
        glass, trash = classify(port, inputs[1]), classify(port, inputs[-1])
    assert glass["nearest_class"] == "glass"
    assert glass["score"] != pytest.approx(trash["score"], abs=1e-3)  # not one constant answer


def test_int8_artifact_ranks_photos_like_fp32(trashnet_dir: Path):
    fp32 = load_model(SHIPPED_MODEL, Settings())
    int8 = load_model(INT8_MODEL, Settings())  # sha256 and signature checked on load
    photos = [
        path
        for name in ("cardboard", "glass", "metal", "trash")
        for path in sorted((trashnet_dir / name).glob("*.jpg"))[:12]
    ]
    batch = np.stack([load_image_file(path, 32, 32, 3) for path in photos])
    a, b = fp32.run(batch), int8.run(batch)
    assert np.std(b.score) > 0.5  # a collapsed graph would give every photo one score
    ranks_a, ranks_b = np.argsort(np.argsort(a.score)), np.argsort(np.argsort(b.score))
    assert np.corrcoef(ranks_a, ranks_b)[0, 1] > 0.95
    assert np.mean(a.nearest == b.nearest) >= 0.9
    assert int8.manifest.test_metrics.auc >= fp32.manifest.test_metrics.auc - 0.005


def test_summary_never_names_the_bound_as_best_peer_and_reports_the_ceiling():
    from types import SimpleNamespace

    from bench.loadgen import LoadResult
    from bench.serve import BOUND, summary_line

    def result(req_per_s: float, cpu_ms: float) -> LoadResult:
        n = int(req_per_s)
        return LoadResult(8, 1.0, [0.002] * n, 0, server_cpu_seconds=n * cpu_ms / 1e3)

    cell = {
        OURS: result(600, 2.6),
        "fastapi-ort": result(500, 3.2),
        "litserve": result(400, 4.0),
        BOUND: result(900, 2.0),
    }
    rows = {(name, c): cell for name in ("small", "big") for c in (1, 8, 32)}
    floors = {name: SimpleNamespace(total_ms=1.0) for name in ("small", "big")}
    limits = {name: SimpleNamespace(req_per_s=1000.0) for name in ("small", "big")}
    line = summary_line(rows, floors, limits, "small", "big", ["fastapi-ort", "litserve", BOUND])
    assert "best_peer=fastapi-ort ratio_c8=1.20 ratio_c32=1.20" in line
    assert "ceiling_ratio_c32=1.60" in line  # 3.2 ms / 2.0 ms
    assert line.endswith("bound_ratio_c32=1.30")  # ours 2.6 ms / the bound's 2.0 ms
    without_bound = summary_line(rows, floors, limits, "small", "big", ["fastapi-ort", "litserve"])
    assert "ceiling" not in without_bound and "bound_ratio" not in without_bound


def test_cpu_per_request_reports_each_arm_over_the_bound_round_by_round():
    """``bench.cpu_per_request --bound``: real servers, one ratio per round for each arm, then its median.
    The service does more per request than decode + ORT + HTTP, so it costs about the bound or more (the
    margin below 1 allows for CPU-tick rounding over 60 requests); a ratio far outside would mean the
    bench counted the wrong processes."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    command = [sys.executable, "-m", "bench.cpu_per_request", "--arm", ".", "--bound", "-c", "2", "-n", "60"]
    result = subprocess.run([*command, "--rounds", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    over = lines[lines.index("over the bound (the same round's bare ASGI server): rounds, median") + 1 :]
    assert len(over) == 1 and over[0].split()[0] == ".", result.stdout
    *rounds, bar, median = over[0].split()[1:]
    assert len(rounds) == 2 and bar == "|"
    assert 0.8 < float(median) < 4.0, result.stdout
