"""Algorithm 1's Dempster-Shafer combination: closed forms (eq. 2-4) against the power-set definition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from service.manifest import Calibration
from training.evaluation.dempster_shafer import (
    anomaly_probability,
    combined_anomaly_probability,
    conflict_normaliser,
)

LAMBDA = "anomaly"


def brute_force(p_normal: np.ndarray) -> tuple[float, float]:
    """Dempster's rule over the power set of U = {0..m-1, Lambda}: every tuple of focal sets, by intersection.

    Detector i's mass function: P_i({i}) = p_i, P_i(U minus {i}) = 1 - p_i, 0 on every other subset.
    """
    m = len(p_normal)
    universe = frozenset([*range(m), LAMBDA])
    subsets = [frozenset(s) for r in range(len(universe) + 1) for s in itertools.combinations(universe, r)]

    def mass(i: int, subset: frozenset) -> float:
        if subset == frozenset([i]):
            return p_normal[i]
        if subset == universe - {i}:
            return 1.0 - p_normal[i]
        return 0.0

    on_lambda = on_empty = 0.0
    for chosen in itertools.product(subsets, repeat=m):
        weight = np.prod([mass(i, s) for i, s in enumerate(chosen)])
        if weight == 0.0:
            continue
        meet = frozenset.intersection(*chosen)
        if meet == frozenset([LAMBDA]):
            on_lambda += weight
        elif not meet:
            on_empty += weight
    k = 1.0 - on_empty
    return on_lambda / k, k


@pytest.mark.parametrize("m", [1, 2, 3])
def test_closed_form_equals_the_power_set_sum(m: int):
    rng = np.random.default_rng(m)
    for _ in range(5):
        p = rng.uniform(0.01, 0.99, size=m)
        expected_lambda, expected_k = brute_force(p)
        assert conflict_normaliser(p[None])[0] == pytest.approx(expected_k, rel=1e-12)
        assert anomaly_probability(p[None])[0] == pytest.approx(expected_lambda, rel=1e-9)
        # eq. 2 literally: prod q / K
        assert anomaly_probability(p[None])[0] == pytest.approx(np.prod(1 - p) / expected_k, rel=1e-9)


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_thresholded_decisions_anomalous_iff_every_detector_says_anomalous(m: int):
    for says_normal in itertools.product([0.0, 1.0], repeat=m):
        p = np.array(says_normal)[None]
        anomalous = anomaly_probability(p)[0] > 0.5
        assert anomalous == (not any(says_normal)), says_normal
        assert np.isfinite(anomaly_probability(p)[0])  # K = 0 (two certain detectors) is still decided


def test_soft_combination_is_monotone_and_bounded():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, size=(200, 3))
    combined = anomaly_probability(p)
    assert np.all((combined >= 0) & (combined <= 1))
    more_normal = np.clip(p + 0.05, 0, 1)
    assert np.all(anomaly_probability(more_normal) <= combined + 1e-12)
    # never more anomalous than the least anomalous single detector says
    assert np.all(combined <= (1 - p).min(axis=1) + 1e-12)


def test_calibrated_distances_combine_like_their_probabilities():
    calibrations = [Calibration(center=2.0, scale=0.5), Calibration(center=4.0, scale=1.0)]
    distances = np.array([[0.5, 9.0], [3.0, 3.0], [9.0, 9.0]])
    p_normal = np.stack(
        [1 - 1 / (1 + np.exp(-(distances[:, i] - c.center) / c.scale)) for i, c in enumerate(calibrations)], axis=1
    )
    np.testing.assert_allclose(combined_anomaly_probability(distances, calibrations), anomaly_probability(p_normal))
    combined = combined_anomaly_probability(distances, calibrations)
    assert combined[0] < 0.5 < combined[2]  # near one centre: normal; far from both: anomalous
