"""Scoring levers that need no training: how the per-class distances of finished models become a score.

DeepMAD scores an item by its minimum distance over the class encoders. This compares that rule with
per-class standardised distances (by each class's own validation distances, or by all validation items),
the margin to the second-nearest class, and averaging the distances of extra test-time views (mirror,
vertical flip, 2-pixel shifts) before the minimum. It resumes the finished checkpoints that
``bench/quality.py`` trained (nothing is retrained) and prints selection and test AUC per rule.

Usage:
    python bench/score_rules.py --variant augment-outlier-exposure --seeds 0,1,2 --flags="--augment --outlier-exposure"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from flywheel.metrics import roc_auc
from training.data import default_normal, load_dataset, make_task
from training.errors import run_command
from training.fit import build_parser, config_from
from training.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[1]


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
    return np.ascontiguousarray(padded[:, 4 + dy : 36 + dy, 4 + dx : 36 + dx])


VIEWS = {
    "mirror": lambda a: np.ascontiguousarray(a[:, :, ::-1]),
    "vertical flip": lambda a: np.ascontiguousarray(a[:, ::-1]),
    "shift ++": lambda a: shifted(a, 2, 2),
    "shift --": lambda a: shifted(a, -2, -2),
    "shift +-": lambda a: shifted(a, 2, -2),
    "shift -+": lambda a: shifted(a, -2, 2),
}
SHIFTS = ["shift ++", "shift --", "shift +-", "shift -+"]
VIEW_SETS = {
    "+ mirror": ["mirror"],
    "+ mirror + vertical flip": ["mirror", "vertical flip"],
    "+ four 2-px shifts": SHIFTS,
    "+ mirror + four shifts": ["mirror", *SHIFTS],
}


def rules(val: np.ndarray, val_labels: np.ndarray) -> dict:
    """Score rules over distances [N, m], fitted on validation normals only."""
    m = val.shape[1]
    own_mean = np.array([val[val_labels == i, i].mean() for i in range(m)])
    own_std = np.array([val[val_labels == i, i].std() for i in range(m)])
    own_median = np.array([np.median(val[val_labels == i, i]) for i in range(m)])
    return {
        "min distance (DeepMAD)": lambda d: d.min(1),
        "min of own-class z-scores": lambda d: ((d - own_mean) / own_std).min(1),
        "min of distance / own-class median": lambda d: (d / own_median).min(1),
        "min of z-scores over all validation items": lambda d: ((d - val.mean(0)) / val.std(0)).min(1),
        "minus margin to the second-nearest class": lambda d: -np.diff(np.sort(d, 1)[:, :2], axis=1)[:, 0],
    }


def measure(variant: str, seed: int, flags: list[str], ae_epochs: int, epochs: int) -> dict[str, tuple[float, float]]:
    argv = ["--dataset", "trashnet", "--anomaly-holdout", "0.5", "--ae-epochs", str(ae_epochs), "--epochs"]
    args = build_parser().parse_args([*argv, str(epochs), *flags, "--seed", str(seed), "--out", "unused"])
    dataset = load_dataset("trashnet", None, args.image_size, None)
    task = make_task(dataset, default_normal(dataset), None, seed, 0.5, args.outlier_exposure)
    task = METHODS["deepmad"].prepare(task)
    checkpoint = REPO_ROOT / "runs" / "quality" / variant / f"checkpoint-seed{seed}.pt"
    if not checkpoint.exists():
        raise SystemExit(f"no checkpoint {checkpoint}: run bench/quality.py for this variant first")
    scorer, _ = METHODS["deepmad"].fit(task, config_from(args), torch.device("cpu"), checkpoint, True, progress=False)
    splits = {"val": task.val.images, "selection": task.selection.images, "test": task.test.images}
    cache: dict[tuple[str, str], np.ndarray] = {}

    def distances(split: str, views: list[str]) -> np.ndarray:
        for view in views:
            if (split, view) not in cache:
                images = splits[split] if view == "identity" else VIEWS[view](splits[split])
                cache[split, view] = scorer.score_arrays(images)[0]
        return np.mean([cache[split, v] for v in views], axis=0)

    def aucs(score, views: list[str]) -> tuple[float, float]:
        val, selection, test = (score(distances(s, views)) for s in splits)
        labels = np.r_[np.zeros(len(val), bool), np.ones(len(selection), bool)]
        return roc_auc(np.concatenate([val, selection]), labels), roc_auc(test, task.test_anomalous)

    fitted = rules(distances("val", ["identity"]), task.val.labels)
    results = {name: aucs(rule, ["identity"]) for name, rule in fitted.items()}
    for name, views in VIEW_SETS.items():
        results[f"min distance {name}"] = aucs(lambda d: d.min(1), ["identity", *views])
    return results


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.score_rules: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="augment-outlier-exposure", help="folder under runs/quality")
    parser.add_argument("--flags", default="--augment --outlier-exposure", help="the fit flags it was trained with")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ae-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    per_seed = [
        measure(options.variant, int(s), shlex.split(options.flags), options.ae_epochs, options.epochs)
        for s in options.seeds.split(",")
    ]
    print(f"\n{options.variant}, seeds {options.seeds}: mean over seeds (min .. max)\n")
    print("| score rule | selection AUC | test AUC |")
    print("|---|---|---|")
    for name in per_seed[0]:
        cells = []
        for index in (0, 1):
            values = [r[name][index] for r in per_seed]
            cells.append(f"{statistics.fmean(values):.3f} ({min(values):.3f} .. {max(values):.3f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
