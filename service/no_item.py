"""Is there an item in the frame at all? An image-statistics check on the model input, before the graph.

Why a check beside the model: a frame without an item (the empty chamber on a false trigger, a covered
lens, lights off, blinding light, a flat colour, sensor noise, a smooth gradient) sits near the feature
mean, and the DeepMAD heads map that near their centres, so both shipped models call most such frames
"normal" (issue 35). Training on generated non-item frames helps one model; this check holds for every
model a bin serves or retrains, costs 0.1-0.6 ms of CPU per photo (32x32-224x224), and answers with its
own verdict, ``no_item``, which tells an operator something different from trash.

What it measures, on the uint8 H x W x C model input (any size and channel count):

* **structure**: the frame is averaged over a ``GRID`` x ``GRID`` grid of cells (area averaging, so
  i.i.d. sensor noise shrinks with the cell's pixel count), a smooth cubic surface in (y, x) is fitted
  per channel and removed (gradients, vignetting, a lamp's broad spot, a hand's falloff), and what is
  left is measured by its lag-1 autocovariance between neighbouring cells: structure that spans cells
  (an item's outline) counts, cell-to-cell noise averages to zero. The square root of the largest
  channel's value, in grey levels, is the frame's structure.
* **clipping**: cells where a channel is blown out (``CLIP_LEVEL``) are left out of that channel's
  fit, so the edge of a blinding area is not mistaken for an outline; a frame with too few cells left
  (``MIN_FIT_SHARE``) is blinding.

A frame is ``no_item`` when its structure is below ``STRUCTURE_THRESHOLD`` or it is blinding. The
threshold was chosen on TrashNet's training side (its recyclables and trash, both models' input sizes):
below all of them, with a margin (``python -m bench.no_item`` prints both sides). ``reason`` says
what kind of frame it was, for the metrics: ``overexposed`` (most of it blown out), ``dark`` (lights
off, a covered lens) or ``featureless`` (the empty chamber, a flat colour, noise).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

GRID = 16  # cells per side (fewer when the input is smaller)
DEGREE = 3  # the smooth surface removed before measuring structure
CLIP_LEVEL = 250  # a channel value at or above this is blown out
CLIPPED_CELL_SHARE = 0.05  # a cell with more of its pixels blown out in a channel leaves that channel's fit
MIN_FIT_SHARE = 0.15  # fewer usable cells than this share (in every channel): blinding
# Grey levels: about 90% of the lowest photo on TrashNet's training side (1,702 photos, 60 of them trash):
# 1.31 at 32x32 and 1.34 at 224x224, a cardboard sheet filling the frame; the next lowest is 1.67.
STRUCTURE_THRESHOLD = 1.2
DARK_LEVEL = 40.0  # reason "dark": a no-item frame this dark (mean level) is lights off or a covered lens
BLOWN_SHARE = 0.5  # reason "overexposed": a no-item frame with under this share of usable cells

Reason = Literal["overexposed", "dark", "featureless"]
REASONS: tuple[Reason, ...] = ("overexposed", "dark", "featureless")


@dataclass(frozen=True)
class ItemCheck:
    """One frame's statistics and verdict: ``reason`` is None when the frame holds an item."""

    structure: float  # grey levels of cell-spanning structure left after the smooth fit (0 when blinding)
    fit_share: float  # share of cells usable in the best channel's fit
    mean_level: float
    reason: Reason | None

    @property
    def no_item(self) -> bool:
        return self.reason is not None


def _cell_means(images: np.ndarray, grid: int) -> np.ndarray:
    """N x H x W x C -> N x grid x grid x C area means (cells of nearly equal size; exact for any H, W)."""
    _, height, width, _ = images.shape
    rows = np.linspace(0, height, grid + 1).astype(np.int64)
    cols = np.linspace(0, width, grid + 1).astype(np.int64)
    sums = np.add.reduceat(np.add.reduceat(images, rows[:-1], axis=1, dtype=np.uint32), cols[:-1], axis=2)
    return sums / (np.diff(rows)[:, None] * np.diff(cols)[None, :])[None, :, :, None]


@functools.lru_cache(maxsize=8)
def _surface(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """The monomials y^i x^j, i + j <= DEGREE, at the cell centres in [-1, 1] (grid*grid x terms), and
    the matrix that removes their least-squares fit from a frame whose every cell is usable."""
    t = (np.arange(grid) + 0.5) / grid * 2 - 1
    y, x = np.meshgrid(t, t, indexing="ij")
    basis = np.stack([(y**i * x**j).ravel() for i in range(DEGREE + 1) for j in range(DEGREE + 1 - i)], axis=1)
    return basis, np.eye(grid * grid) - basis @ np.linalg.pinv(basis)


def _lag_one(residual: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per channel: the mean product of horizontally and vertically neighbouring residuals (both usable)."""
    pairs = (mask[1:] & mask[:-1]).sum(axis=(0, 1)) + (mask[:, 1:] & mask[:, :-1]).sum(axis=(0, 1))
    products = (residual[1:] * residual[:-1]).sum(axis=(0, 1)) + (residual[:, 1:] * residual[:, :-1]).sum(axis=(0, 1))
    return products / np.maximum(pairs, 1)


def _structure(cells: np.ndarray, usable: np.ndarray) -> tuple[float, float]:
    """(structure, fit share) of one frame's grid x grid x C cells; ``usable`` marks cells per channel."""
    grid, _, channels = cells.shape
    basis, remove_fit = _surface(grid)
    values = cells.reshape(grid * grid, channels)
    keep = usable.reshape(grid * grid, channels)
    shares = keep.mean(axis=0)
    if keep.all():
        residual = remove_fit @ values
    else:
        residual = np.zeros_like(values)
        for c in np.flatnonzero(keep.sum(axis=0) >= max(2 * basis.shape[1], MIN_FIT_SHARE * len(keep))):
            rows = keep[:, c]
            coef, *_ = np.linalg.lstsq(basis[rows], values[rows, c], rcond=None)
            residual[:, c] = (values[:, c] - basis @ coef) * rows
    covariance = _lag_one(residual.reshape(grid, grid, channels), usable)
    return float(np.sqrt(max(covariance.max(), 0.0))), float(shares.max())


def check_items(images: np.ndarray) -> list[ItemCheck]:
    """One ``ItemCheck`` per uint8 N x H x W x C model input."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x H x W x C images, got {images.dtype} {images.shape}")
    grid = min(GRID, images.shape[1], images.shape[2])
    cells = _cell_means(images, grid)
    blown = images >= CLIP_LEVEL
    usable = np.ones(cells.shape, dtype=bool)
    if blown.any():
        usable = _cell_means(blown.view(np.uint8), grid) <= CLIPPED_CELL_SHARE
    out = []
    for n in range(len(images)):
        structure, share = _structure(cells[n], usable[n])
        level = float(cells[n].mean())
        reason: Reason | None = None
        if share < MIN_FIT_SHARE or structure < STRUCTURE_THRESHOLD:
            reason = "overexposed" if share < BLOWN_SHARE else "dark" if level < DARK_LEVEL else "featureless"
        out.append(ItemCheck(structure=structure, fit_share=share, mean_level=level, reason=reason))
    return out
