"""A capture store made from real TrashNet photos, written in the service's capture format.

Each capture is the photo's bytes plus a sidecar holding what the model really answered for it (the
photo is scored with the model under test through ONNX Runtime), so exports, Label Studio tasks and
promotion audits in the tests work on the same files a running bin would leave behind.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

from service.imaging import load_image
from service.model import LoadedModel, load_model
from service.settings import Settings


def open_model(model_dir: Path) -> LoadedModel:
    return load_model(model_dir, Settings(threshold=None, providers=["CPUExecutionProvider"], intra_op_threads=1))


def _write(path: Path, data: bytes) -> None:
    """The contract's write: ``.<name>.tmp`` in the same folder, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_capture(
    root: Path,
    model: LoadedModel,
    photo: Path,
    *,
    capture_id: str | None = None,
    when: dt.datetime | None = None,
    label: str | None = None,
    reason: str | None = None,
) -> dict:
    """Score ``photo`` with ``model`` and store it as one capture; returns the sidecar."""
    capture_id = capture_id or uuid.uuid4().hex
    when = when or dt.datetime.now(dt.timezone.utc)
    data = photo.read_bytes()
    height, width, channels = model.input_shape
    scores = model.run(load_image(data, height, width, channels)[None])
    names = model.manifest.class_names
    score = float(scores.score[0])
    verdict = "anomalous" if score >= model.threshold else "normal"
    ext = photo.suffix.lower().lstrip(".") or "bin"
    ext = "jpg" if ext == "jpeg" else ext
    day = root / when.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    manifest = model.manifest
    sidecar = {
        "id": capture_id,
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "image": f"{capture_id}.{ext}",
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "image_bytes": len(data),
        "content_type": "image/jpeg" if ext == "jpg" else f"image/{ext}",
        "model": {"name": manifest.name, "version": manifest.version, "sha256": manifest.model_sha256},
        "score": score,
        "threshold": model.threshold,
        "verdict": verdict,
        "nearest_class": names[int(scores.nearest[0])],
        "distances": dict(zip(names, np.asarray(scores.distances[0], dtype=float).tolist(), strict=True)),
        "reason": reason or ("anomalous" if verdict == "anomalous" else "sampled"),
        "label": label,
        "labelled_at": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if label else None,
        "label_source": "feedback" if label else None,
    }
    _write(day / sidecar["image"], data)
    _write(day / f"{capture_id}.json", (json.dumps(sidecar, indent=2) + "\n").encode())
    return sidecar


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes (for byte-identical comparisons)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
