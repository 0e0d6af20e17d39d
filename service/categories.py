"""New categories from operators' labels: the name rules, the class limit and the confirmation step.

An operator may label a capture with a category the model does not know (a site that collects batteries
separately). Every label writer (``POST /feedback``, the review page, Label Studio) goes through
``check_label``, so a typo never becomes a class unnoticed: a label outside the model's labels and the
categories already pending is refused unless the request confirms it (``new_category: true``), and a
confirmed one must be a name that is a folder name and a Prometheus label value everywhere it goes
(the export's class folder, ``deepmad_classifications_total{nearest_class}``, the manifest). The
exporter (``flywheel.captures export``) checks the same rules and the photo minimums before it writes.

Example:
    >>> check_name("battery")
    >>> check_name("Battery")
    Traceback (most recent call last):
    ...
    service.categories.CategoryError: category 'Battery' breaks the name rule: ...
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from service.labels import DEFAULT_ANOMALY_LABEL, valid_labels
from service.manifest import Manifest

NAME_RULE = "a lowercase letter, then up to 31 lowercase letters, digits, '_' or '-'"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# Words that already mean something in an answer or a label: a class by one of these names would read
# as a verdict or as trash.
RESERVED = ("trash", DEFAULT_ANOMALY_LABEL, "anomalous", "normal", "no_item")
MAX_CLASSES = 16  # recyclable classes one model serves (its anomaly label not counted): one head each
MIN_TRAIN_PHOTOS = 10  # of a new category in the training tree: the folder split 70/10/20 leaves 7 / 1 / 2
MIN_AUDIT_PHOTOS = 3  # of a new category in the audit tree: the gate judges its routing on them


def quoted(label: str, limit: int = 40) -> str:
    """A label as sent, cut short: an error never echoes a huge field back (``service.errors.quoted``'s
    rule; that module's schemas import this one)."""
    return repr(label) if len(label) <= limit else f"{label[:limit]!r}... ({len(label)} characters)"


class CategoryError(ValueError):
    """A label that may not be written; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class LabelCheck:
    """What ``check_label`` decided: the label is the model's, an already pending category, or a new one."""

    label: str
    kind: str  # "known", "pending" or "new"


def check_name(name: str) -> None:
    """A CategoryError unless ``name`` may be a class: a folder name and a metric label value, not reserved."""
    if not NAME_PATTERN.fullmatch(name):
        raise CategoryError("invalid_category", f"category {quoted(name)} breaks the name rule: {NAME_RULE}")
    if name in RESERVED:
        raise CategoryError("invalid_category", f"category {quoted(name)} is a reserved word ({', '.join(RESERVED)})")


def pending_categories(manifest: Manifest, labels_in_use: Iterable[str]) -> list[str]:
    """The labels on captures that the model does not know, sorted: categories waiting for a retrain."""
    known = set(valid_labels(manifest))
    return sorted({label for label in labels_in_use if label not in known})


def check_label(manifest: Manifest, pending: Iterable[str], label: str, new_category: bool) -> LabelCheck:
    """Whether ``label`` may be written on a capture (CategoryError when not).

    The model's labels and the pending categories need nothing more; any other label needs
    ``new_category`` (the confirmation), a valid name, and room under ``MAX_CLASSES``.
    """
    known = valid_labels(manifest)
    waiting = sorted(set(pending))
    if label in known:
        return LabelCheck(label, "known")
    if label in waiting:
        return LabelCheck(label, "pending")
    if not new_category:
        also = f" or the pending new categories {waiting}" if waiting else ""
        raise CategoryError(
            "invalid_label",
            f"label {quoted(label)} is not one of the model's labels {known}{also}; "
            "to add it as a new category, send it again with new_category: true",
        )
    check_name(label)
    classes = len(manifest.class_names) + len(waiting)
    if classes + 1 > MAX_CLASSES:
        raise CategoryError(
            "too_many_categories",
            f"category {quoted(label)} would make {classes + 1} classes ({len(manifest.class_names)} of the model, "
            f"pending {waiting}); a model serves at most {MAX_CLASSES}: relabel or retire one first",
        )
    return LabelCheck(label, "new")
