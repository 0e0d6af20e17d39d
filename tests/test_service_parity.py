"""The service's answers equal the training package's torch Scorer on the same real photo files.

A Scorer is built with the training package's own classes (grouped LeNet encoders with BatchNorm
statistics and a Normaliser fitted on real TrashNet photos, centres = per-class mean embeddings), and
exported with ``training.export.export_onnx``, the same path the shipped model takes. The service
then scores photo *files* (decode -> image function -> ONNX Runtime) and torch scores the same files
through ``service.imaging.load_image_file``.

Tolerance: |service - torch| <= 1e-5 + 1e-4 * |torch| for every distance and score (float32 kernels
differ in summation order; measured here: ~1.5e-7 on scores of ~0.17), nearest class identical, and the verdict
identical unless the score lies within that tolerance of the threshold.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.imaging import load_image_file
from service.manifest import (
    MODEL_FILE,
    Calibration,
    InputSpec,
    Manifest,
    TestMetrics,
    Threshold,
    TrainingData,
    sha256_file,
    write_manifest,
)
from service.settings import Settings
from tests.service_support import RECYCLABLES, photo_subset

torch = pytest.importorskip("torch", reason="the parity test needs the train extra (torch)")
from training.batches import Normaliser  # noqa: E402
from training.export import export_onnx  # noqa: E402
from training.networks import GroupedEncoder  # noqa: E402
from training.scorer import Scorer  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
SIZE = 32


def build_scorer(trashnet_dir: Path) -> Scorer:
    torch.manual_seed(7)
    fit_paths, _ = photo_subset(trashnet_dir, per_class=16, trash=0)
    images = torch.from_numpy(np.stack([load_image_file(p, SIZE, SIZE, 3) for p in fit_paths]))
    normaliser = Normaliser.fit(images)
    x = (images.permute(0, 3, 1, 2).float() / 255.0 - normaliser.mean.view(1, -1, 1, 1)) / normaliser.std.view(
        1, -1, 1, 1
    )
    encoder = GroupedEncoder(len(RECYCLABLES), 3, SIZE, rep_dim=32)
    with torch.no_grad():
        encoder.train()
        encoder.embed_shared(x)  # BatchNorm running statistics from real photos
        encoder.eval()
        z = encoder.embed_shared(x)  # [N, k, D]
    labels = torch.arange(len(RECYCLABLES)).repeat_interleave(16)
    centres = torch.stack([z[labels == i, i].mean(0) for i in range(len(RECYCLABLES))])
    return Scorer(encoder, centres, normaliser).eval()


@pytest.fixture(scope="module")
def exported(trashnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Scorer, Path]:
    scorer = build_scorer(trashnet_dir)
    out = tmp_path_factory.mktemp("parity-model")
    export_onnx(scorer, out / MODEL_FILE)
    probe, _ = photo_subset(trashnet_dir, per_class=8, trash=0)
    with torch.no_grad():
        normal_scores = scorer(torch.from_numpy(np.stack([load_image_file(p, SIZE, SIZE, 3) for p in probe])))[1]
    gamma = float(np.quantile(normal_scores.numpy(), 0.9))
    manifest = Manifest(
        name="parity-check",
        version="0",
        method="deepmad",
        hyperparameters={"rep_dim": 32, "trained": False},
        class_names=list(RECYCLABLES),
        input=InputSpec(height=SIZE, width=SIZE, channels=3),
        threshold=Threshold(value=gamma, rule="90th percentile of probe normals", normal_reject_rate=0.1),
        calibration=Calibration(center=gamma, scale=max(gamma * 0.1, 1e-6)),
        training_data=TrainingData(
            source="trashnet",
            root=str(trashnet_dir),
            normal_classes=list(RECYCLABLES),
            anomaly_classes=["trash"],
            counts={},
            sha256="-",
        ),
        test_metrics=TestMetrics(auc=None, tpr_at_threshold=None, fpr_at_threshold=None, n_normal=0, n_anomalous=0),
        model_sha256=sha256_file(out / MODEL_FILE),
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    write_manifest(out, manifest)
    return scorer, out


def test_service_scores_equal_torch_scorer(exported: tuple[Scorer, Path], trashnet_dir: Path) -> None:
    scorer, model = exported
    recyclable, trash = photo_subset(trashnet_dir, per_class=4, trash=10)
    paths = recyclable + trash
    with TestClient(create_app(Settings(model_dir=model))) as client:
        served = [
            client.post("/classify", files={"file": (p.name, p.read_bytes(), "image/jpeg")}).json() for p in paths
        ]
        batch = client.post(
            "/classify/batch", files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        ).json()["results"]
    images = torch.from_numpy(np.stack([load_image_file(p, SIZE, SIZE, 3) for p in paths]))
    with torch.no_grad():
        distances, score, nearest = (t.numpy() for t in scorer(images))
    assert np.std(score) > 0
    for i, answer in enumerate(served):
        for got in (answer, batch[i]["result"]):
            np.testing.assert_allclose(list(got["distances"].values()), distances[i], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(got["score"], score[i], rtol=RTOL, atol=ATOL)
            assert got["nearest_class"] == RECYCLABLES[nearest[i]]
            if abs(score[i] - got["threshold"]) > ATOL + RTOL * abs(score[i]):
                expected = "anomalous" if score[i] >= got["threshold"] else "normal"
                assert got["verdict"] == expected
