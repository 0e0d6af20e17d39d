"""``python -m bench.pretrained``: DeepMAD heads on EfficientNet-Lite0 against the references, by k-fold CV.

Choosing on one split was noise (30 selection trash photos move the AUC by ±0.04), so every recipe is
scored by stratified k-fold cross-validation over the *training side* of models/trashnet's split: the
train + validation recyclables and the 60 trash photos held out of test (selection + exposure). The 469
test photos are not read here at all; ``--test`` is the one place that reads them, for the recipes named
there, after the choice. Per fold: γ rejects 5% of the held-out fold's recyclables, "caught" is the
share of its trash at or past γ, routing the share of its recyclables nearest their own class.

Rows: DeepMAD heads (``training.methods.backbone.train_heads``, the product's code) frozen or with the
last blocks tuned, with trash as exposure or without; a 6-way classifier with trash as a class on the
same features (cross-entropy, the transfer-learning recipe a pragmatic engineer builds: linear probe,
or with the same last blocks tuned); DN2 (mean distance to the 2 nearest training photos' features,
Bergman et al. 2020) and one Gaussian per class (shared shrunk covariance, min Mahalanobis distance).

Example:
    python -m bench.pretrained --sizes 128 --folds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F  # noqa: N812

from flywheel.metrics import choose_gamma, roc_auc
from service.manifest import INPUT_NAME
from training.backbones import BACKBONE_CHOICES, Backbone, check_input_size, lite_normaliser
from training.data import load_dataset, make_task
from training.data.base import split_per_class
from training.data.folders import TRASHNET_NORMAL
from training.engine import RunOptions
from training.errors import UserError, run_command
from training.export import export_onnx
from training.features import fixed_outputs
from training.methods.backbone import (
    BackboneEncoder,
    CachedInputs,
    GroupedHead,
    pooled_features,
    train_heads,
)
from training.methods.deepmad import DeepMADConfig
from training.scorer import Scorer, split_columns

REPO_ROOT = Path(__file__).resolve().parents[1]
REJECT_RATE = 0.05
FOLD_SEED = 20163
BACKBONE = "efficientnet-lite0"  # --backbone picks another
# The heads' recipe, chosen by this bench's own CV (docs/quality-log.md, "Round 3"): weight decay was the lever.
HEAD = {
    "rep_dim": 32,
    "lr": 1e-3,
    "delta": 2.0,
    "epochs": 30,
    "batch_size": 256,
    "head_hidden": 256,
    "weight_decay": 1e-2,
}


# The anomaly terms (``deepmad.AnomalyTerms``) screened against the shipped hinge, trash in training.
ANOMALY_TERMS = {
    "Deep SAD push 20": {"anomaly_push": "deepsad", "anomaly_weight": 20.0},
    "Deep SAD push 50": {"anomaly_push": "deepsad", "anomaly_weight": 50.0},
    "1 anomaly centre": {"anomaly_centres": 1},
    "2 anomaly centres": {"anomaly_centres": 2},
    "3 anomaly centres": {"anomaly_centres": 3},
    "Deep SAD push 20 + 1 anomaly centre": {"anomaly_push": "deepsad", "anomaly_weight": 20.0, "anomaly_centres": 1},
    "Deep SAD push 20 + 2 anomaly centres": {"anomaly_push": "deepsad", "anomaly_weight": 20.0, "anomaly_centres": 2},
}


@dataclass
class Side:
    """The training side at one input size: photos by split part, labels (0..4 recyclables, -1 trash)."""

    parts: list[np.ndarray]  # train, val, selection, exposure images (each cached separately)
    labels: np.ndarray


def training_side(size: int) -> Side:
    task = make_task(load_dataset("trashnet", None, size, None), TRASHNET_NORMAL, None, 0, 0.5, False)
    parts = [task.train, task.val, task.selection, task.exposure]
    labels = np.concatenate([task.train.labels, task.val.labels, -np.ones(len(task.selection) + len(task.exposure))])
    return Side([p.images for p in parts], labels.astype(np.int64))


def side_features(side: Side, backbone: Backbone, mirrored: bool) -> torch.Tensor:
    return torch.cat([torch.from_numpy(fixed_outputs(backbone, images, mirrored)) for images in side.parts])


@dataclass
class Fold:
    fixed: torch.Tensor  # [2N, ...]: every photo, then its mirror image
    labels: np.ndarray
    train: np.ndarray
    held: np.ndarray
    backbone: Backbone


# (scores, nearest class or None for one centre) of the held-out photos
Recipe = Callable[[Fold, bool], tuple[np.ndarray, np.ndarray | None]]


def held_out_distances(
    fold: Fold, train: np.ndarray, columns: np.ndarray, config: DeepMADConfig, one_class: bool
) -> torch.Tensor:
    """Heads trained on the fold's ``train`` photos (label ``columns``: a head per column, -1 exposure; with
    --augment their mirror images too) through the product's ``train_heads``; held-out distances [N, m + k]
    (k: the anomaly centres' columns)."""
    n = len(fold.labels)
    rows = np.concatenate([train, train + n] if config.augment else [train])
    labels = torch.from_numpy(np.tile(columns, len(rows) // len(train)))
    inputs = CachedInputs(fold.backbone, fold.fixed[rows], labels, len(train), 0)
    n_columns = int(columns.max()) + 1
    encoder, centres, _ = train_heads(inputs, {}, n_columns, config, RunOptions(torch.device("cpu")), one_class)
    with torch.no_grad():
        z = encoder.from_fixed(fold.fixed[fold.held])
    return (z - centres.unsqueeze(0)).pow(2).sum(-1).sqrt()


def scored(columns: torch.Tensor, anomaly_centres: int) -> tuple[np.ndarray, np.ndarray]:
    """(score, nearest class) of held-out distance columns under the product's score rule."""
    normal, score = split_columns(columns, columns.shape[1] - anomaly_centres)
    return score.numpy(), normal.argmin(1).numpy()


def deepmad(config: DeepMADConfig) -> Recipe:
    def run(fold: Fold, with_trash: bool) -> tuple[np.ndarray, np.ndarray]:
        train = fold.train if with_trash else fold.train[fold.labels[fold.train] >= 0]
        centres = config.anomaly_centres if with_trash else 0
        chosen = replace(config, anomaly_centres=centres)
        return scored(held_out_distances(fold, train, fold.labels[train], chosen, one_class=False), centres)

    return run


def deepsvdd(config: DeepMADConfig) -> Recipe:
    """Algorithm 2's DeepSVDD on the same features: one head, the recyclables pooled onto one centre
    (one-class, so trash photos are never used); one centre has no routing."""

    def run(fold: Fold, with_trash: bool) -> tuple[np.ndarray, None]:
        train = fold.train[fold.labels[fold.train] >= 0]
        pooled = np.zeros(len(train), dtype=np.int64)
        return held_out_distances(fold, train, pooled, config, one_class=True)[:, 0].numpy(), None

    return run


def classifier(tune_blocks: int, epochs: int = 60, lr: float = 1e-3) -> Recipe:
    """6-way cross-entropy on the same inputs (trash as class 5); score = P(trash), route = best recyclable."""

    def run(fold: Fold, with_trash: bool) -> tuple[np.ndarray, np.ndarray]:
        torch.manual_seed(0)
        backbone = fold.backbone
        train, n = fold.train, len(fold.labels)
        rows = np.concatenate([train, train + n])
        targets = torch.from_numpy(np.where(fold.labels[rows % n] < 0, 5, fold.labels[rows % n]))
        pooled = pooled_features(backbone, fold.fixed[train])
        mean, std = pooled.mean(0), pooled.std(0).clamp_min(1e-3)
        linear = torch.nn.Linear(backbone.out_dim, 6)
        trained = [*linear.parameters(), *(p for p in backbone.parameters() if p.requires_grad)]
        optimizer = torch.optim.Adam(trained, lr=lr, weight_decay=1e-4)

        def logits(fixed: torch.Tensor) -> torch.Tensor:
            features = backbone.tuned(fixed) if backbone.trains else fixed
            return linear((features - mean) / std)

        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for chosen in torch.randperm(len(rows), generator=generator).split(256):
                loss = F.cross_entropy(logits(fold.fixed[rows][chosen]), targets[chosen])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            probabilities = logits(fold.fixed[fold.held]).softmax(-1)
        return probabilities[:, 5].numpy(), probabilities[:, :5].argmax(1).numpy()

    return run


def dn2(fold: Fold, with_trash: bool) -> tuple[np.ndarray, np.ndarray]:
    train = fold.train[fold.labels[fold.train] >= 0]
    distances = torch.cdist(fold.fixed[fold.held], fold.fixed[train])
    nearest2 = distances.topk(2, largest=False)
    return nearest2.values.mean(1).numpy(), fold.labels[train][nearest2.indices[:, 0].numpy()]


def gaussian(fold: Fold, with_trash: bool) -> tuple[np.ndarray, np.ndarray]:
    train = fold.train[fold.labels[fold.train] >= 0]
    x, y = fold.fixed[train].double(), fold.labels[train]
    means = torch.stack([x[y == c].mean(0) for c in range(5)])
    centred = x - means[torch.from_numpy(y)]
    covariance = centred.T @ centred / len(x)
    covariance = 0.9 * covariance + 0.1 * torch.eye(len(covariance), dtype=covariance.dtype) * covariance.diag().mean()
    precision = torch.linalg.inv(covariance)
    held = fold.fixed[fold.held].double()
    d = torch.stack([((held - m) @ precision * (held - m)).sum(1) for m in means], 1)
    score, nearest = d.min(1)
    return score.numpy(), nearest.numpy()


def fold_metrics(scores: np.ndarray, nearest: np.ndarray | None, labels: np.ndarray) -> tuple[float, float, float]:
    trash = labels < 0
    gamma = choose_gamma(scores[~trash], REJECT_RATE).value  # training's rule, on the held-out fold's recyclables
    caught = float((scores[trash] >= gamma).mean())
    routing = float((nearest[~trash] == labels[~trash]).mean()) if nearest is not None else float("nan")
    return roc_auc(scores, trash), caught, routing


def cross_validate(
    recipe: Recipe, side: Side, fixed: torch.Tensor, tune_blocks: int, with_trash: bool, folds: int, backbone: str
):
    """Per-fold (AUC, caught at γ, routing) over stratified folds of the training side."""
    parts = split_per_class(side.labels, tuple([1.0 / folds] * folds), FOLD_SEED)
    results = []
    for held in parts:
        train = np.setdiff1d(np.arange(len(side.labels)), held)
        fold = Fold(fixed, side.labels, train, held, Backbone.pretrained(backbone, tune_blocks))
        scores, nearest = recipe(fold, with_trash)
        results.append(fold_metrics(scores, nearest, side.labels[held]))
    return np.asarray(results)


def parse_heads(spec: str) -> dict[str, float]:
    """``epochs=15,weight_decay=0.01`` -> overrides of the heads' recipe (a screening run's settings)."""
    overrides: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in HEAD or not value:
            raise UserError(f"--heads takes NAME=VALUE pairs of {', '.join(HEAD)}, got {item!r}")
        overrides[key] = type(HEAD[key])(float(value))
    return overrides


def recipes(
    sizes: list[int], tunes: list[int], heads: dict | None = None, backbone: str = BACKBONE
) -> list[tuple[str, int, int, bool, Recipe]]:
    """(name, size, tune_blocks, trash in training, recipe) rows of the table."""
    base = DeepMADConfig(backbone=backbone, **{**HEAD, **(heads or {})})
    rows = []
    for size in sizes:
        for tune in tunes:
            config = replace(base, tune_blocks=tune, augment=True)
            for with_trash in (True, False):
                rows.append((f"DeepMAD heads, tune {tune}", size, tune, with_trash, deepmad(config)))
            for name, terms in ANOMALY_TERMS.items():
                rows.append(
                    (f"DeepMAD heads, {name}, tune {tune}", size, tune, True, deepmad(replace(config, **terms)))
                )
            rows.append((f"6-way classifier, tune {tune}", size, tune, True, classifier(tune)))
        rows.append(("DeepSVDD head (one centre), tune 0", size, 0, False, deepsvdd(replace(base, augment=True))))
        rows.append(("DN2 kNN (k=2)", size, 0, False, dn2))
        rows.append(("Gaussian per class", size, 0, False, gaussian))
    return rows


# (engine, precision) rows of ``--serving``: ONNX Runtime fp32 (the reference of the ratios), OpenVINO with f32
# pinned (what ``DEEPMAD_ENGINE=openvino`` serves) and OpenVINO's own default precision (bf16 on CPUs with
# avx512_bf16 or AMX; not served: it moves the golden scores, service/engines.py). OpenVINO rows need the
# openvino extra; without it they are left out with a line saying so.
SERVING_ENGINES = (("onnxruntime", "fp32"), ("openvino", "f32"), ("openvino", "default"))
SERVING_BATCHES = (1, 8)


def one_thread_run(path: Path, engine: str, precision: str) -> tuple[Callable[[np.ndarray], object], str]:
    """A one-thread, one-stream runner of ``path`` on ``engine`` and the precision it actually runs in."""
    if engine == "onnxruntime":
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return (lambda photos: session.run(None, {INPUT_NAME: photos})), "fp32"
    import openvino as ov

    config: dict[str, object] = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    effective = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return (lambda photos: request.infer({INPUT_NAME: photos})), effective


def graph_costs(path: Path, size: int, engines, rounds: int = 3, calls: int = 12) -> dict[str, dict[int, float]]:
    """CPU ms per photo at batch 1 and 8 on one thread for each (engine, precision), medians over ``rounds``
    rounds in which every engine takes its turn (drift on a shared box hits them alike)."""
    runners = {}
    for engine, precision in engines:
        run, effective = one_thread_run(path, engine, precision)
        runners[f"{engine} {precision}" + (f" ({effective})" if precision == "default" else "")] = run
    photos = np.random.default_rng(0).integers(0, 256, (max(SERVING_BATCHES), size, size, 3), dtype=np.uint8)
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in SERVING_BATCHES} for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for batch in SERVING_BATCHES:
                batch_photos = photos[:batch]
                run(batch_photos)
                started = time.process_time()
                for _ in range(max(2, calls // batch)):
                    run(batch_photos)
                samples[name][batch].append(1000 * (time.process_time() - started) / max(2, calls // batch) / batch)
    return {name: {b: float(np.median(v)) for b, v in per.items()} for name, per in samples.items()}


def lite0_graph(size: int, folder: Path) -> Path:
    """The whole exported Lite0 graph at one input size (heads' weights do not change the cost, so untrained
    heads stand in)."""
    backbone = Backbone.pretrained(BACKBONE)
    head = GroupedHead(5, backbone.out_dim, HEAD["head_hidden"], HEAD["rep_dim"])
    encoder = BackboneEncoder(backbone, head, size, torch.zeros(backbone.out_dim), torch.ones(backbone.out_dim))
    scorer = Scorer(encoder, torch.ones(5, HEAD["rep_dim"]), lite_normaliser()).eval()
    path = folder / f"lite0-{size}.onnx"
    export_onnx(scorer, path)
    return path


def print_serving(sizes: list[int], graphs: list[Path], engines) -> None:
    print(
        f"# load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1/5/15 min) on {os.cpu_count()} CPUs; "
        "CPU ms per photo on one thread (one stream), batch 1 and 8, medians of 3 interleaved rounds"
    )
    print("| graph | input | engine, precision | ms/photo b1 | ms/photo b8 | vs ONNX Runtime fp32 b1 / b8 | graph MB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        rows: list[tuple[str, Path, int]] = []
        for path in graphs:  # artifacts side by side in one run (a shipped graph against its predecessor)
            size = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[1]
            rows.append((str(path), path, size))
        scratch = REPO_ROOT / "models" / "trashnet" / "model.onnx"
        if scratch.is_file():
            rows.append(("models/trashnet (LeNet encoders)", scratch, 32))
        rows += [("Lite0 + DeepMAD heads", lite0_graph(size, Path(folder)), size) for size in sizes]
        for label, path, size in rows:
            costs = graph_costs(path, size, engines)
            reference = costs["onnxruntime fp32"]
            for name, cost in costs.items():
                print(
                    f"| {label} | {size}x{size} | {name} | {cost[1]:.2f} | {cost[8]:.2f} "
                    f"| {reference[1] / cost[1]:.2f}x / {reference[8] / cost[8]:.2f}x "
                    f"| {path.stat().st_size / 1e6:.1f} |",
                    flush=True,
                )
    print(f"# load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrained", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128", help="input sizes, comma separated (multiples of 32)")
    parser.add_argument("--tune-blocks", default="0", help="fine-tuned last blocks, comma separated")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--backbone", default=BACKBONE, choices=[b for b in BACKBONE_CHOICES if b != "none"])
    parser.add_argument("--only", help="rows whose name contains this text")
    parser.add_argument(
        "--heads", default="", help="the DeepMAD heads' settings to screen, e.g. epochs=15,weight_decay=0.01"
    )
    parser.add_argument(
        "--serving", action="store_true", help="only the serving cost of the whole graph per input size (no CV)"
    )
    parser.add_argument("--graph", type=Path, action="append", default=[], help="with --serving: also this model.onnx")
    parser.add_argument(
        "--engines",
        default="onnxruntime,openvino",
        help="with --serving: onnxruntime (fp32) and/or openvino (f32 pinned, and its default precision: bf16 "
        "where the CPU has it), comma separated",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        torch.set_num_threads(1)
        sizes = [int(s) for s in args.sizes.split(",")]
        tunes = [int(t) for t in args.tune_blocks.split(",")]
        if args.folds < 2:
            raise UserError("--folds must be at least 2")
        for size in sizes:
            check_input_size(args.backbone, size)
        heads = parse_heads(args.heads)
        if args.serving:
            missing = [g for g in args.graph if not g.is_file()]
            if missing:
                raise UserError(f"--graph {missing[0]} is not a file")
            wanted = {e.strip() for e in args.engines.split(",") if e.strip()}
            if not wanted or wanted - {"onnxruntime", "openvino"}:
                raise UserError(f"--engines: choose from onnxruntime, openvino (got {args.engines!r})")
            if "openvino" in wanted and importlib.util.find_spec("openvino") is None:
                raise UserError("--engines: openvino is not installed: pip install 'deepmad-bin[openvino]'")
            engines = [("onnxruntime", "fp32")] + [row for row in SERVING_ENGINES if row[0] in wanted - {"onnxruntime"}]
            print_serving(sizes, args.graph, engines)
            return 0
        print(
            f"# load average {os.getloadavg()[0]:.2f}; {args.backbone}; {args.folds}-fold CV on the training side "
            "(no test photo)"
        )
        print("| recipe | input | trash in training | AUC | trash caught at 5% false reject | routing | s/fold |")
        print("|---|---|---|---|---|---|---|")
        cache: dict[tuple[int, int], torch.Tensor] = {}
        sides: dict[int, Side] = {}
        if heads:
            print(f"# DeepMAD heads: {HEAD | heads}")
        for name, size, tune, with_trash, recipe in recipes(sizes, tunes, heads, args.backbone):
            if args.only and args.only not in name:
                continue
            side = sides.setdefault(size, training_side(size))
            if (size, tune) not in cache:
                backbone = Backbone.pretrained(args.backbone, tune)
                cache[size, tune] = torch.cat([side_features(side, backbone, m) for m in (False, True)])
            started = time.perf_counter()
            results = cross_validate(recipe, side, cache[size, tune], tune, with_trash, args.folds, args.backbone)
            seconds = (time.perf_counter() - started) / args.folds
            mean, spread = results.mean(0), results.std(0)
            cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, spread, strict=True))
            print(f"| {name} | {size} | {'yes' if with_trash else 'no'} | {cells} | {seconds:.0f} |", flush=True)
        return 0

    return run_command(body, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
