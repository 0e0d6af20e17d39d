"""``python -m service check``: a bin owner's self-check, as a real process with the shipped models and photos."""

from __future__ import annotations

import math
import subprocess
import sys
import zipfile

import pytest

from service.manifest import Manifest, write_manifest
from tests.conftest import REPO_ROOT, SHIPPED_MODEL
from tests.service_support import copy_model, corrupt_model, service_env

MODELS = REPO_ROOT / "models"
FIELDS = ("ms_per_photo_p50", "ms_per_photo_p95", "photos_per_s", "peak_rss_mb")
# torch, the bench extras and the project's torch side made unimportable: the check must not need them.
WITHOUT_TORCH = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'training', 'bench', 'flywheel', 'litserve', 'bentoml'):\n"
    "    sys.modules[name] = None\n"
    "from service.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "check", *args],
        cwd=REPO_ROOT,
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def summary(stdout: str) -> dict[str, str]:
    lines = [line for line in stdout.splitlines() if line.startswith("summary: ")]
    assert len(lines) == 1, stdout
    return dict(part.split("=", 1) for part in lines[0].removeprefix("summary: ").split())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trashnet", "trashnet-int8", "trashnet-lite0"])
def test_every_shipped_model_is_verified_and_timed_without_torch(name):
    result = check("--model-dir", str(MODELS / name), "-n", "12")
    assert result.returncode == 0, result.stderr
    fields = summary(result.stdout)
    assert fields["model"] == name and fields["golden"] == "verified" and fields["n"] == "12"
    for key in FIELDS:
        assert math.isfinite(float(fields[key])) and float(fields[key]) > 0, fields
    assert float(fields["ms_per_photo_p95"]) >= float(fields["ms_per_photo_p50"])
    assert fields["engine"].startswith("onnxruntime-") and fields["engine"].endswith("/CPUExecutionProvider")
    assert fields["cpu"] and fields["cpu_features"] != "unknown"
    assert "sha256 ok" in result.stdout


@pytest.mark.slow
def test_a_golden_mismatch_exits_1_naming_the_photo_and_both_scores(tmp_path):
    model = copy_model(SHIPPED_MODEL, tmp_path / "moved")
    manifest = Manifest.load(model)
    scores = list(manifest.golden.score)
    scores[5] += 1.0  # what another CPU's saturating INT8 kernels did to a score, on average
    write_manifest(model, manifest.model_copy(update={"golden": manifest.golden.model_copy(update={"score": scores})}))
    result = check("--model-dir", str(model), "-n", "2")
    assert result.returncode == 1, result.stderr
    assert "summary:" not in result.stdout
    assert "reference photo 5 of 8" in result.stderr
    assert f"scores {scores[5] - 1.0:.4f} here, {scores[5]:.4f} in the manifest" in result.stderr


@pytest.mark.slow
def test_a_corrupt_model_fails_the_sha256_check(tmp_path):
    model = copy_model(SHIPPED_MODEL, tmp_path / "corrupt")
    corrupt_model(model)
    result = check("--model-dir", str(model))
    assert result.returncode == 1 and "sha256" in result.stderr, result.stderr


@pytest.mark.slow
def test_a_folder_of_photos_it_cannot_use_is_one_error_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bin.jpg").write_bytes(b"not a jpeg")
    for folder, reason in ((tmp_path / "missing", "is not a folder"), (empty, "holds no photos"), (broken, "bin.jpg")):
        result = check("--photos", str(folder), "-n", "1")
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and reason in errors[0], result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_default_photos_travel_with_the_package(tmp_path):
    """The image installs the package, not the checkout: the default photos must be in the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=REPO_ROOT,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("deepmad_bin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO_ROOT / "service" / "check_photos").iterdir())
    assert len([n for n in shipped if n.endswith(".jpg")]) >= 5
    assert all(f"service/check_photos/{name}" in names for name in shipped), names
