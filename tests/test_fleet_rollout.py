"""A model roll-out across a fleet without a failed request (docs/deployment.md, "Model roll-out").

Two ``python -m service`` instances on 127.0.0.1 share one model folder, as pods share a volume:
``models/current`` is a symlink to a versioned folder. While four client threads keep classifying
(product API and Open Inference Protocol, bounded in count), a new version is published by swapping
the symlink atomically and each instance reloads: one by ``POST /admin/reload``, the other by SIGHUP.
Then a corrupt version is published and refused while the old one keeps serving. Every request must
succeed, and once an instance answered a client with the new version it never answers that client's
next requests with the old one (each client is sequential; across clients completion order is not
request order, so only a client's own sequence is ordered).

A second test replaces instances as a Deployment with maxUnavailable 0 does: start the new one, wait
for /readyz, move the traffic, then stop the old one with SIGTERM (uvicorn drains in-flight requests).
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.manifest import Manifest, write_manifest
from tests.service_support import Server, copy_model, corrupt_model, model_dir, photo_subset, run_server, wait_for

pytestmark = pytest.mark.slow

TOKEN = "fleet-rollout-admin-token"
MAX_REQUESTS_PER_CLIENT = 400  # bounds the load whatever happens
CLIENTS = 4


@dataclass
class Load:
    """Client threads that cycle over the live endpoints until stopped; every answer is recorded."""

    endpoints: list[str]
    photos: list[bytes]
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[tuple[str, int, str | None]] = field(default_factory=list)  # (url, status, model version)
    clients: list[int] = field(default_factory=list)  # which client thread sent each answer's request
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, index: int) -> None:
        with httpx.Client(timeout=30) as client:
            for n in range(MAX_REQUESTS_PER_CLIENT):
                if self.stop.is_set():
                    return
                with self.lock:
                    url = self.endpoints[(index + n) % len(self.endpoints)]
                photo = self.photos[(index + n) % len(self.photos)]
                try:
                    status, version = self.request(client, url, photo, oip=(n % 2 == 1))
                except httpx.HTTPError as exc:
                    status, version = -1, f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.answers.append((url, status, version))
                    self.clients.append(index)
                    if status != 200:
                        self.errors.append(f"{url}: {status} {version}")

    @staticmethod
    def request(client: httpx.Client, url: str, photo: bytes, oip: bool) -> tuple[int, str | None]:
        if oip:
            body = {
                "inputs": [
                    {"name": "photo", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photo).decode()]}
                ]
            }
            response = client.post(f"{url}/v2/models/trashnet/infer", json=body)
            version = response.json().get("model_version") if response.status_code == 200 else response.text
        else:
            response = client.post(f"{url}/classify", content=photo, headers={"content-type": "image/jpeg"})
            version = response.json()["model"]["version"] if response.status_code == 200 else response.text
        return response.status_code, version

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        """Stop sending and wait for the requests in flight."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def wait_for_more(self, requests: int) -> None:
        """Block until ``requests`` more answers arrived (the roll-out happens under load, not beside it)."""
        target = self.count() + requests
        wait_for(lambda: self.count() >= target or not any(t.is_alive() for t in self.threads))


def counter(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def serving_version(server: Server) -> str:
    return httpx.get(f"{server.url}/v2/models/trashnet", timeout=10).json()["versions"][0]


def publish(models: Path, folder: Path) -> None:
    """Point ``models/current`` at ``folder`` in one rename (what a volume writer or an init job does)."""
    link = models / ".current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(folder.name)
    os.replace(link, models / "current")


def versioned_copy(source: Path, target: Path, version: str) -> Path:
    copy_model(source, target)
    write_manifest(target, Manifest.load(target).model_copy(update={"version": version}))
    return target


def assert_monotonic(load: Load, url: str, old: str, new: str) -> None:
    seen = [(client, version) for client, (where, status, version) in zip(load.clients, load.answers, strict=True)
            if where == url and status == 200]  # fmt: skip
    versions = {version for _, version in seen}
    assert old in versions and new in versions, f"{url} answered {versions}"
    for client in range(CLIENTS):
        sequence = [version for sender, version in seen if sender == client]
        if new in sequence:
            first_new = sequence.index(new)
            assert all(v == new for v in sequence[first_new:]), f"{url} went back to {old} (client {client})"


def test_volume_swap_and_reload_under_load(tmp_path: Path, trashnet_dir: Path) -> None:
    source = model_dir()
    old = Manifest.load(source).version
    new = f"{old}-fleet"
    models = tmp_path / "models"
    versioned_copy(source, models / old, old)
    publish(models, models / old)
    recyclable, trash = photo_subset(trashnet_dir, per_class=2, trash=2)
    photos = [p.read_bytes() for p in recyclable + trash]
    current = models / "current"
    with (
        run_server(current, tmp_path, DEEPMAD_ADMIN_TOKEN=TOKEN) as first,
        run_server(current, tmp_path, DEEPMAD_ADMIN_TOKEN=TOKEN) as second,
    ):
        load = Load(endpoints=[first.url, second.url], photos=photos)
        with load:
            load.wait_for_more(40)
            versioned_copy(source, models / new, new)
            publish(models, models / new)
            reloaded = httpx.post(f"{first.url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            assert reloaded.status_code == 200 and reloaded.json()["model"]["version"] == new, reloaded.text
            load.wait_for_more(40)
            second.sighup()
            assert wait_for(lambda: serving_version(second) == new), second.log()
            load.wait_for_more(40)

            # A broken version is refused by both; the fleet keeps serving the last good one.
            broken = versioned_copy(source, models / "broken", "broken")
            corrupt_model(broken)
            publish(models, broken)
            refused = httpx.post(f"{first.url}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
            assert refused.status_code == 500 and refused.json()["error"]["code"] == "reload_failed"
            second.sighup()
            assert wait_for(lambda: counter(second, "deepmad_reload_failures_total", trigger="sighup") == 1)
            load.wait_for_more(40)
        answers, errors = load.answers, load.errors

        assert counter(first, "deepmad_reloads_total", trigger="http") == 1
        assert counter(second, "deepmad_reloads_total", trigger="sighup") == 1
        assert counter(first, "deepmad_reload_failures_total", trigger="http") == 1
        assert serving_version(first) == serving_version(second) == new
    print(f"{len(answers)} requests during the roll-out, {len(errors)} failed")
    assert not errors, errors[:5]
    assert len(answers) >= 160
    for server in (first, second):
        assert_monotonic(load, server.url, old, new)


def test_replacing_instances_like_a_rolling_update(tmp_path: Path, trashnet_dir: Path) -> None:
    """maxUnavailable 0: the new instance is ready before the old one leaves; no request fails."""
    source = model_dir()
    old = Manifest.load(source).version
    new = f"{old}-image"
    old_dir, new_dir = versioned_copy(source, tmp_path / old, old), versioned_copy(source, tmp_path / new, new)
    recyclable, _ = photo_subset(trashnet_dir, per_class=2, trash=0)
    photos = [p.read_bytes() for p in recyclable]
    with run_server(old_dir, tmp_path) as before:
        load = Load(endpoints=[before.url], photos=photos)
        with load:
            load.wait_for_more(40)
            with run_server(new_dir, tmp_path) as after:  # returns once /readyz answers 200
                with load.lock:  # the Service's endpoints: add the ready pod, then remove the old one
                    load.endpoints.append(after.url)
                load.wait_for_more(20)
                with load.lock:
                    load.endpoints.remove(before.url)
                load.wait_for_more(20)  # requests already sent to the old pod finish (preStop's grace)
                before.process.terminate()
                before.process.wait(timeout=30)
                # uvicorn drains, logs, then re-raises SIGTERM (exit status -15): a graceful stop.
                assert "Finished server process" in before.log(), before.log()
                load.wait_for_more(40)
                load.finish()  # before the new instance stops too
    print(f"{len(load.answers)} requests during the replacement, {len(load.errors)} failed")
    assert not load.errors, load.errors[:5]
    by_instance = {
        url: {version for where, _, version in load.answers if where == url} for url in (before.url, after.url)
    }
    assert by_instance == {before.url: {old}, after.url: {new}}
    assert len(load.answers) >= 120
