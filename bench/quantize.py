"""INT8 vs FP32, measured: test AUC, routing, rank agreement and CPU cost of the graph training.quantize makes.

    .venv/bin/python -m bench.quantize                                  # measure only (the graph stays in a temp dir)
    .venv/bin/python -m bench.quantize --out models/trashnet-int8       # ... and write the artifact (training's rule)

Making the artifact is ``training.quantize`` (settings, calibration, gamma, golden scores, the AUC gate);
this module only reports what it made: test AUC (recyclables vs trash), routing accuracy (the nearest
class on test recyclables), the rank correlation of test scores to FP32, the largest score difference,
each graph's CPU cost per image at batch 1 and 16 (one intra-op thread), and the CPU kind, because
INT8 kernels differ between x86 CPUs with and without VNNI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.golden import cpu_kind, reference_inputs
from service.manifest import MODEL_FILE
from training.errors import run_command
from training.quantize import SETTINGS_TEXT, Quantized, quantize_artifact, single_thread_session

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_ms_per_image(session: ort.InferenceSession, image: np.ndarray, batch: int, calls: int) -> float:
    stacked = np.repeat(image[None], batch, axis=0)
    session.run(None, {"image": stacked})
    times = []
    for _ in range(calls):
        start = time.process_time()
        session.run(None, {"image": stacked})
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3 / batch


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def report(made: Quantized, fp32_path: Path, image: np.ndarray) -> None:
    """The table: both graphs' quality on the test split and their CPU cost."""
    rows = []
    for label, path, scores in (("fp32", fp32_path, made.fp32), ("int8", made.int8_path, made.int8)):
        session = single_thread_session(path)
        rows.append((label, scores, cpu_ms_per_image(session, image, 1, 200), cpu_ms_per_image(session, image, 16, 30)))
    m = made.manifest.test_metrics
    print(f"CPU: {cpu_kind()}; onnxruntime {ort.__version__}; {SETTINGS_TEXT}")
    print(f"test split: {m.n_normal} recyclables, {m.n_anomalous} trash; calibration: {made.n_calibration} photos")
    print(f"{'graph':<5} | {'test AUC':>8} | {'routing acc':>11} | {'CPU ms/img b1':>13} | {'b16':>6}")
    for label, s, b1, b16 in rows:
        print(f"{label:<5} | {s.auc:8.4f} | {s.routing:11.4f} | {b1:13.3f} | {b16:6.3f}")
    fp32, int8 = made.fp32, made.int8
    print(
        f"AUC change {int8.auc - fp32.auc:+.4f}, routing change {int8.routing - fp32.routing:+.4f}, "
        f"rank correlation to fp32 {rank_correlation(made.fp32.test, made.int8.test):.4f}, "
        f"largest |score difference| {float(np.max(np.abs(made.fp32.test - made.int8.test))):.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument("--out", type=Path, help="also write the INT8 artifact here (when its AUC holds)")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--calibration", type=int, default=256, help="training photos for calibration")
    parser.add_argument("--max-auc-drop", type=float, default=0.005, help="write only if test AUC drops at most this")
    args = parser.parse_args(argv)

    def body() -> int:
        with tempfile.TemporaryDirectory(prefix="deepmad-int8-") as tmp:
            command = "python -m bench.quantize " + " ".join(argv if argv is not None else sys.argv[1:])
            made = quantize_artifact(args.model_dir, args.out, Path(tmp), data=args.data, calibration=args.calibration,
                                     max_auc_drop=args.max_auc_drop, command=command)  # fmt: skip
            spec = made.manifest.input  # the cost does not depend on the pixels: one seeded reference input
            image = reference_inputs(spec.height, spec.width, spec.channels, seed="bench", count=1)[0]
            report(made, args.model_dir / MODEL_FILE, image)
        if args.out is not None:
            drop = f"not written: the test AUC drops more than {args.max_auc_drop}"
            print(f"wrote {args.out}" if made.written else drop)
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
