"""Data sources by name; each returns a DataSet of uint8 images made by the service's image function."""

from __future__ import annotations

import os
from pathlib import Path

from training.data.base import DataSet, LabeledImages, Task, make_task, parse_class_selection, pool_task
from training.data.cifar100 import load_cifar100
from training.data.fmnist import load_fmnist
from training.data.folders import TRASHNET_NORMAL, load_cifar10, load_folder, load_trashnet
from training.data.recycle import load_recycle
from training.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
# name -> (folder under the data root, default image shape H, W, C)
SOURCES = {
    "trashnet": ("trashnet", (32, 32, 3)),
    "recycle": (None, (32, 32, 3)),
    "cifar10": ("cifar10", (32, 32, 3)),
    "cifar100": ("cifar100", (32, 32, 3)),
    "fmnist": ("fashion-mnist", (28, 28, 1)),
    "folder": (None, (32, 32, 3)),
}

__all__ = [
    "DataSet",
    "LabeledImages",
    "Task",
    "SOURCES",
    "load_dataset",
    "default_normal",
    "make_task",
    "parse_class_selection",
    "pool_task",
    "data_root",
]


def data_root() -> Path:
    """DEEPMAD_DATA_ROOT, else ../shared/data beside the checkout."""
    configured = os.environ.get("DEEPMAD_DATA_ROOT")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def load_dataset(
    name: str,
    data: Path | None = None,
    image_size: int | None = None,
    trash_dir: Path | None = None,
) -> DataSet:
    if name not in SOURCES:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(SOURCES)}")
    folder, (height, width, channels) = SOURCES[name]
    if image_size is not None:
        height = width = image_size
    shape = (height, width, channels)
    if name == "recycle":
        return load_recycle(data, shape, trash_dir)
    if data is None:
        if folder is None:
            raise UserError(f"data set {name!r} needs --data PATH")
        data = data_root() / folder
    if name == "trashnet":
        return load_trashnet(data, shape)
    if name == "cifar10":
        return load_cifar10(data, shape)
    if name == "cifar100":
        return load_cifar100(data, shape)
    if name == "fmnist":
        return load_fmnist(data, shape)
    return load_folder(data, shape)


def default_normal(dataset: DataSet) -> list[str]:
    """TrashNet: the five recyclables; RECYCLE: its five recyclables; otherwise the first two classes."""
    if dataset.name == "trashnet":
        return list(TRASHNET_NORMAL)
    if dataset.name == "recycle" and "trash" in dataset.class_names:
        return [c for c in dataset.class_names if c != "trash"]
    return dataset.class_names[:2]
