"""``python -m training.fit``: train a model on a data source and write the servable artifact.

Example:
    python -m training.fit --dataset trashnet --out models/trashnet
    python -m training.fit --dataset cifar10 --normal airplane,ship --epochs 10 --out runs/c10-0-8
    python -m training.fit --dataset cifar10 --normal 0,8 --method drocc-m --epochs 10 --out runs/c10-drocc
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path

import torch

from service.manifest import TrainingLog
from training.backbones import block_count, check_input_size, check_tune_blocks
from training.data import SOURCES, default_normal, load_dataset, make_task, parse_class_selection
from training.data.base import add_holdout_flags, check_anomaly_holdout
from training.data.composites import with_composites
from training.engine import read_checkpoint, resolve_device
from training.errors import UserError, require_writable, run_command
from training.export import check_parity, write_artifact
from training.measure import measure_scorer
from training.methods import CONFIG_TYPES, METHODS, Method, get_method
from training.methods.backbone import check_anomaly_terms
from training.methods.config import add_config_flags
from training.methods.ensemble import EnsembleScorer
from training.networks import WIDTHS
from training.routing import format_routing

PARITY_IMAGES = 64
STAGES = ("data", "train", "measure", "export", "parity")  # the result's "seconds"
MIN_IMAGE_SIZE = 2 ** len(WIDTHS)  # every 2x2 pooling of the encoder must keep a pixel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.fit",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help=f"one of {', '.join(SOURCES)}")
    data.add_argument(
        "--data",
        type=Path,
        help="data root (folder, or RECYCLE .npz/.tar.gz); default: DEEPMAD_DATA_ROOT or ../shared/data",
    )
    data.add_argument("--trash-dir", type=Path, help="RECYCLE only: a folder of trash photos for the 5/1 case")
    data.add_argument(
        "--normal",
        help="normal classes by name or index, comma separated (default: "
        "TrashNet's five recyclables, else the first two classes)",
    )
    data.add_argument(
        "--input-size",
        "--image-size",
        dest="image_size",
        type=int,
        help="square input size the photos are resized to (default: the source's, 32 or 28)",
    )
    data.add_argument("--max-train-per-class", type=int, help="subsample each normal class (seeded)")
    add_holdout_flags(data)
    data.add_argument(
        "--composites",
        type=int,
        default=0,
        help="seeded two-class composites of normal training photos (a box of one class pasted onto another) "
        "as negatives for every encoder; no anomaly photo is used",
    )
    method = parser.add_argument_group("method (paper tables 18-20 defaults)")
    method.add_argument(
        "--method",
        default="deepmad",
        choices=list(METHODS),
        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    add_config_flags(method, CONFIG_TYPES)
    method.add_argument("--ensemble", type=int, default=1, help="train seeds seed..seed+N-1, export one graph")
    method.add_argument(
        "--flip-tta", action="store_true", help="average each image with its mirror image inside the graph"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    run.add_argument(
        "--reject-rate", type=float, default=0.05, help="share of held-out normal items the threshold rejects"
    )
    run.add_argument("--out", type=Path, help="artifact folder (model.onnx + manifest.json); default: runs/<dataset>")
    run.add_argument("--name", help="model name (default: the output folder's name)")
    run.add_argument("--version", help="model version (default: UTC timestamp)")
    run.add_argument("--checkpoint", type=Path, help="checkpoint file (default: runs/<name>/checkpoint.pt)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from(args: argparse.Namespace):
    """The chosen method's configuration from the flags (checked by the configuration itself)."""
    return get_method(args.method).config(vars(args))


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no data, so a bad flag costs nothing (UserError, exit 2)."""
    bounds = {"threads": 1, "max_train_per_class": 1, "ensemble": 1, "composites": 0}
    for name, minimum in bounds.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    backbone = args.backbone
    if backbone != "none" and not hasattr(get_method(args.method).config_type, "backbone"):
        raise UserError(f"--backbone works with the centre methods (deepmad, deepsvdd, deepsvdd-m), not {args.method}")
    if backbone != "none":
        check_input_size(backbone, args.image_size or 32)
        check_tune_blocks(backbone, args.tune_blocks, block_count(backbone))
        if args.backbone_weights and not Path(args.backbone_weights).is_file():
            raise UserError(f"--backbone-weights {args.backbone_weights} is not a file")
    elif args.image_size is not None and args.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--input-size must be at least {MIN_IMAGE_SIZE} (three 2x2 poolings), got {args.image_size}")
    if not 0.0 < args.reject_rate < 1.0:
        raise UserError("--reject-rate must lie strictly between 0 and 1")
    check_anomaly_holdout(args.anomaly_holdout, args.outlier_exposure, args.exposure_from_train)
    if getattr(args, "anomaly_centres", 0):
        if backbone == "none":
            raise UserError("--anomaly-centres needs --backbone (the from-scratch encoders take --anomaly-push)")
        if args.ensemble > 1 or args.flip_tta:
            raise UserError("--anomaly-centres works with one model (no --ensemble, no --flip-tta)")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; the artifact is a folder (model.onnx + manifest.json)")
    require_writable("--out", args.out)


def check_labelled_anomalies(config, task) -> None:
    """The anomaly terms need labelled anomalies in training: centres refuse to start without enough of
    them (UserError); the Deep SAD push falls back to the paper's DeepMAD with a message."""
    labelled = int((task.train.labels < 0).sum())
    if hasattr(config, "anomaly_centres"):
        check_anomaly_terms(labelled, config)
    if getattr(config, "anomaly_push", "hinge") != "hinge" and labelled == 0:
        print(
            f"note: no labelled anomalies in training, so --anomaly-push {config.anomaly_push} has nothing to push: "
            "this trains the paper's DeepMAD (normal classes only)",
            file=sys.stderr,
        )


def member_checkpoints(args: argparse.Namespace, config) -> list[tuple[object, Path]]:
    """(configuration, checkpoint path) per ensemble member: seeds seed..seed+N-1, one checkpoint each."""
    checkpoint = args.checkpoint or Path("runs") / args.name / "checkpoint.pt"
    if args.ensemble == 1 and not args.flip_tta:
        return [(config, checkpoint)]
    members = []
    for offset in range(args.ensemble):
        member = dataclasses.replace(config, seed=config.seed + offset)
        members.append((member, checkpoint.with_name(f"{checkpoint.stem}-seed{member.seed}{checkpoint.suffix}")))
    return members


def check_resumable(members: list[tuple[object, Path]]) -> None:
    """With --resume, every member's checkpoint must exist, be readable and hold these settings."""
    for config, path in members:
        state = read_checkpoint(path)
        if "config" not in state:
            raise UserError(f"checkpoint {path} is not a training checkpoint (it has no configuration)")
        if {**config.stored_defaults(), **state["config"]} != config.training_identity():
            raise UserError(f"checkpoint {path} was made with other settings; drop --resume or use them")


def run(args: argparse.Namespace, command: str) -> dict:
    method = get_method(args.method)
    args.out = args.out or Path("runs") / args.dataset
    args.name = args.name or args.out.resolve().name
    check_args(args)
    config = config_from(args)
    members = member_checkpoints(args, config)
    device = resolve_device(args.device)
    if args.resume:
        check_resumable(members)
    if args.threads:
        torch.set_num_threads(args.threads)
    marks = [time.perf_counter()]  # the stages' seconds go into the result (bench.flywheel --retrain-only)
    dataset = load_dataset(args.dataset, args.data, args.image_size, args.trash_dir)
    normal = parse_class_selection(args.normal, dataset.class_names, default_normal(dataset))
    task = make_task(
        dataset,
        normal,
        args.max_train_per_class,
        args.seed,
        args.anomaly_holdout,
        args.outlier_exposure,
        args.exposure_from_train,
    )
    task = with_composites(method.prepare(task), args.composites, args.seed)
    check_labelled_anomalies(config, task)
    print(
        f"{dataset.name}: normal {normal}, anomalies {task.anomaly_classes}; "
        f"{len(task.train)} train / {len(task.val)} val / {len(task.test)} test images; device {device}",
        file=sys.stderr,
    )
    marks.append(time.perf_counter())
    scorer, log = fit_members(args, method, task, members, device)
    marks.append(time.perf_counter())
    measured = measure_scorer(scorer, task, args.reject_rate)
    marks.append(time.perf_counter())
    version = args.version or datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")
    manifest = write_artifact(
        args.out,
        scorer,
        task,
        measured,
        name=args.name,
        version=version,
        method=method.name,
        hyperparameters=recorded_hyperparameters(args, config, device),
        command=command,
        training_log=log,
    )
    marks.append(time.perf_counter())
    parity = check_parity(scorer, args.out / "model.onnx", task.test.images[:PARITY_IMAGES])
    marks.append(time.perf_counter())
    if manifest.test_metrics.routing is not None:
        print(format_routing(manifest.test_metrics.routing), file=sys.stderr)
    return fit_result(args.out, manifest, log, parity, marks)


def recorded_hyperparameters(args: argparse.Namespace, config, device: torch.device) -> dict:
    """What the manifest records of this run: the method's configuration and the data and scoring flags."""
    return {
        **config.as_dict(),
        "reject_rate": args.reject_rate,
        "device": str(device),
        "max_train_per_class": args.max_train_per_class,
        "anomaly_holdout": args.anomaly_holdout,
        "outlier_exposure": args.outlier_exposure,
        "exposure_from_train": args.exposure_from_train,
        "composites": args.composites,
        "ensemble": args.ensemble,
        "flip_tta": args.flip_tta,
    }


def fit_result(out: Path, manifest, log, parity, marks: list[float]) -> dict:
    """The JSON line ``training.fit`` prints: the test numbers, the threshold, parity and each stage's seconds."""
    metrics = manifest.test_metrics
    return {
        "out": str(out),
        "test_auc": metrics.auc,
        "selection_auc": metrics.extra.get("selection_auc"),
        "validation_routing": metrics.extra.get("validation_routing"),
        "tpr_at_threshold": metrics.tpr_at_threshold,
        "fpr_at_threshold": metrics.fpr_at_threshold,
        "routing_accuracy": metrics.routing.accuracy if metrics.routing else None,
        "routing_per_class": metrics.routing.per_class if metrics.routing else None,
        "distance_gap": metrics.distance_gap.model_dump(exclude={"per_class"}) if metrics.distance_gap else None,
        "chosen_epoch": log.epoch_choice.epoch if log.epoch_choice else None,
        "threshold": manifest.threshold.value,
        "parity_max_abs_score": parity.max_abs_score,
        "images_per_second": log.images_per_second,
        "seconds": dict(zip(STAGES, [round(end - start, 2) for start, end in pairwise(marks)], strict=True)),
    }


def fit_members(args: argparse.Namespace, method: Method, task, members, device):
    """One model, or an ensemble over consecutive seeds (one checkpoint each), as one scorer."""
    fitted = [method.fit(task, config, device, path, args.resume, progress=not args.quiet) for config, path in members]
    if len(fitted) == 1 and not args.flip_tta:
        return fitted[0]
    scorers, logs = zip(*fitted, strict=True)
    ensemble = EnsembleScorer.calibrated(list(scorers), task.val.images, args.flip_tta)
    return ensemble, TrainingLog(members=list(logs), images_per_second=logs[0].images_per_second)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m training.fit " + shlex.join(argv)

    def body() -> int:
        print(json.dumps(run(args, command), indent=2))
        return 0

    return run_command(body, "interrupted; the last finished epoch is checkpointed: rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
