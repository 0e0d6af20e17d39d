"""The issue's data set cases: TrashNet 4/1 and 5/1 plans on real photos; CIFAR-100 super-classes from pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from training.data import load_dataset
from training.errors import UserError
from training.evaluate import build_parser, plan
from training.evaluation.protocol import drop_classes, load_for_runs


def test_trashnet_4_in_1_out_leaves_trash_out_of_every_split(trashnet_dir: Path):
    dataset = load_for_runs("trashnet", str(trashnet_dir), None, ("trash",))
    trash = dataset.class_names.index("trash")
    assert not any((split.labels == trash).any() for split in (dataset.train, dataset.val, dataset.test))
    args = build_parser().parse_args(
        [
            "--dataset",
            "trashnet",
            "--data",
            str(trashnet_dir),
            "--exclude-classes",
            "trash",
            "--n-normal",
            "4",
            "--methods",
            "deepmad",
            "--seeds",
            "1",
            "--out",
            "unused",
        ]  # fmt: skip
    )
    specs = plan(args)
    assert len(specs) == 5 and all(trash not in s.normal and s.exclude == ("trash",) for s in specs)


def test_trashnet_5_in_1_out_is_one_combination(trashnet_dir: Path):
    args = build_parser().parse_args(
        [
            "--dataset",
            "trashnet",
            "--data",
            str(trashnet_dir),
            "--n-normal",
            "5",
            "--combos",
            "0,1,2,3,4",
            "--methods",
            "deepmad,drocc",
            "--seeds",
            "2",
            "--out",
            "unused",
        ]  # fmt: skip
    )
    assert [(s.normal, s.method, s.seed) for s in plan(args)] == [
        ((0, 1, 2, 3, 4), "deepmad", 0), ((0, 1, 2, 3, 4), "drocc", 0),
        ((0, 1, 2, 3, 4), "deepmad", 1), ((0, 1, 2, 3, 4), "drocc", 1),
    ]  # fmt: skip
    with pytest.raises(UserError):
        drop_classes(load_dataset("trashnet", trashnet_dir), ("bananas",))


def test_cifar100_super_classes_from_python_pickles(tmp_path: Path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 200), ("test", 40)):
        batch = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"coarse_labels": list(np.arange(count) % 20),
            b"fine_labels": list(np.arange(count) % 100),
        }
        (folder / split).write_bytes(pickle.dumps(batch))
    dataset = load_dataset("cifar100", tmp_path)
    assert len(dataset.class_names) == 20 and dataset.image_shape == (32, 32, 3)
    assert len(dataset.train) + len(dataset.val) == 200 and len(dataset.test) == 40
    first = pickle.loads((folder / "test").read_bytes())[b"data"][0]
    np.testing.assert_array_equal(dataset.test.images[0][..., 0].ravel(), first[:1024])  # red plane, row-major
    with pytest.raises(UserError, match="CIFAR-100 not found"):
        load_dataset("cifar100", tmp_path / "missing")
