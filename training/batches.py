"""Turning uint8 NHWC batches into the networks' float input: scale, augment, standardise."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHIFT = 4  # pixels, each way
BRIGHTNESS = 0.2  # multiplicative, each way
# "strong": what a 32x32 photo of the same item could also look like (issue 14, against memorisation).
CROP_AREA = (0.6, 1.0)  # random resized crop: share of the photo kept
CROP_ASPECT = (3 / 4, 4 / 3)
ROTATION_DEGREES = 15.0  # each way
JITTER = 0.3  # brightness, contrast and saturation, multiplicative, each way
CUTOUT_SHARE = 0.25  # side of the erased square, as a share of the image side
CUTOUT_PROBABILITY = 0.5


CONTRAST_EPS = 1e-4  # a flat image has no contrast to divide by


def contrast_normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-image global contrast normalisation with the l1 norm (DeepSVDD's CIFAR-10 preprocessing): each
    image minus its own mean, over its mean absolute deviation, so lighting and exposure drop out."""
    centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
    return centred / centred.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(CONTRAST_EPS)


def standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, contrast: bool) -> torch.Tensor:
    """Float [B, C, H, W] on the 0..1 scale -> the networks' input (``mean``/``std`` [1, C, 1, 1]); the one
    rule for training batches (``Normaliser``) and the exported graph (``scorer.BaseScorer``)."""
    if contrast:
        x = contrast_normalise(x)
    return (x - mean) / std


@dataclass
class Normaliser:
    """Per-channel standardisation with the training set's statistics (baked into the exported graph),
    after per-image contrast normalisation when ``contrast`` is set."""

    mean: torch.Tensor  # [C], on the 0..1 scale (on the contrast-normalised scale with ``contrast``)
    std: torch.Tensor  # [C]
    contrast: bool = False

    @classmethod
    def fit(cls, images: torch.Tensor, contrast: bool = False) -> Normaliser:
        if contrast:
            x = contrast_normalise(images.permute(0, 3, 1, 2).float() / 255.0)
            pixels = x.permute(0, 2, 3, 1).reshape(-1, images.shape[-1]).double()
        else:
            pixels = images.reshape(-1, images.shape[-1]).double() / 255.0
        return cls(pixels.mean(0).float(), pixels.std(0).clamp_min(1e-3).float(), contrast)

    def to(self, device: torch.device) -> Normaliser:
        return Normaliser(self.mean.to(device), self.std.to(device), self.contrast)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Float [B, C, H, W] on the 0..1 scale -> the networks' input."""
        return standardise(x, self.mean.view(1, -1, 1, 1), self.std.view(1, -1, 1, 1), self.contrast)


def to_float(
    images: torch.Tensor,
    normaliser: Normaliser,
    augment: bool | str = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 [B, H, W, C] -> standardised float [B, C, H, W], optionally augmented.

    ``augment`` True or "basic" keeps the object: horizontal flip, a shift of up to SHIFT pixels (edges
    replicated) and brightness scaled by up to +-BRIGHTNESS. "strong" is ``_augment_strong``. Random
    draws come from ``generator`` (on the CPU) so a seeded run repeats exactly.
    """
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if augment == "strong":
        x = _augment_strong(x, generator)
    elif augment:
        x = _augment(x, generator)
    return normaliser.apply(x)


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


def _augment_strong(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip, random resized crop and a small rotation (one affine resampling, reflected edges), colour
    jitter (brightness, contrast, saturation) and, for half the images, a cutout filled with the photo's
    mean colour: the encoders see the item framed, lit and partly hidden differently every epoch."""
    batch, channels, height, width = x.shape
    uniform = lambda low, high: low + (high - low) * torch.rand(batch, generator=generator)  # noqa: E731
    area = uniform(*CROP_AREA)
    aspect = torch.exp(uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    scale_x = torch.sqrt(area * aspect).clamp(max=1.0)
    scale_y = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = uniform(-1.0, 1.0) * (1.0 - scale_x)
    centre_y = uniform(-1.0, 1.0) * (1.0 - scale_y)
    angle = uniform(-ROTATION_DEGREES, ROTATION_DEGREES) * math.pi / 180.0
    mirror = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output (u, v) in [-1, 1] samples input R(angle) @ diag(mirror * scale_x, scale_y) @ (u, v) + centre.
    theta = torch.stack(
        [
            torch.stack([cos * mirror * scale_x, -sin * scale_y, centre_x], dim=1),
            torch.stack([sin * mirror * scale_x, cos * scale_y, centre_y], dim=1),
        ],
        dim=1,
    ).to(x.device)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(x.device).view(-1, 1, 1, 1)

    x = x * per_image(uniform(1 - JITTER, 1 + JITTER))
    x = torch.lerp(x.mean(dim=(1, 2, 3), keepdim=True), x, per_image(uniform(1 - JITTER, 1 + JITTER)))
    if channels == 3:
        grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = torch.lerp(grey, x, per_image(uniform(1 - JITTER, 1 + JITTER)))
    x = x.clamp(0.0, 1.0)
    side = max(1, round(CUTOUT_SHARE * height))
    top = torch.randint(0, height - side + 1, (batch,), generator=generator)
    left = torch.randint(0, width - side + 1, (batch,), generator=generator)
    erase = torch.rand(batch, generator=generator) < CUTOUT_PROBABILITY
    rows, cols = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    inside = (rows >= top.view(-1, 1, 1)) & (rows < (top + side).view(-1, 1, 1))
    inside = inside & (cols >= left.view(-1, 1, 1)) & (cols < (left + side).view(-1, 1, 1)) & erase.view(-1, 1, 1)
    return torch.where(inside.to(x.device).unsqueeze(1), x.mean(dim=(2, 3), keepdim=True), x)


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
