"""The OpenAI-compatible format: parsing, cost, hardening, logprob hygiene, embeddings, SSE."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.formats import PayloadAdapter, build_adapter
from asgi_extraction_shield.formats.base import (
    EMBEDDINGS,
    HARDENED,
    LOGIT_BIAS,
    LOGPROBS,
    STREAM,
    TOP_LOGPROBS,
    TokenLogprobs,
)
from asgi_extraction_shield.formats.openai_api import OpenAIAdapter, OpenAIRequest
from asgi_extraction_shield.postprocess.chain import Context, LogprobHygiene
from asgi_extraction_shield.settings import OpenAISettings, ShieldSettings

from .conftest import SECRET

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBED = "/v1/embeddings"
HYGIENE = "logprob_hygiene:max_top=2:decimals=1"
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scope_for(path: str) -> dict[str, Any]:
    return {"type": "http", "path": path, "headers": []}


def parse(doc: Any, path: str = CHAT, **openai: Any) -> OpenAIRequest:
    request = OpenAIAdapter(OpenAISettings(**openai)).parse_request(scope_for(path), doc, b"")
    assert isinstance(request, OpenAIRequest)
    return request


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def upstream(request: OpenAIRequest) -> dict[str, Any]:
    assert request.upstream_body is not None
    doc: dict[str, Any] = json.loads(request.upstream_body)
    return doc


# -- requests: queries, cost, flags ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "doc", "queries", "cost"),
    [
        (CHAT, chat(), 1, 1),
        (CHAT, chat(n=4), 1, 4),
        (COMPLETIONS, {"prompt": "once"}, 1, 1),
        (COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 2}, 3, 6),
        (COMPLETIONS, {"prompt": ["a", "b"], "n": 2, "best_of": 5}, 2, 10),
        (COMPLETIONS, {"prompt": [1, 2, 3]}, 1, 1),  # one token array
        (COMPLETIONS, {"prompt": [[1, 2], [3]], "n": 3}, 2, 6),  # two token arrays
        (EMBED, {"input": "x"}, 1, 1),
        (EMBED, {"input": ["x", "y", "z", "w"], "n": 9}, 4, 4),  # n means nothing here
        (EMBED, {"input": [[5, 6], [7], [8, 9]]}, 3, 3),
        (CHAT, chat(n=10**12), 1, 1_000_000),  # bounded: still over any burst
    ],
)
def test_queries_and_cost(path: str, doc: dict[str, Any], queries: int, cost: int) -> None:
    request = parse(doc, path)
    assert request.parsed and request.problem is None and request.adapter is not None
    assert len(request.inputs) == len(request.keys) == queries
    assert request.cost == cost


def test_chat_texts_keys_and_content_parts() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": [{"type": "text", "text": "this?"}]},
    ]
    request = parse({"messages": messages})
    assert request.texts == ["be brief\nwhat is\nthis?"]
    assert request.inputs == [messages]
    # the key is canonical: the same conversation written differently is the same query
    reordered = [{k: m[k] for k in reversed(list(m))} for m in messages]
    assert parse({"messages": reordered}).keys == request.keys
    assert parse({"messages": messages[:2]}).keys != request.keys
    batch = parse({"prompt": ["b", "a"]}, COMPLETIONS)
    assert batch.texts == ["b", "a"] and batch.keys == [b'"b"', b'"a"']


@pytest.mark.parametrize(
    ("path", "doc", "flags"),
    [
        (CHAT, chat(), set()),
        (CHAT, chat(logprobs=True), {LOGPROBS}),
        (CHAT, chat(logprobs=True, top_logprobs=3), {LOGPROBS, TOP_LOGPROBS}),
        (CHAT, chat(logprobs=False, top_logprobs=None), set()),
        (CHAT, chat(stream=True), {STREAM}),
        (CHAT, chat(logit_bias={}), set()),
        (CHAT, chat(logit_bias={"17": 5}), {LOGIT_BIAS}),
        (COMPLETIONS, {"prompt": "p", "logprobs": 0}, {LOGPROBS}),
        (
            COMPLETIONS,
            {"prompt": "p", "logprobs": 3, "stream": True},
            {LOGPROBS, TOP_LOGPROBS, STREAM},
        ),
        (COMPLETIONS, {"prompt": "p", "logprobs": None}, set()),
        (EMBED, {"input": "x"}, {EMBEDDINGS}),
    ],
)
def test_flags(path: str, doc: dict[str, Any], flags: set[str]) -> None:
    request = parse(doc, path)
    assert request.parsed
    assert request.flags == flags


def test_logit_bias_tokens_are_reported() -> None:
    request = parse(chat(logit_bias={"50256": -100, "13": 4.5}))
    assert request.logit_bias_tokens == ("50256", "13")
    assert parse(chat()).logit_bias_tokens == ()


def test_distribution_requests_cost_more_through_the_payload_adapter() -> None:
    adapter = build_adapter(ShieldSettings(distribution_cost=3.0))
    assert isinstance(adapter, PayloadAdapter)
    body = json.dumps(chat(n=2, logprobs=True)).encode()
    assert adapter.parse_request(scope_for(CHAT), body).cost == 6
    assert adapter.parse_request(scope_for(CHAT), json.dumps(chat(n=2)).encode()).cost == 2


def test_format_auto_routes_the_three_paths_and_format_openai_forces_it() -> None:
    auto = build_adapter(ShieldSettings(openai={"max_top_logprobs": 2}))
    assert isinstance(auto, PayloadAdapter)
    for path, doc in [
        ("/v1/chat/completions", chat(top_logprobs=9, logprobs=True)),
        ("/openai/v1/completions", {"prompt": "p", "logprobs": 9}),
        ("/v1/embeddings", {"input": "x"}),
    ]:
        request = auto.parse_request(scope_for(path), json.dumps(doc).encode())
        assert isinstance(request, OpenAIRequest) and request.parsed, path
        assert isinstance(request.adapter, OpenAIAdapter)
    capped = auto.parse_request(scope_for(CHAT), json.dumps(chat(top_logprobs=9)).encode())
    assert upstream(capped)["top_logprobs"] == 2  # the settings reach the adapter
    forced = build_adapter(ShieldSettings(format="openai"))
    on_other_path = forced.parse_request(scope_for("/generate"), json.dumps(chat(n=3)).encode())
    assert isinstance(on_other_path, OpenAIRequest) and on_other_path.endpoint == "chat"
    assert on_other_path.cost == 3


# -- requests: hardening ---------------------------------------------------------------------


def test_top_logprobs_is_capped_and_every_other_field_kept() -> None:
    doc = chat(logprobs=True, top_logprobs=20, temperature=0.5, extra={"é": [1, 2]})
    request = parse(doc, max_top_logprobs=3)
    assert request.refusal is None and HARDENED in request.flags
    assert upstream(request) == {**doc, "top_logprobs": 3}
    assert list(upstream(request)) == list(doc)  # field order kept too
    within = parse(chat(logprobs=True, top_logprobs=3), max_top_logprobs=3)
    assert within.upstream_body is None and HARDENED not in within.flags


def test_completions_logprobs_count_is_capped() -> None:
    request = parse({"prompt": "p", "logprobs": 5, "echo": True}, COMPLETIONS, max_top_logprobs=1)
    assert upstream(request) == {"prompt": "p", "logprobs": 1, "echo": True}
    assert (
        parse({"prompt": "p", "logprobs": 1}, COMPLETIONS, max_top_logprobs=1).upstream_body is None
    )


def test_too_many_logit_bias_entries_is_a_refusal() -> None:
    bias = {str(i): 1 for i in range(51)}
    refused = parse(chat(logit_bias=bias))
    assert refused.refusal is not None and "51 entries" in refused.refusal
    assert "at most 50" in refused.refusal
    assert parse(chat(logit_bias=dict(list(bias.items())[:50]))).refusal is None
    assert parse(chat(logit_bias={"1": 1}), max_logit_bias=0).refusal is not None


@pytest.mark.parametrize(
    ("path", "doc", "dropped"),
    [
        (
            CHAT,
            chat(logit_bias={"9": 100}, logprobs=True, top_logprobs=5),
            {"logprobs", "top_logprobs"},
        ),
        (CHAT, chat(logit_bias={"9": 100}, logprobs=True), {"logprobs"}),
        (CHAT, chat(logit_bias={"9": 100}, top_logprobs=2), {"top_logprobs"}),  # a lenient upstream
        (COMPLETIONS, {"prompt": "p", "logit_bias": {"9": 100}, "logprobs": 0}, {"logprobs"}),
    ],
)
def test_logit_bias_with_logprobs_drops_the_logprobs(
    path: str, doc: dict[str, Any], dropped: set[str]
) -> None:
    request = parse(doc, path)
    assert request.refusal is None and request.parsed
    assert upstream(request) == {k: v for k, v in doc.items() if k not in dropped}
    assert {HARDENED, LOGIT_BIAS} <= request.flags
    # the monitor still learns what was asked: logprobs together with a bias
    assert (LOGPROBS in request.flags) == (
        doc.get("logprobs") is not None and doc.get("logprobs") is not False
    )


def test_logit_bias_with_logprobs_reject_and_allow() -> None:
    doc = chat(logit_bias={"9": 100}, logprobs=True, top_logprobs=9)
    rejected = parse(doc, logit_bias_with_logprobs="reject")
    assert rejected.refusal is not None and "logit_bias" in rejected.refusal
    allowed = parse(doc, logit_bias_with_logprobs="allow", max_top_logprobs=9)
    assert allowed.refusal is None and allowed.upstream_body is None
    capped = parse(doc, logit_bias_with_logprobs="allow", max_top_logprobs=4)
    assert upstream(capped) == {**doc, "top_logprobs": 4}  # the cap still applies
    without_logprobs = parse(
        chat(logit_bias={"9": 100}, logprobs=False), logit_bias_with_logprobs="reject"
    )
    assert without_logprobs.refusal is None and without_logprobs.upstream_body is None


@pytest.mark.parametrize(
    ("path", "doc", "field"),
    [
        (CHAT, chat(top_logprobs="20", logprobs=True), "top_logprobs"),
        (CHAT, chat(top_logprobs=20.0, logprobs=True), "top_logprobs"),
        (CHAT, chat(logprobs=1), "logprobs"),  # 1 == True in Python, not to the shield
        (CHAT, chat(logprobs="true"), "logprobs"),
        (CHAT, chat(n=5.0), "'n'"),
        (CHAT, chat(n=True), "'n'"),
        (CHAT, chat(logit_bias=[["1", 5]]), "logit_bias"),
        (COMPLETIONS, {"prompt": "p", "logprobs": True}, "logprobs"),
        (COMPLETIONS, {"prompt": "p", "best_of": "3"}, "best_of"),
    ],
)
def test_hardening_fields_of_the_wrong_type_are_refused(
    path: str, doc: dict[str, Any], field: str
) -> None:
    # A lenient upstream (pydantic's lax mode) would coerce these past the caps.
    request = parse(doc, path)
    assert request.refusal is not None and field in request.refusal


@pytest.mark.parametrize(
    ("path", "doc", "problem"),
    [
        (CHAT, [1, 2], "JSON object"),
        (CHAT, "text", "JSON object"),
        (CHAT, {"model": "m"}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": ["hi"]}, "messages"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages",
        ),
        (CHAT, chat(temperature=float("nan")), "NaN"),
        (CHAT, chat(stream="yes"), "stream"),
        (CHAT, chat(n=0), "'n'"),
        (CHAT, chat(logit_bias={"1": "x"}), "logit_bias"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"),
        (COMPLETIONS, {"prompt": [[1], []]}, "prompt"),
        (EMBED, {"input": {"text": "x"}}, "input"),
        (EMBED, {"input": [True, False]}, "input"),
        (EMBED, {"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/generate", {"something": 1}, "messages"),
    ],
)
def test_malformed_bodies_are_unparsed_with_a_problem(path: str, doc: Any, problem: str) -> None:
    request = parse(doc, path)
    assert not request.parsed and request.adapter is None
    assert request.problem is not None and problem in request.problem
    assert request.cost >= 1


def test_deep_nesting_is_a_problem_not_a_recursion_error() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    request = parse(chat(metadata=deep, top_logprobs=50))
    assert not request.parsed and request.problem is not None and "nests" in request.problem
    # the hardening does not depend on the rest of the body being sane
    assert request.upstream_body is not None or request.refusal is not None


def test_a_malformed_body_is_still_hardened_and_charged() -> None:
    # NaN elsewhere must not switch the caps off: a lenient upstream may still answer it.
    request = parse(
        {"prompt": ["a", "b"], "n": 3, "logprobs": 20, "temperature": float("nan")}, COMPLETIONS
    )
    assert not request.parsed
    assert request.cost == 6
    assert request.upstream_body is not None and b'"logprobs":5' in request.upstream_body


# The safety property, over hostile values of the fields that matter: unless the request is
# refused, what the app receives asks for at most max_top_logprobs alternatives, and never
# for logprobs together with logit_bias.
odd_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=False, max_value=100),
    st.sampled_from(["20", "true", "", [], {}, [1], {"1": 2}]),
)
bias_values = st.one_of(
    odd_values,
    st.dictionaries(st.sampled_from(["1", "2", "3", "x"]), odd_values, max_size=4),
)


@FAST
@given(
    path=st.sampled_from([CHAT, COMPLETIONS]),
    fields=st.fixed_dictionaries(
        {},
        optional={
            "logprobs": odd_values,
            "top_logprobs": odd_values,
            "logit_bias": bias_values,
            "n": odd_values,
            "stream": odd_values,
        },
    ),
    mode=st.sampled_from(["drop_logprobs", "reject"]),
)
def test_hardening_cannot_be_bypassed(path: str, fields: dict[str, Any], mode: str) -> None:
    doc = {**chat(), "prompt": "p", **fields}
    request = parse(doc, path, max_top_logprobs=2, logit_bias_with_logprobs=mode)
    if request.refusal is not None:
        return
    sent = upstream(request) if request.upstream_body is not None else doc
    logprobs, top = sent.get("logprobs"), sent.get("top_logprobs")
    bias = sent.get("logit_bias")
    assert bias is None or isinstance(bias, dict)
    if path == CHAT:
        assert logprobs is None or isinstance(logprobs, bool)
        assert top is None or (type(top) is int and top <= 2)
        asks = logprobs is True or bool(top)
    else:
        assert logprobs is None or (type(logprobs) is int and logprobs <= 2)
        asks = logprobs is not None
    assert not (bias and asks)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=30,
)
request_docs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "messages": json_values,
            "prompt": json_values,
            "input": json_values,
            "n": json_values,
            "best_of": json_values,
            "logprobs": json_values,
            "top_logprobs": json_values,
            "logit_bias": json_values,
            "stream": json_values,
            "encoding_format": json_values,
        },
    ),
)


@FAST
@given(doc=request_docs, path=st.sampled_from([CHAT, COMPLETIONS, EMBED, "/other"]))
@example(doc={"prompt": [10**400], "n": 10**400, "logprobs": 10**400}, path=COMPLETIONS)
def test_parse_request_never_raises(doc: Any, path: str) -> None:
    request = parse(doc, path)
    assert request.cost >= 1
    assert request.parsed or request.problem or request.refusal
    if request.upstream_body is not None:
        json.loads(request.upstream_body)


# -- responses, read and written directly ----------------------------------------------------


def alt(token: str, logprob: float, raw: list[int] | None = None) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()) if raw is None else raw,
    }


def chat_item(token: str, logprob: float, top: list[dict[str, Any]]) -> dict[str, Any]:
    return {**alt(token, logprob), "top_logprobs": top}


CHAT_DOC: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " café\ufffd"},
            "logprobs": {
                "content": [
                    chat_item(
                        " café",
                        -0.1234,
                        [alt(" café", -0.1234), alt(" tea", -2.4321), alt(" ✓", -3.87)],
                    ),
                    chat_item(
                        "\ufffd",
                        -0.71,
                        [alt("\ufffd", -0.71, [226]), alt("\ufffd", -0.93, [130]), alt("!", -4.04)],
                    ),
                ],
                "refusal": None,
            },
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "x"},
            "logprobs": None,
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
CHAT_HYGIENIC = [  # CHAT_DOC's first choice after logprob_hygiene:max_top=2:decimals=1
    chat_item(" café", -0.1, [alt(" café", -0.1), alt(" tea", -2.4)]),
    chat_item("\ufffd", -0.7, [alt("\ufffd", -0.7, [226]), alt("\ufffd", -0.9, [130])]),
]
COMPLETION_DOC: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "text": "ab",
            "index": 0,
            "logprobs": {
                "tokens": ["<s>", "a", "b"],
                "token_logprobs": [None, -0.1234, -1.2612],
                "top_logprobs": [
                    None,
                    {"a": -0.1234, "b": -2.5432, "c": -3.3},
                    {"b": -1.2612, "é": -1.5},
                ],
                "text_offset": [0, 3, 4],
            },
            "finish_reason": "length",
        }
    ],
}
COMPLETION_HYGIENIC = {
    "tokens": ["<s>", "a", "b"],
    "token_logprobs": [None, -0.1, -1.3],
    "top_logprobs": [None, {"a": -0.1, "b": -2.5}, {"b": -1.3, "é": -1.5}],
    "text_offset": [0, 3, 4],
}


def hygiene(
    doc: dict[str, Any], request: Any, max_top: int = 2, decimals: int = 1
) -> dict[str, Any]:
    adapter = OpenAIAdapter()
    doc = json.loads(json.dumps(doc))
    outputs = adapter.read_response(doc, request)
    assert outputs is not None
    assert LogprobHygiene(max_top, decimals).apply(outputs, Context(b"k" * 32))
    written: dict[str, Any] = adapter.write_response(doc, outputs, request)
    return written


def test_chat_logprobs_read_as_one_sequence_per_choice_with_logprobs() -> None:
    request = parse(chat(n=2))
    outputs = OpenAIAdapter().read_response(CHAT_DOC, request)
    assert outputs is not None and outputs.tokens is not None
    assert outputs.keys == request.keys
    assert outputs.tokens == [
        TokenLogprobs(
            [-0.1234, -0.71],
            [
                [(" café", -0.1234), (" tea", -2.4321), (" ✓", -3.87)],
                [("\ufffd", -0.71), ("\ufffd", -0.93), ("!", -4.04)],
            ],
        )
    ]


def test_chat_hygiene_caps_rounds_and_keeps_the_matching_bytes() -> None:
    written = hygiene(CHAT_DOC, parse(chat()))
    assert written["choices"][0]["logprobs"]["content"] == CHAT_HYGIENIC
    # everything else as it was
    expected = json.loads(json.dumps(CHAT_DOC))
    expected["choices"][0]["logprobs"]["content"] = CHAT_HYGIENIC
    assert written == expected


def test_completion_hygiene_keeps_nulls_and_offsets() -> None:
    written = hygiene(COMPLETION_DOC, parse({"prompt": "p"}, COMPLETIONS))
    assert written["choices"][0]["logprobs"] == COMPLETION_HYGIENIC
    assert written["choices"][0]["text"] == "ab"


def test_written_values_are_plain_floats() -> None:
    # numpy scalars from a processor would not serialise (orjson): they are written as floats
    request = parse(chat())
    adapter = OpenAIAdapter()
    doc = json.loads(json.dumps(CHAT_DOC))
    outputs = adapter.read_response(doc, request)
    assert outputs is not None and outputs.tokens is not None
    seq = outputs.tokens[0]
    seq.logprobs = [np.float64(v) for v in seq.logprobs]
    seq.top = [[(t, np.float64(v)) for t, v in alts] for alts in seq.top]
    written = adapter.write_response(doc, outputs, request)
    items = written["choices"][0]["logprobs"]["content"]
    assert all(type(item["logprob"]) is float for item in items)
    assert all(type(a["logprob"]) is float for item in items for a in item["top_logprobs"])


def test_completion_null_alternatives_stay_null() -> None:
    logprobs = {"tokens": ["a"], "token_logprobs": [-0.26], "top_logprobs": [None]}
    written = hygiene(
        {"choices": [{"index": 0, "logprobs": logprobs}]}, parse({"prompt": "p"}, COMPLETIONS)
    )
    assert written["choices"][0]["logprobs"] == {**logprobs, "token_logprobs": [-0.3]}


def test_completion_choices_are_keyed_by_their_prompt() -> None:
    request = parse({"prompt": ["p0", "p1"], "n": 2, "best_of": 3, "logprobs": 1}, COMPLETIONS)
    assert request.cost == 6 and request.n == 2  # best_of draws 3 per prompt, 2 come back
    choice = COMPLETION_DOC["choices"][0]
    doc = {"choices": [{**choice, "index": i} for i in (3, 0, 2, 1)]}
    outputs = OpenAIAdapter().read_response(doc, request)
    assert outputs is not None
    assert outputs.keys == [b'"p1"', b'"p0"', b'"p1"', b'"p0"']


def test_refusal_logprobs_are_read_after_content() -> None:
    doc = {
        "choices": [
            {"index": 0, "logprobs": {"content": None, "refusal": [chat_item("no", -0.25, [])]}}
        ]
    }
    written = hygiene(doc, parse(chat()))
    assert written["choices"][0]["logprobs"]["refusal"][0]["logprob"] == -0.2
    assert written["choices"][0]["logprobs"]["content"] is None


@pytest.mark.parametrize(
    "doc",
    [
        {"choices": []},
        {"choices": [{"index": 0, "logprobs": None}]},
        {"choices": [{"index": 0, "logprobs": {"content": [{"token": "a", "logprob": "x"}]}}]},
        {"choices": [{"index": 0, "logprobs": {"token_logprobs": [float("nan")]}}]},
        {"choices": "x"},
        {"error": {"message": "nope"}},
        [1, 2],
    ],
)
def test_responses_without_valid_logprobs_are_left_alone(doc: Any) -> None:
    assert OpenAIAdapter().read_response(doc, parse(chat())) is None


def embedding_doc(vectors: list[np.ndarray], encoding: str, order: list[int]) -> dict[str, Any]:
    def encode(v: np.ndarray) -> Any:
        if encoding == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode()
        return v.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encode(vectors[i])} for i in order]
    return {"object": "list", "data": data, "model": "e", "usage": {"prompt_tokens": 2}}


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_are_read_by_index_and_written_in_the_same_encoding(encoding: str) -> None:
    vectors = [np.array([0.6, 0.8, 0.0]), np.array([0.0, 0.6, 0.8])]
    request = parse({"input": ["first", "second"]}, EMBED)
    doc = embedding_doc(vectors, encoding, order=[1, 0])
    adapter = OpenAIAdapter()
    outputs = adapter.read_response(doc, request)
    assert outputs is not None and outputs.embeddings is not None
    assert outputs.keys == [b'"second"', b'"first"']
    np.testing.assert_allclose(outputs.embeddings, [vectors[1], vectors[0]], atol=1e-7)
    outputs.embeddings = outputs.embeddings[:, ::-1].copy()
    written = adapter.write_response(doc, outputs, request)
    first = written["data"][0]["embedding"]
    if encoding == "base64":
        assert isinstance(first, str)
        decoded = np.frombuffer(base64.b64decode(first), dtype="<f4")
        np.testing.assert_allclose(decoded, [0.8, 0.6, 0.0], atol=1e-7)
    else:
        assert first == [0.8, 0.6, 0.0]
    assert [d["index"] for d in written["data"]] == [1, 0]
    assert written["usage"] == {"prompt_tokens": 2}


@pytest.mark.parametrize(
    "data",
    [
        [{"index": 0, "embedding": "not base64!"}],
        [{"index": 0, "embedding": base64.b64encode(b"abc").decode()}],  # not float32-sized
        [{"index": 0, "embedding": [1.0, 2.0]}, {"index": 1, "embedding": [1.0]}],
        [{"index": 0, "embedding": [1.0, "x"]}],
        [{"index": 0, "embedding": "AAAAAA=="}, {"index": 1, "embedding": [0.0]}],
        [],
    ],
)
def test_unreadable_embeddings_are_left_alone(data: list[Any]) -> None:
    assert OpenAIAdapter().read_response({"data": data}, parse({"input": "x"}, EMBED)) is None


logprob_numbers = st.one_of(
    st.floats(), st.integers(), st.none(), st.booleans(), st.text(max_size=2)
)
alternatives = st.lists(
    st.fixed_dictionaries(
        {"token": st.one_of(st.text(max_size=3), st.integers()), "logprob": logprob_numbers},
        optional={"bytes": json_values},
    ),
    max_size=4,
)
logprob_objects = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "content": st.one_of(
                st.none(),
                st.lists(
                    st.fixed_dictionaries(
                        {"token": st.text(max_size=3), "logprob": logprob_numbers},
                        optional={"top_logprobs": st.one_of(st.none(), alternatives, json_values)},
                    ),
                    max_size=3,
                ),
                json_values,
            ),
            "refusal": st.one_of(st.none(), json_values),
        },
    ),
    st.fixed_dictionaries(
        {
            "token_logprobs": st.one_of(st.lists(logprob_numbers, max_size=3), json_values),
        },
        optional={
            "top_logprobs": st.one_of(
                st.none(),
                st.lists(
                    st.one_of(
                        st.none(), st.dictionaries(st.text(max_size=2), logprob_numbers, max_size=3)
                    ),
                    max_size=3,
                ),
                json_values,
            )
        },
    ),
    json_values,
)
response_docs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "choices": st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "index": st.one_of(st.integers(-2, 5), json_values),
                            "logprobs": logprob_objects,
                        },
                    ),
                    max_size=3,
                ),
                json_values,
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "data": st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "index": st.one_of(st.integers(-1, 3), json_values),
                            "embedding": st.one_of(
                                st.lists(logprob_numbers, min_size=1, max_size=3),
                                st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode()),
                                json_values,
                            ),
                        }
                    ),
                    max_size=3,
                ),
                json_values,
            )
        }
    ),
)


def _finite_json(doc: Any) -> bool:
    """Whether ``doc`` has no infinite or NaN number (fields the adapter does not read,
    such as ``index``, pass through as they came)."""
    try:
        json.dumps(doc, allow_nan=False)
    except ValueError:
        return False
    return True


@FAST
@given(
    doc=response_docs,
    path=st.sampled_from([CHAT, COMPLETIONS, EMBED]),
    decimals=st.integers(0, 3),
)
@example(
    doc={"choices": [{"logprobs": {"content": [{"token": "a", "logprob": 10**400}]}}]},
    path=CHAT,
    decimals=1,
)
def test_read_and_write_response_never_raise(doc: Any, path: str, decimals: int) -> None:
    adapter = OpenAIAdapter()
    request = parse(
        {"messages": [{"role": "user", "content": "q"}], "prompt": "q", "input": ["a", "b"]}, path
    )
    outputs = adapter.read_response(doc, request)
    if outputs is None:
        return
    for seq in outputs.tokens or []:
        assert len(seq.logprobs) == len(seq.top)
    if outputs.embeddings is not None:
        assert np.isfinite(outputs.embeddings).all()
        assert len(outputs.keys) == len(outputs.embeddings)
        outputs.embeddings = outputs.embeddings * 0.5
    LogprobHygiene(1, decimals).apply(outputs, Context(b"k" * 32))
    written = adapter.write_response(doc, outputs, request)
    if outputs.tokens and _finite_json(doc):
        json.dumps(written, allow_nan=False)  # what was read was finite, so is what is written
        assert adapter.read_response(written, request) is not None  # still readable


# -- through the middleware ------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    messages: list[Message]

    def json(self) -> Any:
        return json.loads(self.body)


async def call(app: Any, path: str, body: bytes) -> Answer:
    sent: list[Message] = []
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await asyncio.sleep(3600)
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json"), (b"x-api-key", b"key-1")],
        "client": ("192.0.2.1", 1),
    }
    await app(scope, receive, send)
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    headers = dict(start["headers"])
    if b"content-length" in headers:
        assert int(headers[b"content-length"]) == len(payload)
    return Answer(start["status"], headers, payload, sent)


def answering(*chunks: bytes, content_type: bytes = b"application/json") -> Any:
    """A raw ASGI app that answers ``chunks`` as they are, one body message each."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-type", content_type)]
        if len(chunks) == 1:
            headers.append((b"content-length", str(len(chunks[0])).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, chunk in enumerate(chunks):
            more = i < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})

    return app


def shielded(app: Any, **overrides: Any) -> ExtractionShield:
    overrides.setdefault("rate_limit", "1000/second")
    return ExtractionShield(app, secret_key=SECRET, **overrides)


def run(app: Any, path: str, body: Any) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(call(app, path, raw))


def sse(*docs: Any, newline: bytes = b"\n") -> bytes:
    events = [b"data: " + json.dumps(d, ensure_ascii=False).encode() for d in docs]
    events.append(b"data: [DONE]")
    return b"".join(e + newline + newline for e in events)


def chunk_doc(content: str, top: list[dict[str, Any]] | None) -> dict[str, Any]:
    logprobs = (
        None
        if top is None
        else {"content": [chat_item(content, top[0]["logprob"], top)], "refusal": None}
    )
    choice = {
        "index": 0,
        "delta": {"content": content},
        "logprobs": logprobs,
        "finish_reason": None,
    }
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }


STREAM_DOCS = [
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    },
    chunk_doc(" café", [alt(" café", -0.4444), alt(" thé", -1.2345), alt(" ✓", -2.5678)]),
    chunk_doc(" naïve", [alt(" naïve", -0.0512), alt(" x", -3.3333), alt(" y", -4.4444)]),
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": None,
    },
]
STREAM = sse(*STREAM_DOCS)
ODD_JSON = b'{ "object" : "chat.completion",\n  "choices": [ {"index": 0, "message": {"content": "caf\\u00e9"}, "logprobs": null} ] }\n'


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        (CHAT, ODD_JSON, b"application/json"),
        (CHAT, json.dumps(CHAT_DOC, indent=2).encode(), b"application/json"),
        (
            COMPLETIONS,
            json.dumps(COMPLETION_DOC, indent=1, ensure_ascii=False).encode(),
            b"application/json",
        ),
        (
            EMBED,
            json.dumps(embedding_doc([np.array([0.6, 0.8])], "base64", [0]), indent=3).encode(),
            b"application/json",
        ),
        (CHAT, STREAM, b"text/event-stream"),
        (CHAT, b"not json at all", b"application/json"),
    ],
)
@pytest.mark.parametrize("perturbation", ["none", "logprob_hygiene:max_top=20:decimals=12"])
def test_the_shield_returns_exactly_the_apps_bytes_when_nothing_changes(
    path: str, body: bytes, content_type: bytes, perturbation: str
) -> None:
    request = (
        {"input": "x"}
        if path == EMBED
        else chat(logprobs=True)
        if path == CHAT
        else {"prompt": "p"}
    )
    answer = run(
        shielded(answering(body, content_type=content_type), perturbation=perturbation),
        path,
        request,
    )
    assert answer.status == 200
    assert answer.body == body


def test_hygiene_on_a_chat_response() -> None:
    app = shielded(answering(json.dumps(CHAT_DOC).encode()), perturbation=HYGIENE)
    doc = run(app, CHAT, chat(logprobs=True, top_logprobs=3)).json()
    assert doc["choices"][0]["logprobs"]["content"] == CHAT_HYGIENIC
    assert doc["choices"][1] == CHAT_DOC["choices"][1]
    assert doc["usage"] == CHAT_DOC["usage"]


def test_hygiene_on_a_completion_response() -> None:
    app = shielded(answering(json.dumps(COMPLETION_DOC).encode()), perturbation=HYGIENE)
    doc = run(app, COMPLETIONS, {"prompt": "p", "logprobs": 3, "echo": True}).json()
    assert doc["choices"][0]["logprobs"] == COMPLETION_HYGIENIC


def stream_events(body: bytes) -> list[Any]:
    events = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if event.startswith(b"data: "):
            payload = event[6:]
            events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return events


def test_hygiene_on_a_streamed_response() -> None:
    app = shielded(answering(STREAM, content_type=b"text/event-stream"), perturbation=HYGIENE)
    answer = run(app, CHAT, chat(logprobs=True, top_logprobs=3, stream=True))
    events = stream_events(answer.body)
    assert len(events) == 5 and events[-1] == "[DONE]"
    assert events[0] == STREAM_DOCS[0] and events[3] == STREAM_DOCS[3]
    items = [events[i]["choices"][0]["logprobs"]["content"][0] for i in (1, 2)]
    assert items[0] == chat_item(" café", -0.4, [alt(" café", -0.4), alt(" thé", -1.2)])
    assert items[1] == chat_item(" naïve", -0.1, [alt(" naïve", -0.1), alt(" x", -3.3)])
    assert events[1]["choices"][0]["delta"] == {"content": " café"}


def split_at(body: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(set(cuts)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def streamed(chunks: list[bytes]) -> bytes:
    app = shielded(answering(*chunks, content_type=b"text/event-stream"), perturbation=HYGIENE)
    return run(app, CHAT, chat(logprobs=True, stream=True)).body


STREAM_CRLF = sse(*STREAM_DOCS, newline=b"\r\n")
WHOLE = {newline: streamed([body]) for newline, body in ((b"\n", STREAM), (b"\r\n", STREAM_CRLF))}


def awkward_cuts(body: bytes) -> dict[str, list[int]]:
    second = body.index(b"data:", 10)
    return {
        "mid-line": [body.index(b"top_logprobs") + 4],
        "mid-data:": [second + 2, second + 3],
        "mid-UTF-8": [body.index(" café".encode()) + 4],  # between the two bytes of é
        "mid-UTF-8 3-byte": [body.index("✓".encode()) + 1, body.index("✓".encode()) + 2],
        "between CR and LF": [i + 1 for i in range(len(body)) if body[i : i + 1] == b"\r"][:3],
        "mid-separator": [body.index(b"\n\n") + 1]
        if b"\n\n" in body
        else [body.index(b"\r\n\r\n") + 2],
        "several events per chunk": [body.index(b"data: [DONE]")],
        "every byte": list(range(1, len(body))),
    }


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_sse_split_at_awkward_boundaries_gives_the_unsplit_result(newline: bytes) -> None:
    body = STREAM if newline == b"\n" else STREAM_CRLF
    whole = WHOLE[newline]
    assert whole != body and b"-0.4" in whole and b"-0.4444" not in whole  # processed
    assert whole.endswith(b"data: [DONE]" + newline + newline)
    assert stream_events(whole) == stream_events(WHOLE[b"\n"])
    for name, cuts in awkward_cuts(body).items():
        assert streamed(split_at(body, cuts)) == whole, name


@FAST
@given(
    newline=st.sampled_from([b"\n", b"\r\n"]),
    cuts=st.lists(st.integers(min_value=1, max_value=len(STREAM_CRLF) - 1), max_size=12),
)
def test_sse_any_split_gives_the_unsplit_result(newline: bytes, cuts: list[int]) -> None:
    body = STREAM if newline == b"\n" else STREAM_CRLF
    assert streamed(split_at(body, [c for c in cuts if c < len(body)])) == WHOLE[newline]


def test_the_stream_is_processed_event_by_event_not_buffered_whole() -> None:
    events = [e + b"\n\n" for e in STREAM.split(b"\n\n") if e]
    sent: list[Message] = []
    seen_by_app: list[bytes] = []

    def delivered() -> bytes:
        return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, event in enumerate(events):
            await send({"type": "http.response.body", "body": event, "more_body": True})
            # this event is out, processed, before the app produces the next one
            assert delivered().count(b"data:") == i + 1
            seen_by_app.append(delivered())
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def receive() -> Message:
        return {"type": "http.request", "body": json.dumps(chat(stream=True)).encode()}

    async def capture(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "headers": [],
        "client": ("192.0.2.1", 1),
    }
    asyncio.run(shielded(app, perturbation=HYGIENE)(scope, receive, capture))
    assert sent[0]["type"] == "http.response.start"
    assert len(seen_by_app) == len(events)
    assert b'"logprob":-0.4' in seen_by_app[1] and b"-0.4444" not in seen_by_app[1]
    assert delivered() == WHOLE[b"\n"]


def embedding_app(dim: int = 16) -> Any:
    """Deterministic unit embeddings per text, listed in reverse order of ``index``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = json.loads((await receive())["body"])
        texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
        vectors = []
        for text in texts:
            v = np.random.default_rng(zlib.crc32(text.encode())).normal(size=dim)
            vectors.append(v / np.linalg.norm(v))
        order = list(range(len(texts)))[::-1]
        body = json.dumps(
            embedding_doc(vectors, request.get("encoding_format", "float"), order)
        ).encode()
        await answering(body)(scope, _once(b""), send)

    return app


def _once(body: bytes) -> Receive:
    async def receive() -> Message:
        return {"type": "http.request", "body": body}

    return receive


def vectors_of(answer: Answer) -> dict[int, np.ndarray]:
    out = {}
    for item in answer.json()["data"]:
        e = item["embedding"]
        out[item["index"]] = (
            np.frombuffer(base64.b64decode(e), dtype="<f4").astype(float)
            if isinstance(e, str)
            else np.array(e)
        )
    return out


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embedding_noise_keeps_norms_and_is_keyed_by_input(encoding: str) -> None:
    plain = shielded(embedding_app())
    noisy = shielded(embedding_app(), perturbation="embedding_noise:epsilon=0.1")
    request = {"input": ["alpha", "beta"], "encoding_format": encoding}
    clean = vectors_of(run(plain, EMBED, request))
    first = run(noisy, EMBED, request)
    again = run(noisy, EMBED, request)
    alone = vectors_of(run(noisy, EMBED, {"input": ["alpha"], "encoding_format": encoding}))
    swapped = vectors_of(
        run(noisy, EMBED, {"input": ["beta", "alpha"], "encoding_format": encoding})
    )
    noised = vectors_of(first)
    tolerance = 1e-6 if encoding == "base64" else 1e-12
    assert all(
        isinstance(d["embedding"], str) == (encoding == "base64") for d in first.json()["data"]
    )
    for i in (0, 1):
        assert abs(np.linalg.norm(noised[i]) - 1.0) < tolerance  # unit norm kept
        cosine = float(noised[i] @ clean[i])
        assert 0.98 < cosine < 1 - 1e-4  # moved, a little
    assert again.body == first.body  # same input, same answer: nothing to average away
    np.testing.assert_array_equal(alone[0], noised[0])  # keyed by the input, not its position
    np.testing.assert_array_equal(swapped[1], noised[0])
    np.testing.assert_array_equal(swapped[0], noised[1])
    shift_a, shift_b = noised[0] - clean[0], noised[1] - clean[1]
    assert abs(shift_a @ shift_b) / (np.linalg.norm(shift_a) * np.linalg.norm(shift_b)) < 0.9


def echo_app() -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        length = dict(scope["headers"]).get(b"content-length", b"").decode()
        body = json.dumps({"received": message["body"].decode(), "content_length": length}).encode()
        await answering(body)(scope, _once(b""), send)

    return app


@pytest.mark.parametrize(
    ("path", "sent", "received"),
    [
        (CHAT, chat(logprobs=True, top_logprobs=15, n=2), chat(logprobs=True, top_logprobs=5, n=2)),
        (
            CHAT,
            chat(logit_bias={"7": 50}, logprobs=True, top_logprobs=2),
            chat(logit_bias={"7": 50}),
        ),
        (COMPLETIONS, {"prompt": "é", "logprobs": 12}, {"prompt": "é", "logprobs": 5}),
        (
            COMPLETIONS,
            {"prompt": "é", "logit_bias": {"7": 1}, "logprobs": 1},
            {"prompt": "é", "logit_bias": {"7": 1}},
        ),
    ],
)
def test_the_app_receives_the_hardened_body(path: str, sent: Any, received: Any) -> None:
    answer = run(shielded(echo_app()), path, sent).json()
    got = answer["received"].encode()
    assert json.loads(got) == received
    assert answer["content_length"] == str(len(got))


def test_an_unhardened_body_reaches_the_app_byte_for_byte() -> None:
    raw = (
        b'{"messages": [{"role": "user", "content": "hi"}],   "logprobs": true, "top_logprobs": 2}'
    )
    answer = run(shielded(echo_app()), CHAT, raw).json()
    assert answer["received"].encode() == raw


def test_refusals_are_400_problems_and_never_reach_the_app() -> None:
    calls = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["path"])
        await answering(b"{}")(scope, receive, send)

    too_many = run(shielded(app), CHAT, chat(logit_bias={str(i): 1 for i in range(60)}))
    assert too_many.status == 400
    assert too_many.headers[b"content-type"] == b"application/problem+json"
    assert "60 entries" in too_many.json()["detail"]
    rejected = run(
        shielded(app, openai={"logit_bias_with_logprobs": "reject"}),
        CHAT,
        chat(logit_bias={"1": 1}, logprobs=True),
    )
    assert rejected.status == 400 and "logit_bias" in rejected.json()["detail"]
    assert calls == []
    shadow = run(
        shielded(app, mode="shadow"), CHAT, chat(logit_bias={str(i): 1 for i in range(60)})
    )
    assert shadow.status == 200 and calls == [CHAT]  # shadow mode refuses nothing


@pytest.mark.parametrize(
    ("path", "body", "cost"),
    [
        (CHAT, chat(n=3, logprobs=True), 6),  # 1 conversation x n=3 x distribution cost 2
        (COMPLETIONS, {"prompt": ["a", "b"], "n": 2}, 4),
        (EMBED, {"input": ["a", "b", "c"]}, 3),
    ],
)
def test_the_limiter_is_charged_the_cost(path: str, body: Any, cost: int) -> None:
    answer = run(shielded(echo_app(), rate_limit="10/minute"), path, body)
    assert answer.status == 200
    assert answer.headers[b"ratelimit"].startswith(b'"default";r=%d;' % (10 - cost))
