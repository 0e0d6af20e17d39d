"""``python -m training.analyze``: section 5.1 of the paper for one trained detector.

Per class, ``--per-class`` random test images go through the detector; we keep the last-layer features
(the encoders' rep_dim outputs; DROCC's rep_dim/2 hidden layer) and the scores. Then:

- Table 4: for every feature dimension, a two-sample Kolmogorov-Smirnov test (scipy) between the normal
  class's features and class j's; h = 1 where the null (same distribution) is rejected at 5%, summed
  over dimensions. Pooled detectors compare the normal classes together; per-class detectors (DeepMAD,
  the (m) variants) compare encoder i's features of class i with its features of class j, per i.
- Figures 5-7: the empirical CDF of the score (distance to the nearest centre; DROCC's -log P(normal))
  per class.

Example:
    python -m training.analyze --model runs/evaluate/cifar10-2/models/deepmad/6-8-seed0.pt --out runs/analyze/x
    python -m training.analyze --dataset cifar10 --normal 0,8 --method drocc --epochs 5 --out runs/analyze/y
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from flywheel.metrics import roc_auc
from training.data import load_dataset, make_task, parse_class_selection
from training.errors import UserError, run_command
from training.methods import CONFIG_TYPES, METHODS, get_method
from training.methods.config import add_config_flags

SIGNIFICANCE = 0.05
ANALYSIS_SEED = 7


def ks_h(reference: np.ndarray, other: np.ndarray, alpha: float = SIGNIFICANCE) -> int:
    """Number of feature dimensions where a two-sample KS test rejects "same distribution" at ``alpha``."""
    rejected = 0
    for d in range(reference.shape[1]):
        if stats.ks_2samp(reference[:, d], other[:, d]).pvalue < alpha:
            rejected += 1
    return rejected


def ks_table(features: np.ndarray, classes: np.ndarray, normal: list[int], n_classes: int) -> dict[str, list[int]]:
    """Rows of Table 4: reference name -> h per class j. features [N, k, F]; classes [N] data set labels."""
    if features.shape[1] == 1:
        reference = features[np.isin(classes, normal), 0]
        name = "(" + ",".join(map(str, normal)) + ")"
        return {name: [ks_h(reference, features[classes == j, 0]) for j in range(n_classes)]}
    rows = {}
    for column, own in enumerate(normal):
        reference = features[classes == own, column]
        rows[str(own)] = [ks_h(reference, features[classes == j, column]) for j in range(n_classes)]
    return rows


def sample_test(dataset, per_class: int, seed: int = ANALYSIS_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [
        rng.permutation(np.flatnonzero(dataset.test.labels == c))[:per_class] for c in range(len(dataset.class_names))
    ]
    return np.sort(np.concatenate(picks))


def plot_cdfs(scores: np.ndarray, classes: np.ndarray, names: list[str], normal: list[int], title: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, name in enumerate(names):
        values = np.sort(scores[classes == j])
        if len(values) == 0:
            continue
        heavy = j in normal
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", lw=2.4 if heavy else 1.0,
                ls="-" if heavy else "--", label=f"{j} {name}" + (" (normal)" if heavy else ""))  # fmt: skip
    ax.set_xlabel("score (higher = more anomalous)")
    ax.set_ylabel("CDF")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a scorer saved by training.evaluate --save-models")
    parser.add_argument("--dataset", help="train a detector here instead of --model")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--normal", help="normal classes by name or index (with --dataset)")
    parser.add_argument("--method", default="deepmad", choices=list(METHODS))
    parser.add_argument("--max-train-per-class", type=int)
    add_config_flags(parser.add_argument_group("method (with --dataset)"), CONFIG_TYPES)
    parser.add_argument("--per-class", type=int, default=100, help="test images per class (paper: 100)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def load_or_train(args: argparse.Namespace):
    """(scorer, data set, method name, normal class indices)."""
    if args.model:
        if not args.model.exists():
            raise UserError(f"no saved model at {args.model}")
        saved = torch.load(args.model, map_location="cpu", weights_only=False)
        spec = saved["spec"]
        dataset = load_dataset(spec["dataset"], Path(spec["data"]) if spec["data"] else None)
        return saved["scorer"], dataset, spec["method"], list(spec["normal"])
    if not args.dataset:
        raise UserError("give --model PATH or --dataset NAME")
    dataset = load_dataset(args.dataset, args.data)
    normal = parse_class_selection(args.normal, dataset.class_names, dataset.class_names[:2])
    method = get_method(args.method)
    task = method.prepare(make_task(dataset, normal, args.max_train_per_class, seed=0))
    scorer, _ = method.fit(task, method.config(vars(args)), torch.device("cpu"), progress=True)
    return scorer, dataset, args.method, [dataset.class_names.index(n) for n in normal]


def analyze(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    scorer, dataset, method, normal = load_or_train(args)
    index = sample_test(dataset, args.per_class)
    classes = dataset.test.labels[index]
    distances, features = scorer.distances_and_features(dataset.test.images[index])
    scores = distances.min(axis=1)
    auc = roc_auc(scores, ~np.isin(classes, normal))
    table = ks_table(features, classes, normal, len(dataset.class_names))
    args.out.mkdir(parents=True, exist_ok=True)
    combo = ",".join(map(str, normal))
    title = f"{method} on {dataset.name}, normal ({combo}): AUC {auc:.3f} on {len(index)} test images"
    plot_cdfs(scores, classes, dataset.class_names, normal, title, args.out / "cdf.png")
    header = "| KS(reference, -) | " + " | ".join(str(j) for j in range(len(dataset.class_names))) + " |"
    lines = [f"{title}; h = dimensions (of {features.shape[2]}) where KS rejects at 5%", "", header,
             "|---|" + "---|" * len(dataset.class_names)]  # fmt: skip
    lines += [f"| KS({name}, -) | " + " | ".join(map(str, row)) + " |" for name, row in table.items()]
    (args.out / "ks.md").write_text("\n".join(lines) + "\n")
    result = {"method": method, "dataset": dataset.name, "normal": normal, "auc": auc, "feature_dim": features.shape[2],
              "per_class": args.per_class, "ks_h": table}  # fmt: skip
    (args.out / "ks.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        result = analyze(args)
        print((args.out / "ks.md").read_text())
        print(json.dumps({"auc": result["auc"], "out": str(args.out)}))
        return 0

    return run_command(body, "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
