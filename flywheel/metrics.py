"""The numbers a model is judged by, torch-free so training and the promotion gate share them.

``choose_gamma`` is the one rule that picks the threshold gamma a bin acts on (fit, quantize); the gate
compares models at a matched reject count (``threshold_rejecting``), never by re-picking gamma.
"""

from __future__ import annotations

import math

import numpy as np

from service.manifest import Calibration, Threshold


def roc_auc(scores: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve (anomalies positive, higher score = more anomalous); ties count half."""
    scores = np.asarray(scores, dtype=np.float64)
    anomalous = np.asarray(anomalous, dtype=bool)
    n_pos, n_neg = int(anomalous.sum()), int((~anomalous).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both normal and anomalous items")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[anomalous].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def choose_gamma(normal_scores: np.ndarray, reject_rate: float) -> Threshold:
    """gamma = the (1 - reject_rate) quantile of held-out normal scores: that share of normal items is rejected."""
    if not 0.0 < reject_rate < 1.0:
        raise ValueError("reject_rate must lie strictly between 0 and 1")
    value = float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1.0 - reject_rate))
    return Threshold(
        value=value,
        rule=f"{100 * (1 - reject_rate):g}th percentile of validation (held-out normal) scores",
        normal_reject_rate=float(np.mean(normal_scores >= value)),
    )


def calibrate(normal_scores: np.ndarray, threshold: float) -> Calibration:
    """Logistic centred on gamma; the median held-out normal score maps to p = 0.05."""
    median = float(np.median(normal_scores))
    spread = threshold - median
    scale = spread / math.log(19.0) if spread > 1e-9 else max(float(np.std(normal_scores)), 1e-6)
    quantiles = np.quantile(normal_scores, np.linspace(0, 1, 21)).astype(float).tolist()
    return Calibration(center=threshold, scale=scale, normal_score_quantiles=quantiles)


def rates_at(scores: np.ndarray, anomalous: np.ndarray, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) when items scoring >= threshold are called anomalous."""
    flagged = np.asarray(scores) >= threshold
    anomalous = np.asarray(anomalous, dtype=bool)
    return float(flagged[anomalous].mean()), float(flagged[~anomalous].mean())


def threshold_rejecting(normal_scores: np.ndarray, n_reject: int) -> float:
    """The lowest threshold at which exactly ``n_reject`` normal scores lie at or above it (ties aside)."""
    ordered = np.sort(normal_scores)[::-1]
    return float(ordered[n_reject - 1]) if n_reject > 0 else float(np.nextafter(ordered[0], np.inf))
