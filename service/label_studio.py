"""What the service and the exporter agree with Label Studio on: the labelling config, tasks, annotations.

One module for both sides: the ML backend routes (``service.routes.label_studio``) read tasks and
annotations that Label Studio sends, and the exporter (``flywheel.captures``) writes tasks and reads a
file export; both with the names here, so a task made by either is understood by the other. Standard
library only (no FastAPI), so the exporter uses it in the serve image.

The labelling config (docs/label-studio.xml for models/trashnet) has one image and one single choice
whose values are the served model's labels (its classes, then its anomaly label); ``labeling_config``
writes it from the manifest's label list, and ``config_choices`` reads a project's back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

LS_IMAGE = "image"  # <Image name="image" value="$image"/>
LS_CHOICES = "label"  # <Choices name="label" toName="image">


class LabelStudioError(ValueError):
    """A task, annotation or labelling config that the bin cannot read; the message says what is wrong."""


def labeling_config(labels: list[str]) -> str:
    """The labelling config the tasks and the importer assume: one image, one single choice per label."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return (
        "<View>\n"
        f'  <Image name="{LS_IMAGE}" value="${LS_IMAGE}"/>\n'
        f'  <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}" choice="single" showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


def config_choices(config: str) -> list[str]:
    """The choice values of a project's labelling config (the ``label`` choices on the ``image``)."""
    try:
        root = ElementTree.fromstring(config)
    except ElementTree.ParseError as exc:
        raise LabelStudioError(f"the labelling config is not XML: {exc}") from None
    if not any(node.get("name") == LS_IMAGE for node in root.iter("Image")):
        raise LabelStudioError(f'the labelling config has no <Image name="{LS_IMAGE}">')
    for node in root.iter("Choices"):
        if node.get("name") == LS_CHOICES and node.get("toName") == LS_IMAGE:
            return [choice.get("value", "") for choice in node.iter("Choice")]
    raise LabelStudioError(f'the labelling config has no <Choices name="{LS_CHOICES}" toName="{LS_IMAGE}">')


def task_capture_id(task: dict[str, Any]) -> str | None:
    """The capture a task is about: ``data.capture_id`` (tasks the exporter wrote), else the image file's
    stem in ``data.image`` (tasks Label Studio made itself from a Local Files storage on the capture folder)."""
    data = task.get("data")
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("capture_id"), str):
        return data["capture_id"]
    url = data.get(LS_IMAGE)
    if not isinstance(url, str) or not url:
        return None
    try:
        parsed = urlparse(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: no file name to read
        return None
    path = parse_qs(parsed.query).get("d", [parsed.path])[0]
    return Path(path).stem or None


def annotation_choice(annotation: dict[str, Any]) -> str | None:
    """The label one annotation gives, or None: cancelled (a skip), or no ``label`` choice in its result."""
    if annotation.get("was_cancelled"):
        return None
    results = annotation.get("result")
    for result in results if isinstance(results, list) else []:
        if not isinstance(result, dict) or result.get("from_name") != LS_CHOICES or result.get("type") != "choices":
            continue
        value = result.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], str):
            return choices[0]
        raise LabelStudioError(f"annotation {annotation.get('id')}: must hold exactly one choice, got {choices}")
    return None


def task_choice(task: dict[str, Any]) -> str | None:
    """The label of a task's newest annotation that gives one (a file export's task), or None."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    annotations.sort(key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
    for annotation in reversed(annotations):
        try:
            label = annotation_choice(annotation)
        except LabelStudioError as exc:
            raise LabelStudioError(f"task {task.get('id')}: {exc}") from None
        if label is not None:
            return label
    return None


def choice_result(label: str) -> list[dict[str, Any]]:
    """A prediction's (or annotation's) ``result``: ``label`` chosen for the image."""
    return [{"from_name": LS_CHOICES, "to_name": LS_IMAGE, "type": "choices", "value": {"choices": [label]}}]
