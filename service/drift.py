"""Score drift: are the photos this bin sees still scored like the held-out normal photos?

A bin whose camera gets dirty, or whose lighting changes, keeps answering, just wrongly: its scores
move away from the distribution the model was calibrated on. ``ScoreDrift`` keeps the last
``window`` scores and compares them with the manifest's ``calibration.normal_score_quantiles``
(held-out normal scores at evenly spaced percentiles, 0..100):

* **PSI** (population stability index) over ``PSI_BINS`` equal-probability bins of the reference:
  sum over bins of (observed share - expected share) * ln(observed / expected). The usual reading:
  below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 a significant shift. With n scores and B
  bins, sampling noise alone gives about (B - 1) / n (0.018 for 10 bins and 500 scores).
* **KS statistic**: the largest gap between the window's empirical CDF and the reference CDF
  (piecewise linear between the quantiles). At 5% significance the critical value is about
  1.36 / sqrt(n) (0.061 for 500 scores).
* the **anomalous share** of the window (at the threshold in use; about the manifest's
  normal-reject rate when only recyclables arrive).

Trash legitimately scores high, so a bin that gets much trash shows drift too: read the gauges
together with the anomalous share and the nearest-class mix. Frames answered ``no_item`` never enter
the window (``Metrics.observe_result``): they hold no item, and they are counted on their own.
Without a reference (a manifest without quantiles) or without scores, every value is NaN, which no
alert rule fires on.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

PSI_BINS = 10
# Additive smoothing of the observed bin counts: an empty bin would otherwise make PSI infinite.
PSI_SMOOTHING = 0.5


@dataclass(frozen=True)
class DriftSnapshot:
    scores: int  # how many scores the window holds
    psi: float
    ks: float
    anomalous_share: float


class ScoreDrift:
    """A thread-safe sliding window of (score, anomalous) pairs and its drift statistics.

    Example:
        >>> drift = ScoreDrift(window=500)
        >>> drift.set_reference([0.5 + 0.25 * i for i in range(21)])
        >>> for value in (1.0, 2.0, 3.0):
        ...     drift.observe(value, anomalous=False)
        >>> drift.snapshot().scores
        3
    """

    def __init__(self, window: int):
        if window < 1:
            raise ValueError("the drift window must hold at least one score")
        self._scores: deque[float] = deque(maxlen=window)
        self._anomalous: deque[bool] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._quantiles: np.ndarray | None = None
        self._probabilities: np.ndarray | None = None

    def set_reference(self, quantiles: list[float] | None) -> None:
        """Compare against these held-out normal quantiles; a new reference empties the window.

        Scores of two models are not comparable, so a reload to another model starts over; a reload
        of the same model (same quantiles) keeps the window.
        """
        usable = quantiles is not None and len(quantiles) >= 3 and all(map(math.isfinite, quantiles))
        reference = np.maximum.accumulate(np.asarray(quantiles, dtype=np.float64)) if usable else None
        with self._lock:
            if _same(reference, self._quantiles):
                return
            self._quantiles = reference
            self._probabilities = None if reference is None else np.linspace(0.0, 1.0, len(reference))
            self._scores.clear()
            self._anomalous.clear()

    def observe(self, score: float, anomalous: bool) -> None:
        with self._lock:
            self._scores.append(float(score))
            self._anomalous.append(bool(anomalous))

    def snapshot(self) -> DriftSnapshot:
        with self._lock:
            scores = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
            anomalous = sum(self._anomalous)
            quantiles, probabilities = self._quantiles, self._probabilities
        n = len(scores)
        if n == 0:
            return DriftSnapshot(0, math.nan, math.nan, math.nan)
        share = anomalous / n
        if quantiles is None or probabilities is None:
            return DriftSnapshot(n, math.nan, math.nan, share)
        return DriftSnapshot(n, psi(scores, quantiles, probabilities), ks(scores, quantiles, probabilities), share)


def psi(scores: np.ndarray, quantiles: np.ndarray, probabilities: np.ndarray) -> float:
    """PSI of ``scores`` over ``PSI_BINS`` equal-probability bins of the reference quantiles."""
    inner = np.linspace(0.0, 1.0, PSI_BINS + 1)[1:-1]
    edges = np.interp(inner, probabilities, quantiles)
    counts = np.bincount(np.searchsorted(edges, scores, side="right"), minlength=PSI_BINS)
    observed = (counts + PSI_SMOOTHING) / (len(scores) + PSI_SMOOTHING * PSI_BINS)
    expected = 1.0 / PSI_BINS
    return float(np.sum((observed - expected) * np.log(observed / expected)))


def ks(scores: np.ndarray, quantiles: np.ndarray, probabilities: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the scores' empirical CDF and the reference CDF."""
    ordered = np.sort(scores)
    n = len(ordered)
    reference = np.interp(ordered, quantiles, probabilities, left=0.0, right=1.0)
    above = np.arange(1, n + 1) / n - reference  # empirical CDF just after each score
    below = reference - np.arange(0, n) / n  # and just before it
    return float(max(above.max(), below.max()))


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.array_equal(a, b))
