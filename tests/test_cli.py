"""The ``extraction-shield`` console script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asgi_extraction_shield.cli import main
from asgi_extraction_shield.settings import ShieldSettings

SECRET = "cli-secret-never-printed-42"


def test_settings_one_line_per_variable_secret_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", SECRET)
    monkeypatch.setenv("EXTRACTION_SHIELD_RATE_LIMIT", "42/minute")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == len(ShieldSettings().describe())
    assert any(line.startswith("EXTRACTION_SHIELD_OPENAI__MAX_TOP_LOGPROBS=5 ") for line in lines)
    assert any(line.startswith("EXTRACTION_SHIELD_RATE_LIMIT=42/minute ") for line in lines)
    assert any(line.startswith("EXTRACTION_SHIELD_SECRET_KEY=**********") for line in lines)
    assert all("  # " in line for line in lines)
    assert SECRET not in out


def test_settings_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", SECRET)
    assert main(["settings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_env = {row["env"]: row for row in rows}
    assert by_env["EXTRACTION_SHIELD_SECRET_KEY"]["value"] == "**********"
    assert by_env["EXTRACTION_SHIELD_MODE"]["description"]


def test_bad_settings_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_MODE", "loud")
    assert main(["settings"]) == 2
    assert "EXTRACTION_SHIELD_MODE='loud'" in capsys.readouterr().err


def test_keygen(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["keygen", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)["secret_key"]
    assert len(first) >= 40 and len(second) >= 40 and first != second
    ShieldSettings(secret_key=first)  # accepted as a key


def test_bad_arguments_exit_2() -> None:
    assert main(["no-such-command"]) == 2


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asgi_extraction_shield.cli", "keygen"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and len(result.stdout.strip()) >= 40
