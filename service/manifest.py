"""The model artifact contract: ``models/<name>/model.onnx`` + ``manifest.json``.

Training writes the artifact through these names and classes and the service reads it through them,
so the two sides cannot drift apart. The ONNX graph takes ``image`` uint8 [N, H, W, C] and returns
``distances`` float32 [N, k], ``score`` float32 [N] (higher = more anomalous) and ``nearest`` int64 [N].
Every manifest field is typed; manifests written before a field was typed or dropped still load.
This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.fileio import sha256_file, write_atomic

__all__ = ["sha256_file"]  # the service checks an artifact's hash through the contract module

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
INPUT_NAME = "image"  # uint8 [N, H, W, C]
OUTPUT_NAMES = ("distances", "score", "nearest")  # float32 [N, k], float32 [N], int64 [N]


class InputSpec(BaseModel):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = Field(ge=1, le=3)


BACKBONE_FILE = "backbone.pt"  # beside the graph when its backbone weights are not the weight package's


class BackboneSpec(BaseModel):
    """The pretrained network inside the graph (absent for the from-scratch encoders): which one, from
    which weights (their file's sha256), and how many of its last blocks were fine-tuned."""

    name: str
    weights_sha256: str = Field(description="the weights training started from: ImageNet's file, or a backbone.pt")
    tune_blocks: int = Field(ge=0)
    tuned_weights_sha256: str | None = Field(
        default=None,
        description=f"sha256 of {BACKBONE_FILE} beside the graph: the backbone weights inside it, when they are "
        "not the weight package's (fine-tuned); a retrain of the heads starts from that file. null: ImageNet's",
    )


SCORE_RULE_DESCRIPTIONS = {
    "min_distance": "distance to the nearest normal class's centre",
    "min_distance_minus_anomaly_centres": "distance to the nearest normal class's centre minus the distance to "
    "the nearest centre of labelled anomalies (negative: nearer a recyclable than any kind of trash)",
}


class ScoreSpec(BaseModel):
    """How the graph's score output is made from distances (the graph computes it; this says which rule)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["min_distance", "min_distance_minus_anomaly_centres"] = "min_distance"
    anomaly_centres: int = Field(default=0, ge=0, description="centres of labelled anomalies inside the graph")

    @property
    def description(self) -> str:
        return SCORE_RULE_DESCRIPTIONS[self.rule]


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
    """The data's identity (source name, classes, counts, content hash), never a path on the training machine."""

    model_config = ConfigDict(extra="forbid")

    source: str
    normal_classes: list[str]
    anomaly_classes: list[str]
    counts: dict[str, dict[str, int]] = Field(description="split -> class -> number of images")
    sha256: str = Field(description="hash of the decoded training arrays and labels")

    @model_validator(mode="before")
    @classmethod
    def _drop_machine_path(cls, data: Any) -> Any:
        """Manifests before format 1's data identity recorded the data folder (``root``): not kept."""
        return _without(data, "root")


class Routing(BaseModel):
    """Where the bin sends good test items: the nearest class against the true one (normal items only)."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float = Field(description="share of normal test items whose nearest class is their own")
    per_class: dict[str, float] = Field(description="true class -> its items' routing accuracy")
    confusion: dict[str, dict[str, int]] = Field(description="true class -> nearest class -> number of items")
    n_items: int


class ClassDistances(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_median: float
    val_median: float


class DistanceGap(BaseModel):
    """The memorisation symptom, read on training and validation photos (not on test): the median
    own-class distance of validation photos minus, and over, that of training photos."""

    model_config = ConfigDict(extra="forbid")

    train_median: float
    val_median: float
    gap: float = Field(description="val_median - train_median")
    ratio: float | None = Field(description="val_median / train_median (free of the embedding's scale)")
    per_class: dict[str, ClassDistances] = Field(default_factory=dict)


class TestMetrics(BaseModel):
    __test__ = False  # not a pytest class
    auc: float | None
    tpr_at_threshold: float | None = Field(description="share of anomalies flagged at gamma")
    fpr_at_threshold: float | None = Field(description="share of normal test items flagged at gamma")
    n_normal: int
    n_anomalous: int
    routing: Routing | None = Field(default=None, description="nearest-class accuracy; absent for one column")
    distance_gap: DistanceGap | None = Field(default=None, description="train vs validation own-class distance")
    extra: dict[str, Any] = Field(default_factory=dict)


class EpochScores(BaseModel):
    """One encoder epoch scored on held-out photos in eval mode (training photos only for the probe)."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=1)
    val_loss: float = Field(description="the method's loss on the validation photos (normal only)")
    selection_auc: float | None = Field(default=None, description="validation normals vs selection anomalies")
    train_median: float = Field(description="median own-class distance of a fixed probe of training photos")
    val_median: float = Field(description="median own-class distance of the validation photos")
    gap: float
    ratio: float | None


class EpochChoice(BaseModel):
    """Which encoder epoch was exported instead of the last one, and the per-epoch record it was chosen on."""

    model_config = ConfigDict(extra="forbid")

    criterion: str
    epoch: int = Field(ge=1)
    value: float
    history: list[EpochScores]


class TrainingLog(BaseModel):
    """Per-epoch losses by name (``autoencoder_mse`` or ``rotation_loss``, ``encoder_loss``, DROCC's
    ``ce_loss`` and ``adversarial_loss``), the measured training speed, the epoch choice with its held-out
    record (when not the last epoch), and an ensemble's members' logs."""

    model_config = ConfigDict(extra="forbid")

    losses: dict[str, list[float]] = Field(default_factory=dict)
    images_per_second: dict[str, float] = Field(default_factory=dict)
    epoch_choice: EpochChoice | None = None
    members: list[TrainingLog] = Field(default_factory=list)

    def append(self, means: dict[str, float]) -> None:
        """One epoch's mean losses, by name."""
        for name, value in means.items():
            self.losses.setdefault(name, []).append(value)

    @model_validator(mode="before")
    @classmethod
    def _flat_losses(cls, data: Any) -> Any:
        """Older manifests and checkpoints kept each loss list at the top level (and an empty epoch choice
        where the last epoch was exported)."""
        if not isinstance(data, dict):
            return data
        if data.get("epoch_choice") == {}:
            data = _without(data, "epoch_choice")
        known = {"losses", "images_per_second", "epoch_choice", "members"}
        losses = {k: v for k, v in data.items() if k not in known}
        return {**{k: v for k, v in data.items() if k in known}, "losses": {**data.get("losses", {}), **losses}}


class GoldenScores(BaseModel):
    """The graph's outputs on seeded reference inputs (``service.golden``), made where the artifact was
    written; the service recomputes them on load and refuses the artifact beyond the tolerance."""

    model_config = ConfigDict(extra="forbid")

    seed: str
    count: int = Field(gt=0)
    score: list[float]
    nearest: list[int]
    distances: list[list[float]]
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)
    made_on: str = Field(description="provider and CPU kind the values were computed on")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    name: str
    version: str
    method: str
    hyperparameters: dict[str, Any]
    class_names: list[str] = Field(description="one per column of the graph's distances output")
    input: InputSpec
    backbone: BackboneSpec | None = None
    score: ScoreSpec = Field(default_factory=ScoreSpec, description="the score rule (absent before round 4: min)")
    threshold: Threshold
    calibration: Calibration | None = None
    training_data: TrainingData
    test_metrics: TestMetrics
    model_sha256: str
    created_at: str
    command: str = ""
    detector_calibration: list[Calibration] = Field(
        default_factory=list, description="per detector column: P_i({i}|x) for the Dempster-Shafer combination"
    )
    training_log: TrainingLog | None = None
    golden: GoldenScores | None = Field(default=None, description="absent in artifacts made before golden scores")

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        """``method_description`` (older manifests) is the method's description, derived from ``method``."""
        return _without(data, "method_description")

    @classmethod
    def load(cls, model_dir: str | Path) -> Manifest:
        return cls.model_validate_json((Path(model_dir) / MANIFEST_FILE).read_text())


def _without(data: Any, key: str) -> Any:
    """``data`` without ``key`` when it is a dict (what a before-validator gets), else unchanged."""
    return {k: v for k, v in data.items() if k != key} if isinstance(data, dict) else data


def write_manifest(model_dir: str | Path, manifest: Manifest) -> None:
    payload = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    write_atomic(Path(model_dir) / MANIFEST_FILE, payload.encode())
