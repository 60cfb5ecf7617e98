"""``extraction-shield verify`` for the ``embmarker`` and ``text`` schemes: against the
example OpenAI-compatible server running behind the shield (a real HTTP suspect), and
against a JSONL file of plain-text answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asgi_extraction_shield.cli import main
from asgi_extraction_shield.watermark import text as tx
from asgi_extraction_shield.watermark import watermark_key

from .servers import running

SECRET = "verify-cli-text-secret-never-printed"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "openai_compatible.py"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("EXTRACTION_SHIELD_WATERMARK", raising=False)
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", SECRET)
    return monkeypatch


def test_verify_the_openai_example_over_http(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_env = {
        "EXTRACTION_SHIELD_SECRET_KEY": SECRET,
        "EXTRACTION_SHIELD_WATERMARK": "embmarker,text",
        "EXTRACTION_SHIELD_RATE_LIMIT": "100000/minute",
        "EXTRACTION_SHIELD_MONITOR__ENABLED": "false",
    }
    with running(EXAMPLE, tmp_path / "server.log", server_env) as base:
        found = {}
        for scheme, path in (("embmarker", "/v1/embeddings"), ("text", "/v1/completions")):
            args = ["verify", "--scheme", scheme, "--suspect", base + path, "--probes", "300"]
            assert main([*args, "--json"]) == 0
            found[scheme] = json.loads(capsys.readouterr().out)
    for scheme, result in found.items():
        assert result["scheme"] == scheme and result["verdict"] is True
        assert result["p_value"] < 1e-6 and result["probes"] == 300
    assert SECRET not in (tmp_path / "server.log").read_text()


def test_verify_a_jsonl_file_of_texts(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = watermark_key(SECRET, "text")
    words = [
        "the",
        "a",
        "big",
        "small",
        "cat",
        "quickly",
        "slowly",
        "ran",
        "very",
        "happy",
        "glad",
        "dog",
        ",",
        ".",
    ]
    lines = []
    for i in range(150):
        answer = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(30))
        lines.append(json.dumps({"input": f"prompt {i}", "output": tx.mark(key, answer)}))
    path = tmp_path / "suspect.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["verify", "--scheme", "text", "--suspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("text: WATERMARK DETECTED") and SECRET not in out
    assert main(["verify", "--scheme", "text", "--suspect", str(path), "--key", "x" * 20]) == 0
    assert "no watermark detected" in capsys.readouterr().out
