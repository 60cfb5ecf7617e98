"""The official ``openai`` client against the example server (examples/openai_compatible.py)
behind the shield, in-process through ``httpx.ASGITransport`` (and once over a real socket)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from starlette.types import ASGIApp

from asgi_extraction_shield import ExtractionShield

from .conftest import SECRET
from .servers import running

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "openai_compatible.py"
HYGIENE = "logprob_hygiene:max_top=2:decimals=1"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("openai_compatible", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic resolve annotations through it
    spec.loader.exec_module(module)
    return module


ex = _load_example()
HELLO = [{"role": "user", "content": "the cat"}]


def shielded(**overrides: Any) -> ExtractionShield:
    overrides.setdefault("rate_limit", "1000/minute")
    return ExtractionShield(ex.create_app(), secret_key=SECRET, **overrides)


def client_for(app: ASGIApp) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://shield.test/v1",
        api_key="sk-test",
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)),
        max_retries=0,
    )


async def _chat(app: ASGIApp, **fields: Any) -> Any:
    async with client_for(app) as client:
        return await client.chat.completions.create(
            model=ex.CHAT_MODEL, messages=HELLO, max_tokens=6, temperature=0, **fields
        )


def _rounded(value: float, decimals: int) -> bool:
    return value == round(value, decimals)


# -- the example's model ---------------------------------------------------------------------


async def test_the_example_returns_real_log_softmax_logprobs() -> None:
    answer = await _chat(ex.create_app(), logprobs=True, top_logprobs=5)
    items = answer.choices[0].logprobs.content
    assert len(items) == answer.usage.completion_tokens
    assert "".join(item.token for item in items) == answer.choices[0].message.content
    previous = ex.tokenize("the cat")[-1]
    for item in items:
        token = ex.VOCAB.index(item.token)
        expected = ex.log_softmax(ex.LOGITS[previous])
        assert item.logprob == pytest.approx(expected[token], abs=1e-12)
        assert np.exp(expected).sum() == pytest.approx(1.0)
        top = [alt.logprob for alt in item.top_logprobs]
        assert top == sorted(top, reverse=True) and len(top) == 5
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the best
        assert item.bytes == list(item.token.encode())
        previous = token


# -- through the shield ----------------------------------------------------------------------


async def test_chat_logprobs_are_capped_and_rounded_by_the_hygiene() -> None:
    raw = await _chat(ex.create_app(), logprobs=True, top_logprobs=5)
    answer = await _chat(shielded(perturbation=HYGIENE), logprobs=True, top_logprobs=5)
    assert answer.choices[0].message.content == raw.choices[0].message.content
    items, raw_items = answer.choices[0].logprobs.content, raw.choices[0].logprobs.content
    assert len(items) == len(raw_items) > 0
    for item, original in zip(items, raw_items, strict=True):
        assert item.token == original.token and item.bytes == original.bytes
        assert item.logprob == round(original.logprob, 1)
        assert len(item.top_logprobs) == 2
        for alt, alt_original in zip(item.top_logprobs, original.top_logprobs, strict=False):
            assert alt.token == alt_original.token and alt.bytes == alt_original.bytes
            assert alt.logprob == round(alt_original.logprob, 1)
    assert not all(_rounded(item.logprob, 1) for item in raw_items)  # there was rounding to do


async def test_top_logprobs_asked_of_the_model_are_capped() -> None:
    shield = shielded(openai={"max_top_logprobs": 3})
    capped = await _chat(shield, logprobs=True, top_logprobs=15)
    direct = await _chat(ex.create_app(), logprobs=True, top_logprobs=3)
    assert capped.choices[0].logprobs.content == direct.choices[0].logprobs.content
    assert all(len(item.top_logprobs) == 3 for item in capped.choices[0].logprobs.content)


async def test_streaming_chat_with_logprobs() -> None:
    app = shielded(perturbation=HYGIENE)
    whole = await _chat(ex.create_app(), n=2)
    async with client_for(app) as client:
        stream = await client.chat.completions.create(
            model=ex.CHAT_MODEL,
            messages=HELLO,
            max_tokens=6,
            temperature=0,
            n=2,
            logprobs=True,
            top_logprobs=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        content = ["", ""]
        items: list[Any] = []
        finished: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                content[choice.index] += choice.delta.content or ""
                if choice.logprobs is not None:
                    items.extend(choice.logprobs.content)
                if choice.finish_reason:
                    finished[choice.index] = choice.finish_reason
    assert content == [c.message.content for c in whole.choices]
    assert set(finished) == {0, 1}
    assert usage is not None and usage.completion_tokens == len(items) > 0
    for item in items:
        assert _rounded(item.logprob, 1)
        assert len(item.top_logprobs) == 2
        assert all(_rounded(alt.logprob, 1) for alt in item.top_logprobs)


async def test_completions_logprobs_through_the_client() -> None:
    async with client_for(shielded(perturbation=HYGIENE)) as client:
        answer = await client.completions.create(
            model=ex.CHAT_MODEL, prompt=["the cat", "a dog"], n=2, max_tokens=4, logprobs=5
        )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for choice in answer.choices:
        logprobs = choice.logprobs
        assert "".join(logprobs.tokens) == choice.text
        assert all(_rounded(v, 1) for v in logprobs.token_logprobs)
        assert all(len(top) == 2 for top in logprobs.top_logprobs)


async def test_embeddings_float_and_base64_are_noised_alike() -> None:
    inputs = ["a red cat", "a green tree"]
    async with client_for(ex.create_app()) as client:
        clean = await client.embeddings.create(
            model=ex.EMBEDDING_MODEL, input=inputs, encoding_format="float"
        )
    async with client_for(shielded(perturbation="embedding_noise:epsilon=0.1")) as client:
        floats = await client.embeddings.create(
            model=ex.EMBEDDING_MODEL, input=inputs, encoding_format="float"
        )
        decoded = await client.embeddings.create(model=ex.EMBEDDING_MODEL, input=inputs)
        again = await client.embeddings.create(model=ex.EMBEDDING_MODEL, input=inputs)
    for clean_item, float_item, b64_item, again_item in zip(
        clean.data, floats.data, decoded.data, again.data, strict=True
    ):
        c, f, b = (np.asarray(x.embedding) for x in (clean_item, float_item, b64_item))
        assert c.shape == f.shape == b.shape == (ex.EMBEDDING_DIM,)
        assert np.linalg.norm(f) == pytest.approx(1.0, abs=1e-9)
        assert 0.98 < float(c @ f) < 0.9999  # noised, a little
        np.testing.assert_allclose(b, f, atol=1e-6)  # base64 is float32 of the same vector
        assert again_item.embedding == b64_item.embedding


async def test_logit_bias_with_logprobs_gets_no_logprobs_back() -> None:
    biased = {str(ex.VOCAB.index(" ✓")): 100}
    leaky = await _chat(ex.create_app(), logit_bias=biased, logprobs=True, top_logprobs=3)
    # unprotected, the bias shows in the logprobs: the attack reads the biased logit
    assert leaky.choices[0].logprobs.content[0].token == " ✓"
    assert leaky.choices[0].logprobs.content[0].logprob > -1e-6
    answer = await _chat(shielded(), logit_bias=biased, logprobs=True, top_logprobs=3)
    assert answer.choices[0].logprobs is None
    assert answer.choices[0].message.content.startswith(" ✓")  # the bias itself still works


async def test_too_many_logit_bias_entries_is_a_bad_request() -> None:
    with pytest.raises(openai.BadRequestError) as error:
        await _chat(
            shielded(openai={"max_logit_bias": 10}), logit_bias={str(i): 1 for i in range(11)}
        )
    assert error.value.status_code == 400
    detail = error.value.response.json()["detail"]
    assert "11 entries" in detail and "at most 10" in detail
    assert (await _chat(shielded(openai={"max_logit_bias": 10}), logit_bias={"1": 1})).choices


async def test_rate_limit_surfaces_as_rate_limit_error() -> None:
    app = shielded(rate_limit="2/minute")
    assert (await _chat(app)).choices
    assert (await _chat(app)).choices
    with pytest.raises(openai.RateLimitError) as error:
        await _chat(app)
    assert error.value.status_code == 429
    assert int(error.value.response.headers["retry-after"]) >= 1
    assert error.value.response.headers["content-type"] == "application/problem+json"


# -- the example as a program ----------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    log = tmp_path / "server.log"
    env = {"EXTRACTION_SHIELD_SECRET_KEY": SECRET, "EXTRACTION_SHIELD_PERTURBATION": HYGIENE}
    with running(EXAMPLE, log, env) as base:
        yield base + "/v1"
    assert "curl -s" in log.read_text()


def test_running_the_example_serves_the_openai_client(server: str) -> None:
    with openai.OpenAI(base_url=server, api_key="sk-anything", max_retries=0) as client:
        answer = client.chat.completions.create(
            model=ex.CHAT_MODEL, messages=HELLO, logprobs=True, top_logprobs=5, max_tokens=4
        )
        vectors = client.embeddings.create(model=ex.EMBEDDING_MODEL, input=["a cat", "a dog"])
    items = answer.choices[0].logprobs.content
    assert items and all(len(item.top_logprobs) == 2 for item in items)
    assert all(_rounded(item.logprob, 1) for item in items)
    assert [len(d.embedding) for d in vectors.data] == [ex.EMBEDDING_DIM] * 2
