"""Backbone outputs per photo and view, computed once and cached on disk by content.

On 2 cores a Lite0 forward at 224x224 costs ~25 ms per photo, so a run that trains heads (or the last
blocks) for 100 epochs must never run the fixed part of the backbone more than once per photo and view,
and a flywheel retrain after 50 new captures must run it on those 50 photos only. Each entry's key
covers the photo's pixels (after the image function), the backbone, its weights, where the fixed part
ends and the view (mirrored or not); the entries live in ``flywheel.photo_cache``'s per-entry store
(DEEPMAD_CACHE_DIR/features).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from flywheel.photo_cache import EntryStore, cached_rows
from training.backbones import Backbone, lite_normaliser
from training.batches import to_float
from training.scorer import BaseScorer, Scorer

FEATURE_VERSION = "2"  # bump when what is cached for the same key changes
BATCH = 64


def photo_keys(backbone: Backbone, images: np.ndarray, mirrored: bool) -> list[str]:
    """One cache key per photo: its pixels and shape, and what runs on them."""
    part = f"{FEATURE_VERSION}|{backbone.name}|{backbone.weights_sha256}|{backbone.tune_blocks}|{mirrored}|"
    keys = []
    for photo in images:
        digest = hashlib.sha256(part.encode())
        digest.update(repr(photo.shape).encode())
        digest.update(np.ascontiguousarray(photo))
        keys.append(digest.hexdigest()[:40])
    return keys


def fixed_outputs(
    backbone: Backbone, images: np.ndarray, mirrored: bool = False, device: torch.device | None = None
) -> np.ndarray:
    """What no training changes, per photo: the pooled features of a frozen backbone, or the feature map
    where its tuned blocks start. ``mirrored`` flips every photo left-right first (the cached augmentation).
    Only photos without a cache entry run through the backbone, in batches."""
    part = backbone if not backbone.trains else backbone.frozen
    device = device or torch.device("cpu")

    @torch.no_grad()
    def compute(indices: list[int]) -> np.ndarray:
        part.to(device).eval()
        normaliser = lite_normaliser().to(device)
        out = []
        for start in range(0, len(indices), BATCH):
            batch = torch.from_numpy(images[indices[start : start + BATCH]]).to(device)
            x = to_float(batch.flip(2) if mirrored else batch, normaliser)
            out.append(part(x).float().cpu().numpy())
        return np.concatenate(out)

    rows, _ = cached_rows(EntryStore("features"), photo_keys(backbone, images, mirrored), compute)
    return rows if rows is not None else np.zeros((0,), np.float32)


def cache_mirror_images(backbone: Backbone, images: np.ndarray, device: torch.device) -> None:
    """Cache the mirrored view of every photo that lacks it. A folder tree's split is drawn per class from
    its file list (``split_per_class``), so a retrain after new photos moves most validation and test photos
    into training (275 of 428 after 42 new ones), where ``--augment`` needs their mirror images: made here,
    once per photo, they cost the first run one forward each instead of every retrain hundreds."""
    store = EntryStore("features")
    keys = photo_keys(backbone, images, True)
    missing = [i for i, key in enumerate(keys) if not os.path.exists(store.path(key))]
    if missing:
        fixed_outputs(backbone, images[missing], True, device)


@torch.no_grad()
def score_arrays(scorer: BaseScorer, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scorer.score_arrays(images)``, with a frozen backbone's features read from the cache: measuring a
    model on its training, validation and test photos then runs the backbone only on photos it never saw
    (a flywheel retrain's new ones) instead of on every photo again. Their mirror images are cached too
    (``cache_mirror_images``)."""
    backbone = getattr(scorer.encoder, "backbone", None)
    if not isinstance(scorer, Scorer) or not isinstance(backbone, Backbone) or backbone.trains:
        return scorer.score_arrays(images)
    scorer.eval()
    device = scorer.centres.device
    pooled = torch.from_numpy(fixed_outputs(backbone, images, False, device))
    cache_mirror_images(backbone, images, device)
    columns = torch.cat(
        [
            scorer.centre_distances(scorer.encoder.from_pooled(pooled[start : start + 1024].to(scorer.centres.device)))
            for start in range(0, len(pooled), 1024)
        ]
    )
    distances, score = scorer.split(columns.float().cpu())
    return distances.numpy(), score.numpy()


@torch.no_grad()
def reference_outputs(scorer: BaseScorer, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The torch scorer's (distances, score, nearest) on ``images``, as its forward computes them, the frozen
    backbone's features from the cache where ``score_arrays`` can use it."""
    if isinstance(scorer, Scorer):  # its score_arrays computes what its forward does
        distances, score = score_arrays(scorer, images)
        return distances, score, distances.argmin(axis=1)
    distances, score, nearest = scorer.eval()(torch.from_numpy(images))
    return distances.numpy(), score.numpy(), nearest.numpy()
