"""What capture costs a classification: latency with capture off vs on, same run, alternating rounds.

Two ``python -m service`` processes on 127.0.0.1 serve the same model with ``--threshold 0`` (every item
anomalous), one without capture and one capturing every item (image + sidecar, each fsynced, on a
background thread). Each round sends the same real TrashNet photo to both, in alternating order, as
closed-loop keep-alive traffic (``bench.loadgen``); latencies are pooled per arm. The load average is
printed before and after: on a shared machine, read the numbers against it.

    python -m bench.capture_cost [--rounds 8] [--requests 100] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.loadgen import multipart_request, run_load

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def service(model_dir: Path, *flags: str) -> Iterator[int]:
    """``python -m service`` on a free port until the block ends; yields the port once /readyz answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPMAD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise SystemExit(f"error: the service exited: {process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("error: the service was not ready after 60 s") from None
                time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples whose line starts with ``name`` (labels included in ``name``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capture_cost", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "trashnet")
    parser.add_argument("--rounds", type=int, default=8, help="rounds; each sends one photo to both arms")
    parser.add_argument("--requests", type=int, default=100, help="requests per arm per round")
    parser.add_argument("--concurrency", type=int, default=1, help="keep-alive connections per arm")
    args = parser.parse_args(argv)
    if min(args.rounds, args.requests, args.concurrency) < 1:
        parser.error("--rounds, --requests and --concurrency must be at least 1")
    every = sorted(args.data.glob("*/*.jpg"))
    photos = every[:: max(1, len(every) // args.rounds)][: args.rounds]  # spread over the classes
    if not photos:
        parser.error(f"no photos under {args.data} (expected <class>/*.jpg)")

    load_before = os.getloadavg()
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    errors = {"off": 0, "on": 0}
    with tempfile.TemporaryDirectory(prefix="capture-cost-") as folder:
        on_flags = ("--threshold", "0", "--capture-dir", folder)
        with service(args.model_dir, "--threshold", "0") as off, service(args.model_dir, *on_flags) as on:
            ports = {"off": off, "on": on}
            for port in ports.values():  # warm-up, discarded
                warm = multipart_request(port, "/classify", photos[0].read_bytes(), photos[0].name, "image/jpeg")
                run_load(port, warm, 1, seconds=60, max_requests=20)
            for round_index in range(args.rounds):
                photo = photos[round_index % len(photos)]
                order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
                for arm in order:
                    port = ports[arm]
                    request = multipart_request(port, "/classify", photo.read_bytes(), photo.name, "image/jpeg")
                    result = run_load(port, request, args.concurrency, seconds=600, max_requests=args.requests)
                    latencies[arm] += result.latencies
                    errors[arm] += result.errors
            deadline = time.monotonic() + 60  # let the writer finish what is queued before reading its counters
            while metric(on, "deepmad_capture_pending") > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            written = metric(on, 'deepmad_captures_total{outcome="written"}')
            dropped = metric(on, "deepmad_captures_total") - written
            stored_bytes = metric(on, "deepmad_capture_bytes")
    load_after = os.getloadavg()

    print(f"command: python -m bench.capture_cost {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"model: {args.model_dir}, {args.rounds} rounds x {args.requests} requests per arm, "
          f"concurrency {args.concurrency}, photos {', '.join(p.name for p in photos)}")  # fmt: skip
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)} (1, 5, 15 min; {os.cpu_count()} CPUs)")  # fmt: skip
    print()
    print("| capture | requests | errors | p50 ms | p95 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    for arm in ("off", "on"):
        values = np.array(latencies[arm]) * 1000
        print(f"| {arm} | {len(values)} | {errors[arm]} | {np.percentile(values, 50):.2f} | "
              f"{np.percentile(values, 95):.2f} | {values.mean():.2f} |")  # fmt: skip
    print()
    print(f"captures written: {written:.0f}, dropped: {dropped:.0f}, bytes on disk: {stored_bytes:.0f}")
    return 0 if errors["off"] == errors["on"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
