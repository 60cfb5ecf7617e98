"""The ``text`` watermark: keyed synonyms (protected spans, streams), the green-list
``logit_bias``, their tests' calibration, and the OpenAI adapter's generated texts."""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.formats.base import GeneratedText
from asgi_extraction_shield.formats.openai_api import OpenAIAdapter
from asgi_extraction_shield.verify import verify
from asgi_extraction_shield.watermark import parse_scheme, parse_watermarks, watermark_key
from asgi_extraction_shield.watermark import text as tx
from asgi_extraction_shield.watermark.words import SYNONYMS

from .conftest import SECRET
from .test_openai_client import client_for, ex

KEY = watermark_key(SECRET, "text")
OTHER = watermark_key("another secret key 0123456789", "text")
FILLER = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "tree",
    "and",
    "then",
    ",",
    ".",
    "it",
    "was",
    "she",
    "he",
]


def _random_texts(seed: int, n: int = 30, length: int = 30) -> list[str]:
    rng = random.Random(seed)
    vocabulary = FILLER + [w for group in SYNONYMS[:30] for w in group]
    return [" ".join(rng.choice(vocabulary) for _ in range(length)) for _ in range(n)]


# -- marking ---------------------------------------------------------------------------------


def test_words_of_a_group_become_the_keyed_member_of_their_context() -> None:
    out = tx.mark(KEY, "the big cat. a big dog; then Big and BIG")
    words = out.replace(".", " ").replace(";", " ").split()
    for i, word in enumerate(words):
        group = tx.GROUP_OF.get(word.lower())
        if group is not None:
            context = words[i - 1].lower() if i else ""
            context = {"cat": ".", "dog": ";"}.get(context, context)
            expected = SYNONYMS[group][tx.keyed_member(KEY, context, group)]
            assert word.lower() == expected
    assert out.split()[-1].isupper() and out.split()[-3][0].isupper()
    assert tx.mark(KEY, "the big cat") == tx.mark(KEY, "the big cat")  # deterministic


def test_the_choice_depends_on_the_context_and_the_key() -> None:
    contexts = [f"w{i}" for i in range(64)]
    chosen = {tx.mark(KEY, f"{c} big").split()[1] for c in contexts}
    assert chosen == {"big", "large"}  # no global substitution
    same = sum(tx.mark(KEY, f"{c} big") == tx.mark(OTHER, f"{c} big") for c in contexts)
    assert 16 < same < 48  # another key agrees by chance only


@pytest.mark.parametrize(
    "protected",
    [
        "```\nthe big cat quickly ran\n```",
        "```python\nbig = small  # very happy\n```",
        "`big` and `very small`",
        "https://example.com/big/small?very=happy",
        "www.big-small.com",
        '"the big cat said very small things"',
        "“big and small”",
        '{"size": "big", "speed": "quickly", "n": [1, 2]}',
        "[big, small, happy]",
        "big-data big_file file.big big.txt x/big",
        "<big>small</big> size=big",
        "3.5 big 42",
        "Alice met Happy Jones",
    ],
)
def test_protected_spans_are_never_changed(protected: str) -> None:
    marked = tx.mark(KEY, f"{protected}")
    if protected == "3.5 big 42":  # the number is kept; the word between is free text
        assert marked.split()[0] == "3.5" and marked.split()[2] == "42"
        return
    assert marked == protected
    # Protection ends with its span: free text after it is marked again.
    tail = tx.mark(KEY, f"{protected} the big cat")
    assert tail.startswith(protected)


def test_an_unclosed_fence_or_bracket_protects_the_rest() -> None:
    for text in ("```\nbig small very", "{ big small very", '"big small very'):
        assert tx.mark(KEY, text) == text


def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *[c % (len(text) + 1) for c in cuts]})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


SAMPLE = (
    "The big cat quickly ran under the small mat. See `big code` and "
    "https://x.io/big then ```\nbig\n``` and very happy dogs, glad; BIG old car."
)


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_a_stream_marked_piece_by_piece_equals_the_whole_text_marked(cuts: list[int]) -> None:
    pieces = _pieces(SAMPLE, cuts)
    state = tx.ScanState()
    out = []
    for i, piece in enumerate(pieces):
        written = tx.mark(KEY, piece, state, final=i == len(pieces) - 1)
        # Only the trailing partial word (or backticks, or a URL's start) is held back.
        assert len(state.pending) <= max(12, len(piece.split()[-1]) if piece.split() else 0)
        out.append(written)
    assert "".join(out) == tx.mark(KEY, SAMPLE)


@given(st.text(max_size=300))
def test_hostile_text_never_crashes_and_only_letters_change(text: str) -> None:
    marked = tx.mark(KEY, text)
    # Words are swapped for words: every other character stays where it was.
    assert re.sub("[A-Za-z]", "", marked) == re.sub("[A-Za-z]", "", text)
    tx.synonym_test(KEY, [text, marked])


# -- the synonym test ------------------------------------------------------------------------


def test_synonym_p_values_are_valid_for_clean_texts() -> None:
    runs = 150
    p_values = np.array([tx.synonym_test(b"null-%d" % i, _random_texts(i))[1] for i in range(runs)])
    for alpha in (0.01, 0.05, 0.2, 0.5):  # within three standard errors of alpha
        assert np.mean(p_values <= alpha) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / runs)
    assert np.mean(p_values <= 0.5) > 0.3  # not vacuous: not all near 1


def test_a_clean_model_with_fixed_preferences_is_not_flagged() -> None:
    # Always the first member: without counting each (context, group) pair once, this
    # model's repeated choices would look like hundreds of hits or misses.
    rng = random.Random(3)
    texts = [
        " ".join(rng.choice(["the big", "a small", "very quickly", "the cat"]) for _ in range(50))
        for _ in range(20)
    ]
    p_values = [tx.synonym_test(b"pref-%d" % i, texts)[1] for i in range(100)]
    assert np.mean(np.array(p_values) < 0.05) <= 0.1


def test_marked_texts_are_detected_and_a_wrong_key_is_not() -> None:
    marked = [tx.mark(KEY, t) for t in _random_texts(99, n=40)]
    z, p, details = tx.synonym_test(KEY, marked)
    assert p < 1e-20 and details["hits"] == details["pairs"] and z > 5
    assert tx.synonym_test(OTHER, marked)[1] > 1e-3


# -- the green list ----------------------------------------------------------------------------


def test_green_ids_are_keyed_and_sized() -> None:
    green = tx.green_ids(KEY, 1000, 0.25)
    assert len(green) == 250 == len(set(green)) and green == sorted(green)
    assert all(0 <= i < 1000 for i in green)
    assert len(set(green) & set(tx.green_ids(OTHER, 1000, 0.25))) < 100


def test_green_p_values_are_valid_for_clean_text_with_repeats() -> None:
    rng = np.random.default_rng(0)
    vocab = 200
    weights = 1.0 / np.arange(1, vocab + 1)  # Zipf: a few tokens repeat a lot
    z_values, p_values, textbook = [], [], []
    for i in range(400):
        ids = rng.choice(vocab, size=300, p=weights / weights.sum()).tolist()
        green = tx.green_ids(b"g-%d" % i, vocab, 0.25)
        z, p, _ = tx.green_test(ids, green, vocab)
        z_values.append(z)
        p_values.append(p)
        g = sum(1 for t in ids if t in set(green))
        textbook.append((g - 0.25 * len(ids)) / np.sqrt(len(ids) * 0.25 * 0.75))
    assert abs(np.mean(z_values)) < 0.15 and np.std(z_values) == pytest.approx(1.0, abs=0.12)
    for alpha in (0.01, 0.05, 0.2):
        assert np.mean(np.array(p_values) <= alpha) <= alpha + 3 * np.sqrt(alpha / 400)
    # Counting every occurrence over-flags clean text: ~1% expected above 2.33.
    assert np.mean(np.array(textbook) > 2.33) > 0.05


def test_biased_sampling_is_detected() -> None:
    rng = np.random.default_rng(1)
    # The evidence is bounded by the distinct tokens used (the key draws one green/red
    # coin per token id), so this needs a vocabulary far larger than the example's 48.
    vocab, bias = 1000, 2.0
    green = tx.green_ids(KEY, vocab, 0.25)
    logits = rng.normal(size=vocab)
    logits[green] += bias
    p = np.exp(logits) / np.exp(logits).sum()
    ids = rng.choice(vocab, size=2000, p=p).tolist()
    assert tx.green_test(ids, green, vocab)[1] < 1e-6
    assert tx.green_test(ids, tx.green_ids(OTHER, vocab, 0.25), vocab)[1] > 1e-3
    assert tx.green_test([], green, vocab)[1] == 1.0


def test_greedy_tokenizer() -> None:
    tokenize = tx.greedy_tokenizer(list(ex.VOCAB))
    text = " the cat sat on the mat."
    assert tokenize(text) == [
        ex.VOCAB.index(t) for t in (" the", " cat", " sat", " on", " the", " mat", ".")
    ]
    assert tokenize("§§ the") == [ex.VOCAB.index(" the")]


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "text:bias=2",  # no vocab
        "text:bias=2,vocab=100000,gamma=0.5",  # 50,000 logit_bias entries
        "text:gamma=1.5",
        "text:bias=-1",
        "text:synonyms=false",  # nothing left to do
    ],
)
def test_bad_parameters_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="text"):
        parse_watermarks(spec)


# -- the request hook -------------------------------------------------------------------------


def _bound(spec: str) -> Any:
    watermark = parse_watermarks(spec)[0]
    watermark.bind(SECRET.encode())
    return watermark


def _parse(body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    return OpenAIAdapter().parse_request({"type": "http", "path": path}, body, b"")


def test_the_green_list_joins_the_user_logit_bias_and_the_user_wins() -> None:
    watermark = _bound("text:bias=2,vocab=48,gamma=0.25")
    green = tx.green_ids(watermark.key, 48, 0.25)
    body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {str(green[0]): -5}}
    new = watermark.rewrite_request(_parse(body), body)
    assert new["logit_bias"][str(green[0])] == -5
    assert {k for k, v in new["logit_bias"].items() if v == 2.0} == {str(i) for i in green[1:]}
    assert new["messages"] == body["messages"]
    embeddings = {"input": "x"}
    assert watermark.rewrite_request(_parse(embeddings, "/v1/embeddings"), embeddings) is None
    assert _bound("text").rewrite_request(_parse(body), body) is None  # bias=0: off


# -- the OpenAI adapter's texts ---------------------------------------------------------------


def test_the_adapter_reads_and_writes_generated_texts() -> None:
    adapter = OpenAIAdapter()
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "a big cat"}}]}
    request = _parse({"messages": [{"role": "user", "content": "x"}]})
    outputs = adapter.read_response(chat, request)
    assert outputs is not None and outputs.texts == [GeneratedText("a big cat", 0, True)]
    outputs.texts[0].text = "a large cat"
    assert adapter.write_response(chat, outputs, request)["choices"][0]["message"]["content"] == (
        "a large cat"
    )
    stream = _parse({"messages": [{"role": "user", "content": "x"}], "stream": True})
    end = {"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]}
    pieces = adapter.read_response(end, stream)
    assert pieces is not None and pieces.texts == [GeneratedText("", 1, True)]
    pieces.texts[0].text = "held"
    assert adapter.write_response(end, pieces, stream)["choices"][0]["delta"] == {"content": "held"}
    tools = {"choices": [{"index": 0, "message": {"content": None, "tool_calls": []}}]}
    assert adapter.read_response(tools, request) is None


# -- through the shield, with the official client ----------------------------------------------

WATERMARK = "text:bias=2,vocab=48,gamma=0.25"


def _shielded(**overrides: Any) -> ExtractionShield:
    overrides.setdefault("rate_limit", "100000/minute")
    overrides.setdefault("monitor", {"enabled": False})
    return ExtractionShield(ex.create_app(), secret_key=SECRET, **overrides)


@pytest.mark.anyio
async def test_chat_and_streams_are_marked_alike_through_the_openai_client() -> None:
    app, raw = _shielded(watermark=WATERMARK), ex.create_app()
    messages = [{"role": "user", "content": "the big cat"}]
    fields: dict[str, Any] = {"model": ex.CHAT_MODEL, "messages": messages, "max_tokens": 40}
    async with client_for(app) as client, client_for(raw) as plain:
        whole = await client.chat.completions.create(n=2, **fields)
        stream = await client.chat.completions.create(n=2, stream=True, **fields)
        parts: dict[int, str] = {0: "", 1: ""}
        async for chunk in stream:
            for choice in chunk.choices:
                parts[choice.index] += choice.delta.content or ""
        unbiased = await plain.chat.completions.create(n=2, **fields)
        logit_bias = {str(i): 2.0 for i in tx.green_ids(watermark_key(SECRET, "text"), 48, 0.25)}
        biased = await plain.chat.completions.create(n=2, logit_bias=logit_bias, **fields)
    texts = [c.message.content for c in whole.choices]
    assert [parts[0], parts[1]] == texts
    assert [tx.mark(KEY, c.message.content) for c in biased.choices] == texts
    assert texts != [c.message.content for c in unbiased.choices]


@pytest.mark.anyio
async def test_completions_with_logprobs_keep_them_under_the_green_list() -> None:
    app = _shielded(watermark=WATERMARK)
    async with client_for(app) as client:
        answer = await client.completions.create(
            model=ex.CHAT_MODEL, prompt=["the cat", "a dog"], max_tokens=12, logprobs=2
        )
    for choice in answer.choices:
        assert choice.logprobs is not None and len(choice.logprobs.token_logprobs) > 0
        # The text is marked; the tokens with their logprobs are the model's own.
        assert choice.text == tx.mark(KEY, "".join(choice.logprobs.tokens))


async def _completions(app: Any, prompts: list[str]) -> list[str]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shield.test") as client:
        response = await client.post(
            "/v1/completions",
            json={"model": ex.CHAT_MODEL, "prompt": prompts, "max_tokens": 40},
        )
    return [c["text"] for c in response.json()["choices"]]


@pytest.mark.anyio
async def test_verify_detects_the_shielded_api_and_not_the_clean_one() -> None:
    prompts = parse_scheme("text").probes(KEY, 200, [])
    assert len(set(prompts)) > 150 and all(isinstance(p, str) for p in prompts)
    marked = await _completions(_shielded(watermark="text"), prompts)
    clean = await _completions(ex.create_app(), prompts)
    found = verify("text", lambda inputs: marked[: len(inputs)], key=SECRET, probes=200)
    assert found.verdict and found.p_value < 1e-6 and found.probes == 200
    assert not verify("text", lambda inputs: clean[: len(inputs)], key=SECRET, probes=200).verdict


def test_a_stream_goes_out_event_by_event_marked() -> None:
    from starlette.datastructures import Headers

    from asgi_extraction_shield.postprocess.chain import Context
    from asgi_extraction_shield.postprocess.transform import OutputTransform

    watermark = _bound("text")
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    request = _parse(body)
    transform = OutputTransform(request, (watermark,), Context(b"k", "id", request), 1 << 20)
    assert transform.accepts(200, Headers({"content-type": "text/event-stream"}))
    pieces = [" the", " big", " cat", " ran", " very", " quick", "ly", ".", ""]
    sent = []
    for i, piece in enumerate(pieces):
        choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
        if i == len(pieces) - 1:
            choice = {"index": 0, "delta": {}, "finish_reason": "stop"}
        event = b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"
        out = transform.feed(event, more_body=True)
        assert out.endswith(b"\n\n")  # every event goes out as it comes, never held whole
        sent.append(json.loads(out[len(b"data: ") :])["choices"][0]["delta"].get("content", ""))
    assert transform.feed(b"data: [DONE]\n\n", more_body=False) == b"data: [DONE]\n\n"
    assert "".join(sent) == tx.mark(watermark.key, "".join(pieces))
    # At most the trailing word of what came in waited for the next event.
    for i in range(len(pieces)):
        came, went = "".join(pieces[: i + 1]), "".join(sent[: i + 1])
        assert len(re.findall("[A-Za-z]+", went)) >= len(re.findall("[A-Za-z]+", came)) - 1
