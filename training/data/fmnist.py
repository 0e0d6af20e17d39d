"""Fashion-MNIST from torchvision's root layout (``<root>/FashionMNIST/raw/*-ubyte.gz``), read directly."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from service.imaging import array_to_model_input
from training.data.base import DataSet, LabeledImages, with_validation_split
from training.errors import UserError

FMNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _raw_dir(root: Path) -> Path:
    for candidate in (root / "FashionMNIST" / "raw", root / "raw", root):
        if (candidate / FILES["train"][0]).exists():
            return candidate
    raise UserError(
        f"Fashion-MNIST IDX files not found under {root} (expected FashionMNIST/raw/*-ubyte.gz); "
        "pass --data PATH or set DEEPMAD_DATA_ROOT"
    )


def _resize(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    height, width, channels = shape
    if images.shape[1:3] == (height, width) and channels == 1:
        return images[..., None]
    return np.stack([array_to_model_input(image, height, width, channels) for image in images])


def load_fmnist(root: Path, shape: tuple[int, int, int]) -> DataSet:
    raw = _raw_dir(root)
    splits = {}
    for split, (images_file, labels_file) in FILES.items():
        images, labels = _read_idx(raw / images_file), _read_idx(raw / labels_file)
        splits[split] = LabeledImages(_resize(images, shape), labels.astype(np.int64))
    return with_validation_split("fmnist", str(root), FMNIST_CLASSES, splits["train"], splits["test"], "t10k is test")
