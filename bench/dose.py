"""``python -m bench.dose``: how detection grows with the labelled trash a bin's operators give it.

The flywheel's lever is the operator's label: every trash photo labelled is one more labelled anomaly
for the anomaly terms. This bench trains the DeepMAD heads on the recyclables of each CV fold's training
part plus n of its trash photos (n drawn afresh per repeat), and reads the fold's held-out photos, on
the frozen backbone's cached features (``bench.pretrained``'s folds of the training side: no test
photo). A 5-fold training part holds 48 of the side's 60 trash photos, so the largest dose is 48.
n = 0 is the paper's DeepMAD: the anomaly terms have nothing to push (``training.fit`` says so too).
``--synthetic N`` adds a row for a new bin with no trash at all: N generated anomalies per fold (half
non-item frames, ``training.data.non_item_frames``; half two-class composites of the fold's own training
recyclables, ``training.data.composites``) are its only labelled anomalies.

Example:
    python -m bench.dose --doses 0,10,20,30,48 --terms "Deep SAD push 50" --plot docs/quality-dose.png
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.figures import save_png
from bench.pretrained import (
    ANOMALY_TERMS,
    BACKBONE,
    FOLD_SEED,
    HEAD,
    Fold,
    fold_metrics,
    held_out_distances,
    scored,
    side_features,
    training_side,
)
from training.backbones import Backbone
from training.data.base import LabeledImages, split_per_class
from training.data.composites import composite_images
from training.data.non_item_frames import non_item_frames
from training.errors import UserError, run_command
from training.features import fixed_outputs
from training.methods.deepmad import DeepMADConfig


def dose_fold(fold: Fold, dose: int, config: DeepMADConfig, rng: np.random.Generator) -> tuple[float, float, float]:
    """(AUC, caught at γ, routing) on the fold's held-out photos after training with ``dose`` of its trash."""
    recyclables = fold.train[fold.labels[fold.train] >= 0]
    trash = fold.train[fold.labels[fold.train] < 0]
    train = np.concatenate([recyclables, rng.choice(trash, size=dose, replace=False)])
    centres = config.anomaly_centres if dose >= max(config.anomaly_centres, 1) else 0
    chosen = replace(config, anomaly_centres=centres)
    scores, nearest = scored(held_out_distances(fold, train, fold.labels[train], chosen, one_class=False), centres)
    return fold_metrics(scores, nearest, fold.labels[fold.held])


def synthetic_fold(fold: Fold, images: np.ndarray, backbone: Backbone, count: int, seed: int) -> Fold:
    """``fold`` with ``count`` generated anomalies appended as label -1 and in place of its trash in training."""
    recyclables = fold.train[fold.labels[fold.train] >= 0]
    own = LabeledImages(images[recyclables], fold.labels[recyclables])
    composites = composite_images(own, count - count // 2, np.random.default_rng([seed, FOLD_SEED]))
    frames = np.stack([f for _, f in non_item_frames(count // 2, images.shape[1:3], seed)])
    generated = np.concatenate([frames, composites])
    views = [torch.from_numpy(fixed_outputs(backbone, generated, mirrored)) for mirrored in (False, True)]
    n = len(fold.labels)
    fixed = torch.cat([fold.fixed[:n], views[0], fold.fixed[n:], views[1]])
    labels = np.concatenate([fold.labels, np.full(len(generated), -1)])
    train = np.concatenate([recyclables, n + np.arange(len(generated))])
    return Fold(fixed, labels, train, fold.held, backbone)


def plot(path: Path, doses: list[int], results: dict[int, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    for column, label in [(0, "AUC"), (1, "trash caught at γ (5% false reject)"), (2, "routing")]:
        means = [results[d][:, column].mean() for d in doses]
        spreads = [results[d][:, column].std() for d in doses]
        axis.errorbar(doses, means, yerr=spreads, marker="o", capsize=3, label=label)
    axis.set_xlabel("labelled trash photos in training")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_png(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dose", description=__doc__.splitlines()[0])
    parser.add_argument("--doses", default="0,10,20,30,48", help="labelled trash photos, comma separated")
    parser.add_argument("--terms", default="Deep SAD push 50", help=f"one of: hinge, {', '.join(ANOMALY_TERMS)}")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="draws of the n trash photos per fold")
    parser.add_argument("--backbone-weights", type=Path, help="a fine-tuned model's backbone.pt (default: ImageNet's)")
    parser.add_argument("--plot", type=Path, help="write the curve as a PNG here")
    parser.add_argument("--synthetic", type=int, default=0, help="also: N generated anomalies and no trash (a new bin)")
    args = parser.parse_args(argv)

    def body() -> int:
        doses = sorted({int(d) for d in args.doses.split(",")})
        if args.terms != "hinge" and args.terms not in ANOMALY_TERMS:
            raise UserError(f"--terms must be hinge or one of {', '.join(ANOMALY_TERMS)}")
        if args.folds < 2 or args.repeats < 1 or doses[0] < 0:
            raise UserError("--folds must be at least 2, --repeats at least 1, doses at least 0")
        if args.backbone_weights is not None and not args.backbone_weights.is_file():
            raise UserError(f"--backbone-weights {args.backbone_weights} is not a file")
        torch.set_num_threads(1)
        side = training_side(args.size)
        most = int((side.labels < 0).sum() * (args.folds - 1) // args.folds)
        if doses[-1] > most:
            raise UserError(f"a {args.folds}-fold training part holds {most} trash photos; --doses go up to {most}")
        backbone = Backbone.pretrained(BACKBONE, 0, args.backbone_weights)
        fixed = torch.cat([side_features(side, backbone, m) for m in (False, True)])
        terms = {} if args.terms == "hinge" else ANOMALY_TERMS[args.terms]
        config = DeepMADConfig(backbone=BACKBONE, augment=True, **HEAD, **terms)
        parts = split_per_class(side.labels, tuple([1.0 / args.folds] * args.folds), FOLD_SEED)
        results: dict[int, np.ndarray] = {}
        weights = args.backbone_weights or "ImageNet's weights"
        print(f"# load average {os.getloadavg()[0]:.2f}; {BACKBONE} ({weights}) at {args.size}, frozen; heads: {terms}")
        print(f"# {args.folds}-fold CV on the training side x {args.repeats} draws of the trash; no test photo")
        print("| labelled trash | AUC | trash caught at γ | routing |")
        print("|---|---|---|---|")
        for dose in doses:
            rows = []
            for repeat in range(args.repeats if dose else 1):
                rng = np.random.default_rng([FOLD_SEED, dose, repeat])
                for held in parts:
                    train = np.setdiff1d(np.arange(len(side.labels)), held)
                    rows.append(dose_fold(Fold(fixed, side.labels, train, held, backbone), dose, config, rng))
            results[dose] = np.asarray(rows)
            cells = " | ".join(
                f"{m:.3f} ± {s:.3f}" for m, s in zip(results[dose].mean(0), results[dose].std(0), strict=True)
            )
            print(f"| {dose} | {cells} |", flush=True)
        if args.synthetic > 0:
            images = np.concatenate(side.parts)
            rows = []
            for index, held in enumerate(parts):
                train = np.setdiff1d(np.arange(len(side.labels)), held)
                fold = synthetic_fold(Fold(fixed, side.labels, train, held, backbone), images, backbone,
                                      args.synthetic, index)  # fmt: skip
                rows.append(
                    dose_fold(fold, int((fold.labels[fold.train] < 0).sum()), config, rng=np.random.default_rng(0))
                )
            values = np.asarray(rows)
            cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(values.mean(0), values.std(0), strict=True))
            print(
                f"| 0 (and {args.synthetic} generated: non-item frames, two-class composites) | {cells} |", flush=True
            )
        if args.plot:
            plot(args.plot, doses, results, f"DeepMAD heads ({args.terms}) on frozen {BACKBONE} features, CV")
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
