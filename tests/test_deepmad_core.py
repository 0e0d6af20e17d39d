"""Unit tests of the method's pieces: loss, centres, grouped encoders, AUC, threshold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flywheel.metrics import calibrate, choose_gamma, rates_at, roc_auc
from training.methods.deepmad import CENTRE_EPS, deepmad_loss, guard_centres
from training.networks import GroupedAutoencoder, GroupedEncoder


def test_loss_pulls_own_class_and_pushes_others_inside_delta():
    centres = torch.zeros(2, 3)
    # Item 0 (class 0) at distance 2 from both centres; item 1 (class 1) at distance 5.
    z = torch.tensor([[[2.0, 0, 0], [0, 2.0, 0]], [[0, 0, 5.0], [5.0, 0, 0]]])
    labels = torch.tensor([0, 1])
    total, per_encoder = deepmad_loss(z, centres, labels, eta=1.0, delta=8.0)
    # Encoder 0: own item 0 -> 2^2 = 4; foreign item 1 at 5 -> (8 - 5)^2 = 9. Mean over the batch of 2.
    # Encoder 1: foreign item 0 at 2 -> (8 - 2)^2 = 36; own item 1 -> 25.
    assert per_encoder.tolist() == pytest.approx([(4 + 9) / 2, (36 + 25) / 2])
    assert total.item() == pytest.approx(sum(per_encoder.tolist()))


def test_loss_ignores_negatives_beyond_delta_and_scales_with_eta():
    centres = torch.zeros(2, 1)
    z = torch.tensor([[[1.0], [9.0]]])  # a class-0 item, 9 from encoder 1's centre: beyond delta = 8
    _, per_encoder = deepmad_loss(z, centres, torch.tensor([0]), eta=3.0, delta=8.0)
    assert per_encoder.tolist() == pytest.approx([1.0, 0.0])
    z = torch.tensor([[[1.0], [6.0]]])
    _, per_encoder = deepmad_loss(z, centres, torch.tensor([0]), eta=3.0, delta=8.0)
    assert per_encoder.tolist() == pytest.approx([1.0, 3.0 * 4.0])


def test_routing_margin_adds_a_hinge_on_the_nearest_other_class_only():
    centres = torch.zeros(3, 1)
    # A class-0 item at 2 from its own centre, 3 and 9 from the others; an anomaly (-1) adds no margin term.
    z = torch.tensor([[[2.0], [3.0], [9.0]], [[1.0], [1.0], [1.0]]])
    labels = torch.tensor([0, -1])
    plain, per_encoder = deepmad_loss(z, centres, labels, eta=2.0, delta=0.5)
    with_margin, same_per_encoder = deepmad_loss(z, centres, labels, eta=2.0, delta=0.5, routing_margin=4.0)
    # Violation (4 + 2 - 3)^2 = 9 for item 0 (the nearest other class is at 3, not 9), weight eta, batch of 2.
    assert with_margin.item() - plain.item() == pytest.approx(2.0 * 9 / 2)
    assert same_per_encoder.tolist() == per_encoder.tolist()
    satisfied, _ = deepmad_loss(z, centres, labels, eta=2.0, delta=0.5, routing_margin=1.0)
    assert satisfied.item() == pytest.approx(plain.item())  # 1 + 2 - 3 = 0: no violation


def test_loss_gradient_is_finite_at_the_centre():
    z = torch.zeros(1, 2, 4, requires_grad=True)
    total, _ = deepmad_loss(z, torch.zeros(2, 4), torch.tensor([0]), eta=1.0, delta=8.0)
    total.backward()
    assert torch.isfinite(z.grad).all()


def test_centre_guard_moves_near_zero_components_away_keeping_sign():
    centres = torch.tensor([[0.05, -0.05, 0.0, 2.0, -0.3]])
    guarded = guard_centres(centres)
    assert guarded[0].tolist() == pytest.approx([CENTRE_EPS, -CENTRE_EPS, CENTRE_EPS, 2.0, -0.3])


def test_grouped_encoders_are_independent_networks():
    torch.manual_seed(0)
    encoder = GroupedEncoder(groups=3, channels=3, size=32, rep_dim=16).eval()
    x = torch.randn(4, 3, 3, 32, 32)
    base = encoder(x)
    changed = x.clone()
    changed[:, 1] += 1.0  # only encoder 1's input changes
    out = encoder(changed)
    assert torch.equal(out[:, 0], base[:, 0]) and torch.equal(out[:, 2], base[:, 2])
    assert not torch.allclose(out[:, 1], base[:, 1])
    # A loss on encoder 0's output leaves the other encoders' weights without gradient.
    encoder.train()
    encoder(x)[:, 0].pow(2).sum().backward()
    grad = encoder.features[0].weight.grad.reshape(3, -1)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_shared_input_path_equals_the_grouped_network_on_m_copies():
    """embed_shared convolves the input once with all m first-layer filters; it is the same network."""
    torch.manual_seed(0)
    shared, copies = GroupedEncoder(3, 3, 32, 16), GroupedEncoder(3, 3, 32, 16)
    copies.load_state_dict(shared.state_dict())
    x = torch.randn(8, 3, 32, 32)
    for mode in (True, False):  # batch statistics (and their running update), then the running statistics
        shared.train(mode), copies.train(mode)
        a, b = shared.embed_shared(x), copies(x.unsqueeze(1).expand(-1, 3, -1, -1, -1))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key, value in shared.state_dict().items():
        torch.testing.assert_close(value, copies.state_dict()[key])


def test_autoencoder_round_trips_shapes_for_colour_and_grey():
    assert GroupedAutoencoder(2, 3, 32)(torch.randn(2, 2, 3, 32, 32)).shape == (2, 2, 3, 32, 32)
    assert GroupedAutoencoder(2, 1, 28)(torch.randn(2, 2, 1, 28, 28)).shape == (2, 2, 1, 28, 28)


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)
    anomalous = rng.random(40) < 0.4
    pairs = list(itertools.product(scores[anomalous], scores[~anomalous]))
    expected = np.mean([1.0 if a > n else 0.5 if a == n else 0.0 for a, n in pairs])
    assert roc_auc(scores, anomalous) == pytest.approx(expected)
    assert roc_auc(np.array([1.0, 2.0]), np.array([False, True])) == 1.0


def test_threshold_rejects_the_requested_share_and_calibration_is_centred_on_it():
    scores = np.linspace(0, 10, 1001)
    threshold = choose_gamma(scores, 0.05)
    assert threshold.normal_reject_rate == pytest.approx(0.05, abs=0.002)
    calibration = calibrate(scores, threshold.value)
    assert calibration.probability(threshold.value) == pytest.approx(0.5)
    assert calibration.probability(float(np.median(scores))) == pytest.approx(0.05)
    assert calibration.probability(threshold.value + 1) > 0.5
    tpr, fpr = rates_at(np.array([1.0, 2.0, 3.0, 4.0]), np.array([False, False, True, True]), 2.5)
    assert (tpr, fpr) == (1.0, 0.0)
