"""Export a Scorer to the artifact contract (model.onnx + manifest.json) and check ORT against torch."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.fileio import sha256_file, write_atomic
from service.manifest import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAMES,
    BackboneSpec,
    Calibration,
    Manifest,
    TestMetrics,
    Threshold,
    TrainingData,
    TrainingLog,
    write_manifest,
)
from training.data import Task
from training.evaluation.dempster_shafer import combined_anomaly_probability
from training.golden import golden_for
from training.memorisation import distance_gap
from training.metrics import calibrate, choose_threshold, rates_at, roc_auc
from training.routing import routing_metrics
from training.scorer import BaseScorer

OPSET = 17


def export_onnx(scorer: BaseScorer, path: Path) -> None:
    """One graph: uint8 NHWC in; cast, standardisation, all encoders, distances, min and argmin inside."""
    height, width, channels = scorer.input_shape
    example = torch.zeros(2, height, width, channels, dtype=torch.uint8)
    buffer = io.BytesIO()
    scorer = scorer.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            scorer,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *OUTPUT_NAMES]},
            opset_version=OPSET,
            dynamo=False,
        )
    write_atomic(path, buffer.getvalue())


def backbone_spec(scorer: BaseScorer) -> BackboneSpec | None:
    backbone = getattr(scorer.encoder, "backbone", None)
    if backbone is None:
        return None
    return BackboneSpec(name=backbone.name, weights_sha256=backbone.weights_sha256, tune_blocks=backbone.tune_blocks)


@dataclass
class Parity:
    max_abs_distance: float
    max_abs_score: float
    nearest_agreement: float
    n_images: int


def check_parity(scorer: BaseScorer, onnx_path: Path, images: np.ndarray) -> Parity:
    """ONNX Runtime vs torch (CPU, eval mode) on the same uint8 images."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    distances, score, nearest = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    with torch.no_grad():
        t_distances, t_score, t_nearest = scorer.cpu().eval()(torch.from_numpy(images))
    return Parity(
        max_abs_distance=float(np.abs(distances - t_distances.numpy()).max()),
        max_abs_score=float(np.abs(score - t_score.numpy()).max()),
        nearest_agreement=float((nearest == t_nearest.numpy()).mean()),
        n_images=len(images),
    )


@dataclass
class Evaluation:
    threshold: Threshold
    calibration: Calibration
    metrics: TestMetrics
    detector_calibrations: list[Calibration] = field(default_factory=list)
    test_scores: np.ndarray | None = None
    test_distances: np.ndarray | None = None


def evaluate(scorer: BaseScorer, task: Task, reject_rate: float) -> Evaluation:
    """gamma and calibration from validation normals only; AUC, rates and routing on the test split;
    the memorisation gap on training and validation photos.

    With several detector columns, each column is also calibrated on its own class's validation items
    (P_i({i}|x)), and Algorithm 1's Dempster-Shafer combination P(Lambda|x) gets its own AUC.
    """
    val_distances, val_scores = scorer.score_arrays(task.val.images)
    threshold = choose_threshold(val_scores, reject_rate)
    test_distances, test_scores = scorer.score_arrays(task.test.images)
    auc = roc_auc(test_scores, task.test_anomalous)
    tpr, fpr = rates_at(test_scores, task.test_anomalous, threshold.value)
    extra = {"test_score_std": float(np.std(test_scores)), "outlier_exposure": task.outlier_exposure}
    if task.selection is not None:
        # Validation normals against the held-out selection anomalies: what settings are chosen on.
        _, selection_scores = scorer.score_arrays(task.selection.images)
        extra["selection_auc"] = roc_auc(
            np.concatenate([val_scores, selection_scores]),
            np.concatenate([np.zeros(len(val_scores), bool), np.ones(len(selection_scores), bool)]),
        )
    train_distances, _ = scorer.score_arrays(task.train.images)
    gap = distance_gap(train_distances, task.train.labels, val_distances, task.val.labels, task.column_names)
    normal = ~task.test_anomalous
    routing = None
    detectors = []
    if test_distances.shape[1] > 1:
        routing = routing_metrics(test_distances[normal], task.test.labels[normal], task.column_names)
        # Routing on the validation photos: what routing levers are chosen on (the test split is for the table).
        extra["validation_routing"] = routing_metrics(val_distances, task.val.labels, task.column_names).accuracy
        for column in range(test_distances.shape[1]):
            own = val_distances[task.val.labels == column, column]
            detectors.append(calibrate(own, choose_threshold(own, reject_rate).value))
        combined = combined_anomaly_probability(test_distances, detectors)
        extra["auc_dempster_shafer"] = roc_auc(combined, task.test_anomalous)
    metrics = TestMetrics(
        auc=auc,
        tpr_at_threshold=tpr,
        fpr_at_threshold=fpr,
        n_normal=int((~task.test_anomalous).sum()),
        n_anomalous=int(task.test_anomalous.sum()),
        routing=routing,
        distance_gap=gap,
        extra=extra,
    )
    return Evaluation(
        threshold, calibrate(val_scores, threshold.value), metrics, detectors, test_scores, test_distances
    )


def write_artifact(
    out: Path,
    scorer: BaseScorer,
    task: Task,
    evaluation: Evaluation,
    *,
    name: str,
    version: str,
    method: str,
    hyperparameters: dict,
    command: str,
    training_log: TrainingLog | None = None,
) -> Manifest:
    """model.onnx first, then the manifest naming its sha256: a reader never pairs a manifest with another graph."""
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    export_onnx(scorer, model_path)
    height, width, channels = scorer.input_shape
    manifest = Manifest(
        name=name,
        version=version,
        method=method,
        hyperparameters=hyperparameters,
        class_names=task.column_names,
        input={"height": height, "width": width, "channels": channels},
        backbone=backbone_spec(scorer),
        threshold=evaluation.threshold,
        calibration=evaluation.calibration,
        training_data=TrainingData(
            source=task.dataset.name,
            normal_classes=task.normal_classes,
            anomaly_classes=task.anomaly_classes,
            counts=task.counts(),
            sha256=task.content_sha256(),
        ),
        test_metrics=evaluation.metrics,
        model_sha256=sha256_file(model_path),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        detector_calibration=evaluation.detector_calibrations,
        training_log=training_log,
        golden=golden_for(model_path, (height, width, channels)),
    )
    write_manifest(out, manifest)
    return manifest
