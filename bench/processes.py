"""A local HTTP server in a child process: a free port, its environment, waiting until it is ready, stopping it.

``started`` is the one way to run one (``service_command`` for ``python -m service``): shared by the
benchmarks that start real servers (``bench.serve``, ``bench.capture_cost``, ``bench.flywheel``) and by
the tests that start ``python -m service`` (``tests/service_support.py``), so every one of them starts,
waits and stops the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


def stop_group(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """Stop a server started in its own session and every process it started (LitServe and BentoML fork
    workers): SIGTERM to the group, SIGKILL to what is left after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def service_command(model_dir: Path, *args: str) -> Callable[[int], list[str]]:
    """``python -m service`` serving ``model_dir`` with ``args``, on the port ``started`` picks."""
    return lambda port: [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port), *args]


@dataclass(frozen=True)
class Started:
    """A server that answered its ready path: its process, port and output so far."""

    process: subprocess.Popen
    port: int
    log: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of its output, read without moving the file offset the child writes at (``pread``)."""
        size = os.fstat(self.log.fileno()).st_size
        start = max(0, size - 4 * chars)
        return os.pread(self.log.fileno(), size - start, start).decode(errors="replace")[-chars:]


@contextlib.contextmanager
def started(
    argv: Callable[[int], list[str]],
    ready_path: str,
    *,
    env: dict[str, str],
    name: str,
    timeout_s: float,
    log_path: Path | None = None,
    own_group: bool = False,
    stop_timeout_s: float = 15,
) -> Iterator[Started]:
    """Run ``argv(port)`` on a free port (output to ``log_path``, else a temporary file) until the block
    ends; yields once ``ready_path`` answers 200, raises ``ServerStartError`` if it never does. With
    ``own_group`` it starts a session of its own and the whole group is stopped."""
    port = free_port()
    log = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    try:
        process = subprocess.Popen(
            argv(port), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=own_group
        )
        try:
            server = Started(process, port, log)
            wait_until_ready(process, f"{server.url}{ready_path}", timeout_s, name, server.log_tail)
            yield server
        finally:
            (stop_group if own_group else stop)(process, stop_timeout_s)
    finally:
        log.close()
