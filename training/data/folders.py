"""Class-folder sources: TrashNet photos, CIFAR-10 as JPEG folders, and any ``<root>/<class>/*`` tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flywheel.photo_cache import decoded_files
from service.imaging import ImageError, image_files, load_image_file
from training.data.base import SPLIT_SEED, DataSet, LabeledImages, split_per_class, with_validation_split
from training.errors import UserError

TRASHNET_NORMAL = ["cardboard", "glass", "metal", "paper", "plastic"]
TRASHNET_ANOMALY = "trash"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per class: train / validation / test shares of a folder that has no split of its own.
FOLDER_SPLIT = (0.7, 0.1, 0.2)


def decode_files(files: list[Path], shape: tuple[int, int, int]) -> np.ndarray:
    """Every file through the service's image function, cached per file by content."""

    def decode(path: Path) -> np.ndarray:
        try:
            return load_image_file(path, *shape)
        except ImageError as exc:
            raise UserError(f"{path}: {exc.message}") from None

    return decoded_files(files, shape, decode)


def class_folders(root: Path) -> list[str]:
    """The class folders of a ``<root>/<class>/*`` tree, sorted; hidden ones are not classes."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_files(root: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """Every image of each class folder, class by class in name order, and its class's index: the order
    every split of a folder tree is drawn from (training's, and the benchmarks' and tests' that redo it)."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        found = image_files(root / name)
        if not found:
            raise UserError(f"no images in {root / name}")
        files += found
        labels += [label] * len(found)
    return files, labels


def read_class_folders(root: Path, class_names: list[str], shape: tuple[int, int, int]) -> LabeledImages:
    files, labels = folder_files(root, class_names)
    return LabeledImages(decode_files(files, shape), np.asarray(labels, dtype=np.int64))


def _require_dir(root: Path, what: str, flag_hint: str) -> None:
    if not root.is_dir():
        raise UserError(f"{what} not found at {root}; {flag_hint}")


def load_folder(root: Path, shape: tuple[int, int, int], test_only: tuple[str, ...] = ()) -> DataSet:
    """``<root>/<class>/*``: a seeded 70/10/20 split per class; ``test_only`` classes go wholly to test."""
    _require_dir(root, "image folder", "pass --data PATH")
    class_names = class_folders(root)
    if len(class_names) < 2:
        raise UserError(f"{root} needs at least two class folders, found {class_names}")
    everything = read_class_folders(root, class_names, shape)
    train, val, test = split_per_class(everything.labels, FOLDER_SPLIT, SPLIT_SEED)
    held = np.isin(everything.labels, [class_names.index(n) for n in test_only if n in class_names])
    held_idx = np.flatnonzero(held)
    train, val = train[~held[train]], val[~held[val]]
    test = np.union1d(test, held_idx)
    return DataSet(
        name=root.name,
        root=str(root),
        class_names=class_names,
        train=everything.subset(train),
        val=everything.subset(val),
        test=everything.subset(test),
        notes={"split": f"per class {FOLDER_SPLIT} train/val/test, seed {SPLIT_SEED}"},
    )


def load_trashnet(root: Path, shape: tuple[int, int, int]) -> DataSet:
    """TrashNet: five recyclable classes split 70/10/20; every trash photo is test data only."""
    _require_dir(root, "TrashNet", "pass --data PATH or set DEEPMAD_DATA_ROOT")
    missing = [c for c in [*TRASHNET_NORMAL, TRASHNET_ANOMALY] if not (root / c).is_dir()]
    if missing:
        raise UserError(f"TrashNet at {root} lacks class folders {missing}")
    dataset = load_folder(root, shape, test_only=(TRASHNET_ANOMALY,))
    dataset.name = "trashnet"
    dataset.notes["trash"] = "all trash photos are test anomalies"
    return dataset


def load_cifar10(root: Path, shape: tuple[int, int, int]) -> DataSet:
    """CIFAR-10 as ``{train,test}/<class>/*.jpg``; 10% of train per class is the validation split."""
    _require_dir(root / "train", "CIFAR-10 train folder", "pass --data PATH or set DEEPMAD_DATA_ROOT")
    _require_dir(root / "test", "CIFAR-10 test folder", "pass --data PATH or set DEEPMAD_DATA_ROOT")
    full_train = read_class_folders(root / "train", CIFAR10_CLASSES, shape)
    test = read_class_folders(root / "test", CIFAR10_CLASSES, shape)
    return with_validation_split("cifar10", str(root), CIFAR10_CLASSES, full_train, test, "test folder is test")
