"""Every command (training, flywheel, bench) ends bad input before any work: one ``error:`` line, exit 2.

Each runs as a real process from an empty temporary working directory, with a data or model folder
that does not exist; a traceback, a second error line or another exit status fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tomllib
from setuptools import find_packages

from tests.conftest import REPO_ROOT

MISSING = "/nonexistent/deepmad"
# (module, arguments, extra environment); OUT is replaced by a folder under the temporary directory.
COMMANDS = [
    ("training.fit", ["--dataset", "folder", "--data", MISSING, "--normal", "a,b", "--out", "OUT"], {}),
    ("training.evaluate", ["--dataset", "trashnet", "--data", MISSING], {}),
    ("training.analyze", ["--model", MISSING, "--out", "OUT"], {}),
    ("training.quantize", ["--model", MISSING, "--out", "OUT"], {}),
    ("training.quantize", ["--method", "nncf", "--model", MISSING, "--out", "OUT"], {}),
    ("training.golden", ["--model", MISSING], {}),
    ("training.routing", ["--model", MISSING], {}),
    ("flywheel.captures", ["export", "--captures", MISSING, "--out", "OUT"], {}),
    ("flywheel.captures", ["import-label-studio", f"{MISSING}/export.json", "--captures", MISSING], {}),
    ("flywheel.promote", ["--candidate", MISSING, "--current", f"{MISSING}/current", "--audit", MISSING], {}),
    ("flywheel.promote", ["--current", MISSING, "--rollback"], {}),
    # new categories: the retire and minimum flags do not hide a missing folder
    (
        "flywheel.captures",
        ["export", "--captures", MISSING, "--out", "OUT", "--retire", "metal", "--min-train-photos", "3"],
        {},
    ),
    ("flywheel.promote", ["--candidate", MISSING, "--current", MISSING, "--audit", MISSING, "--retire", "metal"], {}),
    ("bench.capture_cost", ["--model-dir", MISSING], {}),
    ("bench.cpu_per_request", ["--arm", "HEAD", "--photo", f"{MISSING}/photo.jpg"], {}),
    ("bench.flywheel", ["--data", MISSING, "--out", "OUT"], {}),
    ("bench.footprint", ["--model-dir", MISSING], {}),
    ("service", ["check", "--photos", MISSING], {}),
    ("bench.int8_no_vnni", ["--model-dir", MISSING], {}),
    ("bench.int8_recipes", ["--model-dir", MISSING], {}),
    ("bench.engines", ["--model-dir", MISSING], {}),
    ("bench.no_item", ["--models", MISSING], {}),
    ("bench.quality", ["--seeds", "1", "--runs", "OUT"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.quantize", ["--data", MISSING], {}),
    ("bench.score_rules", ["--seeds", "0"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.serve", ["--model-dir", MISSING, "--quick"], {}),
    ("bench.train", ["--quick"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.peers.litserve_ort", ["--port", "0"], {"DEEPMAD_MODEL_DIR": MISSING}),
    ("bench.pretrained", ["--sizes", "128"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.tuned", ["--folds", "2", "--log", "OUT"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.dose", ["--doses", "0"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.new_class", ["--ns", "30"], {"DEEPMAD_DATA_ROOT": MISSING}),
    ("bench.new_class", ["--test", "fill classes + scale 0.5", "--round", "OUT"], {"DEEPMAD_DATA_ROOT": MISSING}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "extra"), COMMANDS, ids=[f"{m} {a[0]}" for m, a, _ in COMMANDS])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, module, args, extra):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}
    command = [sys.executable, "-m", module, *[str(tmp_path / "out") if a == "OUT" else a for a in args]]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1, result.stderr
    assert result.returncode == 2, result.stderr
    assert MISSING in errors[0]  # it names what is missing


def test_every_command_module_is_installed_with_the_project():
    """``python -m bench.serve`` works from any folder once the project is installed: bench is a package of it."""
    include = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(find_packages(REPO_ROOT, include=include["include"]))
    modules = {module.rsplit(".", 1)[0] for module, _, _ in COMMANDS}
    assert modules <= packages, modules - packages
    assert "tests" not in packages


def run_cli(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1 and result.returncode == 2, result.stderr
    return errors[0]


@pytest.mark.slow
def test_a_folder_tree_too_small_for_a_validation_split_stops_before_training(tmp_path, trashnet_dir):
    """Four photos per class leave no validation photo (70/10/20): γ could not be chosen, so nothing trains."""
    for klass in ("glass", "metal"):
        (tmp_path / "tree" / klass).mkdir(parents=True)
        for photo in sorted((trashnet_dir / klass).glob("*.jpg"))[:4]:
            (tmp_path / "tree" / klass / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "model"
    result = run_cli(
        "training.fit", "--dataset", "folder", "--data", str(tmp_path / "tree"), "--normal", "glass",
        "--out", str(out), "--checkpoint", str(tmp_path / "ckpt.pt"), "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert "no validation photos" in one_error_line(result)
    assert not out.exists() and not (tmp_path / "ckpt.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--out", "--audit-out"])
def test_an_unwritable_export_folder_is_one_line_before_any_photo_is_read(tmp_path, flag):
    captures = tmp_path / "captures"
    captures.mkdir()
    (tmp_path / "a-file").write_text("in the way")
    args = {"--out": str(tmp_path / "tree"), "--audit-out": str(tmp_path / "audit")}
    args[flag] = str(tmp_path / "a-file" / "below")
    result = run_cli(
        "flywheel.captures",
        "export",
        "--captures",
        str(captures),
        *[x for kv in args.items() for x in kv],
        cwd=tmp_path,
    )
    assert "is not writable" in one_error_line(result) and flag in one_error_line(result)
