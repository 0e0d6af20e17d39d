"""The paper's RECYCLE data: ``recycle_data_shuffled.npz`` (x_train, y_train, x_test, y_test).

From ``--data PATH`` (the .npz or the published .tar.gz), else from the cache, else downloaded from
the published address (DEEPMAD_RECYCLE_URL overrides it) and verified before use. An optional folder
of trash photos (``--trash-dir``) adds a test-only ``trash`` class for the 5/1 case; without it, the
4/1 cases (one recyclable held out as the anomaly) are available.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from flywheel.photo_cache import cache_dir
from service.imaging import array_to_model_input, image_files
from training.data.base import DataSet, LabeledImages, with_validation_split
from training.data.folders import decode_files
from training.errors import UserError

RECYCLE_URL = "http://web.cecs.pdx.edu/~singh/rcyc-web/recycle_data_shuffled.tar.gz"
RECYCLE_CLASSES = ["boxes", "glass_bottles", "soda_cans", "crushed_soda_cans", "water_bottles"]
NPZ_NAME = "recycle_data_shuffled.npz"
ARCHIVE_NAME = "recycle_data_shuffled.tar.gz"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def recycle_url() -> str:
    return os.environ.get("DEEPMAD_RECYCLE_URL", RECYCLE_URL)


def _verify(arrays: dict[str, np.ndarray], origin: str) -> None:
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise UserError(f"{origin} lacks arrays {missing}; expected {list(ARRAYS)}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
            raise UserError(f"{origin}: x_{split} must be N x H x W x 3 matching y_{split}, got {x.shape}")
        if len(y) and (y.min() < 0 or y.max() >= len(RECYCLE_CLASSES)):
            raise UserError(f"{origin}: y_{split} labels must be 0..{len(RECYCLE_CLASSES) - 1}")


def _read_npz_bytes(data: bytes, origin: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"{origin} is not a readable .npz: {exc}") from None
    _verify(arrays, origin)
    return arrays


def _read_archive(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as handle:
        is_zip = handle.read(2) == b"PK"  # an .npz is a zip archive; anything else must be a tar
    if is_zip:
        return _read_npz_bytes(path.read_bytes(), str(path))
    try:
        with tarfile.open(path, "r:*") as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith(NPZ_NAME)), None)
            if member is None:
                raise UserError(f"{path} does not contain {NPZ_NAME}")
            handle = archive.extractfile(member)
            assert handle is not None
            return _read_npz_bytes(handle.read(), f"{path}:{member.name}")
    except tarfile.TarError as exc:
        raise UserError(f"{path} is neither an .npz nor a readable tar archive: {exc}") from None


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        _read_archive(Path(tmp))  # verify before it becomes the cached copy
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise UserError(
            f"RECYCLE is not here and downloading {url} failed ({exc}); download that file elsewhere and "
            f"put it at {target}, or pass --data PATH (the {ARCHIVE_NAME} or {NPZ_NAME})"
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def locate_recycle(data: Path | None) -> Path:
    """The archive to read: ``--data``, else the cached download, else a fresh download."""
    if data is not None:
        if data.is_dir():
            inside = [data / name for name in (ARCHIVE_NAME, NPZ_NAME) if (data / name).is_file()]
            if not inside:
                raise UserError(f"--data {data} is a folder without {ARCHIVE_NAME} or {NPZ_NAME}; name the file")
            return inside[0]
        if not data.exists():
            raise UserError(f"RECYCLE file not found at {data}")
        return data
    cached = cache_dir() / "recycle" / ARCHIVE_NAME
    if not cached.exists():
        _download(recycle_url(), cached)
    return cached


def _resize(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    if images.dtype != np.uint8:
        scale = 255.0 if float(images.max(initial=0)) <= 1.0 else 1.0
        images = np.clip(images * scale + 0.5, 0, 255).astype(np.uint8)
    if images.shape[1:] == shape:
        return images
    return np.stack([array_to_model_input(image, *shape) for image in images])


def load_recycle(data: Path | None, shape: tuple[int, int, int], trash_dir: Path | None = None) -> DataSet:
    archive = locate_recycle(data)
    arrays = _read_archive(archive)
    full_train = LabeledImages(_resize(arrays["x_train"], shape), arrays["y_train"].astype(np.int64))
    test = LabeledImages(_resize(arrays["x_test"], shape), arrays["y_test"].astype(np.int64))
    class_names = list(RECYCLE_CLASSES)
    if trash_dir is not None:
        files = image_files(trash_dir) if trash_dir.is_dir() else []
        if not files:
            raise UserError(f"no trash photos found in {trash_dir}")
        trash = decode_files(files, shape)
        class_names.append("trash")
        test = LabeledImages(
            np.concatenate([test.images, trash]),
            np.concatenate([test.labels, np.full(len(trash), len(RECYCLE_CLASSES), dtype=np.int64)]),
        )
    return with_validation_split("recycle", str(archive), class_names, full_train, test, "x_test is test")
