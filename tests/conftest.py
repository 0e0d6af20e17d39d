"""Shared fixtures: where the real data lives, and the shipped model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
