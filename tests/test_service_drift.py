"""Score drift: the gauges stay low on held-out normal photos and rise on darkened or blurred ones.

The unit tests pin the statistics (PSI, KS, anomalous share, the window) on synthetic scores; the
process test runs ``python -m service`` with a 200-score window, posts 200 held-out TrashNet
recyclables (the validation and test split, never trained on), then the same photos darkened, then
blurred, reads the gauges from ``/metrics`` with prometheus_client's parser after each, and runs
docker/alerts.yml's DeepmadScoreDrift on the values read (promtool): it fires for the degraded photos
only.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from PIL import Image, ImageEnhance, ImageFilter
from prometheus_client.parser import text_string_to_metric_families

from service.drift import ScoreDrift
from service.manifest import Manifest
from tests.monitoring_support import check_alert
from tests.service_support import model_dir, run_server
from training.data.base import SPLIT_SEED, split_per_class
from training.data.folders import FOLDER_SPLIT, TRASHNET_NORMAL, class_folders, folder_files

# docker/alerts.yml fires DeepmadScoreDrift above this PSI (the usual "significant shift" level).
PSI_ALERT = 0.25
WINDOW = 200
UNIFORM = [1.0 + 0.2 * i for i in range(21)]  # held-out quantiles of a score uniform on [1, 5]


def test_scores_from_the_reference_are_stable_and_shifted_scores_drift() -> None:
    rng = np.random.default_rng(0)
    same, shifted = ScoreDrift(500), ScoreDrift(500)
    for drift in (same, shifted):
        drift.set_reference(UNIFORM)
    stable_scores, moved_scores = rng.uniform(1.0, 5.0, 500), rng.uniform(2.0, 6.0, 500)
    for value in stable_scores:
        same.observe(value, anomalous=value >= 4.8)
    for value in moved_scores:
        shifted.observe(value, anomalous=value >= 4.8)
    stable, moved = same.snapshot(), shifted.snapshot()
    assert stable.scores == moved.scores == 500
    # KS against the reference's piecewise-linear CDF is scipy's one-sample statistic.
    assert stable.ks == pytest.approx(scipy.stats.kstest(stable_scores, scipy.stats.uniform(1, 4).cdf).statistic)
    assert stable.psi < 0.1 and stable.ks < 0.1  # sampling noise only
    assert moved.psi > PSI_ALERT and moved.ks == pytest.approx(0.25, abs=0.05)
    assert stable.anomalous_share == pytest.approx(0.05, abs=0.03)
    assert moved.anomalous_share == pytest.approx(0.3, abs=0.05)


def test_window_reference_and_empty_states() -> None:
    drift = ScoreDrift(window=3)
    empty = drift.snapshot()
    assert empty.scores == 0 and math.isnan(empty.psi) and math.isnan(empty.anomalous_share)
    for value in (1.0, 2.0, 3.0, 4.0):
        drift.observe(value, anomalous=False)
    no_reference = drift.snapshot()
    assert no_reference.scores == 3 and math.isnan(no_reference.psi) and no_reference.anomalous_share == 0.0
    drift.set_reference(UNIFORM)  # a new model: its scores start a new window
    assert drift.snapshot().scores == 0
    drift.observe(9.0, anomalous=True)
    drift.set_reference(list(UNIFORM))  # the same model reloaded: the window stays
    assert drift.snapshot().scores == 1 and drift.snapshot().anomalous_share == 1.0
    drift.set_reference(None)
    assert math.isnan(drift.snapshot().ks)


def held_out_recyclables(trashnet_dir: Path, count: int) -> list[Path]:
    """Recyclable photos of the validation and test split (training's own 70/10/20 split, fixed seed)."""
    classes = class_folders(trashnet_dir)
    files, labels = folder_files(trashnet_dir, classes)
    _, val, test = split_per_class(np.asarray(labels), FOLDER_SPLIT, SPLIT_SEED)
    held = [files[i] for i in np.union1d(val, test) if classes[labels[i]] in TRASHNET_NORMAL]
    step = len(held) / count
    return [held[int(i * step)] for i in range(count)]


def degraded(path: Path, kind: str) -> bytes:
    """A dirty-lens or bad-light version: half the brightness, or a 32-px Gaussian blur (2 px at 32x32)."""
    image = Image.open(path).convert("RGB")
    if kind == "dark":
        image = ImageEnhance.Brightness(image).enhance(0.5)
    else:
        image = image.filter(ImageFilter.GaussianBlur(32))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def gauges(text: str) -> dict[str, float]:
    wanted = {
        "deepmad_score_drift_psi",
        "deepmad_score_drift_ks",
        "deepmad_anomalous_share",
        "deepmad_drift_window_scores",
    }
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in wanted
    }


@pytest.mark.slow
def test_drift_gauges_on_normal_darkened_and_blurred_photos(tmp_path: Path, trashnet_dir: Path) -> None:
    manifest = Manifest.load(model_dir())
    assert manifest.calibration and len(manifest.calibration.normal_score_quantiles) == 21
    photos = held_out_recyclables(trashnet_dir, WINDOW)
    phases = {
        "normal": [p.read_bytes() for p in photos],
        "darkened": [degraded(p, "dark") for p in photos],
        "blurred": [degraded(p, "blur") for p in photos],
    }
    readings: dict[str, dict[str, float]] = {}
    with run_server(model_dir(), tmp_path, DEEPMAD_DRIFT_WINDOW=str(WINDOW)) as server, server.client() as client:
        assert math.isnan(gauges(client.get("/metrics").text)["deepmad_score_drift_psi"])  # no scores yet
        for phase, blobs in phases.items():
            scores = []
            for start in range(0, len(blobs), 25):
                files = [
                    ("files", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs[start : start + 25])
                ]
                response = client.post("/classify/batch", files=files)
                assert response.status_code == 200, response.text
                scores += [item["result"]["score"] for item in response.json()["results"]]
            assert np.std(scores) > 0, "constant scores: the model is not looking at the image"
            readings[phase] = gauges(client.get("/metrics").text)
    print({phase: {k.removeprefix("deepmad_"): round(v, 3) for k, v in r.items()} for phase, r in readings.items()})
    for reading in readings.values():
        assert reading["deepmad_drift_window_scores"] == WINDOW  # each phase fills the whole window
    normal = readings["normal"]
    assert normal["deepmad_score_drift_psi"] < 0.1, normal
    assert normal["deepmad_score_drift_ks"] < 1.36 / math.sqrt(WINDOW), normal
    assert normal["deepmad_anomalous_share"] < 0.15, normal  # manifest's normal-reject rate is about 0.05
    assert readings["darkened"]["deepmad_score_drift_psi"] > PSI_ALERT, readings["darkened"]
    for phase in ("darkened", "blurred"):
        assert readings[phase]["deepmad_score_drift_ks"] > 2 * normal["deepmad_score_drift_ks"], readings[phase]

    # The alert rule itself, on the gauges as read (held for 30 minutes), plus an idle bin (NaN, 0 scores).
    readings["idle"] = dict.fromkeys(readings["normal"], math.nan) | {"deepmad_drift_window_scores": 0.0}
    series = {
        f'{name}{{job="deepmad", instance="{phase}"}}': " ".join(["NaN" if math.isnan(value) else repr(value)] * 31)
        for phase, reading in readings.items()
        for name, value in reading.items()
    }
    check_alert(series, "DeepmadScoreDrift", "20m", firing=["darkened", "blurred"], work=tmp_path)
