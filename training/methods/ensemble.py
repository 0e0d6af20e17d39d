"""Several trained scorers (different seeds) and horizontal-flip views as one exportable graph.

Each member's distances are standardised by that member's own held-out normal scores (mean and
standard deviation on the validation split), so members on different scales count equally; the
standardised per-class distances are averaged over members and views, and the score is still the
minimum over classes, as in DeepMAD. Averaging the flipped view costs one more pass per member and
removes the encoders' left/right asymmetry, which a bin's camera does not care about.

Example:
    >>> ensemble = EnsembleScorer.calibrated([scorer_a, scorer_b], task.val.images, flip=True)
    >>> distances, score, nearest = ensemble(images_uint8_nhwc)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.scorer import SCORE_RULES, BaseScorer


class EnsembleScorer(nn.Module):
    def __init__(self, members: list[BaseScorer], offsets: list[float], scales: list[float], flip: bool):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        shapes = {m.input_shape for m in members}
        if len(shapes) != 1 or len({m.n_columns for m in members}) != 1:
            raise ValueError("ensemble members must share input shape and classes")
        self.members = nn.ModuleList(members)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float32))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        self.flip = flip

    @classmethod
    def calibrated(cls, members: list[BaseScorer], val_images: np.ndarray, flip: bool) -> EnsembleScorer:
        """Standardise every member by its scores on held-out normal images (seen with the same views)."""
        offsets, scales = [], []
        for member in members:
            probe = cls([member], [0.0], [1.0], flip)
            _, scores = probe.score_arrays(val_images)
            offsets.append(float(scores.mean()))
            scales.append(float(max(scores.std(), 1e-6)))
        return cls(members, offsets, scales, flip)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.members[0].input_shape

    @property
    def n_columns(self) -> int:
        return self.members[0].n_columns

    score_rule = SCORE_RULES[False]  # members' standardised distances, min over columns
    anomaly_centres = 0

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = [image, image.flip(2)] if self.flip else [image]  # NHWC: axis 2 is the width
        total = None
        for index, member in enumerate(self.members):
            for view in views:
                distances, _, _ = member(view)
                standard = (distances - self.offsets[index]) / self.scales[index]
                total = standard if total is None else total + standard
        distances = total / (len(self.members) * len(views))
        score, nearest = distances.min(dim=1)
        return distances, score, nearest

    @torch.no_grad()
    def score_arrays(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        self.eval()
        device = self.offsets.device
        distances = [
            self(torch.from_numpy(images[s : s + batch_size]).to(device))[0].float().cpu().numpy()
            for s in range(0, len(images), batch_size)
        ]
        stacked = np.concatenate(distances)
        return stacked, stacked.min(axis=1)
