"""The labels an operator may give a capture: the model's classes plus its anomaly label.

One function for the service (``POST /feedback``) and the exporter (``flywheel.captures``), so both
accept the same set. Imports only the manifest contract: training can use it without torch.

Example:
    >>> from service.manifest import Manifest
    >>> valid_labels(Manifest.load("models/trashnet"))  # doctest: +SKIP
    ['cardboard', 'glass', 'metal', 'paper', 'plastic', 'trash']
"""

from __future__ import annotations

from service.manifest import Manifest

DEFAULT_ANOMALY_LABEL = "anomaly"  # for a manifest that names no anomaly class


def anomaly_labels(manifest: Manifest) -> list[str]:
    """The manifest's anomaly classes (``trash`` for TrashNet), else ``["anomaly"]``."""
    return list(manifest.training_data.anomaly_classes) or [DEFAULT_ANOMALY_LABEL]


def valid_labels(manifest: Manifest) -> list[str]:
    """Class names in column order, then the anomaly label(s); no duplicates."""
    return list(dict.fromkeys([*manifest.class_names, *anomaly_labels(manifest)]))
