"""Choosing the encoder epoch to export on held-out photos instead of taking the last one.

After every encoder epoch ``HeldOutScores`` scores the validation photos, the selection anomalies (when
the task holds some) and a fixed probe of training photos, in eval mode and without drawing any random
number (so a monitored run trains exactly like an unmonitored one). It records, per epoch:

- ``val_loss``: DeepMAD's loss on the validation photos (normal only: no anomaly is used);
- ``selection_auc``: validation normals against the selection anomalies;
- the train-vs-validation median own-class distance (``memorisation.distance_gap``).

``engine.BestEpochs`` keeps the encoder weights of the best epoch under each criterion. Choosing by
``selection-auc`` spends the selection anomalies on the choice: that run's selection AUC is then
optimistic, and only its test AUC is an unbiased estimate.
"""

from __future__ import annotations

import numpy as np

from flywheel.metrics import roc_auc
from training.data import Task
from training.errors import UserError
from training.memorisation import distance_gap
from training.scorer import BaseScorer

CRITERIA = {
    "last": "the last epoch",
    "val-loss": "the lowest DeepMAD loss on the validation photos (normal only)",
    "selection-auc": "the highest selection AUC (spends the selection anomalies: its selection AUC is optimistic)",
}
# Criterion -> (the record's field it reads, whether higher is better), for ``engine.BestEpochs``.
RECORD_FIELDS = {"val-loss": ("val_loss", False), "selection-auc": ("selection_auc", True)}
TRAIN_PROBE = 256  # training photos whose own-class distance is followed every epoch
PROBE_SEED = 20163  # fixed: the probe never depends on the training seed


def check_criterion(criterion: str, task: Task) -> None:
    if criterion == "selection-auc" and task.selection is None:
        raise UserError("--epoch-choice selection-auc needs selection anomalies: add --anomaly-holdout")


def validation_loss(distances: np.ndarray, labels: np.ndarray, eta: float, delta: float) -> float:
    """``deepmad_loss`` from eval-mode distances [N, m]: own-class d^2 + eta * relu(delta - d)^2 others."""
    own = labels[:, None] == np.arange(distances.shape[1])[None, :]
    per_item = np.where(own, distances**2, eta * np.maximum(delta - distances, 0.0) ** 2).sum(1)
    return float(per_item.mean())


class HeldOutScores:
    """One epoch's record (the fields of ``service.manifest.EpochScores`` but ``epoch``) for a scorer."""

    def __init__(self, task: Task, eta: float, delta: float):
        self.task, self.eta, self.delta = task, eta, delta
        normal = np.flatnonzero(task.train.labels >= 0)
        self.probe = np.sort(np.random.default_rng(PROBE_SEED).permutation(normal)[:TRAIN_PROBE])

    def __call__(self, scorer: BaseScorer) -> dict:
        task = self.task
        val_distances, val_scores = scorer.score_arrays(task.val.images)
        probe_distances, _ = scorer.score_arrays(task.train.images[self.probe])
        gap = distance_gap(
            probe_distances, task.train.labels[self.probe], val_distances, task.val.labels, task.column_names
        )
        record = {
            "val_loss": validation_loss(val_distances, task.val.labels, self.eta, self.delta),
            **gap.model_dump(exclude={"per_class"}),
        }
        if task.selection is not None:
            _, selection_scores = scorer.score_arrays(task.selection.images)
            record["selection_auc"] = roc_auc(
                np.concatenate([val_scores, selection_scores]),
                np.concatenate([np.zeros(len(val_scores), bool), np.ones(len(selection_scores), bool)]),
            )
        return record
