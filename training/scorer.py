"""The exportable scoring module: uint8 NHWC images -> distances to every centre, score, nearest class.

Fitted statistics (centres, normalisation) are registered buffers, so ONNX export carries them and the
service needs nothing but the graph. This is the torch reference the ONNX graph is checked against.

Example:
    >>> scorer = Scorer(encoder, centres, normaliser).eval()
    >>> distances, score, nearest = scorer(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.batches import Normaliser
from training.networks import GroupedEncoder


class Scorer(nn.Module):
    def __init__(self, encoder: GroupedEncoder, centres: torch.Tensor, normaliser: Normaliser):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("centres", centres.detach().clone().float())  # [k, D]
        self.register_buffer("mean", normaliser.mean.detach().clone().float().view(1, -1, 1, 1))
        self.register_buffer("std", normaliser.std.detach().clone().float().view(1, -1, 1, 1))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.encoder.size, self.encoder.size, self.encoder.channels)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        z = self.encoder.embed_shared(x)  # [N, k, D]
        distances = torch.sqrt((z - self.centres.unsqueeze(0)).pow(2).sum(-1))
        score, nearest = distances.min(dim=1)
        return distances, score, nearest

    @torch.no_grad()
    def score_arrays(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Eval-mode (distances [N, k], score [N]) for uint8 NHWC numpy images."""
        self.eval()
        device = self.centres.device
        distances, scores = [], []
        for start in range(0, len(images), batch_size):
            d, s, _ = self(torch.from_numpy(images[start : start + batch_size]).to(device))
            distances.append(d.float().cpu().numpy())
            scores.append(s.float().cpu().numpy())
        return np.concatenate(distances), np.concatenate(scores)
