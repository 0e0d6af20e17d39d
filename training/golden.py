"""Golden scores for an artifact's manifest, and ``python -m training.golden`` for artifacts made before them.

    python -m training.golden --model models/trashnet          # adds manifest.golden; graph and metrics untouched

The writer computes them on the CPU provider where it runs (``service.golden`` says why); the
tolerance follows the graph's kind: an INT8 graph (QuantizeLinear / QLinear* nodes) gets the looser one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from service import golden
from service.fileio import sha256_file
from service.manifest import MODEL_FILE, GoldenScores, Manifest, write_manifest
from training.errors import UserError, run_command

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


def is_quantized(model_path: Path) -> bool:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(node.op_type in QUANTIZED_OPS for node in graph.node)


def golden_for(model_path: Path, input_shape: tuple[int, int, int]) -> GoldenScores:
    """The graph's golden outputs on this CPU (ORT's CPU provider, default options)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    tolerance = golden.INT8_TOLERANCE if is_quantized(model_path) else golden.FP32_TOLERANCE
    made_on = f"onnxruntime {ort.__version__} CPUExecutionProvider on {golden.cpu_kind()}"
    return golden.compute(golden.session_run(session), input_shape, tolerance, made_on)


def verified_manifest(model_dir: Path) -> Manifest:
    """An artifact's manifest, checked against its graph's sha256; UserError (one line) otherwise."""
    try:
        manifest = Manifest.load(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"no readable manifest in {model_dir}: {str(exc).splitlines()[0]}") from None
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file() or sha256_file(model_path) != manifest.model_sha256:
        raise UserError(f"{model_path} is missing or does not match the manifest's sha256")
    return manifest


def add_golden(model_dir: Path) -> Manifest:
    """Rewrite ``model_dir``'s manifest with golden scores; every other field is kept as it was."""
    manifest = verified_manifest(model_dir)
    model_path = model_dir / MODEL_FILE
    spec = manifest.input
    updated = manifest.model_copy(update={"golden": golden_for(model_path, (spec.height, spec.width, spec.channels))})
    write_manifest(model_dir, updated)
    return updated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact folder (model.onnx + manifest.json)")
    args = parser.parse_args(argv)

    def body() -> int:
        manifest = add_golden(args.model)
        scores = ", ".join(f"{v:.4f}" for v in manifest.golden.score)
        print(f"{args.model}: golden scores [{scores}] (atol {manifest.golden.atol}, rtol {manifest.golden.rtol})")
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
