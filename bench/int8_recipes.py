"""INT8 recipes for one artifact, compared on the training side: which one holds, on which CPUs, how fast.

    .venv/bin/python -m bench.int8_recipes                                  # models/trashnet-lite0
    .venv/bin/python -m bench.int8_recipes --model-dir models/trashnet --calibration 128

Each recipe is ONNX Runtime's static QDQ quantization of the same pre-processed graph
(``training.quantize.quantize_prepared``) with other settings, calibrated on the same seeded training
photos (a whole number of calibration batches: the histogram calibrators stack them). Quality is read on
the split the model was selected on, never on test: validation recyclables against the held-out selection
trash (``selection AUC``), and the rank correlation of those scores to the FP32 graph's. Cost is CPU ms
per photo at batch 1 and 8 on one intra-op thread, interleaved over rounds. The last column says whether
the recipe's results can depend on the CPU: ORT's U8S8 GEMM kernels on x86 CPUs with AVX2 but no VNNI add
pairs of u8 x s8 products in 16 bits with saturation, so only 7-bit weights (``reduce_range``) or uint8
weights (U8U8) give the same integers everywhere (``bench.int8_no_vnni`` measures it for the 32x32
graph); depthwise convolutions run in their own kernel (MLAS widens them to 16 bits first: no pairs to
saturate; not checked under emulation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantType, quant_pre_process

from bench.quantize import cpu_ms_per_image, rank_correlation
from flywheel.metrics import roc_auc
from service.golden import cpu_kind
from service.manifest import MODEL_FILE
from training.errors import UserError, run_command
from training.quantize import (
    CALIBRATION_BATCH,
    QUANTIZATION,
    calibration_sample,
    graph_outputs,
    load_source,
    quantize_prepared,
    rebuild_task,
    single_thread_session,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

SATURATES = "no: saturates without VNNI"
PERCENTILE = {"CalibPercentile": 99.999}


def depthwise_weights(graph: onnx.ModelProto) -> list[str]:
    """The weights of the grouped (depthwise) convolutions."""
    return [
        node.input[1]
        for node in graph.graph.node
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute)
    ]


@dataclass(frozen=True)
class Recipe:
    settings: dict
    everywhere: str  # whether the integers are the same on every x86 CPU
    full_range: Callable[[onnx.ModelProto], list[str]] | None = None  # weights given all 8 bits

    def for_graph(self, graph: onnx.ModelProto) -> dict:
        if self.full_range is None:
            return self.settings
        overrides = {name: [{"reduce_range": False}] for name in self.full_range(graph)}
        extra = {**self.settings.get("extra_options", {}), "TensorQuantOverrides": overrides}
        return {**self.settings, "extra_options": extra}


RECIPES = {
    "7-bit weights (shipped for 32x32)": Recipe(QUANTIZATION, "yes"),
    "8-bit weights (U8S8 full range)": Recipe({**QUANTIZATION, "reduce_range": False}, SATURATES),
    "8-bit depthwise, 7-bit elsewhere": Recipe(QUANTIZATION, "yes (not checked)", depthwise_weights),
    "7-bit, percentile calibration": Recipe(
        {**QUANTIZATION, "calibrate_method": CalibrationMethod.Percentile, "extra_options": PERCENTILE}, "yes"
    ),
    "uint8 weights (U8U8)": Recipe({**QUANTIZATION, "weight_type": QuantType.QUInt8, "reduce_range": False}, "yes"),
    "7-bit, symmetric int8 activations": Recipe(
        {**QUANTIZATION, "activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}}, "yes"
    ),
}


def selection_set(task) -> tuple[np.ndarray, np.ndarray]:
    """Validation recyclables then the selection trash photos, and which of them are trash."""
    if task.selection is None or not len(task.selection.images):
        raise UserError("the model was trained without --anomaly-holdout: no selection trash to compare on")
    images = np.concatenate([task.val.images, task.selection.images])
    trash = np.concatenate([np.zeros(len(task.val.images), bool), np.ones(len(task.selection.images), bool)])
    return images, trash


def cpu_ms(paths: dict[str, Path], image: np.ndarray, rounds: int) -> dict[str, tuple[float, float]]:
    """Median CPU ms per photo at batch 1 and 8 for every graph, the graphs interleaved in each round."""
    sessions = {name: single_thread_session(path) for name, path in paths.items()}
    samples: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in paths}
    for _ in range(rounds):
        for name, session in sessions.items():
            for batch, calls in ((1, 10), (8, 3)):
                samples[name][batch].append(cpu_ms_per_image(session, image, batch, calls))
    return {name: (statistics.median(s[1]), statistics.median(s[8])) for name, s in samples.items()}


def print_table(quality: dict[str, np.ndarray], cost: dict[str, tuple[float, float]], trash: np.ndarray) -> None:
    print(
        "| graph | selection AUC | rank corr. to fp32 | CPU ms/photo b1 | b8 | speed-up b1 / b8 | same on every CPU |"
    )
    print("|---|---|---|---|---|---|---|")
    base_b1, base_b8 = cost["fp32"]
    for name, values in quality.items():
        b1, b8 = cost[name]
        everywhere = "yes" if name == "fp32" else RECIPES[name].everywhere
        correlation = rank_correlation(quality["fp32"], values)
        print(f"| {name} | {roc_auc(values, trash):.4f} | {correlation:.4f} | {b1:.2f} | {b8:.2f} "
              f"| {base_b1 / b1:.2f}x / {base_b8 / b8:.2f}x | {everywhere} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet-lite0")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--calibration", type=int, default=320, help="training photos for calibration")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (graphs interleaved)")
    parser.add_argument("--recipe", action="append", choices=list(RECIPES), help="only these (repeatable)")
    args = parser.parse_args(argv)

    def body() -> int:
        manifest = load_source(args.model_dir)
        task = rebuild_task(manifest, args.data)
        images, trash = selection_set(task)
        photos = calibration_sample(task.train.images, task.train.labels, args.calibration)
        photos = photos[: len(photos) // CALIBRATION_BATCH * CALIBRATION_BATCH]
        if not len(photos):
            raise UserError(f"--calibration {args.calibration}: fewer than {CALIBRATION_BATCH} photos")
        fp32_path = args.model_dir / MODEL_FILE
        chosen = args.recipe or list(RECIPES)
        with tempfile.TemporaryDirectory(prefix="deepmad-int8-recipes-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared))
            graph = onnx.load(prepared)
            paths = {"fp32": fp32_path}
            for index, name in enumerate(chosen):
                paths[name] = Path(tmp) / f"recipe{index}" / MODEL_FILE
                paths[name].parent.mkdir()
                quantize_prepared(prepared, paths[name], photos, RECIPES[name].for_graph(graph))
            quality = {
                name: graph_outputs(single_thread_session(path), images, ["score"])[0] for name, path in paths.items()
            }
            cost = cpu_ms(paths, images[0], args.rounds)
        print(f"model: {args.model_dir} ({manifest.name} {manifest.version}); CPU: {cpu_kind()}")
        print(f"selection set: {int((~trash).sum())} validation recyclables, {int(trash.sum())} selection trash "
              f"(test not read); calibration: {len(photos)} training photos; load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
        print_table(quality, cost, trash)
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
