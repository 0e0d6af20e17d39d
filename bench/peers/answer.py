"""The answer every peer returns, so ``bench.serve`` compares the same JSON from each server.

Only the model's outputs are shaped here; how a peer loads the model, batches and routes stays the way
its own framework's documentation shows, in the peer's module.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIR = Path(os.environ.get("DEEPMAD_MODEL_DIR", Path(__file__).resolve().parents[2] / "models" / "trashnet"))


def served(manifest: dict) -> tuple[list[str], float, dict]:
    """What every peer needs of the manifest: class names, the threshold, the input spec (height, width, channels)."""
    return manifest["class_names"], manifest["threshold"]["value"], manifest["input"]


def answer(distances, score, nearest, class_names: list[str], threshold: float) -> dict:
    """One image's answer from its row of class distances, its score and its nearest class index."""
    return {
        "verdict": "anomalous" if float(score) >= threshold else "normal",
        "score": float(score),
        "threshold": threshold,
        "nearest_class": class_names[int(nearest)],
        "distances": {name: float(d) for name, d in zip(class_names, distances, strict=True)},
    }
