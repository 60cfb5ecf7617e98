"""``extraction-shield audit`` against the example model server, run by real uvicorn."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if os.environ.get("CI"):
    import matplotlib  # noqa: F401
    import sklearn  # noqa: F401
else:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")

from asgi_extraction_shield.audit import report
from asgi_extraction_shield.audit.attacks import Box, Campaign, jitter, strategies
from asgi_extraction_shield.audit.cli import Check
from asgi_extraction_shield.audit.client import parse_headers, resolve_target
from asgi_extraction_shield.audit.samples import load_samples
from asgi_extraction_shield.audit.text import augment_text, text_queries
from asgi_extraction_shield.audit.wire import Wire
from asgi_extraction_shield.cli import main
from asgi_extraction_shield.errors import ConfigurationError

from .servers import running
from .test_example_server import ms

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "model_server.py"
SECRET = "audit-test-secret-key-0123456789"
ARGS = ["--format", "kserve_v1", "--budget", "80", "--identities", "3", "--benign", "30"]
ARGS += ["--time-limit", "90", "--json"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ms.X_TEST[:90].round(4).tolist()))
    return path


def _audit(
    capsys: pytest.CaptureFixture[str], target: str, samples: Path, *more: str
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["audit", "--target", target, "--samples", str(samples), *ARGS, *more])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "enforce.log"
    with running(EXAMPLE, log, {"EXTRACTION_SHIELD_SECRET_KEY": SECRET}) as base:
        yield f"{base}/v1/models/blobs:predict"


@pytest.fixture(scope="module")
def shield_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Shadow mode: identities are graded and reported, but nothing is refused and no
    answer is degraded, so the audit must see no reaction."""
    log = tmp_path_factory.mktemp("server") / "off.log"
    env = {
        "EXTRACTION_SHIELD_SECRET_KEY": SECRET,
        "EXTRACTION_SHIELD_MODE": "shadow",
    }
    with running(EXAMPLE, log, env) as base:
        yield f"{base}/v1/models/blobs:predict"


def test_audit_of_the_shielded_server(
    enforced: str, samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary = _audit(
        capsys, enforced, samples, "--attacks", "uniform", "--out", str(tmp_path)
    )
    assert code == 0
    for key, kind in {
        "target": str,
        "format": str,
        "answer_kind": str,
        "samples": int,
        "pool": int,
        "held_out": int,
        "requests": int,
        "seconds": float,
        "stopped_by_time_limit": bool,
        "benign": dict,
        "attacks": list,
        "shield_reacted": int,
        "runs_without_reaction": int,
        "checks": list,
    }.items():
        assert isinstance(summary[key], kind), key
    assert summary["answer_kind"] == "probabilities"
    assert summary["samples"] == summary["pool"] + summary["held_out"] == 90
    runs = {(r["attack"], r["split"]): r for r in summary["attacks"]}
    assert set(runs) == {("uniform", "single"), ("uniform", "sybil")}
    for run in runs.values():
        assert run["sent"] == run["answered"] + run["refused"] + run["failed"]
        assert set(run["fidelity"]) == {"soft", "label"}
        assert all(0.0 <= f <= 1.0 for c in run["fidelity"].values() for f in c.values())
        assert run["ratelimit_policy"] == '"default";q=600;w=60'
    # One identity sending 80 uniform queries is caught: refused as abnormal usage.
    single = runs["uniform", "single"]
    assert single["first_reaction"] is not None and single["refused"] > 0
    assert single["refusal_status"] == 429
    assert single["refusal_type"].endswith("#abnormal-usage-detected")
    assert single["retry_after"] is not None
    # The benign replay before the attacks was answered in full and is the reference.
    before = summary["benign"]["before"]
    assert before["sent"] == 30 and before["refused"] == 0 and before["failed"] == 0
    assert summary["benign"]["repeat"]["changed_top1"] == 0
    assert summary["max_fidelity"] is not None
    text = (tmp_path / "AUDIT.md").read_text(encoding="utf-8")
    for heading in (
        "## What an attacker would get",
        "## When the shield reacted",
        "## What a benign user experienced",
        "## What this audit can and cannot tell",
    ):
        assert heading in text
    assert "abnormal-usage-detected" in text and "audit-" not in text  # no identity keys
    for plot in (report.FIDELITY_PLOT, report.REFUSALS_PLOT):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"]({plot})" in text


def test_audit_with_the_shield_off_sees_no_reaction(
    shield_off: str, samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary = _audit(
        capsys, shield_off, samples, "--attacks", "knockoff", "--fail-if", "unreacted>0"
    )
    assert code == 1  # the check failed: nothing reacted
    assert summary["shield_reacted"] == 0
    for run in summary["attacks"]:
        assert run["refused"] == 0 and run["first_reaction"] is None
        assert run["perturbed_canaries"] == 0 and run["canaries"] > 0
    assert summary["checks"] == [
        {"check": "unreacted>0", "value": float(len(summary["attacks"])), "failed": True}
    ]
    # Unprotected, the thieves copy the model well (the baseline the shield is measured by).
    assert summary["max_fidelity"] > 0.8


def test_non_loopback_target_is_refused(samples: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", "--target", "http://192.0.2.7/v1/models/m:predict", "--samples",
                 str(samples), "--format", "kserve_v1"])  # fmt: skip
    assert code == 2
    assert "--allow-remote" in capsys.readouterr().err
    allowed = resolve_target("http://192.0.2.7:81/p", allow_remote=True)  # resolved, not sent
    assert allowed.url == "http://192.0.2.7:81/p"
    for url in ("http://127.0.0.1:1/p", "http://localhost:1/p", "http://[::1]:1/p"):
        assert resolve_target(url).port == 1
    with pytest.raises(ConfigurationError, match="http"):
        resolve_target("ftp://127.0.0.1/x")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]\nnot json\n", "line 2 is not JSON"),
        ("[1, 2]\n[3, 4]\n", "at least 10"),
        ("".join(f'"text {i}"\n' for i in range(12)), "not numeric arrays"),
        ("".join(f"[{i}, 1]\n" for i in range(11)) + "[1, 2, 3]\n", "not numeric arrays"),
        ("", "empty"),
    ],
)
def test_bad_samples_exit_2(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    code = main(["audit", "--target", "http://127.0.0.1:9/p:predict", "--samples", str(path),
                 "--format", "kserve_v1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "--samples" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--budget", "999999"],
        ["--identities", "1"],
        ["--time-limit", "99999"],
        ["--header", "X-API-Key: fixed"],
        ["--extra", "[1]"],
        ["--fail-if", "speed>3"],
        ["--attacks", "uniform,telepathy"],
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["audit", "--target", "http://127.0.0.1:9/p:predict", "--samples", str(samples),
                 "--format", "kserve_v1", *argv])  # fmt: skip
    assert code == 2
    assert capsys.readouterr().err.startswith("extraction-shield audit: ")


def test_missing_plotting_library_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigurationError, match=r"asgi-extraction-shield\[lab\]"):
        report.require("matplotlib", "lab", "the plots")


def test_samples_as_request_bodies_and_input_objects(tmp_path: Path) -> None:
    rows = np.arange(24, dtype=float).reshape(12, 2).tolist()
    path = tmp_path / "bodies.jsonl"
    path.write_text(
        json.dumps({"instances": rows[:6]}) + "\n"
        + "".join(json.dumps({"input": r}) + "\n" for r in rows[6:])
    )  # fmt: skip
    loaded = load_samples(path, Wire("kserve_v1", "/v1/models/m:predict"))
    assert loaded.features is not None and loaded.features.tolist() == rows
    v2 = tmp_path / "v2.json"
    body = {"inputs": [{"name": "x", "shape": [12, 2], "datatype": "FP64", "data": rows}]}
    v2.write_text(json.dumps([body]))
    wire = Wire("oip_v2", "/v2/models/m/infer")
    loaded = load_samples(v2, wire)
    assert loaded.tensor is not None and loaded.tensor.name == "x" and loaded.tensor.shape == (2,)
    assert loaded.features is not None and loaded.features.shape == (12, 2)


@pytest.mark.parametrize(
    ("format_", "path", "item"),
    [
        ("kserve_v1", "/v1/models/m:predict", [[1.0, 2.0], [3.0, 4.0]]),
        ("oip_v2", "/v2/models/m/infer", [1.0, 2.0, 3.0]),
        ("hf", "/models/m", "a short text"),
        ("openai", "/v1/chat/completions", "hello there"),
        ("openai", "/v1/completions", "hello there"),
        ("openai", "/v1/embeddings", "hello there"),
    ],
)
def test_bodies_are_read_back_by_the_shields_adapters(format_: str, path: str, item: Any) -> None:
    wire = Wire(format_, path, {"model": "m"})
    request = wire.parse(wire.body(item))
    assert request.parsed and request.cost == 1
    if format_ in ("kserve_v1", "oip_v2"):
        assert request.features is not None
        assert request.features.ravel().tolist() == np.ravel(item).tolist()
    else:
        assert request.texts == [item]


def test_answers_are_read_with_the_adapters() -> None:
    wire = Wire("kserve_v1", "/v1/models/m:predict")
    body = wire.body([1.0, 2.0])
    answer = wire.answer(body, json.dumps({"predictions": [[0.2, 0.8]]}).encode())
    assert answer is not None and answer.kind == "probabilities" and answer.top1() == 1
    labels = wire.answer(body, b'{"predictions": [3]}')
    assert labels is not None and labels.kind == "labels" and labels.top1() == 3
    assert wire.answer(body, b"not json") is None
    chat = Wire("openai", "/v1/chat/completions")
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
    text = chat.answer(chat.body("hello"), json.dumps(reply).encode())
    assert text is not None and text.kind == "text" and text.top1() == "hi"
    hf = Wire("hf", "/models/m")
    scores = [{"label": "NEG", "score": 0.3}, {"label": "POS", "score": 0.7}]
    got = hf.answer(hf.body("nice"), json.dumps(scores).encode())
    assert got is not None and got.row is not None and got.row.tolist() == [0.3, 0.7]
    with pytest.raises(ConfigurationError, match="chat/completions"):
        Wire("openai", "/v1/models")


@pytest.mark.parametrize("dim", [3, 17])
def test_attacks_stay_in_the_box_for_any_dimension(dim: int) -> None:
    rng = np.random.default_rng(1)
    pool = rng.normal(5.0, 2.0, (40, dim))
    box = Box.around(pool)
    weights = rng.normal(size=(dim, 3))
    for name, factory in strategies(box, jitter(box), jbda_seeds=10, jbda_rounds=2).items():
        campaign = Campaign(factory(pool, np.random.default_rng(2), 0), budget=60)
        while (query := campaign.next_query()) is not None:
            assert query.shape == (dim,), name
            assert (query >= box.low - 1e-12).all() and (query <= box.high + 1e-12).all(), name
            logits = query @ weights
            campaign.deliver(np.exp(logits) / np.exp(logits).sum())
        assert len(campaign.queries) == 60 or campaign.done, name


def test_box_scales_to_the_unit_cube_and_widens_constant_features() -> None:
    pool = np.array([[0.0, 2.0], [10.0, 2.0]])
    box = Box.around(pool, margin=0.0)
    assert box.scaled(pool).tolist() == [[0.0, 0.5], [1.0, 0.5]]
    assert box.width.tolist() == [10.0, 1.0]


def test_text_attacks() -> None:
    rng = np.random.default_rng(0)
    pool = ["the cat sat", "a dog ran home", "birds sing at dawn"]
    replay = text_queries("replay", pool, 7, rng)
    assert len(replay) == 7 and set(replay) <= set(pool)
    augmented = text_queries("augment", pool, 30, rng)
    assert sorted(augmented[:3]) == sorted(pool)  # the pool once, then variants
    assert any(q not in pool for q in augmented[3:])
    vocabulary = sorted({w for t in pool for w in t.split()})
    for _ in range(50):
        words = augment_text("a dog ran home", vocabulary, rng).split()
        assert 3 <= len(words) <= 5 and set(words) <= set(vocabulary)


def test_headers_and_checks() -> None:
    assert parse_headers(["Authorization: Bearer {key}", "X-Team: red"]) == [
        ("Authorization", "Bearer {key}"),
        ("X-Team", "red"),
    ]
    with pytest.raises(ConfigurationError, match="Name: value"):
        parse_headers(["nonsense"])
    check = Check.parse("fidelity>=0.5")
    assert (check.metric, check.op, check.threshold) == ("fidelity", ">=", 0.5)
    assert check.failed(0.5) and not check.failed(0.49)
    assert str(Check.parse("unreacted > 0")) == "unreacted>0"


TEXT_WORDS = ("good", "great", "bad", "awful", "the", "film", "was", "very", "plot", "sad")


def _texts(path: Path, n: int) -> Path:
    rng = np.random.default_rng(3)
    lines = [" ".join(rng.choice(TEXT_WORDS, size=int(rng.integers(3, 7)))) for _ in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_audit_of_a_text_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = _texts(tmp_path / "texts.jsonl", 60)
    script = Path(__file__).with_name("hf_server.py")
    with running(script, tmp_path / "hf.log", {"EXTRACTION_SHIELD_SECRET_KEY": SECRET}) as base:
        code = main(["audit", "--target", f"{base}/models/sentiment", "--format", "hf",
                     "--samples", str(samples), "--budget", "60", "--identities", "3",
                     "--benign", "20", "--json", "--out", str(tmp_path / "report")])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["answer_kind"] == "probabilities"
    runs = {(r["attack"], r["split"]) for r in summary["attacks"]}
    assert runs == {(a, s) for a in ("replay", "augment") for s in ("single", "sybil")}
    for run in summary["attacks"]:
        assert set(run["fidelity"]) == {"label"}
        # A bag-of-words copy of a bag-of-words model: close to the endpoint.
        assert max(run["fidelity"]["label"].values()) > 0.7
    assert summary["benign"]["before"]["refused"] == 0
    assert (tmp_path / "report" / "AUDIT.md").exists()


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "oai.log"
    script = EXAMPLE.with_name("openai_compatible.py")
    with running(script, log, {"EXTRACTION_SHIELD_SECRET_KEY": SECRET}) as base:
        yield base


@pytest.mark.parametrize(
    ("path", "extra", "kind", "thief", "meaning"),
    [
        ("/v1/chat/completions", '{"model": "toy-bigram", "max_tokens": 4, "temperature": 0}',
         "text", "text", "next-word agreement"),
        ("/v1/completions", '{"model": "toy-bigram", "max_tokens": 4, "temperature": 0}',
         "text", "text", "next-word agreement"),
        ("/v1/embeddings", '{"model": "toy-embed"}', "embeddings", "embedding",
         "retrieval agreement"),
    ],
)  # fmt: skip
def test_audit_of_openai_text_and_embedding_endpoints(
    openai_server: str,
    path: str,
    extra: str,
    kind: str,
    thief: str,
    meaning: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    samples = _texts(tmp_path / "prompts.jsonl", 30)
    code = main(["audit", "--target", f"{openai_server}{path}", "--format", "openai",
                 "--samples", str(samples), "--budget", "40", "--identities", "2",
                 "--benign", "10", "--extra", extra, "--json", "--fail-if", "fidelity>1",
                 "--out", str(tmp_path / "report")])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["answer_kind"] == kind
    assert summary["benign"]["repeat"]["changed_top1"] == 0  # greedy decoding: same texts
    for run in summary["attacks"]:
        assert run["answered"] == 40 and set(run["fidelity"]) == {thief}
        curve = run["fidelity"][thief]
        assert set(curve) == {"10", "20", "40"} and all(0.0 <= f <= 1.0 for f in curve.values())
        cosine = run["mean_cosine"]
        if kind == "embeddings":
            assert set(cosine) == set(curve) and all(-1.0 <= c <= 1.0 for c in cosine.values())
        else:
            assert cosine is None
    best = max(f for run in summary["attacks"] for f in run["fidelity"][thief].values())
    assert summary["max_fidelity"] == best and summary["checks"][0]["value"] == best
    text = (tmp_path / "report" / "AUDIT.md").read_text(encoding="utf-8")
    assert f"| {thief} fidelity |" in text and "soft fidelity" not in text
    assert f"{best:.0%} {meaning} with the endpoint" in text
    assert (tmp_path / "report" / "audit_fidelity.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("model", "kind", "thieves"),
    [("embed", "embeddings", {"embedding"}), ("classes", "labels", {"soft", "label"})],
)
def test_audit_of_numeric_embedding_and_label_endpoints(
    model: str, kind: str, thieves: set[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = np.random.default_rng(7).uniform(-1, 1, (90, 4)).round(4).tolist()
    samples = tmp_path / "rows.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = Path(__file__).with_name("kserve_server.py")
    with running(script, tmp_path / "k.log", {"EXTRACTION_SHIELD_SECRET_KEY": SECRET}) as base:
        code = main(["audit", "--target", f"{base}/v1/models/{model}:predict", "--format",
                     "kserve_v1", "--samples", str(samples), "--budget", "150",
                     "--identities", "3", "--benign", "30", "--attacks", "uniform",
                     "--json"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["answer_kind"] == kind
    for run in summary["attacks"]:
        assert set(run["fidelity"]) == thieves
        assert all(0.0 <= f <= 1.0 for c in run["fidelity"].values() for f in c.values())
        # A copy of a smooth 4-feature model from 150 answers is close to it (scored on
        # the labels themselves, not on the argmax of a one-number row).
        final = {thief: curve["150"] for thief, curve in run["fidelity"].items()}
        assert max(final.values()) > 0.75
        assert (run["mean_cosine"] is None) == (kind != "embeddings")
        if run["mean_cosine"] is not None:
            assert run["mean_cosine"]["150"] > 0.9


def test_the_time_limit_bounds_the_audit(
    shield_off: str, samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary = _audit(
        capsys, shield_off, samples, "--attacks", "uniform", "--budget", "5000",
        "--time-limit", "2",
    )  # fmt: skip
    assert code == 0 and summary["stopped_by_time_limit"] is True
    assert summary["seconds"] < 15  # 2 s of requests, then the substitutes of what was sent
    assert {run["stopped"] for run in summary["attacks"]} <= {"time limit"}


def test_thieves_copy_a_linear_model_and_guess_without_answers() -> None:
    from asgi_extraction_shield.audit.substitutes import fidelity_curve

    rng = np.random.default_rng(5)
    weights = rng.normal(size=(6, 3))
    x = rng.uniform(-1, 1, (300, 6))
    logits = x @ weights
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    x_eval = rng.uniform(-1, 1, (200, 6))
    target = (x_eval @ weights).argmax(axis=1)
    answers: list[np.ndarray | None] = list(p)
    answers[:50] = [None] * 50  # refused: learned nothing from these
    curve = fidelity_curve(list(x), answers, [50, 300], x_eval, target, [0], lambda v: v)
    assert curve["label"][300] > 0.9 and curve["soft"][300] > 0.8
    # The first 50 were refused: no answer, so the thief guesses class 0.
    assert curve["label"][50] == curve["soft"][50] == float((target == 0).mean())


def test_answers_of_open_inference_v2() -> None:
    wire = Wire("oip_v2", "/v2/models/m/infer")
    body = wire.body([0.5, 1.5])
    reply = {"outputs": [{"name": "probs", "shape": [1, 3], "datatype": "FP32",
                          "data": [0.1, 0.7, 0.2]}]}  # fmt: skip
    answer = wire.answer(body, json.dumps(reply).encode())
    assert answer is not None and answer.kind == "probabilities" and answer.top1() == 1
    sent = json.loads(body)["inputs"][0]
    assert sent == {"name": "input-0", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}


def test_a_target_that_does_not_answer_exit_2(
    samples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .servers import free_port

    target = f"http://127.0.0.1:{free_port()}/v1/models/blobs:predict"  # nothing listens
    code = main(["audit", "--target", target, "--samples", str(samples), "--format",
                 "kserve_v1", "--benign", "10", "--time-limit", "20"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "no answer to the benign replay" in err and "27 failed" in err
