"""Data sources: TrashNet split, class selection, the decode cache, Fashion-MNIST, and RECYCLE's loader."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

import training.data.folders as folders
from training.data import default_normal, load_dataset, make_task, parse_class_selection
from training.errors import UserError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DEEPMAD_CACHE_DIR", str(tmp_path / "cache"))


def test_trashnet_split_is_fixed_and_trash_is_test_only(trashnet_dir: Path):
    first = load_dataset("trashnet", trashnet_dir)
    second = load_dataset("trashnet", trashnet_dir)
    trash = first.class_names.index("trash")
    assert first.image_shape == (32, 32, 3) and first.train.images.dtype == np.uint8
    assert not (first.train.labels == trash).any() and not (first.val.labels == trash).any()
    assert (first.test.labels == trash).sum() == len(list((trashnet_dir / "trash").glob("*.jpg")))
    assert np.array_equal(first.test.images, second.test.images)
    total = len(first.train) + len(first.val) + len(first.test)
    assert total == sum(len(list((trashnet_dir / c).glob("*.jpg"))) for c in first.class_names)
    task = make_task(first, default_normal(first))
    assert task.normal_classes == ["cardboard", "glass", "metal", "paper", "plastic"]
    assert task.test_anomalous.sum() == (first.test.labels == trash).sum()


def test_second_load_reads_the_cache_instead_of_decoding(trashnet_dir: Path, monkeypatch):
    load_dataset("trashnet", trashnet_dir)

    def refuse(*_args, **_kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folders, "load_image_file", refuse)
    assert len(load_dataset("trashnet", trashnet_dir).train) > 1000


def test_normal_classes_by_name_or_index():
    names = ["a", "b", "c"]
    assert parse_class_selection("c,0", names, []) == ["c", "a"]
    assert parse_class_selection(None, names, ["b"]) == ["b"]
    with pytest.raises(UserError, match="twice"):
        parse_class_selection("a,0", names, [])


def test_fmnist_reads_the_idx_files(data_dir: Path):
    dataset = load_dataset("fmnist", data_dir / "fashion-mnist")
    assert dataset.image_shape == (28, 28, 1)
    assert len(dataset.test) == 10000 and len(dataset.train) + len(dataset.val) == 60000
    task = make_task(dataset, parse_class_selection("trouser,bag", dataset.class_names, []))
    assert task.anomaly_classes == [c for c in dataset.class_names if c not in ("trouser", "bag")]
    assert task.test_anomalous.sum() == 8000


def _write_recycle_npz(size: int = 40, per_class: int = 12) -> bytes:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, count in (("train", per_class), ("test", per_class // 2)):
        labels = np.repeat(np.arange(5), count)
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        images[..., 0] = (labels * 50).astype(np.uint8)[:, None, None]  # class shows in the red channel
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _tar_with(npz: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("recycle_data_shuffled/recycle_data_shuffled.npz")
        info.size = len(npz)
        archive.addfile(info, io.BytesIO(npz))
    return buffer.getvalue()


def test_recycle_from_npz_and_tar_resizes_any_size(tmp_path: Path, trashnet_dir: Path):
    npz = _write_recycle_npz()
    (tmp_path / "r.npz").write_bytes(npz)
    (tmp_path / "r.tar.gz").write_bytes(_tar_with(npz))
    from_npz = load_dataset("recycle", tmp_path / "r.npz")
    from_tar = load_dataset("recycle", tmp_path / "r.tar.gz")
    assert from_npz.image_shape == (32, 32, 3)
    assert np.array_equal(from_npz.train.images, from_tar.train.images)
    assert from_npz.class_names == ["boxes", "glass_bottles", "soda_cans", "crushed_soda_cans", "water_bottles"]
    four_one = make_task(from_npz, ["boxes", "glass_bottles", "soda_cans", "water_bottles"])
    assert four_one.anomaly_classes == ["crushed_soda_cans"]
    with_trash = load_dataset("recycle", tmp_path / "r.npz", trash_dir=trashnet_dir / "trash")
    assert default_normal(with_trash) == from_npz.class_names
    assert (with_trash.test.labels == 5).sum() == len(list((trashnet_dir / "trash").glob("*.jpg")))


def test_recycle_rejects_a_file_without_the_arrays(tmp_path: Path):
    buffer = io.BytesIO()
    np.savez(buffer, x_train=np.zeros((1, 4, 4, 3), np.uint8))
    (tmp_path / "bad.npz").write_bytes(buffer.getvalue())
    with pytest.raises(UserError, match="lacks arrays"):
        load_dataset("recycle", tmp_path / "bad.npz")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args):
        pass


def test_recycle_downloads_verifies_and_caches(tmp_path: Path, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    (served / "recycle_data_shuffled.tar.gz").write_bytes(_tar_with(_write_recycle_npz()))
    (served / "broken.tar.gz").write_bytes(b"not an archive")
    handler = lambda *a, **k: _Quiet(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("DEEPMAD_RECYCLE_URL", f"{base}/broken.tar.gz")
        with pytest.raises(UserError):
            load_dataset("recycle")
        assert not list((tmp_path / "cache").rglob("*.tar.gz")), "a broken download must not be cached"
        monkeypatch.setenv("DEEPMAD_RECYCLE_URL", f"{base}/recycle_data_shuffled.tar.gz")
        dataset = load_dataset("recycle")
        assert len(dataset.test) == 30
        server.shutdown()
        assert len(load_dataset("recycle").test) == 30  # served from the cache now
    finally:
        server.server_close()


def test_recycle_offline_names_the_address_and_the_flag(monkeypatch):
    monkeypatch.setenv("DEEPMAD_RECYCLE_URL", "http://127.0.0.1:9/recycle_data_shuffled.tar.gz")
    with pytest.raises(UserError) as error:
        load_dataset("recycle")
    assert "http://127.0.0.1:9/recycle_data_shuffled.tar.gz" in str(error.value) and "--data" in str(error.value)
