"""Levers against memorisation: strong augmentation, centres from augmented views, epoch choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from training.batches import Normaliser, to_float
from training.data import load_dataset, make_task
from training.data.folders import TRASHNET_NORMAL
from training.engine import RunOptions
from training.epoch_choice import check_criterion, validation_loss
from training.errors import UserError
from training.methods.deepmad import DeepMADConfig, fit_deepmad
from training.networks import GroupedEncoder

TINY = {"ae_epochs": 1, "epochs": 4, "batch_size": 32, "augment": True, "augment_strength": "strong"}
CPU = RunOptions(torch.device("cpu"))


@pytest.fixture(scope="module")
def task(trashnet_dir: Path):
    dataset = load_dataset("trashnet", trashnet_dir)
    return make_task(dataset, TRASHNET_NORMAL, max_train_per_class=24, seed=0, anomaly_holdout=0.5)


def test_strong_augmentation_is_seeded_keeps_the_range_and_differs_from_basic(task):
    images = torch.from_numpy(task.train.images[:16])
    identity = Normaliser(torch.zeros(3), torch.ones(3))
    first = to_float(images, identity, "strong", torch.Generator().manual_seed(5))
    again = to_float(images, identity, "strong", torch.Generator().manual_seed(5))
    basic = to_float(images, identity, "basic", torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert first.shape == basic.shape == (16, 3, 32, 32)
    assert first.min() >= 0.0 and first.max() <= 1.0
    # Crops, rotations and jitter move every photo further from itself than the basic shifts do.
    plain = images.permute(0, 3, 1, 2).float() / 255.0
    assert (first - plain).abs().mean() > (basic - plain).abs().mean()
    assert len({round(v, 4) for v in (first - plain).abs().mean(dim=(1, 2, 3)).tolist()}) == 16


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"augment_strength": "strong"}, "need --augment"),
        ({"centre_views": 2}, "need --augment"),
        ({"augment": True, "centre_views": -1}, "--centre-views must be at least 0"),
        ({"augment": True, "augment_strength": "wild"}, "--augment-strength must be one of basic, strong"),
        ({"epoch_choice": "best"}, "--epoch-choice must be one of last, val-loss, selection-auc"),
    ],
)
def test_the_configuration_refuses_levers_it_cannot_apply(values: dict, message: str):
    with pytest.raises(UserError, match=message):
        DeepMADConfig(**values)


def test_validation_loss_is_the_training_loss_on_distances():
    distances = np.array([[1.0, 9.0], [2.0, 7.0], [10.0, 3.0]])
    labels = np.array([0, 0, 1])
    # own d^2 + eta * relu(delta - d)^2 for the other column: (1 + 0) + (4 + 1.2^2 * 0.5) + (9 + 0)
    assert validation_loss(distances, labels, 0.5, 8.2) == pytest.approx((1 + 4 + 0.5 * 1.2**2 + 9) / 3)


def test_epoch_choice_monitors_without_changing_training_and_exports_the_best_epoch(task, tmp_path: Path):
    last, last_log = fit_deepmad(task, DeepMADConfig(**TINY), CPU)
    config = DeepMADConfig(**TINY, epoch_choice="val-loss")
    checkpoint = tmp_path / "ckpt.pt"
    chosen, log = fit_deepmad(task, config, RunOptions(torch.device("cpu"), checkpoint))
    history = log.epoch_choice.history
    assert [r.epoch for r in history] == [1, 2, 3, 4]
    assert last_log.losses["encoder_loss"] == log.losses["encoder_loss"]  # monitoring draws no random number
    best = min(history, key=lambda r: r.val_loss)
    assert log.epoch_choice.epoch == best.epoch and log.epoch_choice.value == best.val_loss
    for record in history:
        assert record.gap == pytest.approx(record.val_median - record.train_median)
        assert 0.0 <= record.selection_auc <= 1.0
    val = task.val.images
    # The exported encoders are the chosen epoch's: equal to the last epoch's only if that epoch won.
    assert np.array_equal(chosen.score_arrays(val)[1], last.score_arrays(val)[1]) == (best.epoch == 4)
    distances, _ = chosen.score_arrays(val)
    assert validation_loss(distances, task.val.labels, 1.0, 8.2) == pytest.approx(best.val_loss, rel=1e-5)

    # The record and the best weights live in the checkpoint: the finished run re-exports under any choice.
    def reexport(choice: str):
        again = DeepMADConfig(**TINY, epoch_choice=choice)
        return fit_deepmad(task, again, RunOptions(torch.device("cpu"), checkpoint, resume=True))

    resumed, resumed_log = reexport("val-loss")
    assert resumed_log.epoch_choice == log.epoch_choice
    assert np.array_equal(resumed.score_arrays(val)[1], chosen.score_arrays(val)[1])
    by_selection, selection_log = reexport("selection-auc")
    assert selection_log.epoch_choice.epoch == max(history, key=lambda r: r.selection_auc).epoch
    assert selection_log.epoch_choice.history == history
    last_again, last_again_log = reexport("last")
    assert last_again_log.epoch_choice is None
    assert np.array_equal(last_again.score_arrays(val)[1], last.score_arrays(val)[1])


def test_a_checkpoint_from_before_the_levers_still_resumes(task, tmp_path: Path):
    """Checkpoints written before augment_strength, centre_views, pretrain, dropout, routing_margin,
    input_norm and width existed had their defaults."""
    config = DeepMADConfig(ae_epochs=1, epochs=1, batch_size=32)
    checkpoint = tmp_path / "ckpt.pt"
    scorer, _ = fit_deepmad(task, config, RunOptions(torch.device("cpu"), checkpoint))
    state = torch.load(checkpoint, weights_only=False)
    for added in ("augment_strength", "centre_views", "pretrain", "dropout", "routing_margin", "input_norm", "width"):
        del state["config"][added]
    torch.save(state, checkpoint)
    resume = RunOptions(torch.device("cpu"), checkpoint, resume=True)
    resumed, _ = fit_deepmad(task, config, resume)
    assert np.array_equal(resumed.score_arrays(task.val.images)[1], scorer.score_arrays(task.val.images)[1])
    with pytest.raises(UserError, match="other settings"):
        fit_deepmad(task, dataclasses.replace(config, augment=True, augment_strength="strong"), resume)
    with pytest.raises(UserError, match="no per-epoch record"):
        fit_deepmad(task, dataclasses.replace(config, epoch_choice="val-loss"), resume)


def test_centres_from_augmented_views_differ_from_the_photos_centres(task):
    config = {**TINY, "epochs": 0}
    plain, _ = fit_deepmad(task, DeepMADConfig(**config), CPU)
    viewed, _ = fit_deepmad(task, DeepMADConfig(**config, centre_views=2), CPU)
    # Same autoencoders (same seed, same draws before the centres); only the centres' inputs differ.
    assert torch.equal(plain.encoder.dense.weight, viewed.encoder.dense.weight)
    assert not torch.allclose(plain.centres, viewed.centres)


def test_selection_choice_needs_selection_anomalies(trashnet_dir: Path):
    dataset = load_dataset("trashnet", trashnet_dir)
    plain = make_task(dataset, TRASHNET_NORMAL, max_train_per_class=8, seed=0)
    with pytest.raises(UserError, match="anomaly-holdout"):
        check_criterion("selection-auc", plain)
    with pytest.raises(UserError, match="anomaly-holdout"):
        fit_deepmad(plain, DeepMADConfig(ae_epochs=1, epochs=1, epoch_choice="selection-auc"), CPU)


def test_rotation_pretraining_learns_the_turns_and_feeds_deepmad(task):
    config = DeepMADConfig(**{**TINY, "ae_epochs": 4, "epochs": 1, "augment": False, "augment_strength": "basic"},
                           pretrain="rotation")  # fmt: skip
    scorer, log = fit_deepmad(task, config, CPU)
    assert "autoencoder_mse" not in log.losses and len(log.losses["rotation_loss"]) == 4
    losses = log.losses["rotation_loss"]
    assert losses[-1] < losses[0]  # mean over the 5 encoders; chance is ln 4 = 1.39
    _, scores = scorer.score_arrays(task.test.images)
    assert scores.std() > 0.02 * scores.mean()  # not collapsed


def test_dropout_acts_in_training_only_and_leaves_the_exported_encoder_unchanged(task):
    encoder = GroupedEncoder(groups=2, channels=3, size=32, dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    encoder.train()
    assert not torch.equal(encoder.embed_shared(x), encoder.embed_shared(x))
    encoder.eval()
    plain = GroupedEncoder(groups=2, channels=3, size=32)
    plain.load_state_dict(encoder.state_dict())  # dropout adds no weights: old and new checkpoints match
    assert torch.equal(encoder.embed_shared(x), plain.eval().embed_shared(x))
    scorer, _ = fit_deepmad(task, DeepMADConfig(**TINY, dropout=0.3), CPU)
    _, scores = scorer.score_arrays(task.test.images)
    assert scores.std() > 0.02 * scores.mean()  # not collapsed


def test_routing_margin_changes_training_and_keeps_scores_spread(task):
    plain, plain_log = fit_deepmad(task, DeepMADConfig(**TINY), CPU)
    margin, margin_log = fit_deepmad(task, DeepMADConfig(**TINY, routing_margin=8.0), CPU)
    assert margin_log.losses["encoder_loss"][0] > plain_log.losses["encoder_loss"][0]  # the hinge adds to the loss
    _, scores = margin.score_arrays(task.test.images)
    assert scores.std() > 0.02 * scores.mean()
    assert not np.array_equal(scores, plain.score_arrays(task.test.images)[1])


def test_contrast_normalisation_removes_lighting_and_reaches_the_exported_graph(task, tmp_path: Path):
    import onnxruntime as ort

    from training.batches import contrast_normalise
    from training.export import export_onnx

    photo = torch.from_numpy(task.train.images[:1]).permute(0, 3, 1, 2).float() / 255.0
    darker = photo * 0.5 + 0.1  # the same item under other lighting
    assert torch.allclose(contrast_normalise(photo), contrast_normalise(darker), atol=1e-5)
    assert not torch.allclose(photo, darker)
    normaliser = Normaliser.fit(torch.from_numpy(task.train.images), contrast=True)
    assert normaliser.contrast and abs(normaliser.mean.mean().item()) < 1e-3  # every image centred on 0

    scorer, _ = fit_deepmad(task, DeepMADConfig(**{**TINY, "epochs": 2}, input_norm="contrast"), CPU)
    assert scorer.contrast
    _, scores = scorer.score_arrays(task.test.images)
    assert scores.std() > 0.02 * scores.mean()  # not collapsed
    graph = tmp_path / "model.onnx"
    export_onnx(scorer, graph)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    onnx_scores = session.run(["score"], {"image": task.test.images})[0]
    assert np.allclose(onnx_scores, scores, rtol=1e-4, atol=1e-4)


def test_contrastive_pretraining_tells_twins_apart_and_feeds_deepmad(task):
    from training.methods.contrastive import nt_xent

    first = torch.randn(8, 2, 16)
    # Twins identical and far from the rest: the loss is near its floor; unrelated "twins": near chance (ln 15).
    assert nt_xent(first, first, temperature=0.05).max() < 0.1
    assert nt_xent(first, torch.randn(8, 2, 16)).min() > 1.5
    config = DeepMADConfig(**{**TINY, "ae_epochs": 4, "epochs": 1}, pretrain="contrastive")
    scorer, log = fit_deepmad(task, config, CPU)
    assert "autoencoder_mse" not in log.losses and len(log.losses["contrastive_loss"]) == 4
    losses = log.losses["contrastive_loss"]
    assert losses[-1] < losses[0]
    _, scores = scorer.score_arrays(task.test.images)
    assert scores.std() > 0.02 * scores.mean()  # not collapsed


def test_wider_encoders_have_more_filters_and_train(task, tmp_path: Path):
    plain, wide = GroupedEncoder(2, 3, 32), GroupedEncoder(2, 3, 32, width=2)
    assert [m.out_channels for m in wide.features if isinstance(m, torch.nn.Conv2d)] == [128, 256, 512]
    assert sum(p.numel() for p in wide.parameters()) > 2.5 * sum(p.numel() for p in plain.parameters())
    scorer, _ = fit_deepmad(task, DeepMADConfig(**{**TINY, "epochs": 2}, width=2), CPU)
    _, scores = scorer.score_arrays(task.test.images)
    assert scores.std() > 0.02 * scores.mean()  # not collapsed
