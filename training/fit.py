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
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from training.data import SOURCES, default_normal, load_dataset, make_task, parse_class_selection
from training.data.composites import with_composites
from training.engine import resolve_device
from training.errors import UserError
from training.export import check_parity, evaluate, write_artifact
from training.methods import METHODS, fit_method, get_method, make_config, prepare_task
from training.methods.deepmad import DeepMADConfig
from training.methods.drocc import DROCCConfig
from training.methods.ensemble import EnsembleScorer

PARITY_IMAGES = 64


def build_parser() -> argparse.ArgumentParser:
    defaults = DeepMADConfig()
    drocc = DROCCConfig()
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
    data.add_argument("--image-size", type=int, help="square input size (default: the source's, 32 or 28)")
    data.add_argument("--max-train-per-class", type=int, help="subsample each normal class (seeded)")
    data.add_argument(
        "--anomaly-holdout",
        type=float,
        default=0.0,
        help="share of each anomaly class taken out of the test split (fixed seed): half for model selection "
        "(reported as selection_auc), half as the outlier-exposure pool",
    )
    data.add_argument(
        "--outlier-exposure",
        action="store_true",
        help="train on the held-out exposure pool as negatives for every encoder (needs --anomaly-holdout)",
    )
    data.add_argument(
        "--exposure-from-train",
        type=int,
        default=0,
        metavar="N",
        help="draw the outlier-exposure pool from the anomaly classes' training split instead, N images per "
        "class (sources with such a split: CIFAR-10, Fashion-MNIST); selection and test images are unchanged",
    )
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
    method.add_argument("--rep-dim", type=int, default=defaults.rep_dim)
    method.add_argument("--eta", type=float, default=defaults.eta)
    method.add_argument("--delta", type=float, default=defaults.delta)
    method.add_argument("--lr", type=float, help=f"default {defaults.lr} (DROCC {drocc.lr})")
    method.add_argument(
        "--weight-decay", type=float, help=f"lambda; default {defaults.weight_decay} (DROCC {drocc.weight_decay})"
    )
    method.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size} (DROCC {drocc.batch_size})")
    method.add_argument("--ae-epochs", type=int, default=defaults.ae_epochs, help="autoencoder pretraining epochs")
    method.add_argument("--ae-lr", type=float, default=defaults.ae_lr)
    method.add_argument(
        "--epochs",
        type=int,
        help=f"encoder epochs after pretraining, default {defaults.epochs} (DROCC: all epochs, {drocc.epochs})",
    )
    method.add_argument("--radius", type=float, default=drocc.radius, help="DROCC: r of N(r)")
    method.add_argument("--gamma", type=float, default=drocc.gamma, help="DROCC: negatives at r..gamma*r")
    method.add_argument("--mu", type=float, default=drocc.mu, help="DROCC: weight of the adversarial loss")
    method.add_argument("--ascent-step-size", type=float, default=drocc.ascent_step_size, help="DROCC")
    method.add_argument("--ascent-steps", type=int, default=drocc.ascent_steps, help="DROCC: gradient ascent steps")
    method.add_argument("--only-ce-epochs", type=int, default=drocc.only_ce_epochs, help="DROCC: BCE-only epochs")
    method.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=defaults.augment,
        help="flips, +-4 px shifts, brightness jitter in both phases (not in the paper)",
    )
    method.add_argument("--seed", type=int, default=defaults.seed)
    method.add_argument("--ensemble", type=int, default=1, help="train seeds seed..seed+N-1, export one graph")
    method.add_argument(
        "--flip-tta", action="store_true", help="average each image with its mirror image inside the graph"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--threads", type=int, help="CPU threads for torch")
    run.add_argument(
        "--reject-rate", type=float, default=0.05, help="share of held-out normal items the threshold rejects"
    )
    run.add_argument("--out", type=Path, required=True, help="artifact folder (model.onnx + manifest.json)")
    run.add_argument("--name", help="model name (default: the output folder's name)")
    run.add_argument("--version", help="model version (default: UTC timestamp)")
    run.add_argument("--checkpoint", type=Path, help="checkpoint file (default: runs/<name>/checkpoint.pt)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from(args: argparse.Namespace) -> DeepMADConfig | DROCCConfig:
    for flag in ("rep_dim", "batch_size", "ae_epochs", "epochs", "ascent_steps", "only_ce_epochs"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag.endswith(("epochs", "steps")) else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.delta <= 0 or args.eta < 0:
        raise UserError("--delta must be > 0 and --eta >= 0")
    if args.radius <= 0 or args.gamma < 1:
        raise UserError("--radius must be > 0 and --gamma >= 1")
    keys = [
        "rep_dim", "eta", "delta", "lr", "weight_decay", "batch_size", "ae_epochs", "ae_lr", "epochs", "augment",
        "seed", "radius", "gamma", "mu", "ascent_step_size", "ascent_steps", "only_ce_epochs",
    ]  # fmt: skip
    return make_config(args.method, {k: getattr(args, k) for k in keys})


def run(args: argparse.Namespace, command: str) -> dict:
    if not 0.0 < args.reject_rate < 1.0:
        raise UserError("--reject-rate must lie strictly between 0 and 1")
    config = config_from(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, args.data, args.image_size, args.trash_dir)
    normal = parse_class_selection(args.normal, dataset.class_names, default_normal(dataset))
    if args.ensemble < 1:
        raise UserError("--ensemble must be at least 1")
    task = prepare_task(
        args.method,
        make_task(
            dataset,
            normal,
            args.max_train_per_class,
            args.seed,
            args.anomaly_holdout,
            args.outlier_exposure,
            args.exposure_from_train,
        ),
    )
    task = with_composites(task, args.composites, args.seed)
    name = args.name or args.out.resolve().name
    checkpoint = args.checkpoint or Path("runs") / name / "checkpoint.pt"
    print(
        f"{dataset.name}: normal {normal}, anomalies {task.anomaly_classes}; "
        f"{len(task.train)} train / {len(task.val)} val / {len(task.test)} test images; device {device}",
        file=sys.stderr,
    )
    scorer, log = fit_members(args, task, config, device, checkpoint)
    evaluation = evaluate(scorer, task, args.reject_rate)
    hyperparameters = {
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
    version = args.version or datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")
    manifest = write_artifact(
        args.out,
        scorer,
        task,
        evaluation,
        name=name,
        version=version,
        method=args.method,
        hyperparameters=hyperparameters,
        command=command,
        extra={"training_log": log, "method_description": get_method(args.method).description},
    )
    parity = check_parity(scorer, args.out / "model.onnx", task.test.images[:PARITY_IMAGES])
    metrics = manifest.test_metrics
    return {
        "out": str(args.out),
        "test_auc": metrics.auc,
        "tpr_at_threshold": metrics.tpr_at_threshold,
        "fpr_at_threshold": metrics.fpr_at_threshold,
        "threshold": manifest.threshold.value,
        "parity_max_abs_score": parity.max_abs_score,
        "images_per_second": log.get("images_per_second", {}),
    }


def fit_members(args: argparse.Namespace, task, config, device, checkpoint: Path):
    """One model, or an ensemble over consecutive seeds (one checkpoint each), as one scorer."""
    if args.ensemble == 1 and not args.flip_tta:
        return fit_method(args.method, task, config, device, checkpoint, args.resume, progress=not args.quiet)
    members, logs = [], []
    for offset in range(args.ensemble):
        member_config = dataclasses.replace(config, seed=config.seed + offset)
        member_checkpoint = checkpoint.with_name(f"{checkpoint.stem}-seed{member_config.seed}{checkpoint.suffix}")
        scorer, log = fit_method(
            args.method, task, member_config, device, member_checkpoint, args.resume, progress=not args.quiet
        )
        members.append(scorer)
        logs.append(log)
    ensemble = EnsembleScorer.calibrated(members, task.val.images, args.flip_tta)
    return ensemble, {"members": logs, "images_per_second": logs[0].get("images_per_second", {})}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    command = "python -m training.fit " + shlex.join(argv)
    # `docker stop` and schedulers send SIGTERM: stop like Ctrl-C, with the last epoch checkpointed.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        summary = run(args, command)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last finished epoch is checkpointed: rerun with --resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(summary, indent=2))
    return 0


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
