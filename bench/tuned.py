"""``python -m bench.tuned``: every block of EfficientNet-Lite tuned, DeepMAD against a classifier tuned the same way.

With every block trained, one fold costs minutes on 2 cores, so this is its own bench with k-fold CV (3
by default) over the same training side as ``bench.pretrained`` (train + validation recyclables, the 60
trash photos held out of test; no test photo is read). Every recipe trains through the product's
``training.methods.backbone.tune_end_to_end``: the same augmentation (``--augment-strength``), AdamW
one-cycle schedule, epochs and batch size; only the head and the loss differ. Each finished fold is
appended to ``--log`` as one JSON line; a rerun with the same settings skips the folds already there
(it resumes fold by fold), and the table is printed from the log (``--report``).

Recipes:
  deepmad-<terms>  DeepMAD heads (``GroupedHead``, δ 2, fixed centres from the ImageNet features) with an
                   anomaly term set from ``TERMS``; score by the product's rule (``bench.pretrained.scored``)
  classifier       6-way linear head on the standardised features, trash as class 5, class-weighted
                   cross-entropy; score = P(trash), route = most probable recyclable
  synthetic        DeepMAD with no trash in training: non-item frames and two-class composites are the
                   only labelled anomalies (a new bin), Deep SAD push 20

Example:
    python -m bench.tuned --recipes deepmad-sad20,classifier --folds 3 --epochs 6
    python -m bench.tuned --report
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bench.pretrained import FOLD_SEED, REJECT_RATE, fold_metrics, scored, training_side
from training.backbones import ALL_BLOCKS, Backbone, check_input_size, lite_normaliser
from training.batches import to_float
from training.data.base import LabeledImages, split_per_class
from training.data.composites import composite_images
from training.data.non_item_frames import non_item_frames
from training.engine import RunOptions, resolve_device
from training.errors import UserError, run_command
from training.features import fixed_outputs
from training.methods.backbone import train_tuned, tune_end_to_end
from training.methods.deepmad import DeepMADConfig

# The tuned recipe (DESIGN.md, "before round 4"): every block, strong augmentation, AdamW one-cycle.
TUNED = DeepMADConfig(
    backbone="efficientnet-lite0",
    tune_blocks=ALL_BLOCKS,
    augment=True,
    augment_strength="strong",
    rep_dim=32,
    head_hidden=256,
    lr=1e-3,
    backbone_lr=3e-4,
    delta=2.0,
    weight_decay=1e-2,
    epochs=6,
    batch_size=32,
)
TERMS = {
    "hinge": {},
    "sad20": {"anomaly_push": "deepsad", "anomaly_weight": 20.0},
    "sad50": {"anomaly_push": "deepsad", "anomaly_weight": 50.0},
    "centre1": {"anomaly_centres": 1},
    "sad20-centre1": {"anomaly_push": "deepsad", "anomaly_weight": 20.0, "anomaly_centres": 1},
}
RECIPES = (*(f"deepmad-{t}" for t in TERMS), "classifier", "synthetic")
SYNTHETIC_FRAMES, SYNTHETIC_COMPOSITES = 100, 100  # the "synthetic" recipe's exposure per fold
DEFAULT_LOG = Path("runs/bench-tuned.jsonl")


class TunedClassifier(nn.Module):
    """Backbone -> the training photos' feature standardisation -> one linear layer of 6 logits."""

    def __init__(self, backbone: Backbone, mean: torch.Tensor, std: torch.Tensor, classes: int = 6):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.out_dim, classes)
        self.register_buffer("feature_mean", mean.view(1, -1))
        self.register_buffer("feature_std", std.view(1, -1))

    def embed_shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.backbone(x) - self.feature_mean) / self.feature_std)


@torch.no_grad()
def outputs(network: nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Eval-mode ``embed_shared`` of uint8 photos, 32 at a time."""
    network.eval()
    normaliser = lite_normaliser().to(device)
    chunks = [
        network.embed_shared(to_float(torch.from_numpy(images[s : s + 32]).to(device), normaliser)).float().cpu()
        for s in range(0, len(images), 32)
    ]
    return torch.cat(chunks)


def run_deepmad(config: DeepMADConfig, train: LabeledImages, held: np.ndarray, device: torch.device):
    labels = torch.from_numpy(train.labels)
    encoder, centres, _ = train_tuned(train.images, labels, 5, {}, config, RunOptions(device), one_class=False)
    z = outputs(encoder, held, device)
    return scored((z - centres.unsqueeze(0)).pow(2).sum(-1).sqrt(), config.anomaly_centres)


def run_classifier(config: DeepMADConfig, train: LabeledImages, held: np.ndarray, device: torch.device):
    targets = torch.from_numpy(np.where(train.labels < 0, 5, train.labels))
    pooled = torch.from_numpy(fixed_outputs(Backbone.pretrained(config.backbone), train.images, False, device))
    normal = targets < 5
    mean, std = pooled[normal].mean(0), pooled[normal].std(0).clamp_min(1e-3)
    torch.manual_seed(config.seed)
    network = TunedClassifier(Backbone.pretrained(config.backbone, ALL_BLOCKS), mean, std).to(device)
    counts = torch.bincount(targets, minlength=6).float()
    weights = (counts.sum() / (6 * counts.clamp_min(1))).to(device)  # class-balanced cross-entropy

    def loss(logits: torch.Tensor, batch_targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, batch_targets, weight=weights)

    tune_end_to_end(network, train.images, targets, loss, config, RunOptions(device), {})
    probabilities = outputs(network, held, device).softmax(-1)
    return probabilities[:, 5].numpy(), probabilities[:, :5].argmax(1).numpy()


def synthetic_exposure(train: LabeledImages, seed: int) -> LabeledImages:
    """The fold's recyclables with generated non-item frames and two-class composites as the only anomalies."""
    recyclables = LabeledImages(train.images[train.labels >= 0], train.labels[train.labels >= 0])
    height, width = recyclables.images.shape[1:3]
    frames = np.stack([frame for _, frame in non_item_frames(SYNTHETIC_FRAMES, (height, width), seed)])
    composites = composite_images(recyclables, SYNTHETIC_COMPOSITES, np.random.default_rng([seed, FOLD_SEED]))
    images = np.concatenate([recyclables.images, frames, composites])
    labels = np.concatenate([recyclables.labels, np.full(len(frames) + len(composites), -1)])
    return LabeledImages(images, labels.astype(np.int64))


def run_recipe(name: str, config: DeepMADConfig, train: LabeledImages, held: np.ndarray, device: torch.device):
    if name == "classifier":
        return run_classifier(config, train, held, device)
    if name == "synthetic":
        chosen = replace(config, **TERMS["sad20"])
        return run_deepmad(chosen, synthetic_exposure(train, config.seed), held, device)
    return run_deepmad(replace(config, **TERMS[name.removeprefix("deepmad-")]), train, held, device)


def logged(log: Path) -> list[dict]:
    """The finished folds in ``log`` (none when it does not exist yet)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def same_run(entry: dict, args: argparse.Namespace) -> bool:
    """A logged fold of this run's settings: a rerun skips it (the bench resumes fold by fold)."""
    return (entry["size"], entry["epochs"], entry["folds"]) == (args.size, args.epochs, args.folds)


def report(log: Path) -> None:
    """The table of every (recipe, size, epochs) in the log: mean ± sd over its folds."""
    rows: dict[tuple, list] = {}
    for entry in logged(log):
        key = (entry["recipe"], entry["size"], entry["epochs"], entry["folds"])
        rows.setdefault(key, []).append(entry)
    print(
        f"# {log}; k-fold CV on the training side (no test photo); γ rejects {REJECT_RATE:.0%} of held-out recyclables"
    )
    print("| recipe | input | epochs | folds done | AUC | trash caught at γ | routing | min/fold |")
    print("|---|---|---|---|---|---|---|---|")
    for (recipe, size, epochs, folds), entries in rows.items():
        values = np.array([[e["auc"], e["caught"], e["routing"]] for e in entries])
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(values.mean(0), values.std(0), strict=True))
        minutes = np.mean([e["seconds"] for e in entries]) / 60
        print(f"| {recipe} | {size} | {epochs} | {len(entries)} of {folds} | {cells} | {minutes:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tuned", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="deepmad-sad20,classifier", help="comma separated (see the module doc)")
    parser.add_argument("--size", type=int, default=224, help="input size (a multiple of 32)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--only-folds", help="run these folds only (0-based, comma separated): split a long run")
    parser.add_argument("--epochs", type=int, default=TUNED.epochs)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", type=Path, default=DEFAULT_LOG, help="JSON lines, one per finished fold")
    parser.add_argument("--report", action="store_true", help="print the table from --log and stop")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.report:
            report(args.log)
            return 0
        if args.folds < 2:
            raise UserError("--folds must be at least 2")
        if args.epochs < 1 or args.threads < 1:
            raise UserError("--epochs and --threads must be at least 1")
        check_input_size(TUNED.backbone, args.size)
        names = [n.strip() for n in args.recipes.split(",") if n.strip()]
        config = replace(TUNED, epochs=args.epochs)
        unknown = [n for n in names if n not in RECIPES]
        if unknown:  # checked before minutes of training
            raise UserError(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
        wanted = [int(f) for f in args.only_folds.split(",")] if args.only_folds else list(range(args.folds))
        torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        side = training_side(args.size)
        images = np.concatenate(side.parts)
        parts = split_per_class(side.labels, tuple([1.0 / args.folds] * args.folds), FOLD_SEED)
        print(f"# load average {os.getloadavg()[0]:.2f}; device {device}; {len(images)} photos", file=sys.stderr)
        done = {(e["recipe"], e["fold"]) for e in logged(args.log) if same_run(e, args)}
        for index in wanted:  # fold by fold, so a run cut short still compares the recipes on the same folds
            for name in names:
                if (name, index) in done:
                    continue
                held = parts[index]
                train = np.setdiff1d(np.arange(len(images)), held)
                started = time.perf_counter()
                fold_train = LabeledImages(images[train], side.labels[train])
                scores, nearest = run_recipe(name, config, fold_train, images[held], device)
                auc, caught, routing = fold_metrics(scores, nearest, side.labels[held])
                entry = {
                    "recipe": name, "size": args.size, "epochs": args.epochs, "folds": args.folds, "fold": index,
                    "auc": auc, "caught": caught, "routing": routing,
                    "seconds": time.perf_counter() - started, "load_average": os.getloadavg()[0], "device": str(device),
                }  # fmt: skip
                args.log.parent.mkdir(parents=True, exist_ok=True)
                with args.log.open("a") as out:
                    out.write(json.dumps(entry) + "\n")
                print(json.dumps(entry), file=sys.stderr, flush=True)
        report(args.log)
        return 0

    return run_command(body, "interrupted; finished folds are in --log")


if __name__ == "__main__":
    sys.exit(main())
