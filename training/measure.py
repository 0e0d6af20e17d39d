"""A trained scorer's numbers: gamma and calibration from validation normals, metrics on the test split.

fit writes them into the manifest and the evaluation protocol into its tables; gamma itself is chosen by
``flywheel.metrics.choose_gamma``, the one rule that quantize also uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flywheel.metrics import calibrate, choose_gamma, rates_at, roc_auc
from service.manifest import Calibration, TestMetrics, Threshold
from training.data import Task
from training.evaluation.dempster_shafer import combined_anomaly_probability
from training.features import score_arrays
from training.memorisation import distance_gap
from training.routing import routing_metrics
from training.scorer import BaseScorer


@dataclass
class Measurement:
    """What the manifest records of a scorer: gamma, its calibration and the test split's numbers."""

    threshold: Threshold
    calibration: Calibration
    metrics: TestMetrics
    detector_calibrations: list[Calibration] = field(default_factory=list)
    test_scores: np.ndarray | None = None
    test_distances: np.ndarray | None = None


def measure_scorer(scorer: BaseScorer, task: Task, reject_rate: float) -> Measurement:
    """gamma (``choose_gamma``) and calibration from validation normals only; AUC, rates and routing on the test split;
    the memorisation gap on training and validation photos.

    With several detector columns, each column is also calibrated on its own class's validation items
    (P_i({i}|x)), and Algorithm 1's Dempster-Shafer combination P(Lambda|x) gets its own AUC.
    """
    val_distances, val_scores = score_arrays(scorer, task.val.images)
    threshold = choose_gamma(val_scores, reject_rate)
    test_distances, test_scores = score_arrays(scorer, task.test.images)
    auc = roc_auc(test_scores, task.test_anomalous)
    tpr, fpr = rates_at(test_scores, task.test_anomalous, threshold.value)
    extra = {"test_score_std": float(np.std(test_scores)), "outlier_exposure": task.outlier_exposure}
    if task.selection is not None:
        # Validation normals against the held-out selection anomalies: what settings are chosen on.
        _, selection_scores = score_arrays(scorer, task.selection.images)
        extra["selection_auc"] = roc_auc(
            np.concatenate([val_scores, selection_scores]),
            np.concatenate([np.zeros(len(val_scores), bool), np.ones(len(selection_scores), bool)]),
        )
    train_distances, _ = score_arrays(scorer, task.train.images)
    gap = distance_gap(train_distances, task.train.labels, val_distances, task.val.labels, task.column_names)
    normal = ~task.test_anomalous
    routing = None
    detectors = []
    if test_distances.shape[1] > 1:
        routing = routing_metrics(test_distances[normal], task.test.labels[normal], task.column_names)
        # Routing on the validation photos: what routing levers are chosen on (the test split is for the table).
        extra["validation_routing"] = routing_metrics(val_distances, task.val.labels, task.column_names).accuracy
        for column in range(test_distances.shape[1]):
            own = val_distances[task.val.labels == column, column]
            detectors.append(calibrate(own, choose_gamma(own, reject_rate).value))
        combined = combined_anomaly_probability(test_distances, detectors)
        extra["auc_dempster_shafer"] = roc_auc(combined, task.test_anomalous)
    metrics = TestMetrics(
        auc=auc,
        tpr_at_threshold=tpr,
        fpr_at_threshold=fpr,
        n_normal=int((~task.test_anomalous).sum()),
        n_anomalous=int(task.test_anomalous.sum()),
        routing=routing,
        distance_gap=gap,
        extra=extra,
    )
    return Measurement(
        threshold, calibrate(val_scores, threshold.value), metrics, detectors, test_scores, test_distances
    )
