"""No item, no recyclable, measured: generated non-item frames and real TrashNet photos through the
service's no-item check (``service.no_item``) and each shipped model's graph.

    .venv/bin/python -m bench.no_item                   # the three shipped models, 624 frames, a few minutes

For each model, per kind of frame (``training.data.non_item_frames``: generated at camera sizes, some
JPEG round-tripped, then through the service's image function to the model's input): how many the graph
alone calls normal (score below gamma), and how many are still normal with the check (neither no_item
nor anomalous). Then TrashNet's photos, split as each model's manifest says (``training.quantize
.rebuild_task``, checked against the manifest's training-data hash): how many recyclables and trash
photos on the training side (where the check's threshold was chosen) and on the test side the check
calls no_item, and the test false-reject rate at gamma with and without it (a recyclable answered
anomalous or no_item is rejected). The last line is a ``summary:``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from service.imaging import array_to_model_input
from service.manifest import Manifest
from service.model import LoadedModel, load_model
from service.no_item import STRUCTURE_THRESHOLD, check_items
from service.settings import Settings
from training.data import data_root
from training.data.non_item_frames import JPEG_QUALITY, KINDS, non_item_frames
from training.errors import UserError, require_artifact, run_command
from training.quantize import rebuild_task

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("models/trashnet", "models/trashnet-int8", "models/trashnet-lite0")
SIZES = "240x320,384x512,480x640"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        height, _, width = part.strip().partition("x")
        if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
            raise UserError(f"--sizes: {part!r} is not HEIGHTxWIDTH (e.g. 384x512)")
        sizes.append((int(height), int(width)))
    return sizes


def score(model: LoadedModel, images: np.ndarray) -> np.ndarray:
    return np.concatenate([model.run(images[i : i + 128]).score for i in range(0, len(images), 128)])


def no_item(images: np.ndarray) -> np.ndarray:
    return np.array([check.no_item for check in check_items(images)], dtype=bool)


def check_ms(images: np.ndarray, photos: int = 200) -> float:
    """Median CPU milliseconds of the check on one model input at a time (as /classify runs it)."""
    times = []
    for image in images[:photos]:
        start = time.process_time()
        check_items(image[None])
        times.append(time.process_time() - start)
    return 1e3 * float(np.median(times))


def measure(model_dir: Path, frames: list[tuple[str, np.ndarray]], data: Path | None) -> dict:
    """One model: normal frames per kind without and with the check, and the check on its TrashNet split."""
    model = load_model(model_dir, Settings(threshold=None, providers=["CPUExecutionProvider"]))
    height, width, channels = model.input_shape
    inputs = np.stack([array_to_model_input(frame, height, width, channels) for _, frame in frames])
    normal = score(model, inputs) < model.threshold
    kinds = np.array([kind for kind, _ in frames])
    stopped = no_item(inputs)
    task = rebuild_task(Manifest.load(model_dir), data)
    recyclable = task.train.labels >= 0
    sides = {
        "train recyclables": np.concatenate([task.train.images[recyclable], task.val.images]),
        "train trash": np.concatenate([task.train.images[~recyclable], task.selection.images]),
        "test recyclables": task.test.images[~task.test_anomalous],
        "test trash": task.test.images[task.test_anomalous],
    }
    real = {name: no_item(images) for name, images in sides.items()}
    lowest = min(min(check_items(images), key=lambda c: c.structure).structure for images in sides.values())
    rejected = score(model, sides["test recyclables"]) >= model.threshold
    caught = score(model, sides["test trash"]) >= model.threshold
    return {
        "name": model_dir.name,
        "gamma": model.threshold,
        "size": f"{height}x{width}",
        "per_kind": {
            kind: (int(normal[kinds == kind].sum()), int((normal & ~stopped)[kinds == kind].sum())) for kind in KINDS
        },
        "normal": (int(normal.sum()), int((normal & ~stopped).sum())),
        "real": {name: (int(flags.sum()), len(flags)) for name, flags in real.items()},
        "lowest_structure": lowest,
        "false_reject": (float(rejected.mean()), float((rejected | real["test recyclables"]).mean())),
        "caught": (float(caught.mean()), float((caught | real["test trash"]).mean())),
        "check_ms": check_ms(sides["test recyclables"]),
    }


def report(results: list[dict], frames: list[tuple[str, np.ndarray]], args: argparse.Namespace) -> None:
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    timings = ", ".join(f"{r['check_ms']:.2f} ms at {r['size']} ({r['name']})" for r in results)
    print(f"# load average {load}; the check's CPU time per photo (median, one photo at a time): {timings}")
    print(
        f"# {len(frames)} generated non-item frames: {len(KINDS)} kinds at {args.sizes} (seed {args.seed}), "
        f"{args.jpeg_share:.0%} JPEG round-tripped at quality {JPEG_QUALITY[0]}-{JPEG_QUALITY[1]}; "
        f"no_item below {STRUCTURE_THRESHOLD} grey levels of structure"
    )
    print("\nnon-item frames called normal: graph alone -> with the check")
    width = max(len(r["name"]) for r in results) + 2
    print("kind".ljust(16) + "n".rjust(5) + "".join(r["name"].rjust(width + 4) for r in results))
    counts = {kind: sum(1 for k, _ in frames if k == kind) for kind in KINDS}
    for kind in KINDS:
        cells = "".join(f"{r['per_kind'][kind][0]:>{width - 2}} -> {r['per_kind'][kind][1]:<2}" for r in results)
        print(kind.ljust(16) + str(counts[kind]).rjust(5) + cells)
    cells = "".join(f"{r['normal'][0]:>{width - 2}} -> {r['normal'][1]:<2}" for r in results)
    print("all".ljust(16) + str(len(frames)).rjust(5) + cells)

    print("\nTrashNet photos the check calls no_item (each model's input size and manifest split)")
    sides = list(results[0]["real"])
    print(
        "model".ljust(width + 2)
        + "input".ljust(10)
        + "".join(side.rjust(20) for side in sides)
        + "lowest structure".rjust(20)
    )
    for r in results:
        cells = "".join(f"{r['real'][side][0]}/{r['real'][side][1]}".rjust(20) for side in sides)
        print(r["name"].ljust(width + 2) + r["size"].ljust(10) + cells + f"{r['lowest_structure']:.2f}".rjust(20))

    print("\ntest split at gamma: recyclables rejected (false reject) and trash caught, graph alone -> with the check")
    print(
        "model".ljust(width + 2)
        + "gamma".rjust(8)
        + "false reject".rjust(22)
        + "delta".rjust(8)
        + "trash caught".rjust(22)
    )
    for r in results:
        (fr0, fr1), (c0, c1) = r["false_reject"], r["caught"]
        print(
            r["name"].ljust(width + 2) + f"{r['gamma']:.3f}".rjust(8) + f"{fr0:.3f} -> {fr1:.3f}".rjust(22)
            + f"{fr1 - fr0:+.3f}".rjust(8) + f"{c0:.3f} -> {c1:.3f}".rjust(22)
        )  # fmt: skip

    still = sum(r["normal"][1] for r in results)
    alone = sum(r["normal"][0] for r in results)
    total = len(frames) * len(results)
    real = sum(flagged for r in results for flagged, _ in r["real"].values())
    photos = sum(n for r in results for _, n in r["real"].values())
    delta = max(r["false_reject"][1] - r["false_reject"][0] for r in results)
    print(
        f"\nsummary: non_item_normal={still}/{total} graph_alone_normal={alone}/{total} "
        f"real_no_item={real}/{photos} test_false_reject_delta={delta:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.no_item", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="artifact folders, comma-separated")
    parser.add_argument("--sizes", default=SIZES, help="camera frame sizes HEIGHTxWIDTH, comma-separated")
    parser.add_argument("--per-size", type=int, default=16 * len(KINDS), help="frames per size (kinds in turn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jpeg-share", type=float, default=0.33, help="share of frames JPEG round-tripped")
    parser.add_argument("--data", type=Path, help="data root (default: DEEPMAD_DATA_ROOT or ../shared/data)")
    args = parser.parse_args(argv)

    def body() -> int:
        models = [Path(p) if Path(p).is_absolute() else REPO_ROOT / p for p in args.models.split(",") if p]
        for model_dir in models:
            require_artifact("--models", model_dir)
        root = args.data or data_root()
        if not (root / "trashnet").is_dir():
            raise UserError(f"no TrashNet at {root / 'trashnet'}; pass --data or set DEEPMAD_DATA_ROOT")
        if args.per_size < 1 or not 0.0 <= args.jpeg_share <= 1.0:
            raise UserError("--per-size must be at least 1 and --jpeg-share lie in [0, 1]")
        frames = []
        for i, size in enumerate(parse_sizes(args.sizes)):
            frames += non_item_frames(args.per_size, size, seed=args.seed + i, jpeg_share=args.jpeg_share)
        results = [measure(model_dir, frames, root / "trashnet") for model_dir in models]
        report(results, frames, args)
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
