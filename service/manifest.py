"""The model artifact contract: ``models/<name>/model.onnx`` + ``manifest.json``.

Training writes the manifest through these classes and the service reads it through them, so the two
sides cannot drift apart. The ONNX graph takes ``image`` uint8 [N, H, W, C] and returns ``distances``
float32 [N, k], ``score`` float32 [N] (higher = more anomalous) and ``nearest`` int64 [N].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


class InputSpec(BaseModel):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = Field(ge=1, le=3)


class Threshold(BaseModel):
    value: float
    rule: str = Field(description="how gamma was chosen, in words")
    normal_reject_rate: float = Field(description="share of held-out normal items scoring at or above gamma")


class Calibration(BaseModel):
    """Score -> probability-like value: p = 1 / (1 + exp(-(score - center) / scale)).

    ``center`` is gamma, so p >= 0.5 exactly when the verdict is anomalous; ``scale`` is set so that the
    median held-out normal item gets p = 0.05.
    """

    kind: str = "logistic"
    center: float
    scale: float = Field(gt=0)
    normal_score_quantiles: list[float] = Field(
        default_factory=list, description="held-out normal scores at 0, 5, ..., 100 percent"
    )

    def probability(self, score: float) -> float:
        z = (score - self.center) / self.scale
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


class TrainingData(BaseModel):
    source: str
    root: str
    normal_classes: list[str]
    anomaly_classes: list[str]
    counts: dict[str, dict[str, int]] = Field(description="split -> class -> number of images")
    sha256: str = Field(description="hash of the decoded training arrays and labels")


class TestMetrics(BaseModel):
    __test__ = False  # not a pytest class
    auc: float | None
    tpr_at_threshold: float | None = Field(description="share of anomalies flagged at gamma")
    fpr_at_threshold: float | None = Field(description="share of normal test items flagged at gamma")
    n_normal: int
    n_anomalous: int
    extra: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    method: str
    hyperparameters: dict[str, Any]
    class_names: list[str] = Field(description="one per column of the graph's distances output")
    input: InputSpec
    threshold: Threshold
    calibration: Calibration | None = None
    training_data: TrainingData
    test_metrics: TestMetrics
    model_sha256: str
    created_at: str
    command: str = ""

    @classmethod
    def load(cls, model_dir: str | Path) -> Manifest:
        return cls.model_validate_json((Path(model_dir) / MANIFEST_FILE).read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; an artifact is read by other users (containers)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(model_dir: str | Path, manifest: Manifest) -> None:
    payload = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    write_atomic(Path(model_dir) / MANIFEST_FILE, payload.encode())
