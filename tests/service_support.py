"""Helpers for the service tests: the model under test, real photo subsets, bad inputs, a uvicorn process."""

from __future__ import annotations

import io
import itertools
import math
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.processes import ServerStartError, service_command, service_env, started
from bench.processes import free_port as free_port  # re-exported: tests import it from here
from tests.conftest import model_dir as model_dir  # re-exported: the service tests import it from here

RECYCLABLES = ("cardboard", "glass", "metal", "paper", "plastic")
SERVER_NUMBERS = itertools.count()  # each server's log file in tmp_path has a name of its own


def photo_subset(trashnet_dir: Path, per_class: int, trash: int) -> tuple[list[Path], list[Path]]:
    """A deterministic spread of real photos: ``per_class`` of each recyclable class and ``trash`` trash."""

    def spread(folder: Path, n: int) -> list[Path]:
        files = sorted(folder.glob("*.jpg"))
        if n <= 0:
            return []
        step = max(1, len(files) // n)
        return files[::step][:n]

    recyclable = [p for name in RECYCLABLES for p in spread(trashnet_dir / name, per_class)]
    return recyclable, spread(trashnet_dir / "trash", trash)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    p = min(max(p, 0.0), 1.0)
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k)."""
    return 1.0 - binomial_cdf(k - 1, n, p) if k > 0 else 1.0


def wait_for(condition, timeout: float = 20.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False); not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def without_id(answer: dict) -> dict:
    """A /classify answer minus what is per request (``id``, and ``capture``: what became of this upload),
    to compare two answers for the same photo."""
    return {key: value for key, value in answer.items() if key not in ("id", "capture")}


# ---- bad inputs, each small in memory ----


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit PNG of width x height, all black, built row by row (~50 KB, no big buffer)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(compressor.compress(row * (height % 1000)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


# ---- a real uvicorn process ----


class Server:
    def __init__(self, process: subprocess.Popen[str], url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def sighup(self) -> None:
        self.process.send_signal(signal.SIGHUP)


@contextmanager
def run_server(model: Path, tmp_path: Path, *args: str, **env: str) -> Iterator[Server]:
    """``python -m service`` on 127.0.0.1 and a free port; waits for /readyz; stops it afterwards."""
    log_path = tmp_path / f"server-{next(SERVER_NUMBERS)}.log"
    try:
        with started(
            service_command(model, *args), "/readyz", env=service_env(**env), name="server", timeout_s=60,
            log_path=log_path,
        ) as running:  # fmt: skip
            yield Server(running.process, running.url, log_path)
    except ServerStartError as error:
        pytest.fail(str(error))


def copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "manifest.json"):
        shutil.copyfile(source / name, target / name)
    return target


def corrupt_model(model: Path) -> None:
    """Flip bytes in the middle of model.onnx (the sha256 no longer matches the manifest)."""
    data = bytearray((model / "model.onnx").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    (model / "model.onnx").write_bytes(bytes(data))
