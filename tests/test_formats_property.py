"""Hostile and random JSON never crashes an adapter, and never corrupts a response."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.types import Message, Receive, Scope, Send

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.formats import build_adapter
from asgi_extraction_shield.formats.generic import GenericJSON
from asgi_extraction_shield.formats.hf import HuggingFace
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.formats.oip_v2 import OpenInferenceV2
from asgi_extraction_shield.settings import GenericSettings, ShieldSettings

from .conftest import SECRET

numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=40,
)
# Payload-shaped documents, so that the adapters get past their first checks.
prob_rows = st.lists(
    st.lists(st.floats(min_value=0, max_value=1), min_size=2, max_size=4).map(
        lambda r: [v / sum(r) for v in r] if sum(r) > 0 else r
    ),
    min_size=1,
    max_size=4,
)
shaped = st.one_of(
    st.fixed_dictionaries({"instances": st.lists(json_values, max_size=4)}),
    st.fixed_dictionaries({"predictions": st.one_of(prob_rows, st.lists(json_values, max_size=4))}),
    st.fixed_dictionaries(
        {
            "inputs": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.text(max_size=3),
                        "shape": st.lists(st.integers(-2, 4), max_size=3),
                        "datatype": st.sampled_from(["FP32", "BYTES", "INT8", "x"]),
                        "data": json_values,
                    }
                ),
                max_size=3,
            )
        }
    ),
    st.fixed_dictionaries(
        {
            "outputs": st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.sampled_from(["p", "embedding"]),
                        "shape": st.lists(st.integers(0, 4), max_size=3),
                        "datatype": st.just("FP32"),
                        "data": st.one_of(json_values, prob_rows),
                    }
                ),
                max_size=3,
            )
        }
    ),
    st.lists(
        st.lists(
            st.fixed_dictionaries({"label": st.text(max_size=3), "score": numbers}), max_size=3
        ),
        max_size=3,
    ),
    json_values,
)
ADAPTERS = [
    KServeV1(),
    OpenInferenceV2(),
    HuggingFace(),
    GenericJSON(GenericSettings(inputs="instances", outputs="predictions")),
]
SCOPE: dict[str, Any] = {"type": "http", "path": "/v1/models/m:predict", "headers": []}
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # NaN/Infinity written as the non-standard literals


@FAST
@given(request=shaped, response=shaped)
@example(
    request={"inputs": ["a"]},
    response=[{"label": "a", "score": 10**400}, {"label": "b", "score": 0.5}],
)
@example(request={"instances": [[10**400]]}, response={"predictions": [[10**400, 1]]})
def test_adapters_never_raise(request: Any, response: Any) -> None:
    for adapter in ADAPTERS:
        parsed = adapter.parse_request(SCOPE, request, dumps(request))
        assert parsed.cost >= 1 if parsed.parsed else parsed.problem
        outputs = adapter.read_response(response, parsed)
        if outputs is None:
            continue
        for kind in ("probabilities", "scores", "embeddings"):
            values = getattr(outputs, kind)
            assert values is None or np.isfinite(values).all()
        written = adapter.write_response(json.loads(dumps(response)), outputs, parsed)
        json.dumps(written, allow_nan=False)


@FAST
@given(body=st.one_of(shaped.map(dumps), st.binary(max_size=64)))
def test_payload_adapter_never_raises(body: bytes) -> None:
    adapter = build_adapter(ShieldSettings())
    parsed = adapter.parse_request(SCOPE, body)
    assert parsed.cost >= 1


def app_answering(body: bytes) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def call(app: Any, body: bytes) -> tuple[int, bytes]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = dict(SCOPE, headers=[(b"x-api-key", b"k")], client=("192.0.2.1", 1), method="POST")
    await app(scope, receive, send)
    start = sent[0]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    length = dict(start["headers"]).get(b"content-length")
    assert length is None or int(length) == len(payload)
    return start["status"], payload


@FAST
@given(
    request=shaped,
    response=shaped,
    chain=st.sampled_from(
        [
            "label_only",
            "top_k:1,round:2",
            "reverse_sigmoid:guard_top1=true",
            "poison",
            "misinformation,embedding_noise:0.1",
        ]
    ),
)
def test_shield_never_breaks_or_corrupts_a_response(
    request: Any, response: Any, chain: str
) -> None:
    answer = dumps(response)
    app = ExtractionShield(
        app_answering(answer), secret_key=SECRET, perturbation=chain, rate_limit="1000000/second"
    )
    status, payload = asyncio.run(call(app, dumps(request)))
    assert status == 200
    if payload != answer:  # rewritten: valid JSON, same top-level shape
        rewritten = json.loads(payload)
        assert type(rewritten) is type(json.loads(answer))


@FAST
@given(
    rows=st.one_of(
        prob_rows, st.lists(st.lists(numbers, min_size=1, max_size=5), min_size=1, max_size=8)
    )
)
def test_few_rows_fast_path_agrees_with_numpy(rows: list[list[Any]]) -> None:
    from asgi_extraction_shield.formats.base import numeric_matrix, probability_rows

    fast = probability_rows(rows)
    matrix = numeric_matrix(rows)
    slow = (
        matrix
        if matrix is not None
        and matrix.shape[1] >= 2
        and matrix.min() >= 0
        and np.abs(matrix.sum(axis=1) - 1).max() <= 1e-3
        else None
    )
    assert (fast is None) == (slow is None)
    if fast is not None and slow is not None:
        np.testing.assert_array_equal(fast, slow)
