"""``python -m service [flags]``: serve the model with uvicorn. Flags override DEEPMAD_* env vars.

``python -m service check [--model-dir DIR] [--photos DIR] [-n N]``: verify and time the model on this box
instead (``service/selfcheck.py``).

Every setting of ``service.settings.Settings`` is a flag (``--model-dir``, ``--threshold``, ...),
generated from the class by pydantic-settings, so a new setting needs no CLI code.
SIGHUP reloads the model folder (a failed reload keeps the old model serving).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliSettingsSource

from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from service.settings import Settings


def cli_source() -> CliSettingsSource[Settings]:
    """The flags of every ``Settings`` field, kebab-case, booleans as ``--x/--no-x``."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return CliSettingsSource(
        Settings,
        root_parser=parser,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_enforce_required=False,
    )


def parse_settings(argv: list[str]) -> Settings:
    """Settings from flags, then DEEPMAD_* env vars, then defaults; ValidationError on a bad value."""
    return Settings(_cli_settings_source=cli_source()(args=argv))


def describe_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        flag = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
        parts.append(f"{flag}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(parts)


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


def check_capture_dir(settings: Settings) -> str | None:
    """The capture folder must be creatable and writable: one clear line at startup, not a traceback."""
    if settings.capture_dir is None:
        return None
    try:
        settings.capture_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.capture_dir / ".startup-check.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"capture folder {settings.capture_dir} is not writable: {exc.strerror or exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        from service.selfcheck import main as check

        return check(argv[1:])
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        print(f"error: {describe_errors(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = (check_model_dir(settings) if settings.require_model else None) or check_capture_dir(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from service.model import ModelLoadError, limit_heap_retention, load_model

    limit_heap_retention()  # before the app and the model allocate: peak memory (bench/footprint.py)
    from service.app import create_app

    preloaded = None
    if settings.require_model:
        try:  # the full load (engine, golden scores on this CPU) before uvicorn: one line, not a traceback
            preloaded = load_model(settings.model_dir, settings)
        except ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    app = create_app(settings, handle_sighup=True, preloaded=preloaded)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
