"""Golden scores: an artifact proves, on the CPU and provider that loads it, that its graph computes
what it computed where it was made.

The reference inputs are made from a seed with integer arithmetic over SHAKE-256 bytes, so every
machine (with or without torch, any numpy) rebuilds them bit for bit. The writer (training's export,
the quantizer) runs them through the graph and stores the outputs and a tolerance in the manifest;
the service runs them again at every load and refuses the artifact when an output moves further.
Why: an INT8 graph made on a VNNI CPU ranked photos with correlation 0.62 to FP32 on an AVX2-only CPU
(saturating U8S8 kernels), and nothing said so until someone measured AUC.

Example:
    >>> images = reference_inputs(32, 32, 3, seed="deepmad-golden-v1", count=8)
    >>> images.shape, images.dtype
    ((8, 32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.manifest import INPUT_NAME, OUTPUT_NAMES, GoldenScores

DEFAULT_SEED = "deepmad-golden-v1"
DEFAULT_COUNT = 8
COARSE = 8  # side of the flat blocks of the photo-like references (a 32x32 input: 4x4 blocks)

# |got - want| <= atol + rtol * |want|, on every score and distance. FP32: what another CPU's float
# kernels (measured: 3.8e-6 between AVX-512 and AVX2) or a GPU's TF32 convolutions (~1e-3 relative per
# layer; not measured, no GPU lent) may move; INT8: the requantisation steps a float rounding difference
# may flip. Both far below the ~1 (mean) and ~5 (max) score units by which the saturating kernels moved
# the full-range INT8 graph (its golden check fails 35 of 48 outputs; docs/performance.md).
FP32_TOLERANCE = (0.01, 0.005)
INT8_TOLERANCE = (0.05, 0.02)

Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # images -> distances, score, nearest


def cpu_kind() -> str:
    """The CPU's architecture and the int8 dot-product extensions that decide ORT's INT8 kernels."""
    kind = platform.machine()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return kind
    present = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{kind} {'+'.join(present) or 'no avx2'}{'' if {'avx512_vnni', 'avx_vnni'} & flags else ' (no VNNI)'}"


def session_run(session) -> Run:
    """A ``Run`` over an ONNX Runtime session (outputs in the contract's order)."""

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        distances, score, nearest = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return np.asarray(distances), np.asarray(score), np.asarray(nearest)

    return run


def one_at_a_time(run: Run) -> Run:
    """``run`` over one image per call: the service checks its references this way, so that checking costs no
    more memory than a photo (eight 224x224 references at once peaked 57-69 MB higher; bench/footprint.py)."""

    def each(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [run(images[i : i + 1]) for i in range(len(images))]
        distances, score, nearest = (np.concatenate(parts) for parts in zip(*rows, strict=True))
        return distances, score, nearest

    return each


def reference_inputs(height: int, width: int, channels: int, *, seed: str, count: int) -> np.ndarray:
    """``count`` uint8 [H, W, C] images: even ones pure noise, odd ones flat blocks with a little noise
    (closer to a photo's statistics). Integer arithmetic only: the same bytes on every machine."""
    size = height * width * channels
    raw = hashlib.shake_256(seed.encode()).digest(2 * count * size)
    data = np.frombuffer(raw, dtype=np.uint8).reshape(count, 2, height, width, channels)
    images = data[:, 0].copy()
    for i in range(1, count, 2):
        coarse = data[i, 1, ::COARSE, ::COARSE].astype(np.uint16)
        blocks = np.repeat(np.repeat(coarse, COARSE, axis=0), COARSE, axis=1)[:height, :width]
        images[i] = ((3 * blocks + data[i, 0]) // 4).astype(np.uint8)
    return images


def compute(run: Run, input_shape: tuple[int, int, int], tolerance: tuple[float, float], made_on: str,
            seed: str = DEFAULT_SEED, count: int = DEFAULT_COUNT) -> GoldenScores:  # fmt: skip
    """The graph's outputs on the reference inputs, for the manifest."""
    distances, score, nearest = run(reference_inputs(*input_shape, seed=seed, count=count))
    atol, rtol = tolerance
    return GoldenScores(
        seed=seed,
        count=count,
        score=[float(v) for v in score],
        nearest=[int(v) for v in nearest],
        distances=[[float(v) for v in row] for row in distances],
        atol=atol,
        rtol=rtol,
        made_on=made_on,
    )


@dataclass(frozen=True)
class GoldenCheck:
    """What the load found: ``verified``, ``mismatch`` or ``absent`` (a manifest from before golden scores)."""

    status: str
    detail: str
    worst: float | None = None  # the largest |got - want| over scores and distances


def verify(run: Run, input_shape: tuple[int, int, int], golden: GoldenScores | None) -> GoldenCheck:
    """Run the references here and compare them with the manifest's outputs."""
    if golden is None:
        return GoldenCheck("absent", "the manifest has no golden scores (made before they existed): not checked")
    distances, score, nearest = run(reference_inputs(*input_shape, seed=golden.seed, count=golden.count))
    want_score, want_distances = np.asarray(golden.score), np.asarray(golden.distances)
    if want_distances.shape != np.shape(distances) or want_score.shape != np.shape(score):
        return GoldenCheck("mismatch", f"outputs have shapes {np.shape(distances)}, {np.shape(score)}; "
                           f"the golden ones {want_distances.shape}, {want_score.shape}")  # fmt: skip
    gaps = np.abs(np.concatenate([score - want_score, (distances - want_distances).ravel()]))
    limits = golden.atol + golden.rtol * np.abs(np.concatenate([want_score, want_distances.ravel()]))
    worst = float(gaps.max())
    over = int(np.sum(gaps > limits))
    # A nearest class may only differ where the golden distances of the two classes are within tolerance.
    sorted_d = np.sort(want_distances, axis=1)
    clear = (sorted_d[:, 1] - sorted_d[:, 0]) > 2 * (golden.atol + golden.rtol * sorted_d[:, 1])
    moved = int(np.sum(clear & (np.asarray(nearest) != np.asarray(golden.nearest))))
    if over or moved:
        # The reference that moved most, with both of its scores: what a bin owner can quote.
        per_reference = np.maximum(np.abs(score - want_score), np.abs(distances - want_distances).max(axis=1))
        i = int(per_reference.argmax())
        return GoldenCheck(
            "mismatch",
            f"{over} of {gaps.size} golden outputs differ by more than {golden.atol:g} + {golden.rtol:g}*|value| "
            f"(largest {worst:.4g}) and {moved} clear nearest classes changed, against the outputs made on "
            f"{golden.made_on}: this CPU or provider computes another function; worst: reference photo {i} of "
            f"{golden.count} (seed {golden.seed!r}) scores {float(score[i]):.4f} here, "
            f"{want_score[i]:.4f} in the manifest",
            worst,
        )
    return GoldenCheck("verified", f"{golden.count} references within tolerance (largest gap {worst:.3g})", worst)
