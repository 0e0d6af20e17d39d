"""arm64 bin controllers, emulated: every shipped model served on a Raspberry Pi 4's and a Pi 5's core.

The arm64 Debian root with the serve extra (aarch64 wheels from the package index) is made and cached by
``tests/arm64/make-root.sh`` (``make test`` runs it first, as ``make arm64-root``); here ``python -m service``
runs inside it under qemu-user with ``QEMU_CPU=cortex-a72`` (Pi 4: no int8 dot product) and ``cortex-a76``
(Pi 5: ``asimddp``), both at once, one core each. Each server loads every shipped model in turn through the
fleet's model swap (a symlink and ``POST /admin/reload``), so each passes its golden check on that core, and
answers 20 real photos as amd64 does: the same verdict and nearest class, the score within the model's
golden tolerance. Last, an INT8 artifact whose golden scores this core does not reproduce is refused and the
model before it keeps serving. Only /dev exists in the root: with the host's /proc (an x86 cpuinfo) importing
ONNX Runtime under qemu-user segfaults; without it ONNX Runtime reads the core's features from its hwcaps.
Speed under emulation means nothing and is not measured.
"""

from __future__ import annotations

import os
import platform
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.processes import service_command, service_env, started
from service.manifest import Manifest, write_manifest
from tests.conftest import REPO_ROOT
from tests.service_support import copy_model, photo_subset

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepmad-bin"
ROOT = Path(os.environ.get("DEEPMAD_ARM64_ROOT", CACHE / "arm64-root"))
CORES = ("cortex-a72", "cortex-a76")  # Raspberry Pi 4, Raspberry Pi 5
MODELS = ("trashnet", "trashnet-int8", "trashnet-lite0")
TOKEN = "arm64-admin"


def unavailable() -> str | None:
    """Why arm64 cannot run here, in one line; None when it can."""
    if platform.machine() != "x86_64":
        return f"the emulated arm64 check runs on x86_64 hosts; this one is {platform.machine()}"
    reason = ROOT.with_name(ROOT.name + ".unavailable")
    if reason.is_file():
        return reason.read_text().strip()
    if not (ROOT / ".debootstrap-done").is_file() or not (ROOT / "opt/venv/bin/python").exists():
        return f"no arm64 root at {ROOT}: tests/arm64/make-root.sh (make arm64-root, run by make test) makes it"
    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not binfmt.is_file() or binfmt.read_text().splitlines()[0] != "enabled":
        return "qemu-aarch64 is not registered with binfmt_misc: run tests/arm64/make-root.sh"
    if os.geteuid() != 0:
        return "chroot into the arm64 root needs root"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


def post_photos(url: str, photos: list[Path], timeout: float) -> list[dict]:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    response = httpx.post(f"{url}/classify/batch", files=files, timeout=timeout)
    response.raise_for_status()
    return [item["result"] for item in response.json()["results"]]


def amd64_answers(photos: list[Path]) -> dict[str, list[dict]]:
    """The same photos answered by the same code on this host, per model."""
    answers = {}
    for name in MODELS:
        command = service_command(REPO_ROOT / "models" / name, "--log-level", "warning")
        with started(command, "/readyz", env=service_env(), name=f"amd64 {name}", timeout_s=120) as server:
            answers[name] = post_photos(server.url, photos, timeout=120)
    return answers


def refused_int8(source: Path, target: Path) -> Path:
    """The INT8 artifact with its first golden score moved by 1.0: what saturating kernels did to a score."""
    copy_model(source, target)
    manifest = Manifest.load(target)
    scores = [manifest.golden.score[0] + 1.0, *manifest.golden.score[1:]]
    write_manifest(target, manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"score": scores})}))
    return target


def serve_on_core(core: str, work: Path, photos: list[Path]) -> dict[str, object]:
    """One emulated server on ``core``: every model swapped in and asked; then the refused INT8 swap."""
    inside = Path("/") / work.relative_to(ROOT)  # the same folder as the chroot sees it
    current = work / f"current-{core}"
    current.symlink_to(inside / "models" / MODELS[0])

    def argv(port: int) -> list[str]:
        return [
            shutil.which("chroot") or "/usr/sbin/chroot", str(ROOT), "/opt/venv/bin/python", "-m", "service",
            "--model-dir", str(inside / current.name), "--port", str(port), "--intra-op-threads", "1",
            "--busy-intra-op-threads", "0", "--log-level", "warning",
        ]  # fmt: skip

    env = {"QEMU_CPU": core, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(inside), "LANG": "C.UTF-8",
           "DEEPMAD_ADMIN_TOKEN": TOKEN, "DEEPMAD_MAX_BATCH_ITEMS": str(len(photos))}  # fmt: skip
    result: dict[str, object] = {}
    with started(argv, "/readyz", env=env, name=f"arm64 {core}", timeout_s=600) as server:
        for i, name in enumerate(MODELS):
            if i:
                swap(current, inside / "models" / name)
                reload = httpx.post(f"{server.url}/admin/reload", headers={"X-Admin-Token": TOKEN}, timeout=600)
                assert reload.status_code == 200, f"{core} {name}: {reload.text}"
            model = httpx.get(f"{server.url}/model", timeout=30).json()
            assert model["golden"]["status"] == "verified", f"{core} {name}: {model['golden']}"
            result[name] = post_photos(server.url, photos, timeout=900)
        swap(current, inside / "refused-int8")
        reload = httpx.post(f"{server.url}/admin/reload", headers={"X-Admin-Token": TOKEN}, timeout=600)
        result["refused"] = (reload.status_code, reload.text, httpx.get(f"{server.url}/model", timeout=30).json())
    return result


def swap(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically, as flywheel.promote does."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    new.replace(link)


def test_every_model_on_emulated_pi_cores_answers_as_on_amd64(trashnet_dir, tmp_path):
    recyclable, trash = photo_subset(trashnet_dir, per_class=3, trash=5)
    photos = recyclable + trash
    assert len(photos) == 20
    expected = amd64_answers(photos)
    work = ROOT / "tmp" / f"deepmad-test-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(REPO_ROOT / "service", work / "service", ignore=shutil.ignore_patterns("__pycache__"))
        for name in MODELS:
            copy_model(REPO_ROOT / "models" / name, work / "models" / name)
        refused_int8(REPO_ROOT / "models" / "trashnet-int8", work / "refused-int8")
        with ThreadPoolExecutor(len(CORES)) as pool:  # one core each: the two emulations run side by side
            results = dict(zip(CORES, pool.map(lambda core: serve_on_core(core, work, photos), CORES), strict=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    differences = []
    for core, result in results.items():
        for name in MODELS:
            golden = Manifest.load(REPO_ROOT / "models" / name).golden
            for photo, want, got in zip(photos, expected[name], result[name], strict=True):
                same = want["verdict"] == got["verdict"] and want["nearest_class"] == got["nearest_class"]
                close = abs(got["score"] - want["score"]) <= golden.atol + golden.rtol * abs(want["score"])
                if not (same and close):
                    differences.append(f"{core} {name} {photo.name}: amd64 {want} / arm64 {got}")
        status, text, serving = result["refused"]
        assert status == 500 and "golden scores mismatch" in text, f"{core}: {status} {text}"
        last = Manifest.load(REPO_ROOT / "models" / MODELS[-1])
        assert (serving["name"], serving["version"]) == (last.name, last.version), f"{core} kept serving {serving}"
    assert not differences, "\n".join(differences)
