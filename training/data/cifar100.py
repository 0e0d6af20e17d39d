"""CIFAR-100 with its 20 coarse (super-)classes, from the python pickles (``cifar-100-python/{train,test}``).

The paper's 2/18 case uses the super-classes. The data is not available offline here: without it the
loader says where it looked and what it expects.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from service.imaging import array_to_model_input
from training.data.base import DataSet, LabeledImages, with_validation_split
from training.errors import UserError

SUPERCLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]  # fmt: skip


def _pickle_dir(root: Path) -> Path:
    for candidate in (root / "cifar-100-python", root):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    raise UserError(
        f"CIFAR-100 not found under {root} (expected cifar-100-python/train and /test, the python pickles "
        "from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz); pass --data PATH or set DEEPMAD_DATA_ROOT"
    )


def _read(path: Path, shape: tuple[int, int, int]) -> LabeledImages:
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data, labels = batch[b"data"], batch[b"coarse_labels"]
    except (OSError, pickle.UnpicklingError, KeyError, EOFError) as exc:
        raise UserError(f"{path} is not a CIFAR-100 python pickle with coarse labels ({exc})") from None
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    height, width, channels = shape
    if (height, width, channels) != (32, 32, 3):
        images = np.stack([array_to_model_input(image, height, width, channels) for image in images])
    return LabeledImages(np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64))


def load_cifar100(root: Path, shape: tuple[int, int, int]) -> DataSet:
    folder = _pickle_dir(root)
    full_train, test = _read(folder / "train", shape), _read(folder / "test", shape)
    return with_validation_split("cifar100", str(folder), SUPERCLASSES, full_train, test, "test is test")
