"""``python -m training.evaluate``: the paper's protocol, every (method, combination, seed), resumable.

Example:
    python -m training.evaluate --dataset cifar10 --n-normal 2 --combos "0,8;3,5" --seeds 2 \\
        --methods deepmad,deepsvdd,deepsvdd-m,drocc,drocc-m --max-train-per-class 200 --out runs/eval/c10-2
    python -m training.evaluate --dataset trashnet --n-normal 5 --combos "0,1,2,3,4" --seeds 3   # 5/1
    python -m training.evaluate --dataset trashnet --exclude-classes trash --n-normal 4 --combos all  # 4/1

Each finished run is one JSON file under ``<out>/runs/``; rerunning the same command skips them. When
all runs are done (or with ``--summary-only``) the summary is written: ``results.json``, ``results.csv``,
``summary.md`` (Table 2/3 form with 95% confidence intervals, best/worst-10, the paper's numbers beside
ours) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from training.data.base import add_holdout_flags, check_anomaly_holdout
from training.errors import UserError, run_command
from training.evaluation.executors import run_local, run_ray
from training.evaluation.protocol import RunSpec, load_for_runs, parse_combos, result_path, write_result
from training.methods import CONFIG_TYPES, METHODS, Method, parse_methods
from training.methods.config import add_config_flags

DEFAULT_METHODS = ",".join(METHODS)
# Per-method settings the sweep may override (flags from the method configurations; None keeps the
# method's default, paper tables 18-20). DROCC's epochs come from --drocc-epochs (DROCCConfig.SWEEP_FLAGS).
SWEEP_FIELDS = (
    "ae_epochs",
    "epochs",
    "ascent_steps",
    "batch_size",
    "rep_dim",
    "delta",
    "augment",
    "augment_strength",
    "pretrain",
    "routing_margin",
    "input_norm",
    "width",
    "backbone",
    "head_hidden",
    "lr",
    "weight_decay",
)
OVERRIDES: list[str] = []  # the flags' destinations, set by build_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, help="cifar10, fmnist, trashnet, recycle, folder")
    parser.add_argument("--data", type=Path, help="data root (default: DEEPMAD_DATA_ROOT or ../shared/data)")
    parser.add_argument("--trash-dir", type=Path, help="RECYCLE 5/1: a folder of trash photos (test only)")
    parser.add_argument(
        "--exclude-classes", default="", help="class names dropped from every split, e.g. trash for TrashNet 4/1"
    )
    parser.add_argument("--n-normal", type=int, default=2, help="normal classes per combination")
    parser.add_argument(
        "--input-size", type=int, help="photos resized to this square size (default: the source's; --backbone: 32k)"
    )
    parser.add_argument("--combos", default="all", help='all, N (a fixed sample of N) or "0,1;3,5"')
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma separated")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per (method, combination)")
    parser.add_argument("--max-train-per-class", type=int, help="fixed training subsample per class")
    parser.add_argument("--max-val-per-class", type=int, help="fixed validation subsample per class")
    parser.add_argument("--max-test-per-class", type=int, help="fixed test subsample per class")
    add_holdout_flags(parser)
    overrides = parser.add_argument_group("method settings for every method of the sweep (None: each method's own)")
    OVERRIDES[:] = add_config_flags(overrides, CONFIG_TYPES, only=SWEEP_FIELDS, sweep=True)
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--save-models", action="store_true", help="keep each run's scorer (for training.analyze)")
    parser.add_argument("--out", type=Path, help="results folder (default runs/evaluate/<dataset>-<n>)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary from finished runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """Seed-major order, so an interrupted sweep has whole seeds of every (method, combination)."""
    if args.seeds < 1 or args.workers < 1 or args.threads < 1:
        raise UserError("--seeds, --workers and --threads must be at least 1")
    # Checked up front, not once per run.
    check_anomaly_holdout(args.anomaly_holdout, args.outlier_exposure, args.exposure_from_train)
    methods = parse_methods(args.methods)
    overrides = {method.name: method_overrides(args, method) for method in methods}
    exclude = tuple(c.strip() for c in args.exclude_classes.split(",") if c.strip())
    trash_dir = str(args.trash_dir) if args.trash_dir else None
    dataset = load_for_runs(args.dataset, str(args.data) if args.data else None, trash_dir, exclude, args.input_size)
    n_classes = len(dataset.class_names)
    allowed = [i for i, name in enumerate(dataset.class_names) if name not in exclude]
    if not 0 < args.n_normal < len(allowed):
        raise UserError(f"--n-normal must lie between 1 and {len(allowed) - 1}")
    combos = parse_combos(args.combos, n_classes, args.n_normal, allowed)
    specs = []
    for seed in range(args.seeds):
        for combo in combos:
            for method in methods:
                spec = RunSpec(
                    dataset=args.dataset,
                    normal=combo,
                    method=method.name,
                    seed=seed,
                    overrides=dict(overrides[method.name]),
                    data=str(args.data) if args.data else None,
                    trash_dir=trash_dir,
                    exclude=exclude,
                    max_train_per_class=args.max_train_per_class,
                    max_val_per_class=args.max_val_per_class,
                    max_test_per_class=args.max_test_per_class,
                    threads=args.threads,
                    anomaly_holdout=args.anomaly_holdout,
                    outlier_exposure=args.outlier_exposure,
                    exposure_from_train=args.exposure_from_train,
                    image_size=args.input_size,
                )
                if args.save_models:
                    model = args.out / "models" / method.name / f"{spec.combo}-seed{seed}.pt"
                    spec = RunSpec(**{**spec.__dict__, "save_model": str(model.resolve())})
                specs.append(spec)
    return specs


def method_overrides(args: argparse.Namespace, method: Method) -> dict:
    """The sweep's settings as ``method`` reads them, checked by its configuration before any run starts.

    A field with its own sweep flag (DROCC's epochs: --drocc-epochs) takes that flag's value only;
    the other sweep-only flags are dropped.
    """
    given = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    renamed = method.config_type.SWEEP_FLAGS
    sweep_only = {flag for m in METHODS.values() for flag in m.config_type.SWEEP_FLAGS.values()}
    overrides = {k: v for k, v in given.items() if k not in renamed and k not in sweep_only}
    overrides.update({field: given[flag] for field, flag in renamed.items() if flag in given})
    method.config(overrides)
    return overrides


def sweep(args: argparse.Namespace, specs: list[RunSpec]) -> list[tuple[str, str]]:
    """Run the unfinished specs; returns (run key, error) for the runs that failed."""
    todo = [s for s in specs if not _finished(args.out, s)]
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    if not todo:
        return []
    if args.executor == "ray":
        results = run_ray(todo, args.workers, args.threads, args.ray_address)
    else:
        results = run_local(todo, args.workers)
    failures = []
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), disable=args.quiet, file=sys.stderr, desc="runs")
    started = time.perf_counter()
    for spec, outcome in results:
        if isinstance(outcome, BaseException):
            failures.append((spec.key, f"{type(outcome).__name__}: {outcome}"))
            print(f"\nrun {spec.key} failed: {failures[-1][1]}", file=sys.stderr)
        else:
            write_result(args.out, spec, outcome)
            bar.set_postfix(last=f"{spec.key} auc={outcome['auc']:.3f}")
        bar.update(1)
    bar.close()
    print(f"sweep wall time {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return failures


def _finished(out: Path, spec: RunSpec) -> bool:
    """A run is done when its result exists; one made with other settings is an error, never mixed in."""
    path = result_path(out, spec)
    if not path.exists():
        return False
    stored = json.loads(path.read_text())
    fields = ("overrides", "max_train_per_class", "max_val_per_class", "max_test_per_class", "data", "exclude")
    # Older results lack the later fields; they were made with these values.
    defaults = {"anomaly_holdout": 0.0, "outlier_exposure": False, "exposure_from_train": 0, "image_size": None}
    for field in (*fields, *defaults):
        if stored.get(field, defaults.get(field, [])) != spec.as_dict()[field]:
            raise UserError(f"{path} was made with other settings ({field}); use another --out or delete it")
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.out = args.out or Path("runs") / "evaluate" / f"{args.dataset}-{args.n_normal}"
    command = "python -m training.evaluate " + shlex.join(argv)

    def body() -> int:
        specs = plan(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "command.txt").write_text(command + "\n")
        failures = [] if args.summary_only else sweep(args, specs)
        from training.evaluation.report import write_summary

        summary = write_summary(args.out, [s.key for s in specs], command)
        print(json.dumps({**summary, "failures": failures}, indent=2))
        return 1 if failures else 0

    return run_command(body, "interrupted; finished runs are kept: rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
