"""Pseudo-anomalies made from normal photos only: a box cut from one class pasted onto another (CutMix).

Much of TrashNet's trash is mixed-material packaging (a foil wrapper on cardboard, a plastic window in
paper). A composite holds two recyclable classes at once, so it belongs to no single class: as label -1
in ``train`` it is a negative for every encoder, like outlier exposure, but without a trash photo.
The composites are drawn once, seeded, so a resumed or repeated run trains on the same images.

Example:
    >>> task = with_composites(task, count=360, seed=0)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from training.data.base import LabeledImages, Task
from training.errors import UserError

MIN_SIDE, MAX_SIDE = 0.4, 0.7  # box side as a share of the image side: 16-49% of the area


def composite_images(train: LabeledImages, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` images [count, H, W, C]: each a normal photo with a box from a photo of another class."""
    normal = np.flatnonzero(train.labels >= 0)
    height, width = train.images.shape[1:3]
    out = np.empty((count, *train.images.shape[1:]), dtype=train.images.dtype)
    for k in range(count):
        base = rng.choice(normal)
        others = normal[train.labels[normal] != train.labels[base]]
        donor = rng.choice(others)
        box_h = int(round(height * rng.uniform(MIN_SIDE, MAX_SIDE)))
        box_w = int(round(width * rng.uniform(MIN_SIDE, MAX_SIDE)))
        top, left = rng.integers(0, height - box_h + 1), rng.integers(0, width - box_w + 1)
        out[k] = train.images[base]
        out[k, top : top + box_h, left : left + box_w] = train.images[donor, top : top + box_h, left : left + box_w]
    return out


def with_composites(task: Task, count: int, seed: int) -> Task:
    """``task`` with ``count`` composites appended to ``train`` as label -1 (negatives for every encoder)."""
    if count < 0:
        raise UserError(f"--composites must be >= 0, got {count}")
    if count == 0:
        return task
    if task.n_normal < 2 or task.pooled:
        raise UserError("--composites needs at least two normal classes (a composite mixes two of them)")
    images = composite_images(task.train, count, np.random.default_rng([seed, 20163]))
    train = LabeledImages(
        np.concatenate([task.train.images, images]),
        np.concatenate([task.train.labels, np.full(count, -1, dtype=np.int64)]),
    )
    return dataclasses.replace(task, train=train, composites=count)
