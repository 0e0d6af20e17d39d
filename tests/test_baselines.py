"""The baselines on real Fashion-MNIST: DROCC's search stays in its shell, DeepSVDD(m)'s detectors are
independent, and every method trains to non-constant scores that export to the one artifact contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flywheel.metrics import roc_auc
from training.batches import Normaliser, to_float
from training.data import load_dataset, make_task
from training.export import check_parity, export_onnx
from training.measure import measure_scorer
from training.methods import METHODS
from training.methods.deepmad import DeepMADConfig, EncoderPhase
from training.methods.deepsvdd import train_one_class_encoders
from training.methods.drocc import DROCCConfig, adversarial_search, learning_rate, project
from training.networks import GroupedClassifier, GroupedEncoder

TINY = {"ae_epochs": 1, "epochs": 1, "ascent_steps": 2, "batch_size": 32}


@pytest.fixture(scope="module")
def fmnist(data_dir: Path):
    return load_dataset("fmnist", data_dir / "fashion-mnist")


@pytest.fixture(scope="module")
def task(fmnist):
    """T-shirt and bag normal (classes 0 and 8), 60 training images each, 300 test images."""
    task = make_task(fmnist, ["t-shirt", "bag"], max_train_per_class=60, seed=0)
    keep = np.random.default_rng(0).choice(len(task.test), 300, replace=False)
    task.test = task.test.subset(keep)
    task.test_anomalous = task.test_anomalous[keep]
    keep_val = np.random.default_rng(1).choice(len(task.val), 100, replace=False)
    task.val = task.val.subset(keep_val)
    return task


def test_projection_lands_between_r_and_gamma_r():
    x = torch.randn(6, 2, 1, 8, 8)
    far = x + 50 * torch.randn_like(x)
    near = x + 1e-3 * torch.randn_like(x)
    for start in (far, near):
        h = project(x, start, radius=2.0, radius_factor=1.5) - x
        norms = h.pow(2).sum((2, 3, 4)).sqrt()
        assert torch.all(norms >= 2.0 - 1e-4) and torch.all(norms <= 3.0 + 1e-4)


def test_adversarial_search_raises_the_normal_logit_within_the_shell():
    torch.manual_seed(0)
    network = GroupedClassifier(2, 1, 28).train()
    x = torch.randn(16, 2, 1, 28, 28)
    config = DROCCConfig(radius=4.0, radius_factor=2.0, ascent_step_size=0.5, ascent_steps=10)
    generator = torch.Generator().manual_seed(0)
    searched = adversarial_search(network, x, config, generator)
    norms = (searched - x).pow(2).sum((2, 3, 4)).sqrt()
    assert torch.all(norms >= 4.0 - 1e-3) and torch.all(norms <= 8.0 + 1e-3)
    random_points = project(x, x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), 4.0, 2.0)
    with torch.no_grad():
        assert network(searched)[0].mean() > network(random_points)[0].mean()  # ascent finds "more normal" points


def test_drocc_learning_rate_schedule():
    config = DROCCConfig(lr=1e-3, epochs=10, only_ce_epochs=0)
    assert [learning_rate(config, e) for e in (0, 4, 5, 8, 9)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_one_class_detectors_are_independent(task):
    """DeepSVDD(m): detector 0 ends identical whatever class 1's images are (Algorithm 1's m separate models)."""
    images = torch.from_numpy(task.train.images)
    labels = torch.from_numpy(task.train.labels)
    normaliser = Normaliser.fit(images)
    config = DeepMADConfig(epochs=1, batch_size=32)

    def train(replace_class_one: bool) -> GroupedEncoder:
        torch.manual_seed(0)
        encoder = GroupedEncoder(2, 1, 28, 16)
        x = images.clone()
        if replace_class_one:
            x[labels == 1] = torch.randint(0, 255, x[labels == 1].shape, dtype=torch.uint8)
        centres = torch.full((2, 16), 0.5)
        optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        train_one_class_encoders(EncoderPhase(encoder, centres, x, labels, normaliser, config, optimizer, generator))
        return encoder.eval()

    a, b = train(False), train(True)
    probe = to_float(images[labels == 0][:8], normaliser)
    with torch.no_grad():
        za, zb = a.embed_shared(probe), b.embed_shared(probe)
    torch.testing.assert_close(za[:, 0], zb[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(za[:, 1], zb[:, 1])


@pytest.mark.parametrize("method", ["deepsvdd", "deepsvdd-m", "drocc", "drocc-m"])
def test_baseline_trains_to_varied_scores_and_exports_the_contract(method, task, tmp_path):
    prepared = METHODS[method].prepare(task)
    scorer, _ = METHODS[method].fit(prepared, METHODS[method].config({**TINY, "seed": 0}), torch.device("cpu"))
    result = measure_scorer(scorer, prepared, 0.05)
    scores = result.test_scores
    # Collapse guard: a detector mapping everything to one point (or one logit) gives near-constant scores.
    assert np.std(scores) > 1e-4 * max(abs(float(np.mean(scores))), 1e-3)
    assert len(np.unique(np.round(scores, 6))) > 0.9 * len(scores)
    assert 0.0 <= roc_auc(scores, prepared.test_anomalous) <= 1.0
    columns = 1 if METHODS[method].pooled else 2
    assert result.test_distances.shape == (len(prepared.test), columns)
    if columns > 1:
        assert "auc_dempster_shafer" in result.metrics.extra and len(result.detector_calibrations) == 2

    export_onnx(scorer, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    images = prepared.test.images[:16]
    distances, score, nearest = session.run(["distances", "score", "nearest"], {"image": images})
    assert images.dtype == np.uint8 and distances.shape == (16, columns) and nearest.dtype == np.int64
    np.testing.assert_allclose(score, distances.min(axis=1), rtol=1e-6)
    assert np.all(distances >= 0)  # DROCC's logit mapped to -log P(normal): higher = more anomalous
    parity = check_parity(scorer, tmp_path / "model.onnx", images)
    assert parity.max_abs_score < 1e-4 and parity.nearest_agreement == 1.0


def test_drocc_score_is_the_negated_logit_in_rank(task):
    drocc = METHODS["drocc"]
    prepared = drocc.prepare(task)
    scorer, _ = drocc.fit(prepared, drocc.config({**TINY, "seed": 1}), torch.device("cpu"))
    images = torch.from_numpy(prepared.test.images[:64])
    with torch.no_grad():
        logits, _ = scorer.head(scorer.encoder.embed_shared(scorer.standardise(images)))
        _, score, _ = scorer(images)
    order_by_score = np.argsort(score.numpy(), kind="stable")
    order_by_negated_logit = np.argsort(-logits[:, 0].numpy(), kind="stable")
    np.testing.assert_array_equal(order_by_score, order_by_negated_logit)
