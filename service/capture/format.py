"""The capture format (docs/capture-format.md): the on-disk layout, the id rule, the typed sidecar, read and write.

One module for both sides of the flywheel: the service's store (``service.capture.store``) writes, labels
and lists captures with it, and the exporter (``flywheel.captures``) reads them and writes Label Studio
labels back with it (under its published name ``service.capture_format``), so a change to the format is
made once and tests/test_capture_format.py fails when the two sides drift. Torch-free (pydantic, Pillow),
so the serve image carries it.

Layout: ``<root>/<YYYY-MM-DD>/<id>.<ext>`` (the upload's bytes, unchanged) plus ``<id>.json`` (the
sidecar) in the folder named by the UTC day of the sidecar's ``time``. Only folders named like a day
count, files starting with ``.`` are temporary files, and a capture exists iff its sidecar exists and
names itself (its ``id`` is the file's stem).
"""

from __future__ import annotations

import datetime as dt
import io
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.fileio import write_atomic

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SIDECAR_SUFFIX = ".json"
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "bin": "application/octet-stream",
}
Verdict = Literal["normal", "anomalous", "no_item"]  # no_item: the service's check found no item (service/no_item.py)
Reason = Literal["anomalous", "uncertain", "sampled"]


def new_id() -> str:
    return uuid.uuid4().hex


def valid_id(value: str | None) -> bool:
    return bool(value) and ID_PATTERN.fullmatch(value) is not None


def utc_timestamp(moment: dt.datetime | None = None) -> str:
    """``2026-11-29T01:23:45.123456Z`` (now by default): UTC, microseconds, sorts as text."""
    moment = moment or dt.datetime.now(dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def image_extension(data: bytes) -> str:
    """The file extension of the image format in ``data`` (header only), ``bin`` if unknown."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return IMAGE_EXTENSIONS.get(image.format or "", "bin")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return "bin"


class CaptureModel(BaseModel):
    name: str
    version: str
    sha256: str


class Sidecar(BaseModel):
    """The JSON beside each captured image (unknown fields are kept when a label is written)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    id: str = Field(pattern=ID_PATTERN.pattern)
    time: str = Field(description="UTC ISO 8601 time of the classification")
    image: str = Field(description="file name of the image in the same folder")
    image_sha256: str
    image_bytes: int
    content_type: str | None
    model: CaptureModel
    score: float
    threshold: float
    verdict: Verdict
    nearest_class: str
    distances: dict[str, float]
    reason: Reason
    label: str | None = None
    labelled_at: str | None = None
    label_source: str | None = None

    @property
    def margin(self) -> float:
        """|score - threshold|: how close the model was to the other verdict (small = uncertain)."""
        return abs(self.score - self.threshold)

    def with_label(self, label: str, source: str) -> Sidecar:
        """A copy labelled now by ``source`` (``feedback``, ``label-studio``), other fields as they were."""
        return self.model_copy(update={"label": label, "labelled_at": utc_timestamp(), "label_source": source})

    def to_bytes(self) -> bytes:
        """Indented UTF-8 JSON by pydantic's serializer (a sixth of ``json.dumps(indent=2)``'s cost, which
        the capture writer pays per photo); the same values, small floats written without an exponent."""
        return (self.model_dump_json(indent=2) + "\n").encode("utf-8")


class SidecarError(ValueError):
    """A file where a sidecar should be that is not one (not JSON, a field missing, an id not its name)."""


def day_folder(root: Path, time: str) -> Path:
    """Where a capture classified at ``time`` (a sidecar's ``time``) lies."""
    return root / time[:10]


def sidecar_path(folder: Path, capture_id: str) -> Path:
    return folder / f"{capture_id}{SIDECAR_SUFFIX}"


def day_folders(root: Path) -> list[Path]:
    """The folders of ``root`` that hold captures, oldest day first (others, e.g. ``lost+found``, do not)."""
    return sorted(path for path in root.iterdir() if path.is_dir() and DAY_FOLDER.fullmatch(path.name))


def sidecar_paths(root: Path) -> Iterator[Path]:
    """Every sidecar under ``root`` in (day, id) order, temporary files left out."""
    for folder in day_folders(root):
        for path in sorted(folder.iterdir()):
            if path.name.endswith(SIDECAR_SUFFIX) and not path.name.startswith("."):
                yield path


def read_sidecar(path: Path) -> Sidecar:
    """The sidecar at ``path``; FileNotFoundError when it is gone, SidecarError when it is not a sidecar."""
    try:
        sidecar = Sidecar.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "JSON"
        raise SidecarError(f"{path}: not a capture sidecar ({where}: {error['msg']})") from None
    if path.name != f"{sidecar.id}{SIDECAR_SUFFIX}":
        raise SidecarError(f"{path}: its id {sidecar.id!r} does not name the file")
    return sidecar


def write_sidecar(path: Path, sidecar: Sidecar) -> bytes:
    """Replace one sidecar atomically, folder fsynced (a label); returns the bytes written."""
    payload = sidecar.to_bytes()
    write_atomic(path, payload, sync_folder=True)
    return payload
