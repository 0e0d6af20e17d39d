"""Backbone outputs of whole image arrays, computed once and cached on disk by content.

On 2 cores a Lite0 forward at 128x128 costs ~10 ms per photo, so a run that trains heads (or the last
blocks) for 100 epochs must never run the fixed part of the backbone more than once per photo and view.
The key covers the pixels, the backbone, its weights and where the fixed part ends; the cache folder is
``training.data.cache``'s (DEEPMAD_CACHE_DIR).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from training.backbones import Backbone, lite_normaliser
from training.batches import to_float
from training.data.cache import cached_array

FEATURE_VERSION = "1"  # bump when what is cached for the same key changes


def fixed_outputs(
    backbone: Backbone, images: np.ndarray, mirrored: bool = False, device: torch.device | None = None
) -> np.ndarray:
    """What no training changes, per photo: the pooled features of a frozen backbone, or the feature map
    where its tuned blocks start. ``mirrored`` flips every photo left-right first (the cached augmentation)."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(
        f"{FEATURE_VERSION}|{backbone.name}|{backbone.weights_sha256}|{backbone.tune_blocks}|{mirrored}".encode()
    )
    part = backbone if not backbone.trains else backbone.frozen
    device = device or torch.device("cpu")
    normaliser = lite_normaliser().to(device)

    @torch.no_grad()
    def build() -> np.ndarray:
        part.to(device).eval()
        out = []
        for start in range(0, len(images), 64):
            batch = torch.from_numpy(images[start : start + 64]).to(device)
            x = to_float(batch.flip(2) if mirrored else batch, normaliser)
            out.append(part(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    return cached_array(f"features-{digest.hexdigest()[:32]}", build)
