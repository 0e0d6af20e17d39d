"""Serving benchmark: the real service against the servers a user would pick instead, and against the limit.

    .venv/bin/python -m bench.serve --quick    # 512x384 and 3008x2000 JPEGs, every peer, the summary (~2-3 min)
    .venv/bin/python -m bench.serve            # every input, longer cells, then the levers' on/off table

Starts the real service (``python -m service``, uvicorn on 127.0.0.1) and the peers of ``bench/peers/``
(plain FastAPI + ONNX Runtime, FastAPI + torch, LitServe with batching, BentoML with a batchable API)
and the bound (``bare-asgi``: decode + one ONNX Runtime call on a bare ASGI event loop, nothing else)
as subprocesses, checks that every peer gives our answer on every input (same graph or weights, same
image function), then drives each with the same closed-loop load generator (``bench/loadgen.py``) at
concurrency 1, 8 and 32. Within a cell the servers take turns, in a rotated order every round, so drift
on a shared machine hits all of them alike.

Two references, both measured in this process before any load:

* **floor** (latency): the service's image function plus one ONNX Runtime call at batch 1, wall clock,
  median, with the service's session options or with one intra-op thread, whichever is faster. No
  server answers one request faster.
* **limit** (throughput): the CPU cost of one image, the image function plus its share of one ONNX
  Runtime call (one intra-op thread) at the batch size that makes that share smallest (swept), in
  process CPU seconds; the limit is ``os.cpu_count()`` / that cost, in images/s.

``--levers`` (on by default without --quick) starts the service with one thing changed at a time
(micro-batching, decode inline on the event loop, worker processes, intra-op threads and spinning, HTTP
server, the INT8 artifact) and compares it
with the shipped configuration on the 512x384 JPEG, back to back; it also times, in process, what
response encoding and the decode's hand-off to a worker thread cost per request.

Every cell also gives each server's **CPU ms per request**: the CPU seconds (user + system) that the
server's processes (the one started and every one below it) spent during its turns, over the requests
it answered. Waiting for a busy core does not count, so on a shared machine this holds still where
throughput does not; its distance above the limit's CPU ms per image is the per-request overhead
(HTTP, multipart, routing, JSON, metrics).

``--engines onnxruntime,openvino`` (default: every engine installed) serves ours once per engine
(``DEEPMAD_ENGINE``; the column ``ours`` is ONNX Runtime, ``ours-openvino`` OpenVINO), side by side in the same
rounds, and measures each engine's in-process cost too (CPU ms per photo on one thread at batch 1 and 8).

The summary lines are machine-readable. First ``summary: best_peer=NAME ratio_c8=X ratio_c32=Y
p50_over_floor_512=A p50_over_floor_3008=B fraction_of_limit_c32=F cpu_ms_per_req_512=C``; ratios are
ours over the best peer's throughput on the 512x384 JPEG (the peer with the highest c8 + c32
throughput, same run), the p50s are ours at concurrency 1, the fraction is ours at concurrency 32 over
the 512x384 limit, and C is our server CPU ms per request at concurrency 32 on the 512x384 JPEG. With
the bound running, ``ceiling_ratio_c32=R`` follows: the best peer's server CPU per request over the
bound's, the most any server could be faster than the best peer once the two cores are busy. Then the
last lines, one per engine measured: ``summary: engine=E ms_per_photo_b1=A ms_per_photo_b8=B
cpu_ms_per_request_c32=C vs_onnxruntime_b1=R vs_onnxruntime_c32=S`` (A, B: the engine's CPU ms per photo on
one thread in process; C: that engine's server, 512x384 JPEG, c32; R, S: ONNX Runtime's over this engine's,
same run, so above 1 is faster), after the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import numpy as np
from fastapi.responses import JSONResponse
from PIL import Image

from bench.loadgen import LoadResult, multipart_request, run_load
from bench.processes import started
from service.imaging import load_image
from service.manifest import Manifest
from service.model import load_model
from service.settings import Settings
from training.data import data_root
from training.errors import require_artifact, require_file, run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = data_root() / "trashnet" / "glass" / "glass10.jpg"  # DEEPMAD_DATA_ROOT, else ../shared/data
DEFAULT_INT8_DIR = REPO_ROOT / "models" / "trashnet-int8"
CONCURRENCY = (1, 8, 32)
LIMIT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
OURS = "ours"  # our service on ONNX Runtime (the default engine)
ENGINES = ("onnxruntime", "openvino")


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


@dataclass
class ServerSpec:
    """How to start one server: ``command`` with ``{port}`` filled in, extra env, its readiness path."""

    name: str
    command: list[str]
    ready_path: str
    env: dict[str, str]

    def argv(self, port: int) -> list[str]:
        return [part.format(port=port) for part in self.command]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Running:
    """A started server: its port, and its leader process (whose descendants are the server's workers)."""

    port: int
    pgid: int

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the leader and every process below it, reaped children included.

        Descendants by parent, not by process group: BentoML's workers start sessions of their own.
        Time spent waiting for a busy core does not count, so on a loaded machine this per-request cost
        holds still where wall-clock throughput does not.
        """
        parents, ticks = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_bytes()
            except OSError:  # the process ended between the listing and the read
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()  # fields from the 3rd on (state, ppid, pgrp, ...)
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            ticks[pid] = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime

        def under_leader(pid: int) -> bool:
            while pid > 1:
                if pid == self.pgid:
                    return True
                pid = parents.get(pid, 0)
            return False

        return sum(value for pid, value in ticks.items() if under_leader(pid)) / CLOCK_TICKS

    def main_thread_cpu_seconds(self) -> float:
        """User + system CPU seconds of the leader's main thread (ours: the event loop, where HTTP parsing,
        routing, multipart and JSON run; decode and ONNX Runtime run in other threads)."""
        stat = Path(f"/proc/{self.pgid}/task/{self.pgid}/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@contextlib.contextmanager
def server(spec: ServerSpec, model_dir: Path) -> Iterator[Running]:
    """Start ``spec`` in its own process group, wait until its ready path answers 200, stop it on exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DEEPMAD_MODEL_DIR": str(model_dir), **spec.env}
    with started(spec.argv, spec.ready_path, env=env, name=spec.name, timeout_s=240, own_group=True) as running:
        yield Running(running.port, running.process.pid)  # own session: the group's id is the leader's pid


PY = sys.executable
UVICORN = [PY, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning", "--no-access-log"]


def ours_name(engine: str) -> str:
    """Our service's column for ``engine``: ``ours`` for the default, ``ours-openvino`` for OpenVINO."""
    return OURS if engine == ENGINES[0] else f"{OURS}-{engine}"


def ours_spec(env: dict[str, str] | None = None, name: str = OURS) -> ServerSpec:
    command = [PY, "-m", "service", "--port", "{port}", "--log-level", "warning"]
    return ServerSpec(name, command, "/readyz", env or {})


PEERS = {
    "fastapi-ort": ServerSpec("fastapi-ort", [*UVICORN, "bench.peers.fastapi_ort:app"], "/healthz", {}),
    "fastapi-torch": ServerSpec("fastapi-torch", [*UVICORN, "bench.peers.torch_fastapi:app"], "/healthz", {}),
    "litserve": ServerSpec("litserve", [PY, "-m", "bench.peers.litserve_ort", "--port", "{port}"], "/health", {}),
    "bentoml": ServerSpec(
        "bentoml",
        [str(Path(PY).with_name("bentoml")), "serve", "bench.peers.bentoml_ort:TrashnetClassifier"]
        + ["--host", "127.0.0.1", "--port", "{port}"],
        "/readyz",
        {"BENTOML_DO_NOT_TRACK": "true"},
    ),
    "bare-asgi": ServerSpec("bare-asgi", [*UVICORN, "bench.peers.bare_asgi:app"], "/healthz", {}),
}
BOUND = "bare-asgi"  # a reference column (bench/peers/bare_asgi.py), never the best peer
TORCH_PEER = "fastapi-torch"  # rebuilds LeNet encoders from the graph: not a pretrained backbone's


def rivals(names) -> list[str]:
    """The servers a user would pick instead of ours: every peer but the bound and ours on any engine."""
    return [n for n in names if n != BOUND and n not in {ours_name(engine) for engine in ENGINES}]


def classify(port: int, item: BenchInput) -> dict:
    files = {"file": (item.path.name, item.data, item.content_type)}
    response = httpx.post(f"http://127.0.0.1:{port}/classify", files=files, timeout=60)
    response.raise_for_status()
    answer = response.json()
    return answer[0] if isinstance(answer, list) else answer  # BentoML's batchable API answers a list


def check_agreement(ports: dict[str, int], inputs: list[BenchInput]) -> list[str]:
    """Every peer must give our nearest class and our distances (to 1e-3 relative) on every input."""
    lines = []
    for item in inputs:
        ours = classify(ports[OURS], item)
        for name, port in ports.items():
            if name == OURS:
                continue
            theirs = classify(port, item)
            gap = max(abs(ours["distances"][k] - theirs["distances"][k]) for k in ours["distances"])
            line = (
                f"  {item.name:<15} {name:<14} score {theirs['score']:.4f} ({theirs['nearest_class']}) "
                f"vs ours {ours['score']:.4f} ({ours['nearest_class']}), max |distance gap| {gap:.1e}"
            )
            lines.append(line)
            if gap > 1e-3 * max(1.0, abs(ours["score"])) or theirs["nearest_class"] != ours["nearest_class"]:
                raise SystemExit(f"{name} disagrees with ours on {item.name}: not the same model or decoding\n{line}")
    return lines


def _median(fn, reps: int, clock=time.perf_counter) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


@dataclass
class Floor:
    decode_ms: float
    ort_ms: float
    total_ms: float


def measure_floor(models, data: bytes, reps: int) -> Floor:
    """The faster of the service's session options and a one-thread session: both are ways to serve."""
    height, width, channels = models[0].input_shape
    array = load_image(data, height, width, channels)[None]
    decode = _median(lambda: load_image(data, height, width, channels), reps)
    floors = []
    for model in models:
        ort_call = _median(lambda m=model: m.run(array), reps)
        total = _median(lambda m=model: m.run(load_image(data, height, width, channels)[None]), reps)
        floors.append(Floor(decode * 1e3, ort_call * 1e3, total * 1e3))
    return min(floors, key=lambda f: f.total_ms)


@dataclass
class Limit:
    decode_cpu_ms: float
    ort_cpu_ms_per_image: dict[int, float]  # batch size -> CPU ms per image of one ORT call

    @property
    def best_batch(self) -> int:
        return min(self.ort_cpu_ms_per_image, key=self.ort_cpu_ms_per_image.get)

    @property
    def image_cpu_ms(self) -> float:
        return self.decode_cpu_ms + self.ort_cpu_ms_per_image[self.best_batch]

    @property
    def req_per_s(self) -> float:
        return (os.cpu_count() or 1) * 1e3 / self.image_cpu_ms


def measure_limit(single_thread_model, data: bytes, reps: int) -> Limit:
    """CPU seconds (process_time: immune to waiting for a busy CPU) of decode and of ORT per image."""
    height, width, channels = single_thread_model.input_shape
    image = load_image(data, height, width, channels)
    decode = _median(lambda: load_image(data, height, width, channels), reps, time.process_time)
    per_image = {}
    for batch in LIMIT_BATCHES:
        stacked = np.repeat(image[None], batch, axis=0)
        calls = max(3, reps // batch)
        per_image[batch] = _median(lambda s=stacked: single_thread_model.run(s), calls, time.process_time) / batch
    return Limit(decode * 1e3, {b: s * 1e3 for b, s in per_image.items()})


def compare(
    servers: dict[str, Running], requests: dict[str, bytes], concurrency: int, seconds: float, rounds: int
) -> dict[str, LoadResult]:
    """Every server in turn, ``rounds`` times (order rotated each round), ``seconds / rounds`` each, pooled;
    each result carries the CPU seconds its server's processes spent during its turns."""
    names = list(servers)
    results: dict[str, LoadResult] = {}
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            port = servers[name].port
            if k == 0:  # one request per connection first: connections open, first-call costs paid
                run_load(port, requests[name], concurrency, 0.0, max_requests=concurrency)
            before = servers[name].cpu_seconds()
            result = run_load(port, requests[name], concurrency, seconds / rounds)
            result.server_cpu_seconds = servers[name].cpu_seconds() - before
            results[name] = result if name not in results else results[name].merge(result)
    return results


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def print_tables(inputs, names, rows, floors, limits, engine_costs) -> None:
    for item in inputs:
        if (item.name, CONCURRENCY[0]) not in rows:
            continue
        print()
        print(f"{item.name}: throughput req/s | p50 / p99 ms | server CPU ms/req   [{load_line()}]")
        width = 17
        header = f"{'conc':>4} | " + " ".join(f"{n:>{width}}" for n in names) + f" | {'ours/best peer':>14}"
        print(header)
        print("-" * len(header))
        for concurrency in CONCURRENCY:
            cell = rows[item.name, concurrency]
            best = max(rivals(names), key=lambda n: cell[n].throughput)
            print(
                f"{concurrency:>4} | "
                + " ".join(f"{cell[n].throughput:>{width}.1f}" for n in names)
                + f" | {cell[OURS].throughput / cell[best].throughput:>6.2f} ({best})"
            )
            print(
                f"{'':>4} | "
                + " ".join(f"{ms(cell[n].percentile(50)) + ' / ' + ms(cell[n].percentile(99)):>{width}}" for n in names)
                + " |"
            )
            print(f"{'':>4} | " + " ".join(f"{cell[n].cpu_ms_per_request:>{width}.2f}" for n in names) + " |")
        errors = {n: sum(rows[item.name, c][n].errors for c in CONCURRENCY) for n in names}
        if any(errors.values()):
            print(f"errors: {errors}")
    print()
    print(f"references, measured in this process before the load   [{load_line()}]")
    print(
        f"{'input':<15} | {'floor ms':>8} = {'decode':>6} + {'ORT b1':>6} | {'CPU ms/img':>10} = "
        f"{'decode':>6} + {'ORT/img':>7} at b | {'limit req/s':>11} | {'ours p50 c1 / floor':>19} | "
        f"{'ours c32 / limit':>16}"
    )
    for item in inputs:
        if item.name not in floors:
            continue
        f, lim = floors[item.name], limits[item.name]
        p50 = rows[item.name, 1][OURS].percentile(50) * 1e3
        c32 = rows[item.name, 32][OURS].throughput
        print(
            f"{item.name:<15} | {f.total_ms:8.2f} = {f.decode_ms:6.2f} + {f.ort_ms:6.2f} | {lim.image_cpu_ms:10.2f} = "
            f"{lim.decode_cpu_ms:6.2f} + {lim.ort_cpu_ms_per_image[lim.best_batch]:7.2f} at {lim.best_batch:<2}| "
            f"{lim.req_per_s:11.1f} | {p50:8.2f} ms {p50 / f.total_ms:6.2f}x | {c32 / lim.req_per_s:16.2f}"
        )
    sweep = next(iter(limits.values())).ort_cpu_ms_per_image
    print("ORT CPU ms per image by batch size: " + ", ".join(f"b{b} {v:.2f}" for b, v in sweep.items()))
    if len(engine_costs) > 1:
        print(f"engines, CPU ms per photo on one thread in process, rounds interleaved   [{load_line()}]")
        for engine, cost in engine_costs.items():
            print(f"  {engine:<12} " + ", ".join(f"b{b} {v:.2f}" for b, v in cost.items()))
    print(
        "floor: image function + one ORT call at batch 1 (service's options or 1 thread), wall-clock median; "
        f"limit: {os.cpu_count()} CPUs / (decode + ORT per image at the best batch), CPU-time medians"
    )


# Each lever changes one thing from the shipped configuration (``python -m service`` with its defaults).
def lever_specs(int8_dir: Path) -> list[tuple[str, ServerSpec, Path | None]]:
    launch = [PY, "-m", "uvicorn", "--factory", "bench.launch:app", "--host", "127.0.0.1", "--port", "{port}"]
    launch += ["--log-level", "warning", "--no-access-log"]
    h11 = ServerSpec("h11", [*launch, "--http", "h11", "--loop", "asyncio"], "/readyz", {})
    levers = [
        ("micro-batch 8 items, 0 ms", ours_spec({"DEEPMAD_MICROBATCH_MAX_ITEMS": "8"}), None),
        (
            "micro-batch 8 items, 2 ms",
            ours_spec({"DEEPMAD_MICROBATCH_MAX_ITEMS": "8", "DEEPMAD_MICROBATCH_WAIT_MS": "2"}),
            None,
        ),
        (
            "micro-batch 32 items, 5 ms",
            ours_spec({"DEEPMAD_MICROBATCH_MAX_ITEMS": "32", "DEEPMAD_MICROBATCH_WAIT_MS": "5"}),
            None,
        ),
        ("decode inline on the event loop", ours_spec({"DEEPMAD_DECODE_INLINE": "true"}), None),
        ("intra-op threads 1", ours_spec({"DEEPMAD_INTRA_OP_THREADS": "1"}), None),
        ("one photo at a time (decode concurrency 1)", ours_spec({"DEEPMAD_DECODE_CONCURRENCY": "1"}), None),
        ("one session, no busy session", ours_spec({"DEEPMAD_BUSY_INTRA_OP_THREADS": "0"}), None),
        ("ORT thread spinning on (ORT default)", ours_spec({"DEEPMAD_ORT_SPINNING": "true"}), None),
        (
            "2 uvicorn workers, 1 thread each",
            ServerSpec("2 workers", [*launch, "--workers", "2"], "/readyz", {"DEEPMAD_INTRA_OP_THREADS": "1"}),
            None,
        ),
        ("uvicorn h11 + asyncio", h11, None),
        (
            "granian",
            ServerSpec(
                "granian",
                [str(Path(PY).with_name("granian")), "--interface", "asgi", "--factory", "--host", "127.0.0.1"]
                + ["--port", "{port}", "--log-level", "warning", "bench.launch:app"],
                "/readyz",
                {},
            ),
            None,
        ),
        (
            "hypercorn",
            ServerSpec(
                "hypercorn",
                [str(Path(PY).with_name("hypercorn")), "--bind", "127.0.0.1:{port}", "bench.launch:app()"],
                "/readyz",
                {},
            ),
            None,
        ),
    ]
    if (int8_dir / "model.onnx").is_file():
        levers.append(("INT8 artifact (bench.quantize)", ours_spec(name="int8"), int8_dir))
    return levers


def measure_in_process_levers(model, data: bytes) -> list[str]:
    """What response encoding and the decode's thread hand-off cost per request, against the request."""
    height, width, channels = model.input_shape
    scores = model.run(load_image(data, height, width, channels)[None])
    names = model.manifest.class_names
    answer = {
        "verdict": "normal",
        "score": float(scores.score[0]),
        "threshold": model.threshold,
        "probability": 0.1,
        "nearest_class": names[int(scores.nearest[0])],
        "distances": dict(zip(names, scores.distances[0].tolist(), strict=True)),
        "model": {"name": model.manifest.name, "version": model.manifest.version},
    }
    render = _median(lambda: JSONResponse(answer).body, 2000)
    compact = _median(lambda: json.dumps(answer, separators=(",", ":")).encode(), 2000)

    async def hops(hand_off, n: int = 2000) -> float:
        await hand_off()
        start = time.perf_counter()
        for _ in range(n):
            await hand_off()
        return (time.perf_counter() - start) / n

    async def both() -> tuple[float, float]:
        with ThreadPoolExecutor(4) as pool:  # the service's hand-off: asyncio's executor (Pipeline)
            loop = asyncio.get_running_loop()
            executor = await hops(lambda: loop.run_in_executor(pool, int))
        return executor, await hops(lambda: anyio.to_thread.run_sync(int))

    executor, anyio_hop = asyncio.run(both())
    return [
        f"  response encoding: JSONResponse render {render * 1e6:.1f} us, bare json.dumps {compact * 1e6:.1f} us "
        "per answer",
        f"  decode off the event loop, wall clock per request: asyncio executor (the service's) "
        f"{executor * 1e6:.1f} us, anyio.to_thread {anyio_hop * 1e6:.1f} us",
    ]


def print_levers(lever_rows, in_process: list[str], floor_ms: float) -> None:
    print()
    print(f"levers on/off: 512x384 JPEG, shipped vs one change, back to back   [{load_line()}]")
    header = (
        f"{'lever':<36} {'conc':>4} | {'shipped req/s':>13} {'lever req/s':>11} | "
        f"{'shipped p50':>11} {'lever p50':>9} | {'lever/shipped':>13} | {'CPU ms/req shipped':>18} {'lever':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, concurrency, shipped, lever in lever_rows:
        print(
            f"{label:<36} {concurrency:>4} | {shipped.throughput:13.1f} {lever.throughput:11.1f} | "
            f"{ms(shipped.percentile(50)):>11} {ms(lever.percentile(50)):>9} | "
            f"{lever.throughput / shipped.throughput:13.2f} | "
            f"{shipped.cpu_ms_per_request:18.2f} {lever.cpu_ms_per_request:6.2f}"
        )
    print(f"in process (the 512x384 floor is {floor_ms:.2f} ms a request):")
    print("\n".join(in_process))


def compare_peers(ours: dict[str, Running], peer_names, model_dir, measured, seconds, rounds) -> dict:
    """Every input at every concurrency, ours (on each engine) and each peer taking turns; the peers stop
    before the levers."""
    rows = {}
    with contextlib.ExitStack() as peer_stack:
        servers = dict(ours)
        for name in peer_names:
            servers[name] = peer_stack.enter_context(server(PEERS[name], model_dir))
        print("agreement (the same graph or weights and the same image function on every input):")
        ports = {name: running.port for name, running in servers.items()}
        print("\n".join(check_agreement(ports, measured)), flush=True)
        for item in measured:
            requests = {
                n: multipart_request(p, "/classify", item.data, item.path.name, item.content_type)
                for n, p in ports.items()
            }
            for concurrency in CONCURRENCY:
                rows[item.name, concurrency] = compare(servers, requests, concurrency, seconds, rounds)
                print(".", end="", flush=True)
        print()
    return rows


def compare_levers(ours, chosen, model_dir, photo, seconds, rounds) -> list:
    """Each lever's server against ours on the 512x384 photo, back to back: (label, concurrency, ours, lever)."""
    lever_rows = []
    for label, spec, lever_model_dir in chosen:
        with server(spec, lever_model_dir or model_dir) as running:
            both = {OURS: ours, label: running}
            requests = {
                n: multipart_request(r.port, "/classify", photo.data, photo.path.name, photo.content_type)
                for n, r in both.items()
            }
            for concurrency in CONCURRENCY:
                cell = compare(both, requests, concurrency, seconds, rounds)
                lever_rows.append((label, concurrency, cell[OURS], cell[label]))
        print(".", end="", flush=True)
    print()
    return lever_rows


ENGINE_BATCHES = (1, 8)


def measure_engine_costs(singles: dict, data: bytes, reps: int, rounds: int = 3) -> dict[str, dict[int, float]]:
    """Each engine's CPU ms per photo on one thread at batch 1 and 8 (process time, median of ``rounds``
    rounds taken in turn, so load drift hits every engine alike)."""
    height, width, channels = next(iter(singles.values())).input_shape
    image = load_image(data, height, width, channels)
    samples: dict[str, dict[int, list[float]]] = {e: {b: [] for b in ENGINE_BATCHES} for e in singles}
    for _ in range(rounds):
        for engine, model in singles.items():
            for batch in ENGINE_BATCHES:
                stacked = np.repeat(image[None], batch, axis=0)
                calls = max(3, reps // batch)
                seconds = _median(lambda m=model, s=stacked: m.run(s), calls, time.process_time)
                samples[engine][batch].append(seconds * 1e3 / batch)
    return {e: {b: statistics.median(v) for b, v in per.items()} for e, per in samples.items()}


def engine_summary_lines(rows, engine_costs: dict[str, dict[int, float]], photo: str) -> list[str]:
    """One ``summary: engine=...`` line per engine; ratios are ONNX Runtime's cost over the engine's."""
    reference = engine_costs[ENGINES[0]]
    reference_c32 = rows[photo, 32][OURS].cpu_ms_per_request if rows else None
    lines = []
    for engine, cost in engine_costs.items():
        line = f"summary: engine={engine} ms_per_photo_b1={cost[1]:.2f} ms_per_photo_b8={cost[8]:.2f}"
        if rows:
            c32 = rows[photo, 32][ours_name(engine)].cpu_ms_per_request
            line += f" cpu_ms_per_request_c32={c32:.2f}"
        line += f" vs_onnxruntime_b1={reference[1] / cost[1]:.2f}"
        if rows:
            line += f" vs_onnxruntime_c32={reference_c32 / c32:.2f}"
        lines.append(line)
    return lines


def summary_line(rows, floors, limits, photo: str, big: str, peer_names: list[str]) -> str:
    cell8, cell32 = rows[photo, 8], rows[photo, 32]
    best = max(rivals(peer_names), key=lambda n: cell8[n].throughput + cell32[n].throughput)
    return (
        f"summary: best_peer={best} ratio_c8={cell8[OURS].throughput / cell8[best].throughput:.2f} "
        f"ratio_c32={cell32[OURS].throughput / cell32[best].throughput:.2f} "
        f"p50_over_floor_512={rows[photo, 1][OURS].percentile(50) * 1e3 / floors[photo].total_ms:.2f} "
        f"p50_over_floor_3008={rows[big, 1][OURS].percentile(50) * 1e3 / floors[big].total_ms:.2f} "
        f"fraction_of_limit_c32={cell32[OURS].throughput / limits[photo].req_per_s:.2f} "
        f"cpu_ms_per_req_512={cell32[OURS].cpu_ms_per_request:.2f}"
        + (
            f" ceiling_ratio_c32={cell32[best].cpu_ms_per_request / cell32[BOUND].cpu_ms_per_request:.2f}"
            # ours over the bare bound, CPU per request at c32: 1.00 would be a server costing nothing beyond
            # decode + ORT; what is above it is our HTTP, multipart and answer code (same run, same cell)
            f" bound_ratio_c32={cell32[OURS].cpu_ms_per_request / cell32[BOUND].cpu_ms_per_request:.2f}"
            if BOUND in peer_names
            else ""
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Bad input ends in one ``error:`` line and exit 2, before any server or training starts."""
    return run_command(lambda: _main(argv), "bench.serve: interrupted")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="JPEG inputs only, short cells, no levers")
    parser.add_argument("--seconds", type=float, help="measured seconds per cell and server (default 4, quick 1.5)")
    parser.add_argument("--rounds", type=int, help="turns per cell and server (default 4, quick 3)")
    parser.add_argument(
        "--peers",
        help=f"comma-separated subset of {', '.join(PEERS)} (default: all; fastapi-torch only for a model without a "
        "pretrained backbone: it rebuilds the LeNet encoders from the graph)",
    )
    parser.add_argument("--levers", action=argparse.BooleanOptionalAction, default=None, help="on/off table")
    parser.add_argument("--only-levers", action="store_true", help="skip the peer comparison")
    parser.add_argument("--lever", action="append", help="only levers whose label contains this (repeatable)")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="a 512x384 TrashNet JPEG")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "trashnet")
    parser.add_argument("--int8-dir", type=Path, default=DEFAULT_INT8_DIR, help="INT8 artifact for its lever row")
    installed = [e for e in ENGINES if importlib.util.find_spec(e) is not None]
    parser.add_argument(
        "--engines",
        default=",".join(installed),
        help=f"ours on each of these engines, comma-separated from {', '.join(ENGINES)} (default: those installed; "
        "onnxruntime is always measured, the reference of the ratios)",
    )
    args = parser.parse_args(argv)
    engines = [ENGINES[0], *(e.strip() for e in args.engines.split(",") if e.strip() and e.strip() != ENGINES[0])]
    for engine in engines:
        if engine not in ENGINES:
            parser.error(f"--engines: choose from {', '.join(ENGINES)} (got {engine!r})")
        if engine not in installed:
            parser.error(f"--engines: {engine} is not installed: pip install 'deepmad-bin[{engine}]'")
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    rounds = args.rounds or (3 if args.quick else 4)
    levers = args.only_levers or ((not args.quick) if args.levers is None else args.levers)
    require_artifact("--model-dir", args.model_dir)
    peers = args.peers
    if peers is None:
        backbone = Manifest.load(args.model_dir).backbone is not None
        peers = ",".join(name for name in PEERS if not (backbone and name == TORCH_PEER))
    peer_names = [name.strip() for name in peers.split(",") if name.strip()]
    unknown = [name for name in peer_names if name not in PEERS]
    if unknown or (not rivals(peer_names) and not args.only_levers):
        parser.error(f"--peers: choose from {', '.join(PEERS)} (got {peers!r})")
    require_file("--photo", args.photo)
    began = time.perf_counter()
    print(f"bench.serve: {seconds:g} s per cell and server in {rounds} round(s); {load_line()}", flush=True)

    model = load_model(args.model_dir, Settings(model_dir=args.model_dir))
    singles = {e: load_model(args.model_dir, Settings(engine=e, intra_op_threads=1)) for e in engines}
    single = singles[ENGINES[0]]
    engine_costs: dict[str, dict[int, float]] = {}
    floors: dict[str, Floor] = {}
    limits: dict[str, Limit] = {}
    rows: dict[tuple[str, int], dict[str, LoadResult]] = {}
    lever_rows = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deepmad-bench-")))
        os.environ.setdefault("BENTOML_HOME", str(tmp / "bentoml"))
        inputs = make_inputs(args.photo, tmp)
        measured = inputs[1:] if args.quick else inputs
        for item in [] if args.only_levers else measured:
            floors[item.name] = measure_floor((model, single), item.data, 100 if args.quick else 300)
            limits[item.name] = measure_limit(single, item.data, 64 if args.quick else 256)
        engine_costs = measure_engine_costs(singles, inputs[1].data, 64 if args.quick else 256)
        ours_by_engine = {
            ours_name(e): stack.enter_context(server(ours_spec({"DEEPMAD_ENGINE": e}, ours_name(e)), args.model_dir))
            for e in engines
        }
        ours = ours_by_engine[OURS]
        if not args.only_levers:
            rows = compare_peers(ours_by_engine, peer_names, args.model_dir, measured, seconds, rounds)
        if levers:
            photo = inputs[1]
            if photo.name not in floors:
                floors[photo.name] = measure_floor((model, single), photo.data, 100)
            wanted = args.lever or [""]
            chosen = [lever for lever in lever_specs(args.int8_dir) if any(k in lever[0] for k in wanted)]
            lever_rows = compare_levers(ours, chosen, args.model_dir, photo, seconds, rounds)
            in_process = measure_in_process_levers(model, photo.data)

    if rows:
        print_tables(measured, [*ours_by_engine, *peer_names], rows, floors, limits, engine_costs)
    if lever_rows:
        print_levers(lever_rows, in_process, floors[inputs[1].name].total_ms)
    print(f"({time.perf_counter() - began:.0f} s; {load_line()})")
    if rows:
        print(summary_line(rows, floors, limits, inputs[1].name, inputs[2].name, peer_names))
    print("\n".join(engine_summary_lines(rows, engine_costs, inputs[1].name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
