"""In-memory labelled images and the normal/anomaly task built from them."""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field

import numpy as np

from training.errors import UserError

SPLIT_SEED = 20161  # fixed: the train/validation/test split never depends on the training seed
ANOMALY_SPLIT_SEED = 20162  # fixed: held-out anomalies never depend on the training seed


@dataclass
class LabeledImages:
    """uint8 images N x H x W x C with integer labels into the data set's class list."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> LabeledImages:
        return LabeledImages(self.images[index], self.labels[index])


@dataclass
class DataSet:
    """A data source's three splits; ``test`` may hold classes never seen in ``train`` (e.g. trash)."""

    name: str
    root: str
    class_names: list[str]
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


@dataclass
class Task:
    """A multi-class anomaly detection task: labels 0..m-1 are the normal classes in column order.

    ``test_anomalous`` marks test items from any other class; the training and validation splits hold
    normal classes only, so no anomaly steers training or the threshold.
    """

    dataset: DataSet
    normal_classes: list[str]
    anomaly_classes: list[str]
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    test_anomalous: np.ndarray
    pooled: bool = False
    selection: LabeledImages | None = None  # held-out anomalies for model selection, never for the test AUC
    exposure: LabeledImages | None = None  # held-out anomalies that outlier exposure may train on
    outlier_exposure: bool = False  # whether ``train`` holds ``exposure`` as label -1 (negative for every encoder)
    composites: int = 0  # two-class composites of normal photos in ``train`` as label -1 (data/composites.py)

    @property
    def column_names(self) -> list[str]:
        """One name per model output column: the normal classes, or ["normal"] for a pooled model."""
        return ["normal"] if self.pooled else list(self.normal_classes)

    @property
    def n_normal(self) -> int:
        return len(self.column_names)

    def content_sha256(self) -> str:
        digest = hashlib.sha256()
        for array in (self.train.images, self.train.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        names = self.column_names
        counts = {
            "train": {n: int((self.train.labels == i).sum()) for i, n in enumerate(names)},
            "val": {n: int((self.val.labels == i).sum()) for i, n in enumerate(names)},
            "test": {n: int(((self.test.labels == i) & ~self.test_anomalous).sum()) for i, n in enumerate(names)},
        }
        counts["test"]["anomalous"] = int(self.test_anomalous.sum())
        if self.selection is not None:
            counts["selection"] = {"anomalous": len(self.selection)}
        if self.outlier_exposure and self.exposure is not None:
            counts["train"]["outlier_exposure"] = len(self.exposure)
        if self.composites:
            counts["train"]["composites"] = self.composites
        return counts


def pool_task(task: Task) -> Task:
    """Algorithm 2: all normal classes as one class (one centre), for single-detector baselines."""

    def pooled(split: LabeledImages) -> LabeledImages:
        return LabeledImages(split.images, np.where(split.labels >= 0, 0, split.labels))

    return Task(
        dataset=task.dataset,
        normal_classes=task.normal_classes,
        anomaly_classes=task.anomaly_classes,
        train=pooled(task.train),
        val=pooled(task.val),
        test=pooled(task.test),
        test_anomalous=task.test_anomalous,
        pooled=True,
        selection=task.selection,
        exposure=task.exposure,
        outlier_exposure=task.outlier_exposure,
    )


def parse_class_selection(spec: str | None, class_names: list[str], default: list[str]) -> list[str]:
    """``"glass,metal"`` or ``"1,2"`` (names or indices) -> class names; None -> ``default``."""
    if spec is None or spec.strip() == "":
        return list(default)
    chosen: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.isdigit():
            index = int(token)
            if index >= len(class_names):
                raise UserError(f"class index {index} is out of range; classes are {_listing(class_names)}")
            name = class_names[index]
        elif token in class_names:
            name = token
        else:
            raise UserError(f"unknown class {token!r}; classes are {_listing(class_names)}")
        if name in chosen:
            raise UserError(f"class {name!r} is selected twice")
        chosen.append(name)
    if not chosen:
        raise UserError("no normal class selected")
    return chosen


def add_holdout_flags(parser: argparse._ActionsContainer) -> None:
    """The flags that set ``make_task``'s anomaly holdout and outlier exposure (training.fit and training.evaluate)."""
    parser.add_argument(
        "--anomaly-holdout",
        type=float,
        default=0.0,
        help="share of each anomaly class taken out of the test split (fixed seed): half for model selection "
        "(reported as selection_auc), half as the outlier-exposure pool",
    )
    parser.add_argument(
        "--outlier-exposure",
        action="store_true",
        help="train on the held-out exposure pool as negatives for every encoder (needs --anomaly-holdout)",
    )
    parser.add_argument(
        "--exposure-from-train",
        type=int,
        default=0,
        metavar="N",
        help="draw the outlier-exposure pool from the anomaly classes' training split instead, N images per "
        "class (sources with such a split: CIFAR-10, Fashion-MNIST); selection and test images are unchanged",
    )


def check_anomaly_holdout(anomaly_holdout: float, outlier_exposure: bool, exposure_from_train: int = 0) -> None:
    """The holdout share is a fraction of each anomaly class; exposure trains on half of that holdout,
    or on ``exposure_from_train`` training images per anomaly class."""
    if not 0.0 <= anomaly_holdout < 1.0:
        raise UserError("--anomaly-holdout must lie in [0, 1)")
    if outlier_exposure and anomaly_holdout == 0.0:
        raise UserError("--outlier-exposure needs --anomaly-holdout > 0 (the images it may train on)")
    if exposure_from_train < 0:
        raise UserError("--exposure-from-train must be at least 0")
    if exposure_from_train and not outlier_exposure:
        raise UserError("--exposure-from-train sets the outlier-exposure pool; it needs --outlier-exposure")


def make_task(
    dataset: DataSet,
    normal: list[str],
    max_train_per_class: int | None = None,
    seed: int = 0,
    anomaly_holdout: float = 0.0,
    outlier_exposure: bool = False,
    exposure_from_train: int = 0,
) -> Task:
    """Select the normal classes; every other test class becomes an anomaly.

    ``anomaly_holdout`` takes that share of each anomaly class out of the test split (a fixed, seeded
    choice, the same for every training seed and with or without outlier exposure): its first half is
    the ``selection`` set (validation anomalies for choosing settings), its second half the
    ``exposure`` pool. With ``outlier_exposure`` the pool joins ``train`` as label -1: a negative for
    every encoder. The test AUC is always measured on the remaining, untouched anomalies.

    ``exposure_from_train`` > 0 draws the pool instead from the anomaly classes' *training* split, that
    many images per class (fixed seed), so the pool can be larger than the holdout while the selection
    and test images stay the same: how detection grows with the number of labelled anomalies.
    """
    check_anomaly_holdout(anomaly_holdout, outlier_exposure, exposure_from_train)
    if len(normal) == len(dataset.class_names):
        raise UserError("every class is normal; leave at least one class out as the anomaly")
    index_of = {name: i for i, name in enumerate(dataset.class_names)}
    remap = np.full(len(dataset.class_names), -1, dtype=np.int64)
    for column, name in enumerate(normal):
        remap[index_of[name]] = column
    rng = np.random.default_rng(seed)
    train = _normal_only(dataset.train, [index_of[name] for name in normal], remap, max_train_per_class, rng)
    val = _normal_only(dataset.val, [index_of[name] for name in normal], remap, None, rng)
    _check_normal_splits(train, val, normal, dataset.root)
    test_labels = remap[dataset.test.labels]
    anomalous = test_labels < 0
    anomaly_classes = [n for n in dataset.class_names if n not in normal and (dataset.test.labels == index_of[n]).any()]
    if not anomalous.any():
        raise UserError("the test split holds no anomalies for this choice of normal classes")
    test = LabeledImages(dataset.test.images, test_labels)
    selection = exposure = None
    if anomaly_holdout > 0.0:
        selection, exposure, test, anomalous = _hold_out_anomalies(
            test, anomalous, dataset.test.labels, anomaly_holdout
        )
        if exposure_from_train:
            exposure = _training_anomalies(dataset, anomaly_classes, exposure_from_train)
        if outlier_exposure:
            train = LabeledImages(
                np.concatenate([train.images, exposure.images]),
                np.concatenate([train.labels, np.full(len(exposure), -1, dtype=np.int64)]),
            )
    return Task(
        dataset=dataset,
        normal_classes=list(normal),
        anomaly_classes=anomaly_classes,
        train=train,
        val=val,
        test=test,
        test_anomalous=anomalous,
        selection=selection,
        exposure=exposure,
        outlier_exposure=outlier_exposure,
    )


def _normal_only(
    split: LabeledImages, classes: list[int], remap: np.ndarray, cap: int | None, rng: np.random.Generator
) -> LabeledImages:
    """The split's images of ``classes`` (at most ``cap`` each, a seeded choice), relabelled by ``remap``."""
    keep = []
    for label in classes:
        where = np.flatnonzero(split.labels == label)
        if cap is not None and len(where) > cap:
            where = np.sort(rng.choice(where, cap, replace=False))
        keep.append(where)
    chosen = np.sort(np.concatenate(keep))
    return LabeledImages(split.images[chosen], remap[split.labels[chosen]])


def _check_normal_splits(train: LabeledImages, val: LabeledImages, normal: list[str], root: str) -> None:
    """γ is chosen on validation photos and every class needs training photos: say which is missing."""
    if len(val) == 0:
        raise UserError(
            f"the split left no validation photos of {', '.join(normal)} in {root}: γ is chosen on "
            "held-out normal photos, so add photos to these classes (folders are split 70/10/20 per class)"
        )
    for column, name in enumerate(normal):
        if not (train.labels == column).any():
            raise UserError(f"class {name!r} has no training images in {root}")


def _hold_out_anomalies(
    test: LabeledImages, anomalous: np.ndarray, class_labels: np.ndarray, share: float
) -> tuple[LabeledImages, LabeledImages, LabeledImages, np.ndarray]:
    """(selection, exposure, remaining test, its anomaly mask): ``share`` of each anomaly class (by its
    data set label in ``class_labels``) leaves the test split, half for selection and half for exposure."""
    held = np.flatnonzero(anomalous)
    picked, _ = split_per_class(class_labels[held], (share, 1.0 - share), ANOMALY_SPLIT_SEED)
    chosen = held[picked]
    half = len(chosen) // 2
    order = np.random.default_rng(ANOMALY_SPLIT_SEED).permutation(chosen)
    selection, exposure = test.subset(np.sort(order[:half])), test.subset(np.sort(order[half:]))
    keep = np.setdiff1d(np.arange(len(test)), chosen)
    if not len(selection) or not anomalous[keep].any():
        raise UserError(
            f"--anomaly-holdout {share} leaves {len(selection)} selection and "
            f"{int(anomalous[keep].sum())} test anomalies; choose a share that leaves at least one of each"
        )
    return selection, exposure, test.subset(keep), anomalous[keep]


def _training_anomalies(dataset: DataSet, anomaly_classes: list[str], per_class: int) -> LabeledImages:
    """``per_class`` training images of each anomaly class, the same whatever the training seed."""
    rng = np.random.default_rng(ANOMALY_SPLIT_SEED)
    picked = []
    for name in anomaly_classes:
        where = np.flatnonzero(dataset.train.labels == dataset.class_names.index(name))
        if len(where) < per_class:
            raise UserError(
                f"--exposure-from-train {per_class}: the training split of {dataset.root} holds "
                f"{len(where)} images of anomaly class {name!r}"
            )
        picked.append(rng.choice(where, per_class, replace=False))
    chosen = np.sort(np.concatenate(picked))
    return LabeledImages(dataset.train.images[chosen], np.full(len(chosen), -1, dtype=np.int64))


def split_per_class(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Seeded per-class split of indices into len(fractions) parts (the last takes the remainder)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels):
        where = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for k, fraction in enumerate(fractions):
            stop = len(where) if k == len(fractions) - 1 else start + int(round(fraction * len(where)))
            parts[k].append(where[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _listing(names: list[str]) -> str:
    return ", ".join(f"{i}:{n}" for i, n in enumerate(names))


def with_validation_split(
    name: str, root: str, class_names: list[str], full_train: LabeledImages, test: LabeledImages, test_note: str
) -> DataSet:
    """A source that ships its own train/test split: 10% of train per class (fixed seed) is validation."""
    train, val = split_per_class(full_train.labels, (0.9, 0.1), SPLIT_SEED)
    return DataSet(
        name=name,
        root=root,
        class_names=list(class_names),
        train=full_train.subset(train),
        val=full_train.subset(val),
        test=test,
        notes={"split": f"train 90/10 train/val per class, seed {SPLIT_SEED}; {test_note}"},
    )
