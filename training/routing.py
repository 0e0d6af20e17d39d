"""Routing: the bin sends a good item to the bin of its nearest class (the graph's ``nearest`` output).

Routing accuracy is the share of test recyclables whose nearest class is their own class. It is read
on the normal test items only (anomalies have no class to be routed to) and reported beside the AUC,
overall, per class and as a confusion table (true class -> nearest class -> count).

Example:
    python -m training.routing --model models/trashnet           # a shipped artifact, scored with ONNX Runtime
    python -m training.routing --model models/trashnet --write   # and record it in its manifest's test_metrics
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import INPUT_NAME, MANIFEST_FILE, MODEL_FILE, Manifest, Routing, write_manifest
from training.errors import UserError, run_command


def routing_metrics(distances: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Routing:
    """``distances`` [N, k] and true columns ``labels`` [N] (0..k-1) of normal items -> their routing."""
    if len(labels) == 0:
        raise ValueError("routing needs at least one normal item")
    nearest = np.asarray(distances).argmin(axis=1)
    labels = np.asarray(labels)
    confusion = {
        true: {routed: int(((labels == i) & (nearest == j)).sum()) for j, routed in enumerate(class_names)}
        for i, true in enumerate(class_names)
    }
    per_class = {
        name: float((nearest[labels == i] == i).mean()) for i, name in enumerate(class_names) if (labels == i).any()
    }
    return Routing(
        accuracy=float((nearest == labels).mean()), per_class=per_class, confusion=confusion, n_items=len(labels)
    )


def format_routing(routing: Routing) -> str:
    """The confusion table as aligned text: one row per true class, one column per nearest class."""
    names = list(routing.confusion)
    width = max(9, *(len(n) for n in names)) + 1
    lines = [f"routing accuracy {routing.accuracy:.3f} on {routing.n_items} test items (rows: true class)"]
    lines.append("".ljust(width) + "".join(n.rjust(width) for n in names) + "accuracy".rjust(width))
    for true, row in routing.confusion.items():
        cells = "".join(str(row[n]).rjust(width) for n in names)
        lines.append(true.ljust(width) + cells + f"{routing.per_class.get(true, float('nan')):.3f}".rjust(width))
    return "\n".join(lines)


def artifact_routing(model_dir: Path, data: Path | None = None) -> Routing:
    """Routing of a finished artifact on the test split its manifest describes, scored by ONNX Runtime."""
    from training.data import load_dataset, make_task  # the data readers only where a data set is scored

    manifest = Manifest.load(model_dir)
    params = manifest.hyperparameters
    dataset = load_dataset(manifest.training_data.source, data, manifest.input.height)
    task = make_task(
        dataset,
        manifest.training_data.normal_classes,
        anomaly_holdout=float(params.get("anomaly_holdout", 0.0)),
    )
    if task.column_names != manifest.class_names:
        raise UserError(f"{model_dir}: the manifest's classes {manifest.class_names} are not the data's")
    normal = ~task.test_anomalous
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    distances = np.concatenate(
        [
            session.run(["distances"], {INPUT_NAME: task.test.images[normal][s : s + 256]})[0]
            for s in range(0, int(normal.sum()), 256)
        ]
    )
    return routing_metrics(distances, task.test.labels[normal], manifest.class_names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.routing", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact folder (model.onnx + manifest.json)")
    parser.add_argument("--data", type=Path, help="data root (default: DEEPMAD_DATA_ROOT or ../shared/data)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="record the result in the manifest's test_metrics.routing (atomically; model.onnx is untouched), "
        "for artifacts made before training wrote it",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        if not (args.model / MANIFEST_FILE).is_file():
            raise UserError(f"no {MANIFEST_FILE} in {args.model}")
        routing = artifact_routing(args.model, args.data)
        print(format_routing(routing))
        if args.write:
            manifest = Manifest.load(args.model)
            if manifest.test_metrics is None:
                raise UserError(f"{args.model}: the manifest has no test_metrics to add routing to")
            manifest.test_metrics.routing = routing
            write_manifest(args.model, manifest)
            print(f"recorded in {args.model / MANIFEST_FILE}")
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
