"""INT8 static quantization of a shipped artifact, scored on its own test split before it may ship.

    .venv/bin/python -m bench.quantize                                   # models/trashnet -> models/trashnet-int8
    .venv/bin/python -m bench.quantize --calibration 256 --max-auc-drop 0.005 --out runs/int8

ONNX Runtime's quantization tool (``quant_pre_process``, then ``quantize_static`` in QDQ format: int8
weights per channel, uint8 activations) with a ``CalibrationDataReader`` over TrashNet training photos
(recyclables only, a seeded sample spread over the classes), decoded by the service's image function
(training's folder source reads every photo through it). The test split is rebuilt exactly as the
manifest's training run made it (``training.data.make_task`` with its seed, anomaly holdout and outlier
exposure), and the rebuild is checked against the manifest's training-data hash.

Both graphs score the validation and test splits. Reported: test AUC (recyclables vs trash), routing
accuracy (the nearest class on test recyclables), the largest score difference, and each graph's CPU
cost per image at batch 1 and 16 (one intra-op thread). The INT8 artifact is written (model.onnx +
manifest.json, atomically; γ and its calibration re-chosen on the INT8 validation scores by the same
rule as training) only when its test AUC is at most ``--max-auc-drop`` below the FP32 graph's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from service.manifest import MODEL_FILE, Manifest, TestMetrics, sha256_file, write_atomic, write_manifest
from training.data import load_dataset, make_task
from training.errors import UserError
from training.metrics import calibrate, choose_threshold, rates_at, roc_auc

REPO_ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32


class PhotoReader(CalibrationDataReader):
    """Feeds uint8 [n, H, W, C] batches of training photos to the calibrator, then None."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}


def calibration_sample(images: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """``count`` recyclable training photos, the same share of every class, fixed seed."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    classes = np.unique(labels[labels >= 0])
    per_class = max(1, count // len(classes))
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return images[np.sort(np.concatenate(picked))]


def score(session: ort.InferenceSession, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, nearest) for every image, in batches of 256."""
    scores, nearest = [], []
    for i in range(0, len(images), 256):
        _, s, n = session.run(["distances", "score", "nearest"], {"image": images[i : i + 256]})
        scores.append(s)
        nearest.append(n)
    return np.concatenate(scores), np.concatenate(nearest)


def cpu_ms_per_image(session: ort.InferenceSession, image: np.ndarray, batch: int, calls: int) -> float:
    stacked = np.repeat(image[None], batch, axis=0)
    session.run(None, {"image": stacked})
    times = []
    for _ in range(calls):
        start = time.process_time()
        session.run(None, {"image": stacked})
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3 / batch


def single_thread_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def rebuild_task(manifest: Manifest, data: Path | None):
    """The manifest's own TrashNet split, checked against its training-data hash (else its test split is
    not the one the model was scored on). Raises ``ValueError`` with the reason."""
    source = manifest.training_data.source
    if source != "trashnet":
        raise ValueError(f"calibration photos are TrashNet photos; the model is from {source}")
    params = manifest.hyperparameters
    task = make_task(
        load_dataset("trashnet", data),
        manifest.training_data.normal_classes,
        max_train_per_class=params.get("max_train_per_class"),
        seed=params.get("seed", 0),
        anomaly_holdout=params.get("anomaly_holdout", 0.0),
        outlier_exposure=params.get("outlier_exposure", False),
    )
    if task.content_sha256() != manifest.training_data.sha256:
        raise ValueError(
            "the rebuilt TrashNet split does not match the manifest's training-data hash; "
            "the test split would not be the one the model was scored on"
        )
    return task


def quantize(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """ONNX Runtime's static QDQ quantization, per channel, calibrated on ``calibration`` photos."""
    prepared = int8_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(
        str(prepared),
        str(int8_path),
        PhotoReader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def measure(path: Path, task) -> dict:
    """Test AUC and routing, validation scores (for γ) and CPU cost of one graph on the task."""
    session = single_thread_session(path)
    test_normal = ~task.test_anomalous
    test_scores, test_nearest = score(session, task.test.images)
    val_scores, _ = score(session, task.val.images)
    return {
        "auc": roc_auc(test_scores, task.test_anomalous),
        "routing": float(np.mean(test_nearest[test_normal] == task.test.labels[test_normal])),
        "scores": test_scores,
        "val_scores": val_scores,
        "b1": cpu_ms_per_image(session, task.test.images[0], 1, 200),
        "b16": cpu_ms_per_image(session, task.test.images[0], 16, 30),
    }


def print_comparison(manifest: Manifest, task, fp32: dict, int8: dict, n_calibration: int) -> None:
    print(
        f"test split: {int((~task.test_anomalous).sum())} recyclables, {int(task.test_anomalous.sum())} trash; "
        f"calibration: {n_calibration} training photos"
    )
    print(f"{'graph':<5} | {'test AUC':>8} | {'routing acc':>11} | {'CPU ms/img b1':>13} | {'b16':>6}")
    for label, r in (("fp32", fp32), ("int8", int8)):
        print(f"{label:<5} | {r['auc']:8.4f} | {r['routing']:11.4f} | {r['b1']:13.3f} | {r['b16']:6.3f}")
    print(
        f"AUC change {int8['auc'] - fp32['auc']:+.4f}, routing change {int8['routing'] - fp32['routing']:+.4f}, "
        f"largest |score difference| {float(np.max(np.abs(fp32['scores'] - int8['scores']))):.3f}, "
        f"manifest's FP32 test AUC {manifest.test_metrics.auc:.4f}"
    )


def ship(out: Path, manifest: Manifest, task, int8_path: Path, fp32: dict, int8: dict, n_calibration: int) -> float:
    """Write the INT8 artifact (graph first, manifest last); γ re-chosen on its own validation scores."""
    params = manifest.hyperparameters
    threshold = choose_threshold(int8["val_scores"], params.get("reject_rate", 0.05))
    tpr, fpr = rates_at(int8["scores"], task.test_anomalous, threshold.value)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MODEL_FILE, int8_path.read_bytes())
    shipped = manifest.model_copy(
        update={
            "version": f"{manifest.version}+int8",
            "threshold": threshold,
            "calibration": calibrate(int8["val_scores"], threshold.value),
            "detector_calibration": [],  # fitted on FP32 per-detector distances; not re-fitted here
            "test_metrics": TestMetrics(
                auc=int8["auc"],
                tpr_at_threshold=tpr,
                fpr_at_threshold=fpr,
                n_normal=int((~task.test_anomalous).sum()),
                n_anomalous=int(task.test_anomalous.sum()),
                extra={
                    "quantized_from": f"{manifest.name} {manifest.version} ({manifest.model_sha256})",
                    "fp32_test_auc": fp32["auc"],
                    "routing_accuracy": int8["routing"],
                    "fp32_routing_accuracy": fp32["routing"],
                    "calibration_photos": n_calibration,
                },
            ),
            "model_sha256": sha256_file(out / MODEL_FILE),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    write_manifest(out, shipped)
    return threshold.value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "trashnet-int8")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--calibration", type=int, default=256, help="training photos for calibration")
    parser.add_argument("--max-auc-drop", type=float, default=0.005, help="ship only if test AUC drops at most this")
    args = parser.parse_args(argv)

    try:
        manifest = Manifest.load(args.model_dir)
    except (OSError, ValueError) as exc:
        print(f"error: no readable manifest in {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    try:
        task = rebuild_task(manifest, args.data)
    except (ValueError, UserError) as exc:
        print(f"error: {args.model_dir}: {exc}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="deepmad-int8-") as tmp:
        fp32_path, int8_path = args.model_dir / MODEL_FILE, Path(tmp) / MODEL_FILE
        calibration = calibration_sample(task.train.images, task.train.labels, args.calibration)
        quantize(fp32_path, int8_path, calibration)
        fp32, int8 = measure(fp32_path, task), measure(int8_path, task)
        print_comparison(manifest, task, fp32, int8, len(calibration))
        drop = fp32["auc"] - int8["auc"]
        if drop > args.max_auc_drop:
            print(f"not shipped: the test AUC drops {drop:.4f} > {args.max_auc_drop}")
            return 0
        command = "python -m bench.quantize " + " ".join(argv if argv is not None else sys.argv[1:])
        shipped = manifest.model_copy(update={"command": command})
        gamma = ship(args.out, shipped, task, int8_path, fp32, int8, len(calibration))
        print(f"shipped {args.out} (γ {gamma:.4f} re-chosen on INT8 validation scores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
