"""``python -m bench.new_class``: how well the heads learn a new category from N labelled photos (issue 36).

The paper's 4/1 setting, on frozen EfficientNet-Lite0 features at 224 (cached) through the product's
``training.methods.backbone.train_heads``: each TrashNet recyclable in turn is held out of training but
for N of its photos (a seeded draw; N = 10, 30, 100); the heads train on the other four classes, those N
photos and the labelled trash (outlier exposure), with each recipe of ``RECIPES`` (the shipped recipe's
flags plus the recipe's). What is read on photos no model trained on:

- new-class routing: the share of the held-out class's photos routed to it (mean over the five classes,
  and the worst class);
- old classes' routing after the add, against the five-class model trained on all photos (``full``) on
  the same photos: adding a class costs the old ones some routing even at full strength;
- trash caught at γ (training's rule, ``flywheel.metrics.choose_gamma``: γ rejects 5% of held-out
  recyclables), against the same ``full`` model.

By default the read photos are cross-validation folds of the training side (``bench.pretrained``'s
folds: train + validation recyclables, the 60 trash photos outside the test split), γ from the held fold's
recyclables; no test photo is read. ``--test RECIPE`` is the one read of the test split, for the recipe
chosen by that CV: the heads train on TrashNet's training split (the N photos drawn from it) and the 30
exposure trash photos as the shipped model does, γ from the validation split, read on the 410 test
recyclables and 59 test trash photos. ``--round DIR`` runs one live round first (``run_round``).

Example:
    python -m bench.new_class --folds 2 --plot docs/flywheel-new-class.png
    python -m bench.new_class --test "fill classes + scale 0.5" --round runs/new-class
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.figures import save_png
from bench.flywheel import (
    ADMIN_TOKEN,
    OPERATOR_TOKEN,
    add_to_tree,
    bin_service,
    data_root,
    folder_exposure,
    trashnet_splits,
    wait_for_captures,
)
from bench.pretrained import BACKBONE, FOLD_SEED, HEAD
from flywheel.captures import in_audit
from flywheel.metrics import choose_gamma
from training.backbones import Backbone
from training.data import load_dataset, make_task
from training.data.base import split_per_class
from training.data.folders import TRASHNET_ANOMALY, TRASHNET_NORMAL
from training.engine import RunOptions
from training.errors import UserError, run_command
from training.features import fixed_outputs
from training.methods.backbone import CachedInputs, train_heads
from training.methods.deepmad import DeepMADConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
REJECT_RATE = 0.05
HEADER = (
    "| recipe | N | new-class routing | worst class | old classes' routing (vs full) | trash caught at γ (vs full) "
    "| s per fit |\n|---|---|---|---|---|---|---|"
)
SIZE = 224
# The shipped recipe (make train-trashnet-pretrained) and what each recipe changes.
SHIPPED = DeepMADConfig(backbone=BACKBONE, augment=True, anomaly_push="deepsad", anomaly_weight=50.0, **HEAD)
RECIPES = {
    "naive": {},
    "class push 1": {"class_push": 1.0},
    "fill classes": {"fill_classes": True},
    "fill classes + scale 0.5": {"fill_classes": True, "class_scale": 0.5},
}
# By CV (docs/flywheel.md): the k with the best new-class routing at N = 30 whose old classes stay within 0.01
# and trash caught within 0.03 of the full model at every N (0.6 drops caught by 0.037 at N = 10).
CHOSEN = "fill classes + scale 0.5"
# The live round: the class it adds, the photos an operator labels, and the product's commands' flags.
ROUND_CLASS = "metal"
ROUND_PHOTOS, ROUND_AUDIT_PHOTOS, AUDIT_SHARE = 30, 8, 0.2
ROUND_RECIPE = [
    "--backbone",
    BACKBONE,
    "--input-size",
    str(SIZE),
    "--rep-dim",
    "32",
    "--head-hidden",
    "256",
    "--lr",
    "1e-3",
    "--delta",
    "2",
    "--weight-decay",
    "1e-2",
    "--epochs",
    "30",
    "--batch-size",
    "256",
    "--anomaly-push",
    "deepsad",
    "--anomaly-weight",
    "50",
    "--augment",
    "--seed",
    "0",
    "--threads",
    "2",
    "--quiet",
]  # fmt: skip  (make train-trashnet-pretrained's)
# A new class costs the audit AUC a little (0.930 -> 0.905 in the live round): this site accepts 0.03.
ROUND_GATE = ["--min-gain", "-0.03"]


@dataclass
class Photos:
    """Cached features of every photo and its mirror image ([2N, F]: the photos, then the mirrors), labels
    (0..4 recyclables, -1 trash), and which rows train, set γ and are read."""

    fixed: torch.Tensor
    labels: np.ndarray
    train: np.ndarray
    calibrate: np.ndarray
    read: np.ndarray


@dataclass
class Reading:
    new: float  # the new class's routing
    old: float  # the other classes' routing (pooled over their photos)
    caught: float  # trash caught at γ


def with_few(photos: Photos, held: int, n: int, draw: int) -> np.ndarray:
    """The training rows with class ``held`` cut to ``n`` photos (seeded by class, n and draw)."""
    own = photos.train[photos.labels[photos.train] == held]
    if n > len(own):
        raise UserError(f"class {TRASHNET_NORMAL[held]} has {len(own)} training photos here, fewer than N = {n}")
    picked = np.random.default_rng([FOLD_SEED, held, n, draw]).choice(own, n, replace=False)
    return np.sort(np.concatenate([photos.train[photos.labels[photos.train] != held], picked]))


def distances(photos: Photos, rows: np.ndarray, config: DeepMADConfig, backbone: Backbone) -> torch.Tensor:
    """Heads trained on ``rows`` (and their mirror images) by the product's ``train_heads``; the distances
    [photos, 5] of every photo that sets γ or is read."""
    n = len(photos.labels)
    inputs = CachedInputs(backbone, photos.fixed[np.concatenate([rows, rows + n])], torch.from_numpy(
        np.tile(photos.labels[rows], 2)), len(rows), SIZE)  # fmt: skip
    encoder, centres, _ = train_heads(inputs, {}, len(TRASHNET_NORMAL), config, RunOptions(torch.device("cpu")), False)
    with torch.no_grad():
        z = encoder.from_fixed(photos.fixed[:n])
    return (z - centres.unsqueeze(0)).pow(2).sum(-1).sqrt()


def read(photos: Photos, d: torch.Tensor, held: int | None) -> dict[int, Reading]:
    """Per class h (or only ``held``): h's routing, the other classes' routing, trash caught at γ."""
    score, nearest = d.min(1).values.numpy(), d.argmin(1).numpy()
    gamma = choose_gamma(score[photos.calibrate[photos.labels[photos.calibrate] >= 0]], REJECT_RATE).value
    labels, rows = photos.labels[photos.read], photos.read
    caught = float((score[rows[labels < 0]] >= gamma).mean())
    right = nearest[rows] == labels
    out = {}
    for h in [held] if held is not None else range(len(TRASHNET_NORMAL)):
        old = (labels >= 0) & (labels != h)
        out[h] = Reading(float(right[labels == h].mean()), float(right[old].mean()), caught)
    return out


def cv_photos(fixed: torch.Tensor, labels: np.ndarray, folds: int, side: np.ndarray) -> list[Photos]:
    """``bench.pretrained``'s folds of the training side (rows ``side``): each fold sets γ and is read once."""
    parts = [side[p] for p in split_per_class(labels[side], tuple([1.0 / folds] * folds), FOLD_SEED)]
    return [Photos(fixed, labels, np.setdiff1d(side, held), held, held) for held in parts]


def training_side_features(backbone: Backbone) -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
    """Features of TrashNet at 224 (photos, then mirrors), labels, and the rows of each split part: train,
    val, exposure (the 30 trash photos the shipped model trains on), selection (30 more), test."""
    task = make_task(load_dataset("trashnet", None, SIZE, None), TRASHNET_NORMAL, None, 0, 0.5, False)
    parts = {"train": task.train, "val": task.val, "selection": task.selection, "exposure": task.exposure,
             "test": task.test}  # fmt: skip
    labels = np.concatenate([
        part.labels if name in ("train", "val") else np.where(task.test_anomalous, -1, part.labels) if name == "test"
        else -np.ones(len(part), dtype=np.int64) for name, part in parts.items()])  # fmt: skip
    views = [torch.cat([torch.from_numpy(fixed_outputs(backbone, p.images, m)) for p in parts.values()])
             for m in (False, True)]  # fmt: skip
    bounds = np.cumsum([0] + [len(p) for p in parts.values()])
    rows = {name: np.arange(bounds[i], bounds[i + 1]) for i, name in enumerate(parts)}
    return torch.cat(views), labels.astype(np.int64), rows


def test_photos(fixed: torch.Tensor, labels: np.ndarray, rows: dict[str, np.ndarray]) -> Photos:
    """The shipped model's split: train on the training split and the exposure trash, γ from validation,
    read the test split."""
    return Photos(fixed, labels, np.concatenate([rows["train"], rows["exposure"]]), rows["val"], rows["test"])


@dataclass
class Result:
    """Readings per N, then per held-out class, one per fold (or one for the test split)."""

    by_n: dict[int, dict[int, list[Reading]]]
    full: dict[int, list[Reading]]  # the five-class model on all photos, per class h: h's and the others' routing
    seconds_per_fit: float

    def mean(self, n: int, field: str) -> float:
        return float(np.mean([self.per_class(n, field)[h] for h in self.by_n[n]]))

    def per_class(self, n: int, field: str) -> dict[int, float]:
        return {h: float(np.mean([getattr(r, field) for r in rs])) for h, rs in self.by_n[n].items()}

    def full_mean(self, field: str, classes: list[int]) -> float:
        return float(np.mean([np.mean([getattr(r, field) for r in self.full[h]]) for h in classes]))


def measure(
    sets: list[Photos], config: DeepMADConfig, ns: list[int], classes: list[int], backbone: Backbone
) -> tuple[dict[int, dict[int, list[Reading]]], float]:
    by_n: dict[int, dict[int, list[Reading]]] = {n: {h: [] for h in classes} for n in ns}
    fits, started = 0, time.perf_counter()
    for draw, photos in enumerate(sets):
        for h in classes:
            for n in ns:
                d = distances(photos, with_few(photos, h, n, draw), config, backbone)
                by_n[n][h].append(read(photos, d, h)[h])
                fits += 1
    return by_n, (time.perf_counter() - started) / max(fits, 1)


def full_model(sets: list[Photos], classes: list[int], backbone: Backbone) -> dict[int, list[Reading]]:
    """The shipped recipe on every photo of the five classes, read per class as the add is."""
    full: dict[int, list[Reading]] = {h: [] for h in classes}
    for photos in sets:
        readings = read(photos, distances(photos, photos.train, SHIPPED, backbone), None)
        for h in classes:
            full[h].append(readings[h])
    return full


def table_rows(name: str, result: Result, ns: list[int], marked: str) -> list[str]:
    rows = []
    for n in ns:
        per = result.per_class(n, "new")
        worst = min(per, key=per.get)
        classes = list(per)
        rows.append(
            f"| {name}{marked} | {n} | {result.mean(n, 'new'):.3f} | {per[worst]:.2f} ({TRASHNET_NORMAL[worst]}) | "
            f"{result.mean(n, 'old'):.3f} ({result.mean(n, 'old') - result.full_mean('old', classes):+.3f}) | "
            f"{result.mean(n, 'caught'):.3f} ({result.mean(n, 'caught') - result.full_mean('caught', classes):+.3f}) | "
            f"{result.seconds_per_fit:.1f} |"
        )
    return rows


def plot(path: Path, ns: list[int], results: dict[str, Result], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    for index, (name, result) in enumerate(results.items()):
        per, colour = [result.per_class(n, "new") for n in ns], f"C{index}"
        means = [float(np.mean(list(p.values()))) for p in per]
        axis.plot(ns, means, marker="o", color=colour, label=f"{name}: mean")
        axis.plot(ns, [min(p.values()) for p in per], marker="x", linestyle=":", color=colour, label="worst class")
    axis.axhline(0.70, color="grey", linewidth=0.6, linestyle="--")
    axis.axhline(0.88, color="grey", linewidth=0.6, linestyle="--")
    axis.set_xscale("log")
    axis.set_xticks(ns, [str(n) for n in ns])
    axis.set_xlabel("photos of the new class (N)")
    axis.set_ylabel("new-class routing")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    save_png(figure, path)


def parse_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"{flag} names nothing")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.new_class", description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="10,30,100", help="photos of the new class, comma separated")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--classes", default=",".join(TRASHNET_NORMAL), help="the classes held out in turn")
    parser.add_argument("--folds", type=int, default=2, help="CV folds of the training side")
    parser.add_argument(
        "--test", metavar="RECIPE", help="instead of the CV: read the test split once, for this (chosen) recipe"
    )
    parser.add_argument("--plot", type=Path, help="the CV's new-class routing against N as a PNG")
    parser.add_argument("--round", type=Path, metavar="DIR", help="also one live round against a real service here")
    args = parser.parse_args(argv)

    def body() -> int:
        ns = sorted({int(n) for n in parse_list(args.ns, "--ns")})
        recipes = parse_list(args.recipes, "--recipes")
        unknown = [r for r in recipes + ([args.test] if args.test else []) if r not in RECIPES]
        if unknown:
            raise UserError(f"unknown recipe {unknown[0]!r}; recipes are: {', '.join(RECIPES)}")
        names = parse_list(args.classes, "--classes")
        if any(name not in TRASHNET_NORMAL for name in names):
            raise UserError(f"--classes takes TrashNet's recyclables: {', '.join(TRASHNET_NORMAL)}")
        if args.folds < 2 or ns[0] < 1:
            raise UserError("--folds must be at least 2 and every N at least 1")
        classes = [TRASHNET_NORMAL.index(name) for name in names]
        torch.set_num_threads(1)
        backbone = Backbone.pretrained(BACKBONE, 0)
        fixed, labels, rows = training_side_features(backbone)
        live = run_round(args.round) if args.round else None
        if args.test:
            tested = [test_photos(fixed, labels, rows)]
            print(f"# load average {os.getloadavg()[0]:.2f}; {BACKBONE} at {SIZE}, frozen, cached features; each "
                  "recyclable held out in turn but for N photos of its training split; the TEST split, read once "
                  "for the recipe chosen by CV")  # fmt: skip
            print(HEADER, flush=True)
            by_n, seconds = measure(tested, replace(SHIPPED, **RECIPES[args.test]), ns, classes, backbone)
            final, split = Result(by_n, full_model(tested, classes, backbone), seconds), "test"
            print("\n".join(table_rows(args.test, final, ns, " (test split, read once after the choice)")), flush=True)
        else:
            side = np.concatenate([rows["train"], rows["val"], rows["selection"], rows["exposure"]])
            sets = cv_photos(fixed, labels, args.folds, side)
            print(f"# load average {os.getloadavg()[0]:.2f}; {BACKBONE} at {SIZE}, frozen, cached features; each "
                  f"recyclable held out in turn but for N photos; {args.folds}-fold CV on the training side "
                  "(no test photo)")  # fmt: skip
            print(HEADER, flush=True)
            full = full_model(sets, classes, backbone)
            results = {}
            for name in recipes:
                by_n, seconds = measure(sets, replace(SHIPPED, **RECIPES[name]), ns, classes, backbone)
                results[name] = Result(by_n, full, seconds)
                print("\n".join(table_rows(name, results[name], ns, "")), flush=True)
            final, split = results.get(CHOSEN), "cv"
            if args.plot:
                plot(args.plot, ns, results, f"new class from N photos, {args.folds}-fold CV, frozen {BACKBONE} heads")
        print(summary(final, ns, split, live), flush=True)
        return 0

    return run_command(body, "interrupted")


def timed(module: str, *args: object, ok: tuple[int, ...] = (0,)) -> tuple[float, float, str]:
    """``python -m module args`` from the repository: (wall s, the child's CPU s, stdout); another exit stops."""
    started_at, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=False)  # fmt: skip
    seconds, after = time.monotonic() - started_at, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in ok:
        raise RuntimeError(f"{module} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, result.stdout


def recipe_flags(name: str) -> list[str]:
    """A recipe as ``training.fit`` flags ({"class_scale": 0.3} -> --class-scale 0.3), for the live round."""
    flags = []
    for field, value in RECIPES[name].items():
        flag = "--" + field.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def run_round(work: Path) -> dict:
    """One live round: a real service on the four-class model (round 0: the shipped recipe on a tree without
    ``ROUND_CLASS``) captures photos of it; the operator labels them through POST /feedback (the first with
    the confirmation); then, timed, the export (a class folder in both trees), ``training.fit`` with the
    export's class list and the chosen recipe on warm features, and the gate with ``--reload-url``; the
    round ends when GET /model serves the new class. Prints each stage and returns them with ``round_s``."""
    splits = trashnet_splits(data_root() / "trashnet")
    shutil.rmtree(work, ignore_errors=True)
    tree, audit, captures, current = work / "data", work / "audit", work / "captures", work / "models" / "bin"
    old = [name for name in TRASHNET_NORMAL if name != ROUND_CLASS]
    trash = [(path, TRASHNET_ANOMALY) for path in splits.held_trash]
    add_to_tree(tree, [photo for photo in splits.train if photo[1] != ROUND_CLASS] + trash[:36])
    add_to_tree(audit, [photo for photo in splits.val if photo[1] != ROUND_CLASS] + trash[36:])
    holdout, exposure = folder_exposure(36)
    fit_flags = ["--dataset", "folder", "--data", tree, "--anomaly-holdout", f"{holdout:.4f}", "--outlier-exposure",
                 "--exposure-from-train", exposure, *ROUND_RECIPE]  # fmt: skip
    fitted0_s, _, _ = timed("training.fit", *fit_flags, "--normal", ",".join(old), "--version", "round0",
                                "--out", current, "--checkpoint", work / "round0.pt")  # fmt: skip
    print(f"# round 0 (four classes, no {ROUND_CLASS}): training.fit {fitted0_s:.0f} s", flush=True)
    photos = [path for path, label in splits.train if label == ROUND_CLASS]
    ids = [f"{ROUND_CLASS}-{n:04d}" for n in range(len(photos))]
    chosen = [n for n, i in enumerate(ids) if not in_audit(i, AUDIT_SHARE)][:ROUND_PHOTOS]
    chosen += [n for n, i in enumerate(ids) if in_audit(i, AUDIT_SHARE)][:ROUND_AUDIT_PHOTOS]
    operator = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    with bin_service(current, captures, work / "service.log", 1.0) as url, httpx.Client(base_url=url) as client:
        for n in chosen:
            answer = client.post("/classify", files={"file": ("item.jpg", photos[n].read_bytes(), "image/jpeg")},
                                 headers={"X-Request-ID": ids[n]})  # fmt: skip
            answer.raise_for_status()
        wait_for_captures(captures)
        for k, n in enumerate(chosen):
            body = {"id": ids[n], "label": ROUND_CLASS, **({"new_category": True} if k == 0 else {})}
            client.post("/feedback", json=body, headers=operator).raise_for_status()
        started_at = time.monotonic()
        export_s, export_cpu, exported = timed("flywheel.captures", "export", "--captures", captures, "--out", tree,
                                          "--audit-out", audit, "--model", current)  # fmt: skip
        classes = json.loads(exported)["classes"]
        fit_s, fit_cpu, fitted = timed("training.fit", *fit_flags, "--normal", ",".join(classes), *recipe_flags(CHOSEN),
                                     "--version", "with-" + ROUND_CLASS, "--out", work / "candidate",
                                     "--checkpoint", work / "candidate.pt")  # fmt: skip
        os.environ["DEEPMAD_ADMIN_TOKEN"] = ADMIN_TOKEN
        gate_s, gate_cpu, gate = timed("flywheel.promote", "--candidate", work / "candidate", "--current", current,
                                    "--audit", audit, "--reload-url", url, *ROUND_GATE, ok=(0, 3))  # fmt: skip
        served = client.get("/model").json()["class_names"]
        round_s = time.monotonic() - started_at
    stages = {"export_s": export_s, "fit_s": fit_s, "gate_promote_reload_s": gate_s, "round_s": round_s,
              "cpu_s": export_cpu + fit_cpu + gate_cpu, "served": float(ROUND_CLASS in served)}  # fmt: skip
    inside = json.loads(fitted).get("seconds") or {}
    print(f"# live round: {len(chosen)} photos of {ROUND_CLASS} labelled through POST /feedback "
          f"({ROUND_PHOTOS} to the training tree, {len(chosen) - ROUND_PHOTOS} to the audit tree); "
          + " ".join(f"{k}={v:.1f}" for k, v in stages.items()) + " " + " ".join(f"fit.{k}={v}" for k, v in
          inside.items()) + f"; serves {served}", flush=True)  # fmt: skip
    print("# gate: " + " | ".join(gate.strip().splitlines()[-12:]), flush=True)
    return stages


def summary(result: Result | None, ns: list[int], split: str, live: dict | None) -> str:
    cells = [f"split={split}"]
    if result is not None:
        classes = list(result.full)
        for n in (30, 100):
            if n in ns:
                cells.append(f"new_routing_n{n}={result.mean(n, 'new'):.3f}")
        if 30 in ns:
            cells += [
                f"worst_new_routing_n30={min(result.per_class(30, 'new').values()):.3f}",
                f"old_routing_vs_full={result.mean(30, 'old') - result.full_mean('old', classes):+.3f}",
                f"caught_vs_full={result.mean(30, 'caught') - result.full_mean('caught', classes):+.3f}",
            ]
    if live is None:
        cells.append("round_s=not_run")
    else:  # a round whose gate refused the candidate ends without the new class served: it says so
        cells += [f"round_s={live['round_s']:.1f}", f"round_served_new_class={'yes' if live['served'] else 'no'}"]
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return "summary: " + " ".join(cells) + f" load_avg={load}"


if __name__ == "__main__":
    sys.exit(main())
