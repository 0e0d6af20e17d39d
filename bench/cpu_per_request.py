"""Server CPU ms per request of the service at two or more commits or settings, interleaved.

    .venv/bin/python -m bench.cpu_per_request --arm HEAD~1 --arm HEAD
    .venv/bin/python -m bench.cpu_per_request --arm 'HEAD' --arm 'HEAD --decode-inline' -c 8 -n 1500
    .venv/bin/python -m bench.cpu_per_request --arm . --bound -c 32 -n 1500 --rounds 5   # ours over the bound

Each ``--arm`` is a git commit (``.`` for the working tree) and optional ``python -m service`` flags.
The commit's ``service/`` is exported to a temp folder and served from there, so two versions of the
code run side by side. Every round sends each arm the same fixed number of requests (512x384 JPEG,
multipart, ``bench/loadgen.py``), in a rotated order, and reads the CPU seconds its processes
spent (``/proc/<pid>/stat``), and apart from that its main thread's: the event loop, where the
per-request overhead of HTTP, routing, multipart and JSON lives (decode and ONNX Runtime run in
worker threads), which is measured far more tightly than the total. CPU time does not count time
spent waiting for a busy core, so the per-request cost stays steady on a shared machine where
wall-clock throughput does not; the floor is the image's own decode + ONNX Runtime cost (~2.15 ms
for this photo, ``bench.serve``'s limit).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from bench.loadgen import multipart_request, run_load
from bench.serve import BOUND, DEFAULT_PHOTO, PEERS, PY, REPO_ROOT, ServerSpec, load_line, server
from training.errors import require_artifact, require_file, run_command


def export_service(ref: str, folder: Path) -> Path:
    """``service/`` as of ``ref`` (``.``: the working tree) in ``folder``; returns the PYTHONPATH to use."""
    if ref == ".":
        return REPO_ROOT
    archive = subprocess.run(["git", "archive", ref, "service"], cwd=REPO_ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.cpu_per_request: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_request", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", required=True, help="'REF [service flags]' (repeatable)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="keep-alive connections (default 8)")
    parser.add_argument("-n", "--requests", type=int, default=1000, help="requests per arm and round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, arms rotated each round (default 3)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="the image sent (default: 512x384 JPEG)")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument(
        "--bound", action="store_true",
        help="also run the bare ASGI server (bench/peers/bare_asgi.py) and print each arm over it, round by round",
    )  # fmt: skip
    args = parser.parse_args(argv)
    require_file("--photo", args.photo)
    require_artifact("--model-dir", args.model_dir)
    data = args.photo.read_bytes()
    print(f"bench.cpu_per_request: {args.requests} requests x {args.rounds} rounds, c{args.concurrency}; {load_line()}")
    names = [*args.arm, BOUND] if args.bound else list(args.arm)
    samples: dict[str, list[float]] = {arm: [] for arm in names}
    loop_samples: dict[str, list[float]] = {arm: [] for arm in names}
    with contextlib.ExitStack() as stack:
        running = {}
        for index, arm in enumerate(args.arm):
            ref, *flags = shlex.split(arm)
            source = export_service(ref, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deepmad-arm-"))))
            command = [PY, "-P", "-m", "service", "--port", "{port}", "--log-level", "warning", *flags]
            spec = ServerSpec(f"arm {index}", command, "/readyz", {"PYTHONPATH": str(source)})
            running[arm] = stack.enter_context(server(spec, args.model_dir))
        if args.bound:
            running[BOUND] = stack.enter_context(server(PEERS[BOUND], args.model_dir))
        requests = {
            arm: multipart_request(live.port, "/classify", data, args.photo.name, "image/jpeg")
            for arm, live in running.items()
        }
        for arm, live in running.items():  # connections open, first-call costs paid
            run_load(live.port, requests[arm], args.concurrency, 60, 4 * args.concurrency)
        arms = list(running)
        for k in range(args.rounds):
            for arm in arms[k % len(arms) :] + arms[: k % len(arms)]:
                live = running[arm]
                before, loop_before = live.cpu_seconds(), live.main_thread_cpu_seconds()
                result = run_load(live.port, requests[arm], args.concurrency, 600, args.requests)
                answered = len(result.latencies) + result.errors
                samples[arm].append((live.cpu_seconds() - before) * 1e3 / answered)
                loop_samples[arm].append((live.main_thread_cpu_seconds() - loop_before) * 1e3 / answered)
                if result.errors:
                    print(f"  {arm!r}: {result.errors} non-200 answers", file=sys.stderr)
    print(f"server CPU ms/request at c{args.concurrency}: rounds, median | of which the event loop   [{load_line()}]")
    for arm, values in samples.items():
        rounds = " ".join(f"{v:5.2f}" for v in values)
        loop = " ".join(f"{v:5.2f}" for v in loop_samples[arm])
        medians = f"{statistics.median(values):5.2f} | {loop} | {statistics.median(loop_samples[arm]):5.2f}"
        print(f"  {arm:<40} {rounds} | {medians}")
    if args.bound:
        print_over_bound(samples)
    return 0


def print_over_bound(samples: dict[str, list[float]]) -> None:
    """Each arm's CPU per request over the bound's in the same round (neighbouring minutes), then the median."""
    print("over the bound (the same round's bare ASGI server): rounds, median")
    for arm, values in samples.items():
        if arm != BOUND:
            ratios = [value / bound for value, bound in zip(values, samples[BOUND], strict=True)]
            print(f"  {arm:<40} {' '.join(f'{r:5.2f}' for r in ratios)} | {statistics.median(ratios):5.2f}")


if __name__ == "__main__":
    sys.exit(main())
