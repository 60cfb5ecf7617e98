"""The watermark framework: registries, ``WATERMARK`` parsing, the place of watermarks in
the response chain, the request hook, :class:`VerifyResult`, and ``verify`` reading a
suspect's answers (callable, JSONL) with the shield's format adapters. A toy watermark
(``toy``: a keyed class gets a small bonus) and its binomial verifier stand in for the
real schemes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_extraction_shield import ConfigurationError, ExtractionShield, ShieldSettings
from asgi_extraction_shield import watermark as wm
from asgi_extraction_shield.formats.base import Outputs, ParsedRequest
from asgi_extraction_shield.keys import derive_key
from asgi_extraction_shield.postprocess import build_postprocessor
from asgi_extraction_shield.postprocess.chain import Context, TopK
from asgi_extraction_shield.verify import (
    VerificationError,
    load_pairs,
    load_records,
    read_answer,
    verify,
)
from asgi_extraction_shield.watermark import VerifyResult, Watermark, watermark_key

from .conftest import SECRET

pytestmark = pytest.mark.anyio


def keyed_class(key: bytes, row: Any, classes: int) -> int:
    digest = derive_key(key + json.dumps(row).encode(), "toy")
    return digest[0] % classes


class Toy(Watermark):
    """Moves ``bonus`` of probability to a keyed class; asks upstream to say it was marked."""

    name = "toy"
    params: ClassVar[dict[str, type]] = {"bonus": float}

    def __init__(self, bonus: float = 0.5) -> None:
        if not 0 < bonus <= 1:
            raise ValueError("toy: bonus must be in (0, 1]")
        self.bonus = bonus

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        p = outputs.probabilities
        if p is None or ctx.request is None:
            return False
        q = (1 - self.bonus) * p
        for i, item in enumerate(ctx.request.inputs):
            q[i, keyed_class(self.key, item, p.shape[1])] += self.bonus
        outputs.probabilities = q
        return True

    def rewrite_request(self, request: ParsedRequest, doc: Any) -> Any | None:
        return {**doc, "marked": True} if isinstance(doc, dict) else None

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        return [r["input"] for r in records][:n] or [[float(i), 1.0] for i in range(n)]

    def test(
        self, key: bytes, inputs: Sequence[Any], outputs: Sequence[Outputs], alpha: float
    ) -> VerifyResult:
        hits = used = 0
        for item, out in zip(inputs, outputs, strict=True):
            if out.probabilities is None:
                continue
            used += 1
            k = out.probabilities.shape[1]
            hits += int(np.argmax(out.probabilities[0]) == keyed_class(key, item, k))
        p = sum(math.comb(used, j) * 0.5**used for j in range(hits, used + 1)) if used else 1.0
        return VerifyResult.decide(self.name, hits, p, used, alpha, hits=hits)


@pytest.fixture(autouse=True)
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(wm.WATERMARKS, "toy", Toy)
    monkeypatch.setitem(wm.SCHEMES, "toy", Toy)
    yield


# -- registry, parsing, settings -------------------------------------------------------------


def test_parse_watermarks_uses_the_chain_syntax() -> None:
    assert wm.parse_watermarks("none") == ()
    assert wm.parse_watermarks("") == ()
    (toy,) = wm.parse_watermarks("toy:bonus=0.25")
    assert isinstance(toy, Toy) and toy.bonus == 0.25
    assert repr(toy) == "toy:bonus=0.25"
    with pytest.raises(ValueError, match="not a post-processor"):
        wm.parse_watermarks("top_k:1")  # a perturbation is not a watermark
    with pytest.raises(ValueError, match="bonus must be"):
        wm.parse_watermarks("toy:2")
    assert isinstance(wm.parse_scheme("toy:bonus=0.3"), Toy)
    with pytest.raises(ValueError, match="expected one scheme"):
        wm.parse_scheme("toy,toy")


def test_watermark_setting_is_validated() -> None:
    assert ShieldSettings().watermark == "none"
    assert ShieldSettings(watermark="toy:0.3").watermark == "toy:0.3"
    with pytest.raises(ConfigurationError, match="EXTRACTION_SHIELD_WATERMARK='nope'"):
        ShieldSettings(watermark="nope")


def test_watermark_key_is_per_name_and_per_secret() -> None:
    a = watermark_key(SECRET, "toy")
    assert a == watermark_key(SECRET.encode(), "toy") and len(a) == 32
    assert a != watermark_key(SECRET, "toy2")
    assert a != watermark_key(SECRET + "x", "toy")
    assert a != derive_key(SECRET.encode(), "postprocess")
    (toy,) = wm.build_watermarks(ShieldSettings(watermark="toy"), SECRET.encode())
    assert toy.key == a


def test_watermarks_follow_the_perturbation_of_every_level() -> None:
    settings = ShieldSettings(watermark="toy", perturbation="round:2")
    post = build_postprocessor(settings, SECRET.encode(), graded=True)
    assert post is not None
    assert [p.name for p in post.default] == ["round", "toy"]
    for level in ("degrade", "throttle", "block"):
        assert post.chains[level][-1].name == "toy"
    assert isinstance(post.chains["throttle"][0], TopK)
    # Watermarks alone make a post-processor.
    alone = build_postprocessor(ShieldSettings(watermark="toy"), SECRET.encode())
    assert alone is not None and [p.name for p in alone.default] == ["toy"]
    assert build_postprocessor(ShieldSettings(), SECRET.encode()) is None


# -- through the middleware ------------------------------------------------------------------


def model_app(seen: list[Any]) -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        doc = json.loads(await request.body())
        seen.append(doc)
        rows = [[0.7, 0.2, 0.1] for _ in doc["instances"]]
        return JSONResponse({"predictions": rows})

    return Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"])])


async def test_middleware_marks_answers_and_rewrites_requests() -> None:
    seen: list[Any] = []
    app = ExtractionShield(model_app(seen), secret_key=SECRET, watermark="toy:bonus=0.5")
    rows = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1/models/m:predict", json={"instances": rows})
    assert response.status_code == 200
    assert seen == [{"instances": rows, "marked": True}]  # the request hook ran
    key = watermark_key(SECRET, "toy")
    for row, answer in zip(rows, response.json()["predictions"], strict=True):
        expected = np.array([0.35, 0.1, 0.05])
        expected[keyed_class(key, row, 3)] += 0.5
        np.testing.assert_allclose(answer, expected)
        assert math.isclose(sum(answer), 1.0)


async def test_a_failing_request_hook_leaves_the_request_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: Toy, request: ParsedRequest, doc: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(Toy, "rewrite_request", broken)
    seen: list[Any] = []
    app = ExtractionShield(model_app(seen), secret_key=SECRET, watermark="toy")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/v1/models/m:predict", json={"instances": [[1.0, 2.0]]})
    assert response.status_code == 200 and seen == [{"instances": [[1.0, 2.0]]}]


# -- VerifyResult ----------------------------------------------------------------------------


def test_verify_result_serialises_and_describes() -> None:
    result = VerifyResult.decide("toy", 12.5, 3e-9, 400, 1e-3, hits=np.int64(7))
    assert result.verdict and result.p_value == 3e-9
    data = json.loads(result.to_json())
    assert data == {
        "scheme": "toy",
        "statistic": 12.5,
        "p_value": 3e-9,
        "verdict": True,
        "probes": 400,
        "alpha": 1e-3,
        "details": {"hits": 7},
    }
    text = str(result)
    assert text.startswith("toy: WATERMARK DETECTED") and "3e-09" in text and "400" in text
    odd = VerifyResult.decide("toy", float("nan"), float("nan"), 0, 0.01)
    assert (odd.p_value, odd.statistic, odd.verdict) == (1.0, 0.0, False)
    assert "no watermark detected" in odd.describe()


# -- reading a suspect's answers -------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        [0.1, 0.9],
        {"probabilities": [0.1, 0.9]},
        {"predictions": [[0.1, 0.9]]},
        {"outputs": [{"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.1, 0.9]}]},
        [{"label": "a", "score": 0.1}, {"label": "b", "score": 0.9}],
    ],
    ids=["row", "named", "kserve-doc", "oip-doc", "hf"],
)
def test_read_answer_understands_each_format(answer: Any) -> None:
    out = read_answer([1.0, 2.0], answer)
    assert out.probabilities is not None
    np.testing.assert_allclose(out.probabilities, [[0.1, 0.9]])


def test_read_answer_labels_embeddings_and_garbage() -> None:
    labels = read_answer([1.0], 3).labels
    assert labels is not None and labels.tolist() == [3]
    emb = read_answer("text", {"object": "list", "data": [{"embedding": [0.6, 0.8], "index": 0}]})
    assert emb.embeddings is not None and emb.embeddings.shape == (1, 2)
    for garbage in (None, "x", {}, [], [[]], {"predictions": "no"}, float("nan"), [1e400]):
        out = read_answer([1.0], garbage)
        assert out.probabilities is None and out.labels is None


def marked_suspect(key: bytes) -> Any:
    def answer(inputs: list[Any]) -> list[Any]:
        out = []
        for item in inputs:
            row = [0.1] * 4
            row[keyed_class(key, item, 4)] = 0.7
            out.append(row)
        return out

    return answer


def test_verify_a_callable_and_a_jsonl_file(tmp_path: Path) -> None:
    key = watermark_key(SECRET, "toy")
    result = verify("toy", marked_suspect(key), key=SECRET, probes=40)
    assert result.verdict and result.probes == 40 and result.p_value == 0.5**40
    wrong = verify("toy", marked_suspect(key), key=SECRET + "-other", probes=40)
    assert not wrong.verdict
    path = tmp_path / "answers.jsonl"
    inputs = [[float(i), 2.0] for i in range(30)]
    lines = [
        json.dumps({"input": x, "output": y})
        for x, y in zip(inputs, marked_suspect(key)(inputs), strict=True)
    ]
    path.write_text("\n".join(["not json", "[1]", '{"input": 1}', *lines, ""]))
    assert load_pairs(path)[0] == inputs
    from_file = verify("toy", path, key=SECRET)
    assert from_file.verdict and from_file.probes == 30
    assert verify("toy", str(path), key=SECRET, probes=10).probes == 10


def test_records_feed_the_probes(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text('{"input": [9.0, 9.0]}\n{"nope": 1}\ngarbage\n{"input": [8.0, 8.0]}\n')
    assert load_records(path) == [{"input": [9.0, 9.0]}, {"input": [8.0, 8.0]}]
    asked: list[Any] = []

    def suspect(inputs: list[Any]) -> list[Any]:
        asked.extend(inputs)
        return [[0.5, 0.5] for _ in inputs]

    verify("toy", suspect, key=SECRET, records=path)
    assert asked == [[9.0, 9.0], [8.0, 8.0]]


def test_verify_refuses_what_cannot_run(tmp_path: Path) -> None:
    key = watermark_key(SECRET, "toy")
    with pytest.raises(VerificationError, match="not a post-processor"):
        verify("nope", marked_suspect(key), key=SECRET)
    with pytest.raises(VerificationError, match="cannot read"):
        verify("toy", tmp_path / "missing.jsonl", key=SECRET)
    with pytest.raises(VerificationError, match="could not be reached"):
        verify("toy", "http://127.0.0.1:9/v1/models/m:predict", key=SECRET, probes=2)
    with pytest.raises(VerificationError, match="alpha"):
        verify("toy", marked_suspect(key), key=SECRET, alpha=0)
    with pytest.raises(VerificationError, match="not a callable"):
        verify("toy", 42, key=SECRET)  # type: ignore[arg-type]


def test_a_suspect_that_answers_garbage_is_not_detected() -> None:
    result = verify("toy", lambda inputs: ["?" for _ in inputs], key=SECRET, probes=5)
    assert not result.verdict and result.probes == 0 and result.p_value == 1.0
    short = verify("toy", lambda inputs: [], key=SECRET, probes=5)
    assert short.probes == 0
