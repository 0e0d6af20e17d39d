"""A local HTTP server in a child process: a free port, its environment, waiting until it is ready, stopping it.

Shared by the benchmarks that start real servers (``bench.serve``, ``bench.flywheel``) and by the tests
that start ``python -m service`` (``tests/service_support.py``), so every one of them waits and stops the
same way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited, or did not answer its ready path in time; the message ends with its log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(**extra: str) -> dict[str, str]:
    """This process's environment without its ``DEEPMAD_`` settings (but the data root), the checkout first on
    ``PYTHONPATH``, plus ``extra``: the child is configured only by what its caller passes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMAD_") or k == "DEEPMAD_DATA_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def wait_until_ready(
    process: subprocess.Popen, url: str, timeout_s: float, name: str, log_tail: Callable[[], str]
) -> None:
    """Poll ``url`` until it answers 200; raise ``ServerStartError`` if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerStartError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise ServerStartError(f"{name} not ready after {timeout_s:.0f} s:\n{log_tail()}")
        time.sleep(0.2)


def stop(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it has not exited after ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
