"""Engine x precision for one artifact's graph: cost per photo, quality on the selection side, and whether
the outputs hold on a CPU without VNNI or bf16.

    .venv/bin/python -m bench.engines                                   # models/trashnet-lite0, every graph
    .venv/bin/python -m bench.engines --graph fp32 --graph "NNCF, overflow fix on every layer" --emulated 0

Graphs: the artifact's fp32 graph, INT8 graphs made by NNCF's post-training quantization
(``training.quantize.nncf_quantize_graph``: overflow fix, preset, the DeepMAD heads kept in fp32) and by
ONNX Runtime's quantizer (the shipped 7-bit recipe and 8-bit weights), all calibrated on the same seeded
training photos. Engines: ONNX Runtime, OpenVINO with ``INFERENCE_PRECISION_HINT`` f32, and OpenVINO's
default precision (bf16 on CPUs with avx512_bf16 or AMX: the non-INT8 parts of a graph run in bf16
there; f32 elsewhere). Every row runs on one thread.

Quality is read on the split the model was selected on, never on test: validation recyclables against
the held-out selection trash (``bench.int8_recipes.selection_set``), AUC and its change from ONNX
Runtime fp32, and the rank correlation of scores to it. Cost is CPU ms per photo at batch 1 and 8,
medians over rounds, every row once per round. ``--emulated N`` also runs N photos of that set (half
trash) through each row under ``qemu-x86_64 -cpu Haswell`` (AVX2, no VNNI, no bf16: ORT's and
oneDNN's u8 x s8 kernels add pairs of products in 16 bits with saturation there) and compares with the
native outputs; nothing is sorted under emulation (``bench.int8_no_vnni`` says why). About 1-3 s of
emulated CPU per photo and row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.int8_no_vnni import CPU_MODEL, qemu_binary
from bench.int8_recipes import RECIPES, selection_set
from bench.quantize import rank_correlation
from service.manifest import MODEL_FILE
from training.errors import UserError, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADS = r"/head/.*"  # the DeepMAD heads' nodes in the exported graph

# INT8 graphs: NNCF's settings (``nncf_quantize_graph``'s keywords), or the name of ORT's recipe in bench.int8_recipes.
NNCF_GRAPHS = {
    "NNCF, overflow fix on every layer": {"overflow_fix": "enable"},
    "NNCF, overflow fix on the first layer": {"overflow_fix": "first_layer_only"},
    "NNCF, no overflow fix": {"overflow_fix": "disable"},
    "NNCF mixed preset, overflow fix on every layer": {"overflow_fix": "enable", "preset": "mixed"},
    "NNCF, overflow fix on every layer, heads fp32": {"overflow_fix": "enable", "ignored": HEADS},
}
ORT_GRAPHS = {
    "ORT quantizer, 7-bit weights (shipped recipe)": "7-bit weights (shipped for 32x32)",
    "ORT quantizer, 8-bit weights": "8-bit weights (U8S8 full range)",
}
GRAPHS = ["fp32", *NNCF_GRAPHS, *ORT_GRAPHS]
ENGINES = ["onnxruntime", "openvino f32", "openvino default"]


def precision_flags() -> str:
    """This CPU's flags that decide INT8 and bf16 kernels."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
    return "+".join(f for f in wanted if f in flags) or "no avx2"


def make_graph(name: str, fp32_path: Path, out: Path, photos: np.ndarray) -> None:
    from training.quantize import nncf_quantize_graph, quantize_graph

    if name in NNCF_GRAPHS:
        nncf_quantize_graph(fp32_path, out, photos, **NNCF_GRAPHS[name])
    else:
        quantize_graph(fp32_path, out, photos, RECIPES[ORT_GRAPHS[name]].settings)


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def runner(engine: str, path: Path) -> tuple[Runner, str]:
    """A one-thread ``images -> (score, nearest)`` for the engine, and the precision it runs in."""
    if engine == "onnxruntime":
        from training.quantize import single_thread_session

        session = single_thread_session(path)
        return (lambda images: tuple(session.run(["score", "nearest"], {"image": images}))), "as stored"
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if engine == "openvino f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = request.infer({"image": images})
        return out["score"].copy(), out["nearest"].copy()

    return run, str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[1]


def outputs(run: Runner, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [run(images[i : i + 32]) for i in range(0, len(images), 32)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cpu_ms_per_photo(run: Runner, image: np.ndarray, batch: int, calls: int) -> float:
    stacked = np.repeat(image[None], batch, axis=0)
    run(stacked)
    times = []
    for _ in range(calls):
        start = time.process_time()
        run(stacked)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3 / batch


@dataclass
class Row:
    graph: str
    engine: str
    precision: str
    scores: np.ndarray
    b1: float = 0.0
    b8: float = 0.0
    emulated: str = "–"


def emulated_subset(trash: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` photos of the selection set, half of them trash, evenly spread."""
    picked = []
    for part, share in ((np.flatnonzero(~trash), count - count // 2), (np.flatnonzero(trash), count // 2)):
        picked.append(part[np.linspace(0, len(part) - 1, min(share, len(part))).astype(int)])
    return np.sort(np.concatenate(picked))


def child(spec_path: Path) -> int:
    """Under the emulator: every row's outputs on the saved photos, and the precision OpenVINO chose."""
    spec = json.loads(spec_path.read_text())
    images = np.load(spec["images"])
    report = {}
    for index, (engine, path) in enumerate(spec["rows"]):
        run, precision = runner(engine, Path(path))
        score, nearest = outputs(run, images)
        np.savez(Path(spec["out"]) / f"{index}.npz", score=score, nearest=nearest)
        report[index] = precision
    (Path(spec["out"]) / "report.json").write_text(json.dumps(report))
    return 0


def run_emulated(rows: list[Row], paths: dict[str, Path], images: np.ndarray, trash: np.ndarray, tmp: Path) -> None:
    """Fill the ``emulated`` column of every row that runs INT8 or bf16 kernels: its outputs under QEMU
    against the native ones (fp32 kernels gave the same outputs there: max difference 0 for ONNX Runtime,
    2e-9 for OpenVINO)."""
    from flywheel.metrics import roc_auc

    checked = [r for r in rows if r.graph != "fp32" or r.precision == "bfloat16"]
    np.save(tmp / "emulated.npy", images)
    spec = {
        "images": str(tmp / "emulated.npy"),
        "out": str(tmp),
        "rows": [[r.engine, str(paths[r.graph])] for r in checked],
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    command = [
        qemu_binary(),
        "-cpu",
        CPU_MODEL,
        sys.executable,
        "-m",
        "bench.engines",
        "--child",
        str(tmp / "spec.json"),
    ]
    subprocess.run(command, cwd=REPO_ROOT, check=True, stderr=subprocess.DEVNULL)
    report = json.loads((tmp / "report.json").read_text())
    fp32 = outputs(runner("onnxruntime", paths["fp32"])[0], images)[0]
    for index, row in enumerate(checked):
        there = np.load(tmp / f"{index}.npz")
        here_score, here_nearest = outputs(runner(row.engine, paths[row.graph])[0], images)
        auc, native_auc = roc_auc(there["score"], trash), roc_auc(here_score, trash)
        corr, native_corr = rank_correlation(fp32, there["score"]), rank_correlation(fp32, here_score)
        row.emulated = (
            f"{report[str(index)]}; AUC {auc:.4f} (native {native_auc:.4f}), rank corr. to fp32 {corr:.3f} "
            f"(native {native_corr:.3f}), max |diff| {float(np.max(np.abs(there['score'] - here_score))):.3g}, "
            f"nearest same {float(np.mean(there['nearest'] == here_nearest)):.2f}"
        )


def print_table(rows: list[Row], trash: np.ndarray, emulated: int) -> str:
    from flywheel.metrics import roc_auc

    base = rows[0]
    base_auc = roc_auc(base.scores, trash)
    print("| graph | engine | runs in | selection AUC | vs fp32 | rank corr. | ms/photo b1 | b8 | speed-up b1 / b8 "
          f"| no VNNI, emulated ({emulated} photos) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    best = base
    for row in rows:
        auc = roc_auc(row.scores, trash)
        print(f"| {row.graph} | {row.engine} | {row.precision} | {auc:.4f} | {auc - base_auc:+.4f} "
              f"| {rank_correlation(base.scores, row.scores):.4f} | {row.b1:.2f} | {row.b8:.2f} "
              f"| {base.b1 / row.b1:.2f}x / {base.b8 / row.b8:.2f}x | {row.emulated} |")  # fmt: skip
        if auc >= base_auc - 0.005 and row.b1 < best.b1:
            best = row
    return f"fastest_holding_here={best.graph} / {best.engine} speedup_b1={base.b1 / best.b1:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet-lite0")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--calibration", type=int, default=320, help="training photos for calibration")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (rows interleaved)")
    parser.add_argument("--graph", action="append", choices=GRAPHS, help="only these graphs (repeatable; fp32 always)")
    parser.add_argument("--engine", action="append", choices=ENGINES, help="only these engines (repeatable)")
    parser.add_argument("--emulated", type=int, default=0, help="photos per row under qemu -cpu Haswell (0: none)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    return run_command(lambda: body(args), "bench.engines: interrupted")


def body(args: argparse.Namespace) -> int:
    from training.quantize import calibration_sample, load_source, rebuild_task

    if args.rounds < 1 or args.calibration < 1 or args.emulated < 0:
        raise UserError("--rounds and --calibration must be at least 1, --emulated at least 0")
    if args.emulated:
        qemu_binary()
    manifest = load_source(args.model_dir)
    task = rebuild_task(manifest, args.data)
    images, trash = selection_set(task)
    photos = calibration_sample(task.train.images, task.train.labels, args.calibration)
    graphs = ["fp32", *[g for g in GRAPHS[1:] if g in (args.graph or GRAPHS)]]
    engines = args.engine or ENGINES
    if "onnxruntime" not in engines:
        engines = ["onnxruntime", *engines]  # the baseline of every ratio
    with tempfile.TemporaryDirectory(prefix="deepmad-engines-") as tmp:
        paths = {"fp32": args.model_dir / MODEL_FILE}
        for index, name in enumerate(graphs[1:]):
            paths[name] = Path(tmp) / f"graph{index}" / MODEL_FILE
            paths[name].parent.mkdir()
            make_graph(name, paths["fp32"], paths[name], photos)
        rows, runners = [], []
        for graph in graphs:
            for engine in engines:
                run, precision = runner(engine, paths[graph])
                rows.append(Row(graph, engine, precision, outputs(run, images)[0]))
                runners.append(run)
        samples = [([], []) for _ in rows]
        for _ in range(args.rounds):
            for run, (b1, b8) in zip(runners, samples, strict=True):
                b1.append(cpu_ms_per_photo(run, images[0], 1, 10))
                b8.append(cpu_ms_per_photo(run, images[0], 8, 3))
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())  # over the timing rounds
        for row, (b1, b8) in zip(rows, samples, strict=True):
            row.b1, row.b8 = statistics.median(b1), statistics.median(b8)
        del runners
        if args.emulated:
            subset = emulated_subset(trash, args.emulated)
            run_emulated(rows, paths, images[subset], trash[subset], Path(tmp))
    import onnxruntime
    import openvino

    print(f"model: {args.model_dir} ({manifest.name} {manifest.version}); CPU: {precision_flags()}; "
          f"onnxruntime {onnxruntime.__version__}, openvino {openvino.get_version().split('-')[0]}")  # fmt: skip
    print(f"selection set: {int((~trash).sum())} validation recyclables, {int(trash.sum())} selection trash "
          f"(test not read); calibration: {len(photos)} photos; {args.rounds} rounds; load average {load}")  # fmt: skip
    verdict = print_table(rows, trash, args.emulated)
    print(f"summary: rows={len(rows)} {verdict} cpu={precision_flags()} load_average={load.replace(' ', ',')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
