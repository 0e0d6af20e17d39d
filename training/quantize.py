"""INT8 static quantization of a shipped artifact into a second artifact that holds on every x86 CPU.

    python -m training.quantize --model models/trashnet --out models/trashnet-int8
    python -m training.quantize --model models/trashnet --out runs/int8 --calibration 128 --max-auc-drop 0.01
    python -m training.quantize --method nncf --model models/trashnet-lite0 --out runs/lite0-int8

ONNX Runtime's quantization tool (``quant_pre_process``, then ``quantize_static`` in QDQ format, uint8
activations, int8 weights per channel with ``reduce_range=True``: 7-bit weights) calibrated on TrashNet
training photos (recyclables, a seeded sample spread over the classes) read through the service's image
function. Why 7-bit weights: on x86 CPUs with AVX2 but no VNNI, ORT's U8S8 kernels add pairs of
u8 x s8 products in 16 bits with saturation (255 * 127 * 2 > 32767); the full-range graph made on a VNNI
CPU ranked test photos with correlation 0.65 to FP32 there and lost 0.10 AUC, while 7-bit weights
(255 * 64 * 2 < 32767) cannot saturate. S8S8 does not help: ORT on x86 shifts int8 activations to
uint8 and runs the same kernels (same outputs, measured; see docs/performance.md).

``--method nncf`` makes the graph with NNCF's post-training quantization instead (``nncf_quantize_graph``:
QDQ, its performance preset, overflow fix on every layer, i.e. 7-bit weights as above), the INT8 path
of OpenVINO; bench.engines compares both quantizers on both engines and CPU kinds (docs/performance.md).

The test split is rebuilt as the manifest's training run made it and checked against its training-data
hash. gamma and its calibration are re-chosen on the INT8 graph's validation scores with training's own
rule (``choose_gamma``); the artifact is written (graph first, manifest with its sha256 and golden
scores last, each atomically) only when the INT8 test AUC is at most ``--max-auc-drop`` below FP32's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from flywheel.metrics import calibrate, choose_gamma, rates_at, roc_auc
from service.fileio import sha256_file, write_atomic
from service.manifest import MODEL_FILE, Manifest, TestMetrics, write_manifest
from training.data import load_dataset, make_task
from training.errors import UserError, require_writable, run_command
from training.golden import golden_for, verified_manifest
from training.routing import routing_metrics

CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32
# ORT's documented choice for x86 CPUs without VNNI, which also holds on VNNI CPUs (measured).
QUANTIZATION = {
    "quant_format": QuantFormat.QDQ,
    "per_channel": True,
    "activation_type": QuantType.QUInt8,
    "weight_type": QuantType.QInt8,
    "reduce_range": True,
}
SETTINGS_TEXT = "QDQ, uint8 activations, int8 per-channel weights, reduce_range=True (7-bit weights)"
# --method: the graph maker and what the manifest says about it.
METHODS = {
    "ort": SETTINGS_TEXT,  # ONNX Runtime quantize_static (the text the shipped INT8 manifest carries)
    "nncf": "NNCF post-training quantization: QDQ, performance preset, overflow fix on every layer (7-bit weights)",
}


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


def rebuild_task(manifest: Manifest, data: Path | None):
    """The manifest's own TrashNet split, checked against its training-data hash (else its test split is
    not the one the model was scored on)."""
    source = manifest.training_data.source
    if source != "trashnet":
        raise UserError(f"calibration photos are TrashNet photos; the model is from {source}")
    params = manifest.hyperparameters
    task = make_task(
        load_dataset("trashnet", data, manifest.input.height),
        manifest.training_data.normal_classes,
        max_train_per_class=params.get("max_train_per_class"),
        seed=params.get("seed", 0),
        anomaly_holdout=params.get("anomaly_holdout", 0.0),
        outlier_exposure=params.get("outlier_exposure", False),
    )
    if task.content_sha256() != manifest.training_data.sha256:
        raise UserError(
            "the rebuilt TrashNet split does not match the manifest's training-data hash; "
            "the test split would not be the one the model was scored on"
        )
    return task


def quantize_graph(fp32_path: Path, int8_path: Path, calibration: np.ndarray, settings: dict = QUANTIZATION) -> None:
    """ORT's pre-processing (shape inference, folded batch norms), then static quantization with
    ``settings``, calibrated on ``calibration`` photos."""
    prepared = int8_path.with_name("prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_prepared(prepared, int8_path, calibration, settings)


def nncf_quantize_graph(fp32_path: Path, int8_path: Path, calibration: np.ndarray, *, overflow_fix: str = "enable",
                        preset: str = "performance", ignored: str | None = None) -> None:  # fmt: skip
    """NNCF's post-training quantization of the ONNX graph (a QDQ graph that ONNX Runtime and OpenVINO both
    run): statistics and fast bias correction over every ``calibration`` photo, one at a time (NNCF's
    minimum and maximum statistics are per batch: batches of 32 lost 0.015 selection AUC). ``overflow_fix`` "enable"
    quantizes every weight to 7 bits, "first_layer_only" the first convolution's only; ``ignored`` is a
    regular expression of node names kept in fp32."""
    try:
        import nncf  # the train extra; imported here so that the ORT path starts without it
    except ImportError as exc:
        raise UserError(f"--method nncf needs nncf ({exc}): pip install 'deepmad-bin[train]'") from None
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    quantized = nncf.quantize(
        onnx.load(fp32_path),
        nncf.Dataset(list(calibration), lambda photo: {"image": photo[None]}),
        preset=nncf.QuantizationPreset(preset),
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(patterns=[ignored], validate=False) if ignored else None,
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(overflow_fix)),
    )
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, int8_path)


def quantize_prepared(prepared: Path, int8_path: Path, calibration: np.ndarray, settings: dict) -> None:
    """``quantize_static`` of a pre-processed graph (``bench.int8_recipes`` tries other ``settings``)."""
    quantize_static(str(prepared), str(int8_path), PhotoReader(calibration), **settings)


def single_thread_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class GraphScores:
    """One graph on the task: test scores and distances, validation scores (for gamma), test AUC, routing."""

    test: np.ndarray
    test_distances: np.ndarray
    val: np.ndarray
    auc: float
    routing: float


def graph_outputs(session: ort.InferenceSession, images: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The named outputs for every image, run in batches of 256 (memory stays bounded at 224x224)."""
    parts = [session.run(names, {"image": images[i : i + 256]}) for i in range(0, len(images), 256)]
    return [np.concatenate([part[k] for part in parts]) for k in range(len(names))]


def score_graph(path: Path, task) -> GraphScores:
    session = single_thread_session(path)
    test, distances = graph_outputs(session, task.test.images, ["score", "distances"])
    (val,) = graph_outputs(session, task.val.images, ["score"])
    normal = ~task.test_anomalous
    routing = float(np.mean(distances[normal].argmin(axis=1) == task.test.labels[normal]))
    return GraphScores(test, distances, val, roc_auc(test, task.test_anomalous), routing)


def make_int8(method: str, fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    if method == "nncf":
        nncf_quantize_graph(fp32_path, int8_path, calibration)
    else:
        quantize_graph(fp32_path, int8_path, calibration)


def int8_manifest(
    manifest: Manifest, task, int8: GraphScores, fp32: GraphScores, n_calibration: int, method: str = "ort"
) -> Manifest:
    """The FP32 manifest with the INT8 graph's own gamma, calibration and test metrics."""
    threshold = choose_gamma(int8.val, manifest.hyperparameters.get("reject_rate", 0.05))
    tpr, fpr = rates_at(int8.test, task.test_anomalous, threshold.value)
    normal = ~task.test_anomalous
    routing = routing_metrics(int8.test_distances[normal], task.test.labels[normal], task.column_names)
    metrics = TestMetrics(
        auc=int8.auc,
        tpr_at_threshold=tpr,
        fpr_at_threshold=fpr,
        n_normal=int(normal.sum()),
        n_anomalous=int(task.test_anomalous.sum()),
        routing=routing,
        extra={
            "quantized_from": f"{manifest.name} {manifest.version} ({manifest.model_sha256})",
            "quantization": METHODS[method],
            "fp32_test_auc": fp32.auc,
            "routing_accuracy": int8.routing,
            "fp32_routing_accuracy": fp32.routing,
            "calibration_photos": n_calibration,
        },
    )
    return manifest.model_copy(
        update={
            "version": f"{manifest.version}+int8",
            "threshold": threshold,
            "calibration": calibrate(int8.val, threshold.value),
            "detector_calibration": [],  # fitted on FP32 per-detector distances; not re-fitted here
            "test_metrics": metrics,
        }
    )


@dataclass
class Quantized:
    """What ``quantize_artifact`` made: both graphs' scores, the INT8 graph's path (inside ``workdir``) and
    its manifest, and whether it was written to ``out`` (only when the AUC held)."""

    fp32: GraphScores
    int8: GraphScores
    int8_path: Path
    manifest: Manifest
    n_calibration: int
    written: bool


def load_source(model_dir: Path) -> Manifest:
    """The FP32 artifact's manifest, checked against its graph; UserError (one line) otherwise."""
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} is not a folder (an artifact folder holds {MODEL_FILE} + manifest.json)")
    return verified_manifest(model_dir)


def quantize_artifact(model_dir: Path, out: Path | None, workdir: Path, *, data: Path | None = None,
                      calibration: int = 256, max_auc_drop: float = 0.005, command: str = "",
                      method: str = "ort") -> Quantized:  # fmt: skip
    """Quantize ``model_dir``'s graph into ``workdir``, score both graphs on the manifest's own split, and
    write the INT8 artifact to ``out`` (when given) if its test AUC drops at most ``max_auc_drop``."""
    manifest = load_source(model_dir)
    if out is not None:
        require_writable("--out", out)
    task = rebuild_task(manifest, data)
    photos = calibration_sample(task.train.images, task.train.labels, calibration)
    int8_path = workdir / MODEL_FILE
    make_int8(method, model_dir / MODEL_FILE, int8_path, photos)
    fp32, int8 = score_graph(model_dir / MODEL_FILE, task), score_graph(int8_path, task)
    shipped = int8_manifest(manifest, task, int8, fp32, len(photos), method)
    written = out is not None and fp32.auc - int8.auc <= max_auc_drop
    if written:
        shipped = write_int8(out, int8_path, shipped.model_copy(update={"command": command or shipped.command}))
    return Quantized(fp32, int8, int8_path, shipped, len(photos), written)


def write_int8(out: Path, int8_path: Path, manifest: Manifest) -> Manifest:
    """Graph first, then the manifest naming its sha256 and golden scores (each file atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MODEL_FILE, int8_path.read_bytes())
    spec = manifest.input
    final = manifest.model_copy(
        update={
            "model_sha256": sha256_file(out / MODEL_FILE),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "golden": golden_for(out / MODEL_FILE, (spec.height, spec.width, spec.channels)),
        }
    )
    write_manifest(out, final)
    return final


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the FP32 artifact folder")
    p.add_argument("--out", type=Path, required=True, help="the INT8 artifact folder to write")
    p.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    p.add_argument("--method", choices=list(METHODS), default="ort", help="the quantizer (default: ort)")
    p.add_argument("--calibration", type=int, default=256, help="training photos for calibration")
    p.add_argument("--max-auc-drop", type=float, default=0.005, help="write only if test AUC drops at most this")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = "python -m training.quantize " + " ".join(argv if argv is not None else sys.argv[1:])

    def body() -> int:
        with tempfile.TemporaryDirectory(prefix="deepmad-int8-") as tmp:
            made = quantize_artifact(args.model, args.out, Path(tmp), data=args.data, calibration=args.calibration,
                                     max_auc_drop=args.max_auc_drop, command=command, method=args.method)  # fmt: skip
        print(
            f"INT8 test AUC {made.int8.auc:.4f} vs FP32 {made.fp32.auc:.4f} ({made.int8.auc - made.fp32.auc:+.4f}), "
            f"routing {made.int8.routing:.4f} vs {made.fp32.routing:.4f}; {METHODS[args.method]}"
        )
        if not made.written:
            print(f"error: not written: the test AUC drops more than {args.max_auc_drop}", file=sys.stderr)
            return 1
        print(f"wrote {args.out} (γ {made.manifest.threshold.value:.4f} re-chosen on INT8 validation scores)")
        return 0

    return run_command(body, "interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(main())
