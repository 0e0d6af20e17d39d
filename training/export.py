"""Export a Scorer to the artifact contract (model.onnx + manifest.json) and check ORT against torch.

The numbers the manifest records (gamma, calibration, test metrics) come from ``training.measure``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.fileio import sha256_file, write_atomic
from service.manifest import (
    BACKBONE_FILE,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAMES,
    BackboneSpec,
    Manifest,
    ScoreSpec,
    TrainingData,
    TrainingLog,
    write_manifest,
)
from training.data import Task
from training.features import reference_outputs
from training.golden import golden_for
from training.measure import Measurement
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


def write_backbone(scorer: BaseScorer, out: Path) -> BackboneSpec | None:
    """The manifest's backbone entry; a backbone whose weights are not the weight package's (fine-tuned
    here, or read from a fine-tuned model's file) is also written beside the graph, so the flywheel can
    retrain heads on it without the graph."""
    backbone = getattr(scorer.encoder, "backbone", None)
    if backbone is None:
        return None
    tuned_sha256 = None
    if backbone.trains or not backbone.packaged:
        buffer = io.BytesIO()
        torch.save(backbone.state_for_file(), buffer)
        write_atomic(out / BACKBONE_FILE, buffer.getvalue())
        tuned_sha256 = sha256_file(out / BACKBONE_FILE)
    return BackboneSpec(
        name=backbone.name,
        weights_sha256=backbone.weights_sha256,
        tune_blocks=backbone.tune_blocks,
        tuned_weights_sha256=tuned_sha256,
    )


@dataclass
class Parity:
    max_abs_distance: float
    max_abs_score: float
    nearest_agreement: float
    n_images: int


def check_parity(scorer: BaseScorer, onnx_path: Path, images: np.ndarray) -> Parity:
    """ONNX Runtime vs torch (CPU, eval mode) on the same uint8 images; torch's frozen backbone features come
    from the cache (``features.reference_outputs``), so the graph is checked against what training computed."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    distances, score, nearest = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    t_distances, t_score, t_nearest = reference_outputs(scorer.cpu(), images)
    return Parity(
        max_abs_distance=float(np.abs(distances - t_distances).max()),
        max_abs_score=float(np.abs(score - t_score).max()),
        nearest_agreement=float((nearest == t_nearest).mean()),
        n_images=len(images),
    )


def write_artifact(
    out: Path,
    scorer: BaseScorer,
    task: Task,
    measured: Measurement,
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
        backbone=write_backbone(scorer, out),
        score=ScoreSpec(rule=scorer.score_rule, anomaly_centres=scorer.anomaly_centres),
        threshold=measured.threshold,
        calibration=measured.calibration,
        training_data=TrainingData(
            source=task.dataset.name,
            normal_classes=task.normal_classes,
            anomaly_classes=task.anomaly_classes,
            counts=task.counts(),
            sha256=task.content_sha256(),
        ),
        test_metrics=measured.metrics,
        model_sha256=sha256_file(model_path),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command,
        detector_calibration=measured.detector_calibrations,
        training_log=training_log,
        golden=golden_for(model_path, (height, width, channels)),
    )
    write_manifest(out, manifest)
    return manifest
