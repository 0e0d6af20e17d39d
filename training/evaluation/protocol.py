"""One evaluation run = (data set, normal combination, method, seed): train, score the test split, record.

A run is a pure function of its ``RunSpec`` so any executor (a local process pool, Ray) can run it
anywhere the data is; results are plain dicts, written by the caller as one JSON file per run, which
is what makes a sweep resumable (a finished run's file exists; it is skipped).

The training subsample (``max_train_per_class``) and the validation/test subsamples are drawn with
fixed seeds, so every method and seed of a combination sees the same images; ``seed`` only changes
initialisation, batch order and DROCC's noise.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from service.fileio import write_atomic
from training.data import DataSet, load_dataset, make_task
from training.errors import UserError
from training.measure import measure_scorer
from training.methods import get_method

SUBSAMPLE_SEED = 0  # training subsample: the same for every method and seed
EVAL_SUBSAMPLE_SEED = 1  # validation and test subsamples
REJECT_RATE = 0.05


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    normal: tuple[int, ...]
    method: str
    seed: int
    overrides: dict = field(default_factory=dict, hash=False, compare=False)
    data: str | None = None
    trash_dir: str | None = None  # RECYCLE 5/1: a folder of trash photos, test only
    exclude: tuple[str, ...] = ()  # classes dropped from every split (TrashNet 4/1: trash)
    max_train_per_class: int | None = None
    max_val_per_class: int | None = None
    max_test_per_class: int | None = None
    threads: int | None = None
    save_model: str | None = None  # where to torch.save the scorer, or None
    anomaly_holdout: float = 0.0  # share of each anomaly class kept out of the test split (make_task)
    outlier_exposure: bool = False  # train on half of that holdout as negatives for every encoder
    exposure_from_train: int = 0  # or on this many training images per anomaly class instead
    image_size: int | None = None  # photos resized to this square size (None: the source's own)

    @property
    def combo(self) -> str:
        return "-".join(str(i) for i in self.normal)

    @property
    def key(self) -> str:
        return f"{self.method}/{self.combo}/seed{self.seed}"

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["normal"] = list(self.normal)
        out["exclude"] = list(self.exclude)
        return out


def parse_combos(spec: str, n_classes: int, n_normal: int, allowed: list[int] | None = None) -> list[tuple[int, ...]]:
    """``all``, ``N`` (the first N of all combinations in a fixed shuffled order) or ``"0,1;3,5"``.

    ``allowed``: the class indices combinations are drawn from (default all ``n_classes``).
    """
    allowed = list(range(n_classes)) if allowed is None else allowed
    every = list(itertools.combinations(allowed, n_normal))
    spec = spec.strip()
    if spec == "all":
        return every
    if spec.isdigit():
        count = int(spec)
        if not 0 < count <= len(every):
            raise UserError(f"--combos {count}: there are {len(every)} combinations of {n_normal} classes")
        order = np.random.default_rng(SUBSAMPLE_SEED).permutation(len(every))
        return sorted(every[i] for i in order[:count])
    combos = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        try:
            combo = tuple(sorted(int(t) for t in part.split(",")))
        except ValueError:
            raise UserError(f"--combos: {part!r} is not a comma-separated list of class indices") from None
        if len(combo) != n_normal or len(set(combo)) != n_normal:
            raise UserError(f"--combos: {part!r} must name {n_normal} distinct classes")
        if any(c not in allowed for c in combo):
            raise UserError(f"--combos: {part!r} names a class outside {allowed}")
        combos.append(combo)
    if not combos:
        raise UserError("--combos: no combination given")
    return combos


def subsample(split, cap: int | None, seed: int):
    """At most ``cap`` items per class of a split, drawn with a fixed seed (None: all)."""
    if cap is None:
        return split
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(split.labels == c))[:cap] for c in np.unique(split.labels)]
    return split.subset(np.sort(np.concatenate(keep)))


def drop_classes(dataset: DataSet, exclude: tuple[str, ...]) -> DataSet:
    """The data set without ``exclude``'s items in any split (class indices unchanged)."""
    unknown = [c for c in exclude if c not in dataset.class_names]
    if unknown:
        raise UserError(f"--exclude-classes: {unknown} not among {dataset.class_names}")
    dropped = [dataset.class_names.index(c) for c in exclude]

    def keep(split):
        return split.subset(np.flatnonzero(~np.isin(split.labels, dropped)))

    return dataclasses.replace(dataset, train=keep(dataset.train), val=keep(dataset.val), test=keep(dataset.test))


def load_for_runs(
    name: str, data: str | None, trash_dir: str | None, exclude: tuple[str, ...], image_size: int | None = None
) -> DataSet:
    trash = Path(trash_dir) if trash_dir else None
    dataset = load_dataset(name, Path(data) if data else None, image_size, trash_dir=trash)
    return drop_classes(dataset, exclude)


@functools.lru_cache(maxsize=2)
def _dataset(spec_key: tuple, max_val: int | None, max_test: int | None) -> DataSet:
    """Loaded once per worker process (decoded arrays are cached on disk as well)."""
    dataset = load_for_runs(*spec_key)
    return dataclasses.replace(
        dataset,
        val=subsample(dataset.val, max_val, EVAL_SUBSAMPLE_SEED),
        test=subsample(dataset.test, max_test, EVAL_SUBSAMPLE_SEED),
    )


def run_one(spec: RunSpec) -> dict:
    """Train and evaluate one run on the CPU (or CUDA when present); returns the result record."""
    started = time.perf_counter()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    source = (spec.dataset, spec.data, spec.trash_dir, tuple(spec.exclude), spec.image_size)
    dataset = _dataset(source, spec.max_val_per_class, spec.max_test_per_class)
    normal = [dataset.class_names[i] for i in spec.normal]
    task = make_task(
        dataset,
        normal,
        spec.max_train_per_class,
        SUBSAMPLE_SEED,
        spec.anomaly_holdout,
        spec.outlier_exposure,
        spec.exposure_from_train,
    )
    method = get_method(spec.method)
    task = method.prepare(task)
    config = method.config({**spec.overrides, "seed": spec.seed})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer, log = method.fit(task, config, device)
    trained = time.perf_counter()
    result = measure_scorer(scorer, task, REJECT_RATE)
    scores = result.test_scores
    if spec.save_model:
        path = Path(spec.save_model)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"scorer": scorer, "spec": spec.as_dict(), "normal": normal}, path)
    return {
        **spec.as_dict(),
        "key": spec.key,
        "combo": spec.combo,
        "normal_names": normal,
        "auc": result.metrics.auc,
        "auc_dempster_shafer": result.metrics.extra.get("auc_dempster_shafer"),
        "selection_auc": result.metrics.extra.get("selection_auc"),
        "tpr_at_threshold": result.metrics.tpr_at_threshold,
        "fpr_at_threshold": result.metrics.fpr_at_threshold,
        "threshold": result.threshold.value,
        "test_score_std": float(np.std(scores)),
        "test_score_unique_share": float(len(np.unique(np.round(scores, 6))) / len(scores)),
        "n_train": len(task.train),
        "n_test": len(task.test),
        "n_test_anomalous": int(task.test_anomalous.sum()),
        "config": config.as_dict(),
        "log": log.model_dump(),
        "train_seconds": trained - started,
        "total_seconds": time.perf_counter() - started,
        "device": str(device),
        "host": platform.node(),
        "pid": os.getpid(),
    }


def result_path(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.method / f"{spec.combo}-seed{spec.seed}.json"


def write_result(out: Path, spec: RunSpec, record: dict) -> None:
    write_atomic(result_path(out, spec), json.dumps(record, indent=1).encode())


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
