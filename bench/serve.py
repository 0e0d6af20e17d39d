"""Serving benchmark: the real service vs a naive baseline, and both against the floor.

    .venv/bin/python -m bench.serve            # full run (a few minutes), with the on/off variants
    .venv/bin/python -m bench.serve --quick    # the same comparison, short (under a minute)

Starts the real service (``python -m service``, uvicorn on 127.0.0.1) and the naive baseline
(``bench/naive_service.py``: FastAPI + torch eager on the same weights + full-size Pillow decode) as
subprocesses, checks that they agree on a photo, then drives both with the same closed-loop load
generator (``bench/loadgen.py``) at concurrency 1, 8 and 32 for three inputs: a 32x32 PNG, a 512x384
TrashNet JPEG and a 3008x2000 JPEG (that photo upscaled, written to a temp dir at bench time). Ours
and naive run back to back for each cell, alternating over ``--rounds``, so their ratio is fair on a
shared, noisy machine even when absolute numbers drift.

The floor of an input is what no server can beat: the service's image function plus one ONNX Runtime
call at batch 1, in this process, median of many repetitions, with the service's session options.

``--variants`` (on by default without --quick) also starts the service with one optimisation turned
off or on at a time (ORT session options, micro-batching) and compares each with the shipped defaults
on the 512x384 JPEG at concurrency 1 and 8, back to back.

The last line is machine-readable:
``summary: throughput_ratio_c8=X p50_over_floor_512=Y p50_over_floor_3008=Z`` where X is ours/naive
throughput at concurrency 8 on the 512x384 JPEG and Y, Z are ours' p50 at concurrency 1 over the floor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.loadgen import LoadResult, multipart_request, run_load
from service.imaging import load_image, open_image
from service.model import load_model
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = REPO_ROOT.parent / "shared" / "data" / "trashnet" / "glass" / "glass10.jpg"
CONCURRENCY = (1, 8, 32)


@dataclass
class BenchInput:
    name: str
    path: Path
    content_type: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def make_inputs(photo: Path, folder: Path) -> list[BenchInput]:
    """32x32 PNG and 3008x2000 JPEG made from ``photo`` (a 512x384 TrashNet JPEG, used as is)."""
    image = Image.open(photo).convert("RGB")
    small = folder / "photo-32x32.png"
    image.resize((32, 32), Image.Resampling.BILINEAR).save(small, "PNG")
    big = folder / "photo-3008x2000.jpg"
    image.resize((3008, 2000), Image.Resampling.BICUBIC).save(big, "JPEG", quality=90)
    return [
        BenchInput("png 32x32", small, "image/png"),
        BenchInput(f"jpeg {image.width}x{image.height}", photo, "image/jpeg"),
        BenchInput("jpeg 3008x2000", big, "image/jpeg"),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(name: str, command: list[str], env: dict[str, str], port: int, ready_path: str) -> Iterator[int]:
    """Start a server subprocess, wait until ``ready_path`` answers 200, stop it on exit."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read().decode(errors='replace')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready in 180 s")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def ours(model_dir: Path, env: dict[str, str] | None = None, name: str = "service"):
    port = free_port()
    command = [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--port", str(port)]
    return server(name, [*command, "--log-level", "warning"], env or {}, port, "/readyz")


def naive(model_dir: Path):
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "bench.naive_service:app", "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", "warning", "--no-access-log"]
    return server("naive baseline", command, {"DEEPMAD_MODEL_DIR": str(model_dir)}, port, "/healthz")


def classify(port: int, item: BenchInput) -> dict:
    files = {"file": (item.path.name, item.data, item.content_type)}
    response = httpx.post(f"http://127.0.0.1:{port}/classify", files=files, timeout=60)
    response.raise_for_status()
    return response.json()


def check_agreement(our_port: int, naive_port: int, inputs: list[BenchInput]) -> list[str]:
    """Same weights: on the 32x32 PNG (no resize, no decoder choice) the answers must match; on the
    photos the decoders differ (draft mode + bilinear vs full decode + bicubic), so report the gap."""
    lines = []
    for item in inputs:
        a, b = classify(our_port, item), classify(naive_port, item)
        gap = max(abs(a["distances"][k] - b["distances"][k]) for k in a["distances"])
        lines.append(
            f"  {item.name:<15} ours score {a['score']:.4f} ({a['nearest_class']}), "
            f"naive {b['score']:.4f} ({b['nearest_class']}), max |distance gap| {gap:.2e}"
        )
        same = gap <= 1e-3 * max(1.0, abs(a["score"])) and a["nearest_class"] == b["nearest_class"]
        if item.content_type == "image/png" and not same:
            raise SystemExit(f"ours and naive disagree on {item.name}: the baseline's weights differ\n{lines[-1]}")
    return lines


@dataclass
class Floor:
    decode_ms: float
    ort_ms: float
    total_ms: float
    decode_no_draft_ms: float


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _decode_without_draft(data: bytes) -> np.ndarray:
    image = open_image(data)
    image.load()  # full-size decode: what the image function avoids with Image.draft
    return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))


def measure_floor(model, item: BenchInput, reps: int) -> Floor:
    height, width, channels = model.input_shape
    data = item.data
    array = load_image(data, height, width, channels)[None]
    decode = _median_ms(lambda: load_image(data, height, width, channels), reps)
    ort_call = _median_ms(lambda: model.run(array), reps)
    total = _median_ms(lambda: model.run(load_image(data, height, width, channels)[None]), reps)
    no_draft = _median_ms(lambda: _decode_without_draft(data), max(3, reps // 10))
    return Floor(decode, ort_call, total, no_draft)


def compare(
    port_a: int,
    port_b: int,
    request_a: bytes,
    request_b: bytes,
    concurrency: int,
    seconds: float,
    rounds: int,
    warm: bool,
) -> tuple[LoadResult, LoadResult]:
    """A and B back to back, alternating ``rounds`` times (B first on odd rounds), pooled."""
    a = b = None
    for k in range(rounds):
        order = [("a", port_a, request_a), ("b", port_b, request_b)]
        if k % 2:
            order.reverse()
        for which, port, request in order:
            if warm and k < 2:
                run_load(port, request, concurrency, 0.0, max_requests=concurrency)  # one per connection
            result = run_load(port, request, concurrency, seconds / rounds)
            if which == "a":
                a = result if a is None else a.merge(result)
            else:
                b = result if b is None else b.merge(result)
    return a, b


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (under a minute), no variants")
    parser.add_argument("--seconds", type=float, help="measured seconds per cell and server (default 4, quick 0.6)")
    parser.add_argument("--rounds", type=int, help="alternations of ours/naive per cell (default 6, quick 1)")
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None, help="on/off table")
    parser.add_argument("--only-variants", action="store_true", help="skip the naive comparison (tuning)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="a 512x384 TrashNet JPEG")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    args = parser.parse_args(argv)
    seconds = args.seconds or (0.6 if args.quick else 4.0)
    rounds = args.rounds or (1 if args.quick else 6)
    variants = (not args.quick) if args.variants is None else args.variants
    began = time.perf_counter()
    print(
        f"bench.serve: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"{seconds:g} s per cell and server in {rounds} round(s)",
        flush=True,
    )

    settings = Settings(model_dir=args.model_dir)
    model = load_model(args.model_dir, settings)
    floors: dict[str, Floor] = {}
    rows: dict[tuple[str, int], tuple[LoadResult, LoadResult]] = {}
    variant_rows = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="deepmad-bench-"))
        inputs = make_inputs(args.photo, Path(tmp))
        our_port = stack.enter_context(ours(args.model_dir))
        if not args.only_variants:
            naive_port = stack.enter_context(naive(args.model_dir))
            print("agreement (same weights; photos differ only by the decoder):")
            print("\n".join(check_agreement(our_port, naive_port, inputs)), flush=True)
            for item in inputs:
                floors[item.name] = measure_floor(model, item, 30 if args.quick else 200)
                req_ours = multipart_request(our_port, "/classify", item.data, item.path.name, item.content_type)
                req_naive = multipart_request(naive_port, "/classify", item.data, item.path.name, item.content_type)
                for concurrency in CONCURRENCY:
                    rows[item.name, concurrency] = compare(
                        our_port, naive_port, req_ours, req_naive, concurrency, seconds, rounds, warm=not args.quick
                    )
                    print(".", end="", flush=True)
            print()
        if variants or args.only_variants:
            photo = inputs[1]
            req_o = multipart_request(our_port, "/classify", photo.data, photo.path.name, photo.content_type)
            for label, env in VARIANTS:
                with ours(args.model_dir, env, label) as port:
                    req_v = multipart_request(port, "/classify", photo.data, photo.path.name, photo.content_type)
                    for concurrency in (1, 8):
                        shipped, variant = compare(our_port, port, req_o, req_v, concurrency, seconds, rounds, True)
                        variant_rows.append((label, concurrency, shipped, variant))
                print(".", end="", flush=True)
            print()

    if rows:
        print_table(inputs, rows, floors)
    if variant_rows:
        print_variants(variant_rows)
    print(f"({time.perf_counter() - began:.0f} s, load average now {os.getloadavg()[0]:.1f})")
    if rows:
        photo, big = inputs[1].name, inputs[2].name
        ratio = rows[photo, 8][0].throughput / rows[photo, 8][1].throughput
        over_512 = rows[photo, 1][0].percentile(50) * 1e3 / floors[photo].total_ms
        over_3008 = rows[big, 1][0].percentile(50) * 1e3 / floors[big].total_ms
        print(
            f"summary: throughput_ratio_c8={ratio:.2f} p50_over_floor_512={over_512:.2f} "
            f"p50_over_floor_3008={over_3008:.2f}"
        )
    return 0


# Each variant changes one thing from the shipped defaults (env vars of the service's settings).
VARIANTS = [
    ("ORT defaults (threads 0, spinning)", {"DEEPMAD_INTRA_OP_THREADS": "0", "DEEPMAD_ORT_SPINNING": "true"}),
    ("intra-op threads 1", {"DEEPMAD_INTRA_OP_THREADS": "1"}),
    ("intra-op threads 2", {"DEEPMAD_INTRA_OP_THREADS": "2"}),
    ("graph optimisation basic", {"DEEPMAD_GRAPH_OPTIMIZATION": "basic"}),
    ("micro-batching 8 items, 0 ms", {"DEEPMAD_MICROBATCH_MAX_ITEMS": "8"}),
    ("micro-batching 8 items, 2 ms", {"DEEPMAD_MICROBATCH_MAX_ITEMS": "8", "DEEPMAD_MICROBATCH_WAIT_MS": "2"}),
]


def print_table(inputs, rows, floors) -> None:
    print()
    header = (
        f"{'input':<15} {'conc':>4} | {'ours req/s':>10} {'naive req/s':>11} {'ratio':>6} | "
        f"{'ours p50':>8} {'p95':>8} {'p99':>8} | {'naive p50':>9} {'p95':>8} {'p99':>8} | {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for item in inputs:
        for concurrency in CONCURRENCY:
            a, b = rows[item.name, concurrency]
            print(
                f"{item.name:<15} {concurrency:>4} | {a.throughput:10.1f} {b.throughput:11.1f} "
                f"{a.throughput / b.throughput:6.2f} | {ms(a.percentile(50))} {ms(a.percentile(95))} "
                f"{ms(a.percentile(99))} | {' ' + ms(b.percentile(50))} {ms(b.percentile(95))} "
                f"{ms(b.percentile(99))} | {a.errors + b.errors:>6}"
            )
    print("latencies in ms; ratio = ours/naive throughput (same cell, back to back)")
    print()
    print(
        f"{'input':<15} | {'floor ms':>8} = {'decode':>7} + {'ORT b1':>7} | {'no-draft decode':>15} | "
        f"{'ours p50 c1':>11} {'/ floor':>7}"
    )
    for item in inputs:
        f = floors[item.name]
        p50 = rows[item.name, 1][0].percentile(50) * 1e3
        print(
            f"{item.name:<15} | {f.total_ms:8.2f} = {f.decode_ms:7.2f} + {f.ort_ms:7.2f} | "
            f"{f.decode_no_draft_ms:15.2f} | {p50:11.2f} {p50 / f.total_ms:7.2f}"
        )
    print("floor: the service's image function + one ORT call at batch 1, in-process (median)")


def print_variants(variant_rows) -> None:
    print()
    print("optimisations on/off: 512x384 JPEG, shipped defaults vs one change, back to back")
    header = (
        f"{'variant':<36} {'conc':>4} | {'shipped req/s':>13} {'variant req/s':>13} | "
        f"{'shipped p50':>11} {'variant p50':>11} | {'variant/shipped':>15}"
    )
    print(header)
    print("-" * len(header))
    for label, concurrency, shipped, variant in variant_rows:
        print(
            f"{label:<36} {concurrency:>4} | {shipped.throughput:13.1f} {variant.throughput:13.1f} | "
            f"{ms(shipped.percentile(50)):>11} {ms(variant.percentile(50)):>11} | "
            f"{variant.throughput / shipped.throughput:15.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
