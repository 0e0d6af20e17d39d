"""Algorithm 1's combination rule: m one-class detectors -> P(anomaly | x) by Dempster-Shafer (eq. 2-4).

Detector i puts mass p_i = P_i({i}|x) on "class i" and q_i = 1 - p_i on "not class i" (Table 1). With
U = {1..m, Lambda}, the only intersection equal to {Lambda} is all "not" answers, and the non-conflicting
outcomes are that one plus "exactly one detector says its class", so

    K = prod_i q_i + sum_i p_i prod_{j != i} q_j                        (eq. 4)
    P(Lambda|x) = prod_i q_i / K = 1 / (1 + sum_i p_i / q_i)            (eq. 2)

The right-hand form is computed in log space (log-odds of normality, logsumexp), which stays finite for
hard 0/1 decisions: one detector certain of its class gives P(Lambda|x) = 0 even when two such detectors
conflict (K = 0), i.e. x is anomalous iff every detector says anomalous.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logsumexp

from service.manifest import Calibration


def normal_log_odds(p_normal: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p = 1 -> +inf and p = 0 -> -inf."""
    p = np.asarray(p_normal, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def anomaly_probability(p_normal: np.ndarray) -> np.ndarray:
    """P(Lambda|x) [N] from per-detector P_i({i}|x) [N, m] (eq. 2 with eq. 4's K)."""
    return anomaly_probability_from_log_odds(normal_log_odds(p_normal))


def anomaly_probability_from_log_odds(log_odds: np.ndarray) -> np.ndarray:
    """P(Lambda|x) = sigmoid(-logsumexp_i log_odds_i); log-odds may be +-inf."""
    log_odds = np.atleast_2d(np.asarray(log_odds, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        total = logsumexp(log_odds, axis=1)
    return expit(-total)


def conflict_normaliser(p_normal: np.ndarray) -> np.ndarray:
    """K of eq. 4 [N] (1 minus the mass on empty intersections)."""
    p = np.atleast_2d(np.asarray(p_normal, dtype=np.float64))
    q = 1.0 - p
    all_not = q.prod(axis=1)
    one_says = sum(p[:, i] * np.delete(q, i, axis=1).prod(axis=1) for i in range(p.shape[1]))
    return all_not + one_says


def detector_log_odds(distances: np.ndarray, calibrations: list[Calibration]) -> np.ndarray:
    """Per-detector log-odds of "x is of my class" from distances [N, m] and each column's logistic.

    Calibration i maps distance to P_i(not {i}|x) = sigmoid((d - center_i) / scale_i), so the log-odds
    of {i} is (center_i - d) / scale_i.
    """
    distances = np.asarray(distances, dtype=np.float64)
    centre = np.array([c.center for c in calibrations])
    scale = np.array([c.scale for c in calibrations])
    return (centre[None, :] - distances) / scale[None, :]


def combined_anomaly_probability(distances: np.ndarray, calibrations: list[Calibration]) -> np.ndarray:
    """Algorithm 1's P(Lambda|x) for m calibrated distance detectors."""
    return anomaly_probability_from_log_odds(detector_log_odds(distances, calibrations))
