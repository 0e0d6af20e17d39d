"""Held-out anomalies, outlier exposure, and seed ensembles with mirror views exported as one graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import load_dataset, make_task, pool_task
from training.data.composites import with_composites
from training.data.folders import TRASHNET_NORMAL
from training.engine import RunOptions, TrainingInputs
from training.errors import UserError
from training.export import check_parity, export_onnx
from training.methods.deepmad import DeepMADConfig, fit_deepmad
from training.methods.ensemble import EnsembleScorer


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


def test_exposure_from_train_draws_anomaly_training_images_and_keeps_the_test(data_dir: Path, trashnet):
    fmnist = load_dataset("fmnist", data_dir / "fashion-mnist")
    normal = ["t-shirt", "trouser"]
    held = make_task(fmnist, normal, max_train_per_class=50, anomaly_holdout=0.5)
    drawn = [
        make_task(fmnist, normal, 50, seed, anomaly_holdout=0.5, outlier_exposure=True, exposure_from_train=7)
        for seed in (0, 1)
    ]
    n_anomaly_classes = len(fmnist.class_names) - 2
    assert len(drawn[0].exposure) == 7 * n_anomaly_classes == (drawn[0].train.labels == -1).sum()
    assert _ids(drawn[0].exposure.images) == _ids(drawn[1].exposure.images)  # fixed whatever the seed
    anomaly_train = fmnist.train.images[np.isin(fmnist.train.labels, range(2, len(fmnist.class_names)))]
    assert _ids(drawn[0].exposure.images) <= _ids(anomaly_train)
    # Selection and test images are those of the plain holdout: only the exposure pool changes.
    assert _ids(drawn[0].test.images) == _ids(held.test.images)
    assert _ids(drawn[0].selection.images) == _ids(held.selection.images)
    assert drawn[0].counts()["train"]["outlier_exposure"] == 7 * n_anomaly_classes
    with pytest.raises(UserError, match="holds 0 images of anomaly class 'trash'"):
        make_task(trashnet, TRASHNET_NORMAL, anomaly_holdout=0.5, outlier_exposure=True, exposure_from_train=5)
    with pytest.raises(UserError, match="needs --outlier-exposure"):
        make_task(fmnist, normal, anomaly_holdout=0.5, exposure_from_train=5)


def test_ensemble_with_mirror_view_exports_to_one_graph(trashnet, tmp_path: Path):
    task = make_task(trashnet, TRASHNET_NORMAL, max_train_per_class=20, anomaly_holdout=0.5, outlier_exposure=True)
    members = [
        fit_deepmad(
            task, DeepMADConfig(ae_epochs=1, epochs=1, batch_size=32, seed=seed), RunOptions(torch.device("cpu"))
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


def test_composites_mix_two_normal_classes_and_train_as_negatives(trashnet):
    task = make_task(trashnet, TRASHNET_NORMAL, max_train_per_class=30, seed=0)
    mixed = with_composites(task, 40, seed=5)
    assert len(mixed.train) == len(task.train) + 40 and mixed.counts()["train"]["composites"] == 40
    assert (mixed.train.labels[: len(task.train)] == task.train.labels).all()
    assert (mixed.train.labels[len(task.train) :] == -1).all()
    sources = {image.tobytes(): label for image, label in zip(task.train.images, task.train.labels, strict=True)}
    for composite in mixed.train.images[len(task.train) :]:
        assert composite.tobytes() not in sources  # neither photo survives whole
        # Every pixel comes from one of two training photos of different classes.
        matches = [
            label for image, label in zip(task.train.images, task.train.labels, strict=True)
            if (image == composite).all(axis=-1).mean() > 0.15
        ]  # fmt: skip
        assert len(set(matches)) >= 2
    # Seeded: the same composites again; another seed, others. The normalisation ignores them.
    assert (with_composites(task, 40, seed=5).train.images == mixed.train.images).all()
    assert not (with_composites(task, 40, seed=6).train.images == mixed.train.images).all()
    inputs, plain = TrainingInputs.of(mixed, 0), TrainingInputs.of(task, 0)
    assert torch.equal(inputs.normaliser.mean, plain.normaliser.mean)
    with pytest.raises(UserError, match="two normal classes"):
        with_composites(pool_task(task), 10, seed=0)
