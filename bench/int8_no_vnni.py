"""INT8 on an x86 CPU without VNNI, emulated: the engine's outputs under ``qemu-x86_64 -cpu Haswell`` (AVX2,
no VNNI), the metrics computed natively.

    apt-get install qemu-user-static                                 # QEMU 7.2+: TCG emulates AVX2
    .venv/bin/python -m bench.int8_no_vnni                           # models/trashnet vs models/trashnet-int8
    .venv/bin/python -m bench.int8_no_vnni --int8-dir OLD --limit 96 # any INT8 artifact, fewer photos (faster)
    .venv/bin/python -m bench.int8_no_vnni --engine openvino --model-dir models/trashnet-lite0 --int8-dir DIR --limit 48

ONNX Runtime has no option that turns its VNNI kernels off (``session.x64quantprecision`` swaps U8S8 for
U8U8 on a non-VNNI CPU; it does not make a VNNI CPU take the saturating path), but it picks its kernels
from CPUID, and QEMU's user-mode emulator reports the CPU model it is given. A child process under
QEMU loads each artifact through the service (golden scores checked there) and writes the graphs'
outputs on the manifest's own test split; this process compares them with native outputs (``--engine``:
ONNX Runtime, or OpenVINO, whose oneDNN kernels also pick their INT8 path from CPUID). Only the engine runs
in the child: QEMU 7.2's AVX2 emulation gets numpy's ``argsort`` wrong (its ranks of 469 random
floats correlate 0.87 with the native ones), so no sorting, AUC or rank is computed under emulation.
Slow: about 10 minutes of CPU for the two graphs on 469 photos.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from service.manifest import Manifest
from training.errors import UserError, require_artifact, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_MODEL = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI


def qemu_binary() -> str:
    """QEMU's x86-64 user-mode emulator (Debian's qemu-user or qemu-user-static); UserError when absent."""
    for name in ("qemu-x86_64", "qemu-x86_64-static"):
        if found := shutil.which(name):
            return found
    raise UserError("qemu-x86_64 not found (apt-get install qemu-user-static)")


def child(images_path: Path, out: Path, model_dirs: list[Path], engine: str) -> int:
    """In the emulator: load each artifact through the service on ``engine``, record its golden check and
    outputs (a refused artifact's outputs come from the bare engine, f32)."""
    from service.golden import session_run
    from service.model import ModelLoadError, load_model
    from service.settings import Settings

    images = np.load(images_path)
    report = {}
    for index, folder in enumerate(model_dirs):
        try:
            model = load_model(folder, Settings(intra_op_threads=1, engine=engine))
            report[str(folder)] = f"loaded, golden scores {model.golden.status}: {model.golden.detail}"
            run = session_run(model.session)
        except ModelLoadError as exc:
            report[str(folder)] = f"refused: {exc}"
            run = bare_run(folder / "model.onnx", engine)
        distances, score, nearest = run(images)
        np.savez(out / f"{index}.npz", score=score, nearest=nearest)
    (out / "report.json").write_text(json.dumps(report))
    return 0


def bare_run(path: Path, engine: str):
    """The graph on the engine without the service's golden check (natively, and for a refused artifact)."""
    if engine == "onnxruntime":
        import onnxruntime as ort

        from service.golden import session_run

        return session_run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = compiled({"image": images})
        return out["distances"], out["score"], out["nearest"]

    return run


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values))


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.int8_no_vnni: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_no_vnni", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument("--int8-dir", type=Path, default=REPO_ROOT / "models" / "trashnet-int8")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--limit", type=int, help="every n-th test photo so that at most this many are scored")
    parser.add_argument(
        "--engine", choices=["onnxruntime", "openvino"], default="onnxruntime", help="the service's engine"
    )
    parser.add_argument("--child", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], args.child[2:], args.engine)
    require_artifact("--model-dir", args.model_dir)
    require_artifact("--int8-dir", args.int8_dir)
    qemu = qemu_binary()
    from flywheel.metrics import roc_auc
    from training.quantize import rebuild_task

    task = rebuild_task(Manifest.load(args.model_dir), args.data)
    step = max(1, -(-len(task.test.images) // args.limit)) if args.limit else 1
    images, anomalous = task.test.images[::step], task.test_anomalous[::step]
    folders = [args.model_dir.resolve(), args.int8_dir.resolve()]
    with tempfile.TemporaryDirectory(prefix="deepmad-novnni-") as tmp:
        np.save(Path(tmp) / "images.npy", images)
        command = [qemu, "-cpu", CPU_MODEL, sys.executable, "-m", "bench.int8_no_vnni", "--engine", args.engine,
                   "--child", str(Path(tmp) / "images.npy"), tmp, *map(str, folders)]  # fmt: skip
        subprocess.run(command, cwd=REPO_ROOT, check=True, stderr=subprocess.DEVNULL)
        emulated = [np.load(Path(tmp) / f"{i}.npz")["score"] for i in range(2)]
        report = json.loads((Path(tmp) / "report.json").read_text())
    native = [bare_run(folder / "model.onnx", args.engine)(images)[1] for folder in folders]
    print(f"{len(images)} test photos ({int(anomalous.sum())} trash); engine {args.engine}; emulated: qemu -cpu "
          f"{CPU_MODEL} (AVX2, no VNNI)")  # fmt: skip
    for label, folder, here, there in zip(("fp32", "int8"), folders, native, emulated, strict=True):
        print(f"{label}: {report[str(folder)]}")
        print(f"  AUC native {roc_auc(here, anomalous):.4f}, no-VNNI {roc_auc(there, anomalous):.4f}; "
              f"largest |no-VNNI - native| {float(np.max(np.abs(there - here))):.3g}")  # fmt: skip
    here, there = (float(np.corrcoef(ranks(fp32), ranks(int8))[0, 1]) for fp32, int8 in (native, emulated))
    print(f"int8 rank correlation to fp32: native {here:.4f}, no-VNNI {there:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
