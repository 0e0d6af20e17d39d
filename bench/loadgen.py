"""A bounded closed-loop load generator: ``concurrency`` keep-alive connections, each sending one request
and waiting for its answer before the next, for a fixed time (and at most ``max_requests``).

Plain asyncio streams and a hand-rolled HTTP/1.1 exchange rather than an HTTP client library: on a
2-core machine the client shares the CPUs with the server, and httpx costs several times more CPU per
request than these few lines, which would hide the server's own speed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

BOUNDARY = "deepmadbenchboundary"


def multipart_request(port: int, path: str, data: bytes, filename: str, content_type: str) -> bytes:
    """A complete ``POST path`` with the image as multipart field ``file`` (what ``curl -F`` sends)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    headers = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return headers + body


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, one per successful request
    errors: int = 0
    server_cpu_seconds: float = 0.0  # CPU the server's processes spent meanwhile (bench.serve measures it)

    @property
    def cpu_ms_per_request(self) -> float:
        answered = len(self.latencies) + self.errors
        return self.server_cpu_seconds * 1e3 / answered if answered else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def merge(self, other: LoadResult) -> LoadResult:
        return LoadResult(
            self.concurrency,
            self.seconds + other.seconds,
            self.latencies + other.latencies,
            self.errors + other.errors,
            self.server_cpu_seconds + other.server_cpu_seconds,
        )


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _drive(port: int, request: bytes, concurrency: int, seconds: float, max_requests: int) -> LoadResult:
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    budget = [max_requests]
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            sent = time.perf_counter()
            status = await _exchange(reader, writer, request)
            if status == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                errors += 1

    await asyncio.gather(*(worker(r, w) for r, w in connections))
    elapsed = time.perf_counter() - start
    for _, writer in connections:
        writer.close()
    return LoadResult(concurrency, elapsed, latencies, errors)


def run_load(
    port: int, request: bytes, concurrency: int, seconds: float, max_requests: int = 100_000, warmup: float = 0.0
) -> LoadResult:
    """Warm up (discarded), then measure ``seconds`` of closed-loop load at ``concurrency``."""
    if warmup > 0:
        asyncio.run(_drive(port, request, concurrency, warmup, max_requests))
    return asyncio.run(_drive(port, request, concurrency, seconds, max_requests))
