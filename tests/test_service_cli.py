"""``python -m service`` flags: generated from ``Settings``, so every setting has one."""

from __future__ import annotations

import pytest

from service.__main__ import cli_source, main, parse_settings
from service.settings import Settings


def flags() -> set[str]:
    parser = cli_source().root_parser
    return {option for action in parser._actions for option in action.option_strings}


def test_every_setting_has_a_flag() -> None:
    names = set(Settings.model_fields)
    assert len(names) >= 15
    missing = [name for name in names if "--" + name.replace("_", "-") not in flags()]
    assert missing == []


def test_flags_reach_settings_and_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPMAD_PORT", "5001")
    monkeypatch.setenv("DEEPMAD_MAX_BATCH_ITEMS", "7")
    settings = parse_settings(
        ["--port", "5002", "--threshold", "3.0", "--no-require-model", "--providers", "A,B", "--log-level", "debug"]
    )
    assert settings.port == 5002 and settings.max_batch_items == 7
    assert settings.threshold == 3.0 and settings.require_model is False
    assert settings.providers == ["A", "B"] and settings.log_level == "debug"
    assert parse_settings([]) == Settings()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "x"], "--port: "),
        (["--port", "70000"], "--port: "),
        (["--log-level", "loud"], "--log-level: "),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_flag_is_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (unknown flag, bad choice)
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err.splitlines()[-1]  # argparse prints its usage above the error line
    assert "Traceback" not in err
