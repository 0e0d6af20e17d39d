"""Shared fixtures: where the real data lives, and the shipped model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO_ROOT / "models" / "trashnet"


def data_root() -> Path:
    """DEEPMAD_DATA_ROOT, else ../shared/data beside the checkout."""
    configured = os.environ.get("DEEPMAD_DATA_ROOT")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "trashnet").is_dir():
        pytest.fail(f"real data not found at {root}; set DEEPMAD_DATA_ROOT")
    return root


@pytest.fixture(scope="session")
def trashnet_dir(data_dir: Path) -> Path:
    return data_dir / "trashnet"


def model_dir() -> Path:
    """The shipped model; DEEPMAD_TEST_MODEL_DIR points the tests at another exported model."""
    path = Path(os.environ.get("DEEPMAD_TEST_MODEL_DIR", SHIPPED_MODEL))
    if not (path / "model.onnx").is_file() or not (path / "manifest.json").is_file():
        pytest.fail(f"no exported model at {path} (expected model.onnx + manifest.json; `make train-trashnet`)")
    return path


@pytest.fixture(scope="module")
def model() -> Path:
    """The exported model the service tests serve (a module may define its own)."""
    return model_dir()


@pytest.fixture(scope="module")
def manifest(model: Path) -> Manifest:
    return Manifest.load(model)
