"""Generated frames with no item in them: what a bin's camera sends on a false trigger or a bad day.

A frame without an item must never come back "normal" (issue 35), so the service's no-item check
(``service.no_item``), its tests and ``bench.no_item`` need many kinds of featureless frame, and a
trainer can use them as exposure. Every kind is parameterised (colours, levels, noise, blur, falloff)
and drawn from a seeded generator, so a run sees many different frames and a rerun the same ones.
Torch-free (numpy, Pillow): the tests and the benchmarks import it without training's extra.

Example:
    >>> frames = non_item_frames(30, (384, 512), seed=0)
    >>> kind, frame = frames[0]   # a name from KINDS, uint8 384 x 512 x 3
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

Frame = np.ndarray  # uint8 H x W x 3
Maker = Callable[[np.random.Generator, int, int], np.ndarray]  # float H x W x 3, before clipping
JPEG_QUALITY = (40, 95)  # a JPEG round trip draws its quality from this range (cameras store 70-95)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres as (y, x) in [-1, 1], the longer side spanning the whole range."""
    scale = max(height, width) / 2
    y = (np.arange(height) + 0.5 - height / 2) / scale
    x = (np.arange(width) + 0.5 - width / 2) / scale
    return y[:, None], x[None, :]


def _colour(rng: np.random.Generator, low: float = 0.0, high: float = 255.0) -> np.ndarray:
    return rng.uniform(low, high, 3)


def _sensor_noise(rng: np.random.Generator, height: int, width: int, sigma: float, colour: float = 0.3) -> np.ndarray:
    """Gaussian noise, partly shared across channels (luminance) and partly per channel (chroma)."""
    shared = rng.normal(0.0, 1.0, (height, width, 1))
    own = rng.normal(0.0, 1.0, (height, width, 3))
    return sigma * (np.sqrt(1 - colour) * shared + np.sqrt(colour) * own)


def _blurred_field(height: int, width: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """White noise H x W blurred by a Gaussian of ``radius`` pixels (in the Fourier domain: wraps at the edges)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    transfer = np.exp(-2 * (np.pi * radius) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(rng.normal(0.0, 1.0, (height, width))) * transfer, s=(height, width))


def _vignette(height: int, width: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Lens falloff (H x W x 1): 1 at a centre near the middle, 1 - ``strength`` at the farthest corner."""
    y, x = _grid(height, width)
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    return (1.0 - strength * r2 / r2.max())[..., None]


def _uniform(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One flat colour (a lid, a wall, a cloth over the lens) with a little sensor noise."""
    return np.broadcast_to(_colour(rng), (height, width, 3)) + _sensor_noise(rng, height, width, rng.uniform(0, 4))


def _dimmed(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A flat colour at 3-30% brightness: the chamber in failing light."""
    level = _colour(rng, 40, 255) * rng.uniform(0.03, 0.3)
    return np.broadcast_to(level, (height, width, 3)) + _sensor_noise(rng, height, width, rng.uniform(0, 3))


def _dark(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Lights off: a black level of 0-25 with the sensor's noise at high gain (1-10 grey levels)."""
    base = rng.uniform(0, 25) + rng.uniform(-3, 3, 3)
    return np.broadcast_to(base, (height, width, 3)) + _sensor_noise(rng, height, width, rng.uniform(1, 10), 0.5)


def _hot_pixels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A dark frame with 0.05-1% stuck or hot pixels (long exposure in the dark)."""
    frame = _dark(rng, height, width)
    hot = rng.random((height, width)) < rng.uniform(0.0005, 0.01)
    frame[hot] = rng.uniform(120, 255, (int(hot.sum()), 1))
    return frame


def _covered(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A hand or a lid over the lens: a dark, warm or grey tint, out of focus, brighter at one edge."""
    tint = rng.choice([np.array([1.0, 0.7, 0.55]), np.array([1.0, 1.0, 1.0]), np.array([0.8, 0.85, 1.0])])
    level = rng.uniform(8, 90)
    y, x = _grid(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    leak = 1.0 + rng.uniform(0.1, 0.8) * ((np.cos(angle) * x + np.sin(angle) * y + 1.5) / 3) ** 2
    frame = level * tint * leak[..., None] * _vignette(height, width, rng.uniform(0.2, 0.7), rng)
    return frame + _sensor_noise(rng, height, width, rng.uniform(1, 6), 0.4)


def _overexposed(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Blinding light: a bright source somewhere in (or near) the frame drives most of it into clipping."""
    y, x = _grid(height, width)
    cy, cx = rng.uniform(-1.2, 1.2, 2)
    falloff = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / rng.uniform(1.0, 4.0))
    gain = rng.uniform(1.3, 3.0)
    tint = 1.0 - rng.uniform(0.0, 0.15, 3)
    frame = 255 * gain * (0.55 + 0.45 * falloff)[..., None] * tint
    return frame + _sensor_noise(rng, height, width, rng.uniform(0, 3))


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth linear ramp between two colours, in any direction (light falling across an empty board)."""
    y, x = _grid(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * x + np.sin(angle) * y) / 1.42 + 1) / 2  # 0..1 across the frame
    a, b = _colour(rng), _colour(rng)
    return a + (b - a) * t[..., None] + _sensor_noise(rng, height, width, rng.uniform(0, 3))


def _spot(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A lamp's broad spot on an empty board: 10-50% brighter at a centre, fading over the frame."""
    y, x = _grid(height, width)
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    bump = rng.uniform(0.1, 0.5) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / rng.uniform(1.0, 2.0) ** 2)
    frame = _colour(rng, 40, 230) * (1.0 + bump)[..., None]
    return frame + _sensor_noise(rng, height, width, rng.uniform(0, 3))


def _vignetted(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A flat mid-to-light colour darkened towards the corners by the lens (20-70% at the edge)."""
    frame = _colour(rng, 60, 255) * _vignette(height, width, rng.uniform(0.2, 0.7), rng)
    return frame + _sensor_noise(rng, height, width, rng.uniform(0, 4))


def _noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sensor noise at very high gain, 8-64 grey levels, around any grey level."""
    base = rng.uniform(40, 215)
    return np.full((height, width, 3), base) + _sensor_noise(rng, height, width, rng.uniform(8, 64), 0.2)


def _colour_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Independent noise per channel (8-48 levels) around a random colour: a broken or unsynchronised sensor."""
    return np.broadcast_to(_colour(rng, 40, 215), (height, width, 3)) + rng.normal(
        0.0, rng.uniform(8, 48), (height, width, 3)
    )


def _blurred_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """High-gain sensor noise (16-64 levels) smoothed over 1-8 pixels, as a camera's noise reduction or
    a soft JPEG leaves it: the blur keeps the noise's power at the frequencies it passes."""
    radius = rng.uniform(1.0, 8.0)
    field = _blurred_field(height, width, radius, rng) * rng.uniform(16, 64)
    return np.full((height, width, 3), rng.uniform(40, 215)) + field[..., None] * (1 - rng.uniform(0, 0.3, 3))


def _empty_chamber(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The empty chamber on a false trigger: a light board, light falling across it, vignette, noise."""
    board = rng.uniform(150, 245) * (1 - rng.uniform(0, 0.12, 3))
    y, x = _grid(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.0, 0.15) * (np.cos(angle) * x + np.sin(angle) * y)
    frame = board * light[..., None] * _vignette(height, width, rng.uniform(0.05, 0.4), rng)
    return frame + _sensor_noise(rng, height, width, rng.uniform(1, 6))


MAKERS: dict[str, Maker] = {
    "uniform": _uniform,
    "dimmed": _dimmed,
    "dark": _dark,
    "hot_pixels": _hot_pixels,
    "covered": _covered,
    "overexposed": _overexposed,
    "gradient": _gradient,
    "spot": _spot,
    "vignette": _vignetted,
    "noise": _noise,
    "colour_noise": _colour_noise,
    "blurred_noise": _blurred_noise,
    "empty_chamber": _empty_chamber,
}
KINDS: tuple[str, ...] = tuple(MAKERS)


def jpeg_round_trip(frame: Frame, quality: int) -> Frame:
    """The frame as a camera that stores JPEG would deliver it (4:2:0 chroma, Pillow's encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.uint8)


def non_item_frame(
    kind: str, size: tuple[int, int], rng: np.random.Generator, jpeg_quality: int | None = None
) -> Frame:
    """One frame of ``kind`` (one of ``KINDS``) at ``size`` = (height, width), JPEG round-tripped at
    ``jpeg_quality`` when given."""
    if kind not in MAKERS:
        raise ValueError(f"unknown non-item kind {kind!r}; choose one of {', '.join(KINDS)}")
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"a frame needs a positive size, not {size}")
    frame = np.clip(np.rint(MAKERS[kind](rng, height, width)), 0, 255).astype(np.uint8)
    return frame if jpeg_quality is None else jpeg_round_trip(frame, jpeg_quality)


def non_item_frames(
    n: int, size: tuple[int, int], seed: int, kinds: tuple[str, ...] = KINDS, jpeg_share: float = 0.5
) -> list[tuple[str, Frame]]:
    """``n`` frames (kind, uint8 H x W x 3), the kinds in turn so each gets its share; ``jpeg_share`` of
    them JPEG round-tripped at a quality drawn from ``JPEG_QUALITY``. The same seed gives the same frames."""
    if not 0.0 <= jpeg_share <= 1.0:
        raise ValueError(f"jpeg_share must lie in [0, 1], not {jpeg_share}")
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)) if rng.random() < jpeg_share else None
        frames.append((kind, non_item_frame(kind, size, rng, quality)))
    return frames
