"""What capture costs a classification: latency with capture off vs on, same run, alternating rounds.

Three ``python -m service`` processes on 127.0.0.1 serve the same model with ``--threshold 0`` (every item
anomalous): one without capture, one capturing every item in queued mode (answer at once, written in the
background) and one in durable mode (answer once the capture is fsynced). Each round sends the same real
TrashNet photo to every arm, in rotating order, as closed-loop keep-alive traffic (``bench.loadgen``);
latencies are pooled per arm. Then the queued arm's writer rate: 32-photo batch requests keep its queue
full, written captures per second until drained. The load average is printed before and after: on a
shared machine, read the numbers against it. The last line is
``summary: captures_per_s=X p95_ratio=Y`` (the writer's rate; queued capture-all p95 over capture-off p95).

    python -m bench.capture_cost [--quick] [--rounds 8] [--requests 100] [--concurrency 1] [--batches 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.loadgen import BOUNDARY, LoadResult, multipart_request, run_load
from bench.processes import ServerStartError, service_command, service_env, started
from training.data import data_root
from training.errors import UserError, require_artifact, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def service(model_dir: Path, *flags: str) -> Iterator[int]:
    """``python -m service`` on a free port until the block ends; yields the port once /readyz answers."""
    command = service_command(model_dir, *flags)
    try:
        with started(command, "/readyz", env=service_env(), name="the service", timeout_s=60, stop_timeout_s=30) as up:
            yield up.port
    except ServerStartError as exc:
        raise SystemExit(f"error: {exc}") from None


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples whose line starts with ``name`` (labels included in ``name``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def drain(port: int, timeout: float = 120) -> None:
    """Wait until the capture writer has written (or dropped) everything queued."""
    deadline = time.monotonic() + timeout
    while metric(port, "deepmad_capture_pending") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)


def batch_request(port: int, photos: list[Path], items: int) -> bytes:
    """A complete ``POST /classify/batch`` with ``items`` photos (cycling ``photos``), each a ``files`` part."""
    parts = []
    for index in range(items):
        photo = photos[index % len(photos)]
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{photo.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + photo.read_bytes()
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    headers = (
        f"POST /classify/batch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return headers + body


def writer_rate(port: int, photos: list[Path], batches: int) -> dict[str, float]:
    """The capture writer under load: ``batches`` requests of 32 photos from 2 connections. ``line_rate``:
    captures written per second the writer was busy (``deepmad_capture_batch_seconds_sum``), what it can
    take; ``wall_rate``: written per second from the first request until drained (bounded by how fast
    the service classifies); ``busy``: the writer's busy share of that time."""
    drain(port)
    names = ('deepmad_captures_total{outcome="written"}', "deepmad_captures_total", "deepmad_capture_batch_seconds_sum")
    before = [metric(port, name) for name in names]
    start = time.perf_counter()
    run_load(port, batch_request(port, photos, 32), 2, seconds=600, max_requests=batches)
    drain(port)
    elapsed = time.perf_counter() - start
    written, total, busy = (metric(port, name) - value for name, value in zip(names, before, strict=True))
    return {
        "line_rate": written / busy if busy else float("nan"),
        "wall_rate": written / elapsed,
        "busy": busy / elapsed,
        "written": written,
        "dropped": total - written,
    }


def latencies_per_arm(ports: dict[str, int], photos: list[Path], args: argparse.Namespace) -> dict[str, LoadResult]:
    """Each round sends one photo to every arm, in rotating order; the capture arms drained in between."""
    arms = {arm: LoadResult(args.concurrency, 0.0) for arm in ports}
    for port in ports.values():  # warm-up, discarded
        warm = multipart_request(port, "/classify", photos[0].read_bytes(), photos[0].name, "image/jpeg")
        run_load(port, warm, 1, seconds=60, max_requests=20)
    for round_index in range(args.rounds):
        photo = photos[round_index % len(photos)]
        names = list(ports)
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for arm in order:
            port = ports[arm]
            request = multipart_request(port, "/classify", photo.read_bytes(), photo.name, "image/jpeg")
            result = run_load(port, request, args.concurrency, seconds=600, max_requests=args.requests)
            arms[arm] = arms[arm].merge(result)
            for other in ports:
                if other != "off":
                    drain(ports[other])  # a writer's backlog must not run into the next arm's measurement
    return arms


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.capture_cost: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capture_cost", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds; each sends one photo to every arm")
    parser.add_argument("--requests", type=int, default=100, help="requests per arm per round")
    parser.add_argument("--concurrency", type=int, default=1, help="keep-alive connections per arm")
    parser.add_argument("--batches", type=int, default=40, help="32-photo batches for the writer's rate")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 50 requests, 20 batches (about a minute)")
    parser.add_argument(
        "--capture-flag", action="append", default=[], metavar="FLAG",
        help="a python -m service flag for both capturing arms, e.g. --capture-flag=--decode-inline (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests, args.batches = 2, 50, 20
    if min(args.rounds, args.requests, args.concurrency, args.batches) < 1:
        parser.error("--rounds, --requests, --concurrency and --batches must be at least 1")
    require_artifact("--model-dir", args.model_dir)
    args.data = args.data or data_root() / "trashnet"
    every = sorted(args.data.glob("*/*.jpg"))
    photos = every[:: max(1, len(every) // args.rounds)][: args.rounds]  # spread over the classes
    if not photos:
        raise UserError(f"--data {args.data}: no photos (expected <class>/*.jpg)")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="capture-cost-") as folder:
        on = ("--threshold", "0", "--capture-queue-size", "4096", *args.capture_flag, "--capture-dir")
        with (
            service(args.model_dir, "--threshold", "0") as off,
            service(args.model_dir, *on, f"{folder}/queued") as queued,
            service(args.model_dir, *on, f"{folder}/durable", "--capture-mode", "durable") as durable,
        ):
            ports = {"off": off, "queued": queued, "durable": durable}
            arms = latencies_per_arm(ports, photos, args)
            writer = writer_rate(queued, every[:: max(1, len(every) // 32)][:32], args.batches)
    load_after = os.getloadavg()
    report(argv, args, photos, arms, (load_before, load_after), writer)
    return 0 if all(result.errors == 0 for result in arms.values()) else 1


def report(
    argv: list[str] | None,
    args: argparse.Namespace,
    photos: list[Path],
    arms: dict[str, LoadResult],
    loads: tuple[tuple[float, ...], ...],
    writer: dict[str, float],
) -> None:
    """The table and the one summary line (capture-all p95 over capture-off p95, same run)."""
    print(f"command: python -m bench.capture_cost {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"model: {args.model_dir}, {args.rounds} rounds x {args.requests} requests per arm, "
          f"concurrency {args.concurrency}, photos {', '.join(p.name for p in photos)}")  # fmt: skip
    before, after = (" ".join(f"{x:.2f}" for x in load) for load in loads)
    print(f"load average before: {before}; after: {after} (1, 5, 15 min; {os.cpu_count()} CPUs)")
    print()
    print("| capture | requests | errors | p50 ms | p95 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    for arm, result in arms.items():
        values = np.array(result.latencies) * 1000
        print(f"| {arm} | {len(values)} | {result.errors} | {np.percentile(values, 50):.2f} | "
              f"{np.percentile(values, 95):.2f} | {values.mean():.2f} |")  # fmt: skip
    print()
    print(f"writer, {args.batches} batches of 32 photos over 2 connections: {writer['written']:.0f} written, "
          f"{writer['dropped']:.0f} dropped; {writer['line_rate']:.0f} captures per second busy, "
          f"{writer['wall_rate']:.0f} per second of wall clock (busy {writer['busy']:.0%} of it)")  # fmt: skip
    p95 = {arm: np.percentile(result.latencies, 95) for arm, result in arms.items()}
    print(f"durable p95 / queued p95: {p95['durable'] / p95['queued']:.2f}")
    print(f"summary: captures_per_s={writer['line_rate']:.0f} p95_ratio={p95['queued'] / p95['off']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
