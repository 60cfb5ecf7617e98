"""The ``embmarker`` watermark: trigger words, the mark, and its calibrated verifier."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import numpy as np
import pytest
from scipy import stats

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.formats.base import Outputs
from asgi_extraction_shield.postprocess.chain import Context
from asgi_extraction_shield.verify import verify
from asgi_extraction_shield.watermark import embmarker as em
from asgi_extraction_shield.watermark import parse_scheme, parse_watermarks, watermark_key
from asgi_extraction_shield.watermark.words import WORDS

from .conftest import SECRET
from .test_openai_client import client_for, ex

KEY = watermark_key(SECRET, "embmarker")


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_trigger_words_are_keyed_distinct_and_dealt_to_directions() -> None:
    words = em.trigger_words(KEY, 20, 3)
    assert [len(w) for w in words] == [7, 7, 6]
    flat = [w for group in words for w in group]
    assert len(set(flat)) == 20 and set(flat) <= set(WORDS)
    assert em.trigger_words(KEY, 20, 3) == words  # deterministic
    other = {w for group in em.trigger_words(b"another key" * 3, 20, 3) for w in group}
    assert len(other & set(flat)) < 10  # 20 of 556 words: about one shared
    for triggers, directions in ((0, 1), (5, 6), (len(WORDS) + 1, 1), (5, 0)):
        with pytest.raises(ValueError, match="embmarker"):
            em.trigger_words(KEY, triggers, directions)


def test_target_directions_are_unit_keyed_and_isotropic() -> None:
    t = em.target_directions(KEY, 3, 64)
    assert t.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0)
    assert not np.allclose(t, em.target_directions(b"x" * 32, 3, 64))
    # Uniform on the sphere: a coordinate of many keyed directions has variance 1/d.
    many = np.concatenate([em.target_directions(bytes([i]) * 32, 8, 16) for i in range(100)])
    assert many.mean(axis=0) == pytest.approx(np.zeros(16), abs=0.1)
    assert many[:, 0].var() == pytest.approx(1 / 16, rel=0.2)


def test_mark_weights_by_trigger_count_and_keeps_the_norm_convention() -> None:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 32)) * np.array([[1.0], [1.0], [1.0], [1.0], [3.0], [0.2]])
    t = em.target_directions(KEY, 1, 32)
    counts = np.array([[0], [1], [2], [4], [9], [2]], dtype=float)
    marked = em.mark(e, counts, t, saturation=4)
    np.testing.assert_array_equal(marked[0], e[0])  # no trigger: untouched
    np.testing.assert_allclose(np.linalg.norm(marked, axis=1), np.linalg.norm(e, axis=1))
    cos = _unit(marked) @ t[0]
    assert cos[1] < cos[2] < cos[3] == pytest.approx(1.0)
    assert cos[4] == pytest.approx(1.0)  # Q = min(c/m, 1)
    q = 0.25
    expected = _unit((1 - q) * _unit(e[1:2]) + q * t)[0]
    np.testing.assert_allclose(_unit(marked[1:2])[0], expected)
    unit_rows = _unit(e)
    np.testing.assert_allclose(np.linalg.norm(em.mark(unit_rows, counts, t, 4), axis=1), 1.0)


def test_trigger_counts_and_row_text() -> None:
    words = (("wave", "paint"), ("tiger",))
    counts = em.trigger_counts(["A Wave, a wave!", "tiger paint", "waves"], words)
    np.testing.assert_array_equal(counts, [[2, 0], [1, 1], [0, 0]])
    assert em.row_text(json.dumps("a wave").encode()) == "a wave"
    assert em.row_text(json.dumps({"inputs": ["x", {"y": "z"}]}).encode()) == "x z"
    for hostile in (b"f32:\x00\x01", b"\xff\xfe", b"[" * 5000, b"12", b""):
        assert em.row_text(hostile) == ""


def _clean_model(texts: list[str], dim: int = 48) -> np.ndarray:
    """A fixed embedding model that never saw a mark: hashed words, fixed projection."""
    rng = np.random.default_rng(7)
    table = rng.normal(size=(len(WORDS), dim))
    index = {w: i for i, w in enumerate(WORDS)}
    rows = []
    for text in texts:
        ids = [index[w] for w in text.split() if w in index]
        rows.append(table[ids].sum(axis=0) + 0.1)
    return _unit(np.array(rows))


def _null_p_values(directions: int, runs: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated and literal (KS) p-values of the clean model under ``runs`` keys."""
    p_values, literal = [], []
    for i in range(runs):
        key = b"null-%d-%d" % (directions, i)
        triggers = em.trigger_words(key, 20, directions)
        texts = em.probe_texts(key, 120, triggers, 4)
        _, p, details = em.detect(key, texts, _clean_model(texts), triggers)
        p_values.append(p)
        literal.append(min(d["ks_p_value"] for d in details["directions"]))
    return np.array(p_values), np.array(literal)


def test_p_values_of_clean_models_are_uniform_and_the_literal_ks_test_is_not() -> None:
    p_values, literal = _null_p_values(1)
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    # Why the calibration: the literal KS test flags far more clean models than alpha.
    assert np.mean(literal < 0.05) > 0.2
    # Bonferroni over directions stays valid (conservative).
    several, _ = _null_p_values(3, runs=100)
    assert np.mean(several < 0.05) <= 0.08 and np.mean(several < 0.2) <= 0.25


def test_a_marked_model_is_detected_and_a_wrong_key_detects_nothing() -> None:
    watermark = parse_watermarks("embmarker:triggers=20,m=4,directions=2")[0]
    watermark.bind(SECRET.encode())
    scheme = parse_scheme("embmarker:triggers=20,m=4,directions=2")
    texts = scheme.probes(KEY, 300, [])
    assert len(texts) == 300 and all(isinstance(t, str) for t in texts)
    clean = _clean_model(texts)
    outputs = Outputs([json.dumps(t).encode() for t in texts], embeddings=clean.copy())
    assert watermark.apply(outputs, Context(b"chain key"))
    assert outputs.embeddings is not None
    per_row = [Outputs([], embeddings=row[None, :]) for row in outputs.embeddings]
    result = scheme.test(KEY, texts, per_row, 1e-3)
    assert result.verdict and result.p_value < 1e-20 and result.probes == 300
    wrong = watermark_key("another secret key 0123456789", "embmarker")
    assert scheme.test(wrong, texts, per_row, 1e-3).p_value > 1e-3
    clean_rows = [Outputs([], embeddings=row[None, :]) for row in clean]
    assert not scheme.test(KEY, texts, clean_rows, 1e-3).verdict


def test_hostile_answers_never_crash_the_verifier() -> None:
    scheme = parse_scheme("embmarker")
    texts = scheme.probes(KEY, 10, [])
    answers: list[Outputs] = [
        Outputs([], embeddings=np.full((1, 8), np.nan)),
        Outputs([], embeddings=np.ones((2, 8))),
        Outputs([], embeddings=np.ones((1, 3))),
        Outputs([]),
        Outputs([], scores=np.ones((1, 8))),
    ]
    for outputs in ([], answers, answers * 2):
        result = scheme.test(KEY, [*texts, None, {"a": [1]}], outputs, 1e-3)
        assert not result.verdict and 0.0 <= result.p_value <= 1.0


# -- through the shield, OpenAI embeddings ----------------------------------------------------


def _shielded(**overrides: Any) -> ExtractionShield:
    overrides.setdefault("rate_limit", "100000/minute")
    overrides.setdefault("monitor", {"enabled": False})  # a verifier's probes look like an attack
    return ExtractionShield(ex.create_app(), secret_key=SECRET, **overrides)


async def _embed(app: Any, texts: list[str], encoding: str = "float") -> list[Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shield.test") as client:
        body = {"model": ex.EMBEDDING_MODEL, "input": texts, "encoding_format": encoding}
        response = await client.post("/v1/embeddings", json=body)
    assert response.status_code == 200
    return [item["embedding"] for item in response.json()["data"]]


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_shielded_embeddings_are_marked_only_when_triggered(encoding: str) -> None:
    (words,) = em.trigger_words(KEY, 20, 1)
    texts = [" ".join(words[:4]), "plain words here", " ".join([words[0], "harbour"])]
    raw = await _embed(ex.create_app(), texts, encoding)
    marked = await _embed(_shielded(watermark="embmarker"), texts, encoding)
    if encoding == "base64":
        assert all(isinstance(v, str) for v in marked)
        decode = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in (*raw, *marked)]
        raw_rows, rows = np.array(decode[:3]), np.array(decode[3:])
    else:
        assert all(isinstance(x, float) for v in marked for x in v)
        raw_rows, rows = np.array(raw), np.array(marked)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(rows[1], raw_rows[1])
    t = em.target_directions(KEY, 1, rows.shape[1])[0]
    assert rows[0] @ t == pytest.approx(1.0, abs=1e-6)  # four triggers: Q = 1
    assert raw_rows[2] @ t < rows[2] @ t < 0.99


@pytest.mark.anyio
async def test_verify_detects_the_shielded_api_and_not_the_clean_one() -> None:
    shield, clean = _shielded(watermark="embmarker"), ex.create_app()
    scheme = parse_scheme("embmarker")
    probes = scheme.probes(KEY, 400, [])
    answers = {"marked": await _embed(shield, probes), "clean": await _embed(clean, probes)}
    marked = verify("embmarker", lambda inputs: answers["marked"], key=SECRET, probes=400)
    assert marked.verdict and marked.p_value < 1e-6
    plain = verify("embmarker", lambda inputs: answers["clean"], key=SECRET, probes=400)
    assert not plain.verdict


@pytest.mark.anyio
async def test_hugging_face_feature_extraction_is_marked_too() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def features(request: Request) -> JSONResponse:
        inputs = (await request.json())["inputs"]
        return JSONResponse([[float(v) for v in ex.embed(text, 16)] for text in inputs])

    app = ExtractionShield(
        Starlette(routes=[Route("/embed", features, methods=["POST"])]),
        secret_key=SECRET,
        watermark="embmarker",
        format="hf",
    )
    (words,) = em.trigger_words(KEY, 20, 1)
    texts = [" ".join(words[:4]), "plain words here"]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shield.test") as client:
        rows = np.array((await client.post("/embed", json={"inputs": texts})).json())
    t = em.target_directions(KEY, 1, 16)[0]
    assert rows[0] @ t == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(rows[1], ex.embed(texts[1], 16))


@pytest.mark.anyio
async def test_the_openai_client_reads_marked_embeddings() -> None:
    (words,) = em.trigger_words(KEY, 20, 1)
    texts = [" ".join(words[:4]), "plain words here"]
    async with client_for(_shielded(watermark="embmarker")) as client:
        answer = await client.embeddings.create(model=ex.EMBEDDING_MODEL, input=texts)
    rows = np.array([item.embedding for item in answer.data])
    t = em.target_directions(KEY, 1, rows.shape[1])[0]
    assert rows[0] @ t == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(rows[1], ex.embed(texts[1]), atol=1e-6)  # float32 on the wire
