"""The exportable scoring modules: uint8 NHWC images -> per-detector distances, score, nearest column.

Every method exports the same three outputs (the artifact contract), so the service can serve any of
them: ``distances`` [N, k] (one column per detector, higher = less like that detector's class),
``score`` [N] = the minimum over columns (higher = more anomalous; "anomalous iff every detector says
anomalous" at a common threshold) and ``nearest`` [N]. A DeepMAD model trained with centres of its own
for labelled anomalies (``--anomaly-centres k``) has k more columns inside the graph; they are not
exported as distances, and the score becomes d_min(normal classes) - d_min(anomaly centres)
(``SCORE_RULES``): still a difference of distances, higher = more anomalous. Fitted statistics
(centres, normalisation) are registered buffers, so ONNX export carries them and the service needs
nothing but the graph. These are the torch references the ONNX graph is checked against.

Example:
    >>> scorer = Scorer(encoder, centres, normaliser).eval()
    >>> distances, score, nearest = scorer(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.batches import Normaliser, standardise
from training.networks import GroupedClassifier, GroupedEncoder

# The score rule by number of anomaly centres (0 or more); the manifest and GET /model carry its name.
SCORE_RULES = {False: "min_distance", True: "min_distance_minus_anomaly_centres"}
BATCH_PIXELS = 2**21  # photos per evaluation batch times their pixels: bounds activation memory at any input size


def split_columns(columns: torch.Tensor, n_normal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All distance columns [N, m + k] (after the m normal ones: anomaly centres) -> (normal distances [N, m],
    score [N]) under the score rule (``SCORE_RULES``). ``n_normal`` is a Python int, so the exported graph's
    distances output keeps a fixed width."""
    normal = columns[:, :n_normal]
    score = normal.min(dim=1).values
    if columns.shape[1] > n_normal:
        score = score - columns[:, n_normal:].min(dim=1).values
    return normal, score


class BaseScorer(nn.Module):
    """Standardisation, the min/argmin over detector columns and numpy helpers; subclasses give the columns."""

    def __init__(self, encoder: GroupedEncoder, normaliser: Normaliser, anomaly_centres: int = 0):
        super().__init__()
        self.encoder = encoder
        self.anomaly_centres = anomaly_centres  # the last columns of ``columns``: centres of labelled anomalies
        self.register_buffer("mean", normaliser.mean.detach().clone().float().view(1, -1, 1, 1))
        self.register_buffer("std", normaliser.std.detach().clone().float().view(1, -1, 1, 1))
        self.contrast = normaliser.contrast  # per-image contrast normalisation first (traced into the graph)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.encoder.size, self.encoder.size, self.encoder.channels)

    @property
    def n_columns(self) -> int:
        """Exported distance columns: one per normal class (anomaly centres stay inside the graph)."""
        return self.encoder.groups - self.anomaly_centres

    @property
    def score_rule(self) -> str:
        return SCORE_RULES[self.anomaly_centres > 0]

    def split(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_columns(columns, self.n_columns)

    def standardise(self, image: torch.Tensor) -> torch.Tensor:
        return standardise(image.permute(0, 3, 1, 2).float() / 255.0, self.mean, self.std, self.contrast)

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised [N, C, H, W] -> (per-detector distances [N, k], features [N, k, F])."""
        raise NotImplementedError

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        distances, score = self.split(self.columns(self.standardise(image))[0])
        return distances, score, distances.argmin(dim=1)

    @torch.no_grad()
    def score_arrays(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Eval-mode (distances [N, k], score [N]) for uint8 NHWC numpy images."""
        columns, _ = self.distances_and_features(images, batch_size)
        distances, score = self.split(torch.from_numpy(columns))
        return distances.numpy(), score.numpy()

    @torch.no_grad()
    def distances_and_features(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Eval-mode (every column's distance [N, m + k], last-layer features [N, m + k, F]) for section 5.1's
        analysis and ``score_arrays``."""
        self.eval()
        device = self.mean.device
        distances, features = [], []
        height, width, _ = self.input_shape
        batch_size = max(1, min(batch_size, BATCH_PIXELS // (height * width)))  # a 224x224 backbone: ~40 photos
        for start in range(0, len(images), batch_size):
            x = self.standardise(torch.from_numpy(images[start : start + batch_size]).to(device))
            d, f = self.columns(x)
            distances.append(d.float().cpu().numpy())
            features.append(f.float().cpu().numpy())
        return np.concatenate(distances), np.concatenate(features)


class Scorer(BaseScorer):
    """Centre-based detectors (DeepMAD, DeepSVDD, DeepSVDD(m)): column i is ||E_i(x) - c_i||."""

    def __init__(
        self, encoder: GroupedEncoder, centres: torch.Tensor, normaliser: Normaliser, anomaly_centres: int = 0
    ):
        super().__init__(encoder, normaliser, anomaly_centres)
        self.register_buffer("centres", centres.detach().clone().float())  # [m + k, D]

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder.embed_shared(x)  # [N, k, D]
        return self.centre_distances(z), z

    def centre_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, k, D] -> column i = ||z_i - c_i|| [N, k] (``training.features`` scores cached features)."""
        return torch.sqrt((z - self.centres.unsqueeze(0)).pow(2).sum(-1))


class LogitScorer(BaseScorer):
    """Classifier detectors (DROCC, DROCC(m)): column i is softplus(-logit_i) = -log P_i(normal | x).

    DROCC's logit is high for normal items; softplus(-logit) is monotone decreasing in it (so the AUC
    is the negated logit's), non-negative like a distance, and 0 where the detector is certain.
    """

    def __init__(self, classifier: GroupedClassifier, normaliser: Normaliser):
        super().__init__(classifier.encoder, normaliser)
        self.head = classifier.head

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.head(self.encoder.embed_shared(x))
        return torch.nn.functional.softplus(-logits), features
