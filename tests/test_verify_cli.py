"""``extraction-shield verify`` end to end: against a JSONL file of answers, and against
the example model server running behind the shield with watermarks on (a real HTTP
suspect). Exit status 0 whatever the verdict, 2 when the verification cannot run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from asgi_extraction_shield.cli import main
from asgi_extraction_shield.formats.base import Outputs, batch_request
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.postprocess.chain import Context
from asgi_extraction_shield.settings import ShieldSettings
from asgi_extraction_shield.watermark import build_watermarks

from .servers import running

SECRET = "verify-cli-secret-never-printed"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "model_server.py"


def records_of(answers: Path) -> Path:
    """Where :func:`answers_file` has the shield write the queries it marked."""
    return answers.with_name(answers.stem + "-records.jsonl")


def answers_file(path: Path, spec: str, n: int = 400) -> Path:
    """A JSONL file of a perfect copy's answers: the watermarked rows of a fixed model
    (and the records of the marked queries, :func:`records_of`)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (n, 12)) + rng.integers(0, 4, (n, 1))
    weights = np.random.default_rng(4).normal(0, 1, (12, 4))
    z = x @ weights
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    request = batch_request(KServeV1(), x.tolist())
    outputs = Outputs(request.keys, probabilities=p)
    settings = ShieldSettings(watermark=spec, watermark_records_path=str(records_of(path)))
    for watermark in build_watermarks(settings, SECRET.encode()):
        watermark.apply(outputs, Context(b"", "thief", request))
    assert outputs.probabilities is not None
    lines = [
        json.dumps({"input": item, "output": row})
        for item, row in zip(x.tolist(), outputs.probabilities.tolist(), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("EXTRACTION_SHIELD_WATERMARK", "EXTRACTION_SHIELD_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", SECRET)
    return monkeypatch


def test_verify_a_jsonl_file(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = answers_file(tmp_path / "suspect.jsonl", "drw:k=16:nulls=50")
    assert main(["verify", "--scheme", "drw:k=16:nulls=50", "--suspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["scheme"] == "drw" and result["verdict"] is True
    assert result["p_value"] < 1e-6 and result["probes"] == 400
    assert SECRET not in out
    assert main(["verify", "--scheme", "drw:k=16:nulls=50", "--suspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("drw: WATERMARK DETECTED") and "p-value" in text
    # Another key: the same answers carry no mark of it; still exit 0 (a verdict is data).
    args = ["verify", "--scheme", "drw:k=16:nulls=50", "--suspect", str(path), "--json"]
    assert main([*args, "--key", "another-secret-key-of-16+"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] is False


def test_verify_with_a_reference_file(
    tmp_path: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--reference: the owner's model without the watermark, here a JSONL file of its
    answers to the same inputs (a copy of the clean rows: the suspect's file, unmarked)."""
    path = answers_file(tmp_path / "answers.jsonl", "drw")
    clean = answers_file(tmp_path / "clean.jsonl", "none")
    args = ["verify", "--scheme", "drw", "--suspect", str(path), "--json"]
    assert main([*args, "--reference", str(clean)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["details"]["reference"] is True and result["p_value"] < 1e-6
    assert main([*args, "--reference", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_a_bare_scheme_takes_the_parameters_of_watermark(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = answers_file(tmp_path / "suspect.jsonl", "dawn:rate=0.3")
    env.setenv("EXTRACTION_SHIELD_WATERMARK", "drw,dawn:rate=0.3")
    args = ["verify", "--scheme", "dawn", "--suspect", str(path), "--json"]
    assert main([*args, "--records", str(records_of(path))]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] is True and result["details"]["regions"] >= 10
    # Without the records, the model's own answers (half of each keyed label's unit) are
    # unknown: the verifier says so instead of finding anything.
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["details"]["answers_known"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheme", "nope", "--suspect", "x.jsonl"], "not a post-processor"),
        (["--scheme", "drw", "--suspect", "missing.jsonl"], "cannot read"),
        (["--scheme", "drw", "--suspect", "http://127.0.0.1:9/v1/models/m:predict"], "records"),
        (
            [
                "--scheme",
                "dawn",
                "--suspect",
                "http://127.0.0.1:9/v1/models/m:predict",
                "--records",
                "{records}",
            ],
            "could not be reached",
        ),
        (["--scheme", "drw", "--suspect", "ftp://host/x", "--records", "{records}"], "http(s) URL"),
        (["--scheme", "drw", "--suspect", "x.jsonl", "--header", "nocolon"], "--header"),
        (["--scheme", "drw", "--suspect", "x.jsonl", "--alpha", "2"], "alpha"),
    ],
)
def test_exit_2_when_verification_cannot_run(
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    env.chdir(tmp_path)
    records = tmp_path / "records.jsonl"
    records.write_text('{"input": [1.0, 2.0, 3.0]}\n')
    args = [a.replace("{records}", str(records)) for a in args]
    assert main(["verify", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and SECRET not in err


def test_exit_2_without_a_key(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.delenv("EXTRACTION_SHIELD_SECRET_KEY")
    path = answers_file(tmp_path / "s.jsonl", "drw")
    assert main(["verify", "--scheme", "drw", "--suspect", str(path)]) == 2
    assert "EXTRACTION_SHIELD_SECRET_KEY" in capsys.readouterr().err


def test_verify_the_example_server_over_http(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shielded example server is its own perfect copy: both marks must show."""
    records = tmp_path / "marked.jsonl"
    server_env = {
        "EXTRACTION_SHIELD_SECRET_KEY": SECRET,
        "EXTRACTION_SHIELD_WATERMARK": "drw:k=16:nulls=50,dawn:rate=0.2",
        "EXTRACTION_SHIELD_WATERMARK_RECORDS_PATH": str(records),
        "EXTRACTION_SHIELD_RATE_LIMIT": "100000/minute",
        "EXTRACTION_SHIELD_MONITOR__ENABLED": "false",
    }
    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, (600, 64))
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps({"input": row}) + "\n" for row in x.tolist()))
    with running(EXAMPLE, tmp_path / "server.log", server_env) as base:
        url = f"{base}/v1/models/blobs:predict"
        for start in range(0, 600, 200):
            reply = httpx.post(url, json={"instances": x[start : start + 200].tolist()}, timeout=10)
            assert reply.status_code == 200
        assert records.exists()
        results: dict[str, Any] = {}
        for scheme, probe_file in (("dawn:rate=0.2", records), ("drw:k=16:nulls=50", probes)):
            args = ["verify", "--scheme", scheme, "--suspect", url, "--records", str(probe_file)]
            assert main([*args, "--json", "--probes", "600"]) == 0
            results[scheme] = json.loads(capsys.readouterr().out)
    for scheme, result in results.items():
        assert result["verdict"] is True and result["p_value"] < 1e-6, (scheme, result)
