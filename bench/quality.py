"""TrashNet 5/1 detection-quality ablation: each lever's test AUC over seeds, chosen on the selection split.

Every run is a plain ``python -m training.fit`` command (printed), so any row can be reproduced alone.
Runs use ``--anomaly-holdout 0.5``: a fixed half of the trash photos leaves the test split — one
quarter for choosing settings (selection AUC, with validation normals), one quarter as the outlier
exposure pool — so every variant is tested on the same untouched trash photos. Seed ensembles and
mirror-view averaging reuse the single-seed checkpoints (``--resume``), so they cost no training.

Usage:
    python bench/quality.py                     # 3 seeds, the levers below; prints a markdown table
    python bench/quality.py --seeds 1 --ae-epochs 2 --epochs 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from training.errors import UserError, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "trashnet", "--anomaly-holdout", "0.5", "--quiet"]
VARIANTS = {  # name -> extra fit flags
    "augment": ["--augment"],
    "augment + outlier exposure": ["--augment", "--outlier-exposure"],
    "augment + composites": ["--augment", "--composites", "360"],
    "augment + outlier exposure + composites": ["--augment", "--outlier-exposure", "--composites", "360"],
    "augment + outlier exposure + lr 5e-4": ["--augment", "--outlier-exposure", "--lr", "5e-4"],
    "augment + outlier exposure + rep_dim 64": ["--augment", "--outlier-exposure", "--rep-dim", "64"],
    "augment + outlier exposure + delta 4.1": ["--augment", "--outlier-exposure", "--delta", "4.1"],
    "augment + outlier exposure + delta 16.4": ["--augment", "--outlier-exposure", "--delta", "16.4"],
}
SLUGS = {  # the run folder of each variant under --runs
    "augment + outlier exposure + lr 5e-4": "augment-outlier-exposure-lr5e-4",
    "augment + outlier exposure + rep_dim 64": "augment-outlier-exposure-rep64",
    "augment + outlier exposure + delta 4.1": "augment-outlier-exposure-delta4.1",
    "augment + outlier exposure + delta 16.4": "augment-outlier-exposure-delta16.4",
}


def fit(args: list[str]) -> tuple[dict, float]:
    command = [sys.executable, "-m", "training.fit", *args]
    print("$ python -m training.fit " + shlex.join(args), file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode == 2:  # bad input: training.fit's one error line, said once
        raise UserError(result.stderr.strip().splitlines()[-1].removeprefix("error: "))
    if result.returncode != 0:
        sys.exit(f"fit failed:\n{result.stderr[-2000:]}")
    summary = json.loads(result.stdout)
    manifest = json.loads((Path(summary["out"]) / "manifest.json").read_text())
    return manifest["test_metrics"], time.perf_counter() - start


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    half = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {half:.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ae-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs" / "quality")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch threads per training (default: torch's)")
    return parser


def variant_rows(name: str, options: argparse.Namespace, schedule: list[str]) -> list[tuple]:
    """One training variant: a model per seed, alone and with the mirror view, then the seeds' ensembles."""
    slug = SLUGS.get(name, name.replace(" + ", "-").replace(" ", "-"))
    folder = options.runs / slug
    base = [*COMMON, *schedule, *VARIANTS[name]]
    singles, flipped, seconds = [], [], []
    for seed in range(options.seeds):
        checkpoint = folder / f"checkpoint-seed{seed}.pt"
        resume = ["--resume"] if checkpoint.exists() else []
        metrics, took = fit(
            [*base, "--seed", str(seed), "--out", str(folder / f"seed{seed}"), "--checkpoint", str(checkpoint), *resume]
        )
        singles.append(metrics)
        seconds.append(took)
        metrics, _ = fit(
            [*base, "--seed", str(seed), "--flip-tta", "--resume", "--out", str(folder / f"seed{seed}-flip")]
            + ["--checkpoint", str(folder / "checkpoint.pt")]
        )
        flipped.append(metrics)
    rows = [(name, "single model", singles, statistics.fmean(seconds)), (name, "+ mirror view", flipped, 0.0)]
    if options.seeds > 1:
        for flags, label in (
            ([], f"ensemble of {options.seeds}"),
            (["--flip-tta"], f"ensemble of {options.seeds} + mirror view"),
        ):
            metrics, _ = fit(
                [*base, "--seed", "0", "--ensemble", str(options.seeds), *flags, "--resume"]
                + ["--out", str(folder / label.replace(" ", "-")), "--checkpoint", str(folder / "checkpoint.pt")]
            )
            rows.append((name, label, [metrics], options.seeds * statistics.fmean(seconds)))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.quality: interrupted")


def _main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.seeds < 1:
        raise UserError("--seeds must be at least 1")
    schedule = ["--ae-epochs", str(options.ae_epochs), "--epochs", str(options.epochs)]
    if options.threads:
        schedule += ["--threads", str(options.threads)]
    rows = [row for name in options.variants.split(",") for row in variant_rows(name, options, schedule)]
    print(
        f"\nTrashNet 5/1, {options.ae_epochs} autoencoder + {options.epochs} encoder epochs, "
        f"seeds 0..{options.seeds - 1}; AUC mean ± half-range over seeds\n"
    )
    print("| training | scoring | selection AUC | test AUC | TPR at γ | FPR at γ | CPU training s |")
    print("|---|---|---|---|---|---|---|")
    for name, scoring, metrics, seconds in rows:
        print(
            f"| {name} | {scoring} | {spread([m['extra']['selection_auc'] for m in metrics])} | "
            f"{spread([m['auc'] for m in metrics])} | {spread([m['tpr_at_threshold'] for m in metrics])} | "
            f"{spread([m['fpr_at_threshold'] for m in metrics])} | {seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
