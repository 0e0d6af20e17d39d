"""``python -m service [flags]``: serve the model with uvicorn. Flags override DEEPMAD_* env vars.

SIGHUP reloads the model folder (a failed reload keeps the old model serving).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from service.settings import Settings


def parse_args(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--model-dir", help="folder with model.onnx + manifest.json (default: models/trashnet)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--threshold", type=float, help="override the manifest's threshold gamma")
    parser.add_argument("--max-upload-bytes", type=int, help="largest image in bytes (default 10 MB)")
    parser.add_argument("--max-pixels", type=int, help="largest image in width x height (default 50 M)")
    parser.add_argument("--max-batch-items", type=int, help="most files in one batch request")
    parser.add_argument("--intra-op-threads", type=int, help="ONNX Runtime intra-op threads (0: default)")
    parser.add_argument("--inter-op-threads", type=int, help="ONNX Runtime inter-op threads (0: default)")
    parser.add_argument("--ort-spinning", action=argparse.BooleanOptionalAction, help="ORT threads spin-wait")
    parser.add_argument("--graph-optimization", choices=["disabled", "basic", "extended", "all"])
    parser.add_argument("--microbatch-max-items", type=int, help="micro-batching: images per ORT call (1: off)")
    parser.add_argument("--microbatch-wait-ms", type=float, help="micro-batching: wait for more, under load")
    parser.add_argument("--providers", help="comma-separated ONNX Runtime providers (default: CUDA if any, CPU)")
    parser.add_argument("--admin-token", help="token for POST /admin/reload (better: DEEPMAD_ADMIN_TOKEN)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    return {key: value for key, value in vars(args).items() if value is not None}


def check_model_dir(settings: Settings) -> str | None:
    """A cheap pre-flight (files, manifest, sha256) so a bad model is one clear line, not a traceback."""
    model_dir = settings.model_dir
    manifest_path, model_path = model_dir / MANIFEST_FILE, model_dir / MODEL_FILE
    if not manifest_path.is_file() or not model_path.is_file():
        return f"no model at {model_dir} (need {MODEL_FILE} and {MANIFEST_FILE}); set --model-dir or DEEPMAD_MODEL_DIR"
    try:
        manifest = Manifest.load(model_dir)
    except ValueError as exc:
        return f"{manifest_path} is not a valid manifest: {exc}"
    if sha256_file(model_path) != manifest.model_sha256:
        return f"{model_path} does not match the sha256 in {manifest_path}: corrupt or mismatched model"
    return None


def main(argv: list[str] | None = None) -> int:
    settings = Settings(**parse_args(argv))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.require_model and (problem := check_model_dir(settings)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from service.app import create_app

    app = create_app(settings, handle_sighup=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
