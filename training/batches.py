"""Turning uint8 NHWC batches into the networks' float input: scale, augment, standardise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHIFT = 4  # pixels, each way
BRIGHTNESS = 0.2  # multiplicative, each way


@dataclass
class Normaliser:
    """Per-channel standardisation with the training set's statistics (baked into the exported graph)."""

    mean: torch.Tensor  # [C], on the 0..1 scale
    std: torch.Tensor  # [C]

    @classmethod
    def fit(cls, images: torch.Tensor) -> Normaliser:
        pixels = images.reshape(-1, images.shape[-1]).double() / 255.0
        return cls(pixels.mean(0).float(), pixels.std(0).clamp_min(1e-3).float())

    def to(self, device: torch.device) -> Normaliser:
        return Normaliser(self.mean.to(device), self.std.to(device))


def to_float(
    images: torch.Tensor, normaliser: Normaliser, augment: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 [B, H, W, C] -> standardised float [B, C, H, W], optionally augmented.

    Augmentation keeps the object: horizontal flip, a shift of up to SHIFT pixels (edges replicated)
    and brightness scaled by up to +-BRIGHTNESS. Random draws come from ``generator`` (on the CPU) so a
    seeded run repeats exactly.
    """
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if augment:
        x = _augment(x, generator)
    mean = normaliser.mean.view(1, -1, 1, 1)
    std = normaliser.std.view(1, -1, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    batch, _, height, width = x.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    shifts = torch.randint(-SHIFT, SHIFT + 1, (batch, 2), generator=generator)
    gain = 1.0 + (torch.rand(batch, generator=generator) * 2 - 1) * BRIGHTNESS
    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
    # Shift by indexing a replicate-padded copy: one gather for the whole batch.
    padded = torch.nn.functional.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), mode="replicate")
    rows = (torch.arange(height).view(1, -1) + SHIFT + shifts[:, :1]).to(x.device)  # [B, H]
    cols = (torch.arange(width).view(1, -1) + SHIFT + shifts[:, 1:]).to(x.device)  # [B, W]
    index_b = torch.arange(batch, device=x.device).view(-1, 1, 1)
    shifted = padded.permute(0, 2, 3, 1)[index_b, rows.unsqueeze(2), cols.unsqueeze(1)]  # [B, H, W, C]
    x = shifted.permute(0, 3, 1, 2)
    return (x * gain.to(x.device).view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def class_batches(class_images: list[torch.Tensor], batch_size: int, generator: torch.Generator):
    """Per epoch: ceil(max_i |X_i| / batch) steps of one batch per class; smaller classes wrap around."""
    steps = math.ceil(max(len(x) for x in class_images) / batch_size)
    orders = [torch.randperm(len(x), generator=generator) for x in class_images]
    for step in range(steps):
        window = torch.arange(step * batch_size, (step + 1) * batch_size)
        yield [x[order[window % len(x)]] for x, order in zip(class_images, orders, strict=True)]


def shuffled_batches(count: int, batch_size: int, generator: torch.Generator):
    """Index batches of one seeded permutation of ``count`` items (drawn when iteration starts)."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]
