"""Peak resident memory of the serving process, per model: can a small board's 1 GB hold it?

    .venv/bin/python -m bench.footprint                        # every shipped model, 100 requests each
    .venv/bin/python -m bench.footprint --model-dir models/trashnet-lite0 -n 200 --flag=--busy-intra-op-threads=0

Each model is served by a real ``python -m service`` (``bench.processes``), sent ``-n`` real TrashNet
photos on ``/classify`` from 4 threads (so the busy session runs too), and its kernel-counted peak
resident size (``VmHWM`` in ``/proc/<pid>/status``) is read after the last answer, with the size after
start-up beside it. One line per model, then a ``summary:`` line with the largest peak and the limit.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.processes import REPO_ROOT, service_command, service_env, started
from training.data import data_root
from training.errors import UserError, require_artifact, run_command

SHIPPED = ("trashnet", "trashnet-int8", "trashnet-lite0")
CLASSES = ("cardboard", "glass", "metal", "paper", "plastic", "trash")
LIMIT_MB = 200  # issue 37: a 1 GB board runs the OS, the bin's own software and this


def photos(trashnet: Path, count: int = 24) -> list[Path]:
    """``count`` photos spread over the six TrashNet folders, the same ones every run."""
    per_class = [sorted((trashnet / name).glob("*.jpg"))[::25][: count // len(CLASSES)] for name in CLASSES]
    found = [path for group in per_class for path in group]
    if not found:
        raise UserError(f"no TrashNet photos under {trashnet}; pass --data or set DEEPMAD_DATA_ROOT")
    return found


def memory_mb(pid: int) -> dict[str, float]:
    """The kernel's resident-size counters of ``pid``, in MB (VmHWM: the peak so far)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024  # kB
    return fields


def measure(model_dir: Path, files: list[Path], requests: int, flags: list[str]) -> dict[str, float]:
    """Serve ``model_dir``, send ``requests`` photos from 4 threads, return start-up and peak resident MB."""
    bodies = [(path.name, path.read_bytes()) for path in files]
    with started(
        service_command(model_dir, "--log-level", "warning", *flags),
        "/readyz",
        env=service_env(),
        name=f"service ({model_dir.name})",
        timeout_s=180,
    ) as server:
        after_start = memory_mb(server.process.pid)["VmRSS"]
        with httpx.Client(base_url=server.url, timeout=60) as client:

            def classify(item: tuple[str, bytes]) -> str:
                response = client.post("/classify", files={"file": (item[0], item[1], "image/jpeg")})
                response.raise_for_status()
                return response.json()["verdict"]

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(classify, itertools.islice(itertools.cycle(bodies), requests)))
        counters = memory_mb(server.process.pid)
    return {"start_mb": after_start, "peak_mb": counters["VmHWM"], "now_mb": counters["VmRSS"]}


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server starts."""
    return run_command(lambda: _main(argv), "bench.footprint: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, action="append", help="a model folder (repeatable; default: every shipped model)"
    )
    parser.add_argument("-n", "--requests", type=int, default=100, help="photos sent to each server (default 100)")
    parser.add_argument("--data", type=Path, help="TrashNet folder (default: DEEPMAD_DATA_ROOT/trashnet)")
    parser.add_argument("--flag", action="append", default=[], help="a python -m service flag (repeatable)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        raise UserError(f"-n must be at least 1, got {args.requests}")
    model_dirs = args.model_dir or [REPO_ROOT / "models" / name for name in SHIPPED]
    for model_dir in model_dirs:
        require_artifact("--model-dir", model_dir)
    files = photos(args.data or data_root() / "trashnet")
    worst = 0.0
    for model_dir in model_dirs:
        numbers = measure(model_dir, files, args.requests, args.flag)
        worst = max(worst, numbers["peak_mb"])
        print(
            f"{model_dir.name}: after start {numbers['start_mb']:.0f} MB, peak {numbers['peak_mb']:.0f} MB, "
            f"now {numbers['now_mb']:.0f} MB after {args.requests} requests",
            flush=True,
        )
    flags = " ".join(args.flag) or "(defaults)"
    print(
        f"summary: peak_rss_mb_max={worst:.0f} limit_mb={LIMIT_MB} within={worst <= LIMIT_MB} "
        f"models={len(model_dirs)} requests={args.requests} flags={flags}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
