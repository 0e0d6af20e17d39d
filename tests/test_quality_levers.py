"""Held-out anomalies, outlier exposure, and seed ensembles with mirror views exported as one graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import load_dataset, make_task
from training.data.folders import TRASHNET_NORMAL
from training.deepmad import DeepMADConfig
from training.ensemble import EnsembleScorer
from training.errors import UserError
from training.export import check_parity, export_onnx
from training.trainer import fit_deepmad


@pytest.fixture(scope="module")
def trashnet(trashnet_dir: Path):
    return load_dataset("trashnet", trashnet_dir)


def _ids(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def test_anomaly_holdout_is_fixed_disjoint_and_feeds_outlier_exposure(trashnet):
    plain = make_task(trashnet, TRASHNET_NORMAL, seed=0)
    held = make_task(trashnet, TRASHNET_NORMAL, seed=3, anomaly_holdout=0.5)
    exposed = make_task(trashnet, TRASHNET_NORMAL, seed=7, anomaly_holdout=0.5, outlier_exposure=True)
    n_trash = int(plain.test_anomalous.sum())
    assert len(held.selection) + len(held.exposure) + held.test_anomalous.sum() == n_trash
    test_trash = _ids(held.test.images[held.test_anomalous])
    assert not test_trash & _ids(held.selection.images) and not test_trash & _ids(held.exposure.images)
    # The same photos are held out whatever the seed, with or without exposure.
    assert _ids(exposed.test.images[exposed.test_anomalous]) == test_trash
    assert _ids(exposed.selection.images) == _ids(held.selection.images)
    assert (exposed.train.labels == -1).sum() == len(exposed.exposure)
    assert _ids(exposed.train.images[exposed.train.labels == -1]) == _ids(held.exposure.images)
    assert (held.train.labels >= 0).all() and len(held.train) == len(plain.train)
    with pytest.raises(UserError, match="anomaly-holdout"):
        make_task(trashnet, TRASHNET_NORMAL, outlier_exposure=True)


def test_ensemble_with_mirror_view_exports_to_one_graph(trashnet, tmp_path: Path):
    task = make_task(trashnet, TRASHNET_NORMAL, max_train_per_class=20, anomaly_holdout=0.5, outlier_exposure=True)
    members = [
        fit_deepmad(
            task, DeepMADConfig(ae_epochs=1, epochs=1, batch_size=32, seed=seed), torch.device("cpu"), progress=False
        )[0]
        for seed in (0, 1)
    ]
    ensemble = EnsembleScorer.calibrated(members, task.val.images, flip=True)
    # Standardised by held-out normal scores: each member's validation scores have mean 0, sd 1 alone.
    assert ensemble.offsets.shape == (2,) and (ensemble.scales > 0).all()
    images = task.test.images[:48]
    _, scores = ensemble.score_arrays(images)
    _, mirrored = ensemble.score_arrays(np.ascontiguousarray(images[:, :, ::-1]))
    assert np.allclose(scores, mirrored, atol=1e-5)  # the mirror view makes the score left/right invariant
    assert scores.std() > 0.01
    export_onnx(ensemble, tmp_path / "model.onnx")
    parity = check_parity(ensemble, tmp_path / "model.onnx", images)
    assert parity.max_abs_score < 1e-4 and parity.nearest_agreement == 1.0
