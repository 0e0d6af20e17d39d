"""A real Prometheus server scrapes the real service (``python -m service`` on the shipped model).

The service and ``prometheus`` (Debian package; ``make system-deps`` installs it) run as processes on
127.0.0.1 with free ports; Prometheus scrapes every second. The test waits until Prometheus reports the
target up, classifies a real TrashNet photo, then reads the service's own counters back through
Prometheus's HTTP API (``/api/v1/query``) and checks they count that very answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.processes import free_port, stop
from tests.service_support import model_dir, run_server

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        PROMETHEUS is None, reason="the prometheus binary is not installed (Debian: `make system-deps`)"
    ),
]


def wait_for(
    what: str,
    probe: Callable[[], Any],
    timeout: float,
    log: Path | None = None,
    process: subprocess.Popen[bytes] | None = None,
) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``log``'s tail after ``timeout``
    or as soon as ``process`` exits."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            last = f"the process exited with status {process.returncode}"
            break
        try:
            last = probe()
        except (OSError, httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what} not reached (waited up to {timeout:.0f} s; last: {last!r})\n{tail}")


def answers_200(url: str) -> bool:
    return httpx.get(url, timeout=2).status_code == 200


@pytest.fixture()
def service_url(tmp_path: Path) -> Iterator[str]:
    # the shipped model (DEEPMAD_TEST_MODEL_DIR: another one)
    with run_server(model_dir(), tmp_path, DEEPMAD_INTRA_OP_THREADS="1") as server:
        yield server.url


@pytest.fixture()
def prometheus_url(service_url: str, tmp_path: Path) -> Iterator[str]:
    target = service_url.removeprefix("http://")
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "deepmad",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=2))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus /-/ready 200", lambda: answers_200(f"{url}/-/ready"), 30, log, process)
        yield url
    finally:
        stop(process)


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def scalar(prometheus_url: str, promql: str) -> float | None:
    result = query(prometheus_url, promql)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_service(prometheus_url: str, service_url: str, trashnet_dir: Path) -> None:
    def target_up() -> dict[str, Any] | None:
        targets = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return next((t for t in targets if t["health"] == "up"), None)

    target = wait_for("target health up", target_up, 30)
    assert target["labels"]["job"] == "deepmad"
    assert target["scrapeUrl"] == f"{service_url}/metrics"
    print(f"\ntarget: {target['scrapeUrl']} health={target['health']} lastError={target['lastError']!r}")

    photo = sorted((trashnet_dir / "glass").glob("*.jpg"))[0]
    response = httpx.post(
        f"{service_url}/classify", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}, timeout=10
    )
    assert response.status_code == 200, response.text
    verdict = response.json()
    print(f"POST /classify {photo.name}: verdict={verdict['verdict']} nearest_class={verdict['nearest_class']}")

    # The next scrapes carry the count of that answer, labelled with its verdict and nearest class.
    promql = (
        f'deepmad_classifications_total{{job="deepmad",verdict="{verdict["verdict"]}",'
        f'nearest_class="{verdict["nearest_class"]}"}}'
    )
    wait_for(f"{promql} == 1", lambda: scalar(prometheus_url, promql) == 1.0, 15)
    result = query(prometheus_url, promql)
    print(f"query {promql} -> {json.dumps(result)}")
    assert len(result) == 1
    assert result[0]["metric"]["instance"] == service_url.removeprefix("http://")

    assert scalar(prometheus_url, 'sum(deepmad_classifications_total{job="deepmad"})') == 1.0
    assert scalar(prometheus_url, 'up{job="deepmad"}') == 1.0
    assert scalar(prometheus_url, 'deepmad_ready{job="deepmad"}') == 1.0
    threshold = scalar(prometheus_url, 'deepmad_threshold{job="deepmad"}')
    assert threshold == pytest.approx(verdict["threshold"], rel=1e-6)
    print(f"query deepmad_threshold -> {threshold} (the answer's threshold: {verdict['threshold']})")
