"""AUC for the modules that still import it from here (bench/pretrained.py); the numbers live in flywheel.metrics."""

from __future__ import annotations

from flywheel.metrics import roc_auc

__all__ = ["roc_auc"]
