"""Schemathesis (PyPI) fuzzes the running service from its own OpenAPI schema: no server errors.

Every check runs except ``positive_data_acceptance``: the schema can only say "binary" for an image, and
random bytes that are not a decodable image are rightly refused with 400. ``not_a_server_error`` (no
5xx), status-code, content-type and response-schema conformance, negative-data rejection and auth
checks all must pass. Bounded: 50 examples per operation, fixed seed, one worker (a few seconds).
The Open Inference Protocol's path parameters are the served model's name and version, so those routes
are fuzzed past their 404.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.manifest import Manifest
from tests.service_support import model_dir, run_server, wait_for

pytestmark = pytest.mark.slow

TOKEN = "schemathesis-admin-token"


# Seeds one capture so the image route is reached (not only 404s); feedback labels depend on the loaded
# model, so most generated labels are rightly refused with 422, and so are generated labelling configs
# (Label Studio's /setup: random text is no XML holding the model's labels): no "validation mismatch"
# warning there.
CONFIG = """
[[operations]]
include-path = "/captures/{capture_id}/image"
parameters = { capture_id = "fuzz-seed" }

[[operations]]
include-path = "/feedback"
warnings = false

[[operations]]
include-path = "/label-studio/setup"
warnings = false
"""
# The v2 routes on the served model. A random tensor never has the model's shape, so generated
# inference requests are rightly refused with 400: no "validation mismatch" warning for those.
OIP_CONFIG = """
[[operations]]
include-path-regex = "^/v2/models/[^/]+(/versions/[^/]+)?(/ready)?$"
parameters = {{ name = "{name}", model_version = "{version}" }}

[[operations]]
include-path-regex = "^/v2/models/.+/infer$"
parameters = {{ name = "{name}", model_version = "{version}" }}
warnings = false
"""


def test_schemathesis_finds_no_server_error(tmp_path: Path, trashnet_dir: Path) -> None:
    env = {
        "DEEPMAD_ADMIN_TOKEN": TOKEN,
        "DEEPMAD_OPERATOR_TOKEN": TOKEN,
        "DEEPMAD_CAPTURE_DIR": str(tmp_path / "captures"),
        "DEEPMAD_CAPTURE_NORMAL_RATE": "1",
    }
    manifest = Manifest.load(model_dir())
    (tmp_path / "schemathesis.toml").write_text(
        CONFIG + OIP_CONFIG.format(name=manifest.name, version=manifest.version)
    )
    with run_server(model_dir(), tmp_path, **env) as server:
        with server.client() as client:
            photo = next(iter(sorted((trashnet_dir / "glass").glob("*.jpg")))).read_bytes()
            seeded = client.post(
                "/classify", content=photo, headers={"content-type": "image/jpeg", "x-request-id": "fuzz-seed"}
            )
            assert seeded.status_code == 200
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert wait_for(lambda: client.get("/captures/fuzz-seed/image", headers=auth).status_code == 200)
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "50", "--seed", "20240601", "--workers", "1",
            "-H", f"Authorization: Bearer {TOKEN}",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        log = server.log()
    summary = result.stdout[-3000:]
    print(summary)
    assert "Traceback" not in log, log[-3000:]
    assert result.returncode == 0, summary + result.stderr[-2000:]
    assert "No issues found" in result.stdout
