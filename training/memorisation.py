"""The memorisation symptom: training photos sit closer to their own centre than held-out photos.

DeepMAD scores a photo by its distance to the nearest centre, so an encoder that has memorised its
training photos puts them near the centre while new photos of the same class land farther out, and
trash is then judged against a spread the encoders never showed on their training photos. The gap is
the median own-class distance of validation photos minus that of training photos (eval mode, no
augmentation), and their ratio (the gap without the embedding's scale, which δ and the recipe set); a
smaller gap means the encoders generalise their class rather than their photos.
"""

from __future__ import annotations

import numpy as np

from service.manifest import ClassDistances, DistanceGap


def own_distances(distances: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each normal item's distance to its own class's column (items with label < 0 are dropped)."""
    keep = labels >= 0
    return distances[keep, labels[keep]]


def distance_gap(
    train_distances: np.ndarray,
    train_labels: np.ndarray,
    val_distances: np.ndarray,
    val_labels: np.ndarray,
    class_names: list[str],
) -> DistanceGap:
    """Median own-class distance on training vs validation photos, overall and per class."""
    train_own, val_own = own_distances(train_distances, train_labels), own_distances(val_distances, val_labels)
    train_kept, val_kept = train_labels[train_labels >= 0], val_labels[val_labels >= 0]
    per_class = {
        name: ClassDistances(
            train_median=float(np.median(train_own[train_kept == i])),
            val_median=float(np.median(val_own[val_kept == i])),
        )
        for i, name in enumerate(class_names)
        if (train_kept == i).any() and (val_kept == i).any()
    }
    train_median, val_median = float(np.median(train_own)), float(np.median(val_own))
    return DistanceGap(
        train_median=train_median,
        val_median=val_median,
        gap=val_median - train_median,
        ratio=val_median / train_median if train_median > 0 else None,
        per_class=per_class,
    )
