"""KServe v1, Open Inference Protocol v2, Hugging Face and generic JSON adapters."""

from __future__ import annotations

import gzip
import json
from typing import Any

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_extraction_shield.formats import PayloadAdapter, build_adapter
from asgi_extraction_shield.formats.base import PROBABILITIES, ParsedRequest
from asgi_extraction_shield.formats.generic import GenericJSON
from asgi_extraction_shield.formats.hf import HuggingFace
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.formats.oip_v2 import OpenInferenceV2
from asgi_extraction_shield.settings import GenericSettings, ShieldSettings

from .conftest import FakeClock, client, shield

pytestmark = pytest.mark.anyio

SCOPE: dict[str, Any] = {"type": "http", "path": "/", "headers": []}


def softmax_rows(x: np.ndarray) -> list[list[float]]:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).tolist()


# -- a model app speaking the three formats --------------------------------------------------

W = np.random.default_rng(7).normal(size=(4, 5))


async def kserve(request: Request) -> JSONResponse:
    rows = np.asarray((await request.json())["instances"], dtype=float)
    return JSONResponse({"predictions": softmax_rows(rows @ W), "model_version": "3"})


async def kserve_named(request: Request) -> JSONResponse:
    rows = np.asarray((await request.json())["instances"], dtype=float)
    probs = softmax_rows(rows @ W)
    return JSONResponse(
        {
            "predictions": [
                {"probabilities": p, "class_ids": [int(np.argmax(p))], "note": "x"} for p in probs
            ]
        }
    )


async def oip(request: Request) -> JSONResponse:
    doc = await request.json()
    tensor = doc["inputs"][0]
    rows = np.asarray(tensor["data"], dtype=float).reshape(tensor["shape"])
    probs = np.asarray(softmax_rows(rows @ W))
    return JSONResponse(
        {
            "model_name": "m",
            "id": doc.get("id"),
            "outputs": [
                {
                    "name": "probabilities",
                    "shape": list(probs.shape),
                    "datatype": "FP32",
                    "data": probs.ravel().tolist(),
                },
                {
                    "name": "label",
                    "shape": [len(probs)],
                    "datatype": "INT64",
                    "data": probs.argmax(1).tolist(),
                },
            ],
        }
    )


async def hf(request: Request) -> JSONResponse:
    doc = await request.json()
    texts = doc["inputs"] if isinstance(doc["inputs"], list) else [doc["inputs"]]
    out = []
    for text in texts:
        scores = softmax_rows(np.asarray([[len(text) % 3, 1.0, 0.5]]))[0]
        entries = [
            {"label": label, "score": s}
            for label, s in zip(["NEG", "NEU", "POS"], scores, strict=True)
        ]
        out.append(sorted(entries, key=lambda e: -e["score"]))
    return JSONResponse(out if isinstance(doc["inputs"], list) else out[0])


async def gzipped(request: Request) -> Response:
    body = gzip.compress(json.dumps({"predictions": [[0.2, 0.8]]}).encode())
    return Response(body, media_type="application/json", headers={"content-encoding": "gzip"})


async def not_json(request: Request) -> Response:
    return Response(b"predictions: 0.2 0.8", media_type="text/plain")


async def nan(request: Request) -> Response:
    return Response(b'{"predictions": [[NaN, 0.5]]}', media_type="application/json")


APP = Starlette(
    routes=[
        Route("/v1/models/m:predict", kserve, methods=["POST"]),
        Route("/v1/models/named:predict", kserve_named, methods=["POST"]),
        Route("/v2/models/m/infer", oip, methods=["POST"]),
        Route("/hf", hf, methods=["POST"]),
        Route("/v1/models/gz:predict", gzipped, methods=["POST"]),
        Route("/v1/models/text:predict", not_json, methods=["POST"]),
        Route("/v1/models/nan:predict", nan, methods=["POST"]),
    ]
)
ROWS = np.random.default_rng(1).normal(size=(6, 4)).round(3).tolist()


# -- auto detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "doc", "expected"),
    [
        ("/v1/models/m:predict", {"instances": [[1, 2]]}, "kserve_v1"),
        ("/predict", {"instances": [[1, 2]]}, "kserve_v1"),
        ("/v1/models/m:predict", {"inputs": [[1, 2]]}, "kserve_v1"),
        ("/v2/models/m/infer", {"inputs": []}, "oip_v2"),
        (
            "/infer",
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
            "oip_v2",
        ),
        ("/models/sentiment", {"inputs": "I love it"}, "hf"),
        ("/models/sentiment", {"inputs": ["a", "b"]}, "hf"),
        ("/other", {"rows": [1]}, None),
        ("/other", [1, 2], None),
    ],
)
def test_auto_detection(path: str, doc: Any, expected: str | None) -> None:
    adapter = build_adapter(ShieldSettings())
    assert isinstance(adapter, PayloadAdapter)
    chosen = adapter.choose({"path": path}, doc)
    assert (chosen.name if chosen else None) == expected


def test_forced_format_and_unparsed_bodies() -> None:
    adapter = build_adapter(ShieldSettings(format="kserve_v1"))
    assert isinstance(adapter, PayloadAdapter)
    assert adapter.choose({"path": "/anything"}, {"inputs": "text"}).name == "kserve_v1"  # type: ignore[union-attr]
    for body in (b"not json", b"{bad", b'"just a string"', b"[1,2", b"{}", b'{"instances": 5}'):
        parsed = adapter.parse_request({"path": "/x", "headers": []}, body)
        assert not parsed.parsed and parsed.problem and parsed.cost == 1
    empty = adapter.parse_request({"path": "/x", "headers": []}, b"  ")
    assert not empty.parsed and empty.problem is None  # no payload is not a bad payload
    none = build_adapter(ShieldSettings(format="none"))
    assert none.parse_request(SCOPE, b'{"instances": [[1], [2]]}').cost == 1


def test_distribution_cost_multiplier() -> None:
    adapter = build_adapter(ShieldSettings(distribution_cost=3.0))
    body = json.dumps({"inputs": ["a", "b"], "parameters": {"top_k": None}}).encode()
    parsed = adapter.parse_request({"path": "/hf", "headers": []}, body)
    assert PROBABILITIES in parsed.flags and parsed.cost == 6


# -- KServe v1 ------------------------------------------------------------------------------


def test_kserve_v1_request() -> None:
    a = KServeV1()
    rows = a.parse_request(SCOPE, {"instances": [[1.0, 2.0], [3.0, 4.5]]}, b"")
    assert rows.parsed and rows.cost == 2 and rows.features is not None
    assert rows.features.tolist() == [[1.0, 2.0], [3.0, 4.5]] and len(set(rows.keys)) == 2
    images = a.parse_request(SCOPE, {"instances": [[[1, 2], [3, 4]]]}, b"")
    assert images.features is not None and images.features.shape == (1, 4)
    columnar = a.parse_request(SCOPE, {"inputs": {"a": [1, 2, 3], "b": ["x", "y", "z"]}}, b"")
    assert columnar.cost == 3 and columnar.inputs[1] == {"a": 2, "b": "y"}
    texts = a.parse_request(SCOPE, {"instances": ["good", "bad"]}, b"")
    assert texts.texts == ["good", "bad"] and texts.features is None
    for bad in (
        {"instances": []},
        {"instances": "x"},
        [1],
        {"other": 1},
        {"inputs": {"a": [1], "b": [1, 2]}},
    ):
        assert not a.parse_request(SCOPE, bad, b"").parsed
    ragged = a.parse_request(SCOPE, {"instances": [[1, 2], [3]]}, b"")
    assert ragged.parsed and ragged.features is None


def test_kserve_v1_response_kinds() -> None:
    a = KServeV1()
    req = a.parse_request(SCOPE, {"instances": [[1], [2]]}, b"")
    probs = a.read_response({"predictions": [[0.3, 0.7], [0.5, 0.5]]}, req)
    assert probs is not None and probs.probabilities is not None and probs.keys == req.keys
    scores = a.read_response({"predictions": [[3.0, -1.0], [0.2, 9.0]]}, req)
    assert scores is not None and scores.scores is not None and scores.probabilities is None
    labels = a.read_response({"predictions": [1, 0]}, req)
    assert labels is not None and labels.labels is not None and labels.labels.tolist() == [1, 0]
    for doc in (
        {"predictions": []},
        {"predictions": [[1, "x"]]},
        {"foo": 1},
        [],
        {"predictions": [True, False]},
    ):
        assert a.read_response(doc, req) is None


async def test_kserve_v1_passthrough_is_byte_exact(clock: FakeClock) -> None:
    bare, shielded = client(APP), client(shield(APP, clock))
    async with bare as b, shielded as s:
        expected = await b.post("/v1/models/m:predict", json={"instances": ROWS})
        got = await s.post("/v1/models/m:predict", json={"instances": ROWS})
    assert got.content == expected.content


@pytest.mark.parametrize(
    ("chain", "check"),
    [
        ("label_only", lambda p, q: np.array_equal(q, np.eye(5)[p.argmax(1)])),
        ("top_k:2", lambda p, q: ((q > 0).sum(1) == 2).all()),
        ("round:2", lambda p, q: np.allclose(q * 100, np.round(q * 100))),
        (
            "reverse_sigmoid:beta=1:gamma=0.2:guard_top1=true",
            lambda p, q: (q.argmax(1) == p.argmax(1)).all(),
        ),
        ("poison:alpha=0.5:epsilon=0.3", lambda p, q: (np.abs(q - p).sum(1) <= 0.3 + 1e-9).all()),
    ],
)
async def test_kserve_v1_perturbed(clock: FakeClock, chain: str, check: Any) -> None:
    async with client(APP) as bare, client(shield(APP, clock, perturbation=chain)) as shielded:
        original = (await bare.post("/v1/models/m:predict", json={"instances": ROWS})).json()
        r = await shielded.post("/v1/models/m:predict", json={"instances": ROWS})
    doc = r.json()
    assert r.headers["content-length"] == str(len(r.content))
    assert doc["model_version"] == "3"  # other fields untouched
    p, q = np.asarray(original["predictions"]), np.asarray(doc["predictions"])
    assert q.shape == p.shape and (q >= 0).all() and np.allclose(q.sum(1), 1, atol=1e-6)
    assert not np.array_equal(p, q) and check(p, q)


async def test_keyed_perturbation_is_deterministic_per_query(clock: FakeClock) -> None:
    app = shield(APP, clock, perturbation="poison:alpha=0.9:epsilon=0.5")
    async with client(app) as c:
        first = (await c.post("/v1/models/m:predict", json={"instances": ROWS})).json()
        again = (await c.post("/v1/models/m:predict", json={"instances": ROWS})).json()
        alone = (await c.post("/v1/models/m:predict", json={"instances": ROWS[2:3]})).json()
    assert first == again  # averaging repeats gains nothing
    assert alone["predictions"][0] == first["predictions"][2]  # keyed by the query, not the batch
    other = shield(
        APP,
        clock,
        perturbation="poison:alpha=0.9:epsilon=0.5",
        secret_key="another-secret-key-abcdef",
    )
    async with client(other) as c:
        different = (await c.post("/v1/models/m:predict", json={"instances": ROWS})).json()
    assert different != first


async def test_kserve_v1_named_outputs_keep_class_ids_consistent(clock: FakeClock) -> None:
    rows = [[0.01, 0.0, 0.0, 0.0]] * 3
    app = shield(APP, clock, perturbation="misinformation:tau=1:nu=50")
    async with client(app) as c:
        doc = (await c.post("/v1/models/named:predict", json={"instances": rows})).json()
    for prediction in doc["predictions"]:
        assert prediction["note"] == "x"
        assert prediction["class_ids"] == [int(np.argmax(prediction["probabilities"]))]
        assert abs(sum(prediction["probabilities"]) - 1) < 1e-6


@pytest.mark.parametrize(
    "path", ["/v1/models/gz:predict", "/v1/models/text:predict", "/v1/models/nan:predict"]
)
async def test_unparseable_responses_pass_unchanged(clock: FakeClock, path: str) -> None:
    async with client(APP) as bare, client(shield(APP, clock, perturbation="label_only")) as s:
        expected = await bare.post(path, json={"instances": [[1, 2, 3, 4]]})
        got = await s.post(path, json={"instances": [[1, 2, 3, 4]]})
    assert got.status_code == 200 and got.content == expected.content


async def test_gzip_outside_the_shield_still_gets_perturbed_bodies(clock: FakeClock) -> None:
    inner = shield(APP, clock, perturbation="label_only")
    app = Starlette(routes=[], middleware=[Middleware(GZipMiddleware, minimum_size=1)])
    app.mount("/", inner)
    async with client(app) as c:
        r = await c.post(
            "/v1/models/m:predict", json={"instances": ROWS}, headers={"accept-encoding": "gzip"}
        )
    assert r.headers["content-encoding"] == "gzip"
    assert all(sorted(row) == [0, 0, 0, 0, 1] for row in r.json()["predictions"])


async def test_strict_mode_refuses_unparseable_requests(clock: FakeClock) -> None:
    received: list[bytes] = []

    async def echo(request: Request) -> Response:
        received.append(await request.body())
        return Response(b"ok")

    inner = Starlette(routes=[Route("/v1/models/m:predict", echo, methods=["POST"])])
    async with (
        client(shield(inner, clock)) as lenient,
        client(shield(inner, clock, strict=True)) as strict,
    ):
        passed = await lenient.post("/v1/models/m:predict", content=b"{not json")
        refused = await strict.post("/v1/models/m:predict", content=b"{not json")
        fine = await strict.post("/v1/models/m:predict", json={"instances": [[1]]})
    assert passed.status_code == 200 and received[0] == b"{not json"
    assert (
        refused.status_code == 400 and refused.headers["content-type"] == "application/problem+json"
    )
    assert "not valid JSON" in refused.json()["detail"]
    assert fine.status_code == 200 and len(received) == 2


async def test_cost_is_one_token_per_instance(clock: FakeClock) -> None:
    app = shield(APP, clock, rate_limit="10/minute")
    async with client(app) as c:
        r = await c.post("/v1/models/m:predict", json={"instances": ROWS})  # 6 rows
        assert r.headers["ratelimit"].startswith('"default";r=4;')
        over = await c.post("/v1/models/m:predict", json={"instances": ROWS})
    assert over.status_code == 429


# -- Open Inference Protocol v2 -------------------------------------------------------------


def tensor(
    name: str, rows: list[list[float]], nested: bool = False, datatype: str = "FP32"
) -> dict[str, Any]:
    data: Any = rows if nested else [v for row in rows for v in row]
    return {"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype, "data": data}


def test_oip_v2_request() -> None:
    a = OpenInferenceV2()
    flat = a.parse_request(SCOPE, {"inputs": [tensor("x", ROWS)]}, b"")
    nested = a.parse_request(SCOPE, {"inputs": [tensor("x", ROWS, nested=True)]}, b"")
    assert flat.cost == 6 and flat.features is not None and flat.features.shape == (6, 4)
    assert flat.keys == nested.keys  # flat and nested data are the same query
    two = a.parse_request(
        SCOPE,
        {
            "inputs": [
                tensor("x", ROWS),
                {"name": "t", "shape": [6], "datatype": "BYTES", "data": list("abcdef")},
            ]
        },
        b"",
    )
    assert two.cost == 6 and two.texts == list("abcdef") and two.features is not None
    assert two.features.shape == (6, 4)
    for bad in (
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]},
        {"inputs": [tensor("x", ROWS), tensor("y", ROWS[:2])]},
        {"inputs": []},
        {"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]},
        {"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]},
        {"inputs": [{"name": "x", "shape": [0, 3], "datatype": "FP32", "data": []}]},
    ):
        assert not a.parse_request(SCOPE, bad, b"").parsed


@pytest.mark.parametrize("nested", [False, True])
def test_oip_v2_response_round_trip(nested: bool) -> None:
    a = OpenInferenceV2()
    req = a.parse_request(SCOPE, {"inputs": [tensor("x", ROWS[:2])]}, b"")
    probs = [[0.2, 0.8], [0.6, 0.4]]
    doc = {
        "outputs": [
            {"name": "ids", "shape": [2], "datatype": "INT64", "data": [1, 0]},
            tensor("probs", probs, nested),
            tensor("text_embedding", [[0.5, 0.1, 0.2], [0.3, 0.3, 0.3]], nested),
        ]
    }
    outputs = a.read_response(doc, req)
    assert (
        outputs is not None and outputs.probabilities is not None and outputs.embeddings is not None
    )
    outputs.probabilities = np.asarray([[0.0, 1.0], [1.0, 0.0]])
    written = a.write_response(json.loads(json.dumps(doc)), outputs, req)
    expected = [[0.0, 1.0], [1.0, 0.0]] if nested else [0.0, 1.0, 1.0, 0.0]
    assert written["outputs"][1]["data"] == expected
    assert written["outputs"][1]["shape"] == [2, 2] and written["outputs"][1]["datatype"] == "FP32"
    assert written["outputs"][0] == doc["outputs"][0]


async def test_oip_v2_through_the_shield(clock: FakeClock) -> None:
    body = {"id": "req-1", "inputs": [tensor("x", ROWS)]}
    async with client(APP) as bare, client(shield(APP, clock, perturbation="top_k:1")) as s:
        original = (await bare.post("/v2/models/m/infer", json=body)).json()
        doc = (await s.post("/v2/models/m/infer", json=body)).json()
    p = np.asarray(original["outputs"][0]["data"]).reshape(6, 5)
    q = np.asarray(doc["outputs"][0]["data"]).reshape(6, 5)
    assert np.array_equal(q, np.eye(5)[p.argmax(1)])
    assert doc["outputs"][1] == original["outputs"][1] and doc["id"] == "req-1"


# -- Hugging Face ---------------------------------------------------------------------------


def test_hf_request() -> None:
    a = HuggingFace()
    one = a.parse_request(SCOPE, {"inputs": "great movie"}, b"")
    many = a.parse_request(SCOPE, {"inputs": ["a", "b", "c"], "parameters": {"top_k": 3}}, b"")
    assert one.cost == 1 and one.texts == ["great movie"] and not one.flags
    assert many.cost == 3 and PROBABILITIES in many.flags
    assert not a.parse_request(SCOPE, {"text": "x"}, b"").parsed
    assert not a.parse_request(SCOPE, {"inputs": []}, b"").parsed


def test_hf_response_kinds() -> None:
    a = HuggingFace()
    req = a.parse_request(SCOPE, {"inputs": ["a", "b"]}, b"")
    full = [
        [{"label": "POS", "score": 0.7}, {"label": "NEG", "score": 0.3}],
        [{"label": "NEG", "score": 0.9}, {"label": "POS", "score": 0.1}],
    ]
    outputs = a.read_response(full, req)
    assert outputs is not None and outputs.probabilities is not None
    assert outputs.probabilities.tolist() == [[0.3, 0.7], [0.9, 0.1]]  # columns by label
    top1 = a.read_response(
        [[{"label": "POS", "score": 0.7}], [{"label": "POS", "score": 0.9}]], req
    )
    assert top1 is not None and top1.scores is not None and top1.probabilities is None
    mismatched = [[{"label": "POS", "score": 1.0}], [{"label": "NEG", "score": 1.0}]]
    assert a.read_response(mismatched, req) is None
    embeddings = a.read_response([[0.1, 0.2], [0.3, 0.4]], req)
    assert embeddings is not None and embeddings.embeddings is not None


async def test_hf_through_the_shield_sorted_and_fields_kept(clock: FakeClock) -> None:
    app = shield(APP, clock, perturbation="label_only")
    async with client(app) as c:
        single = (await c.post("/hf", json={"inputs": "abcd"})).json()
        batch = (await c.post("/hf", json={"inputs": ["a", "bb", "ccc"]})).json()
    assert [e["score"] for e in single] == [1.0, 0.0, 0.0]
    assert {e["label"] for e in single} == {"NEG", "NEU", "POS"}
    assert len(batch) == 3 and all([e["score"] for e in row] == [1.0, 0.0, 0.0] for row in batch)


# -- generic JSON ---------------------------------------------------------------------------


def test_generic_paths() -> None:
    a = GenericJSON(GenericSettings(inputs="data.rows", outputs="result.0.scores"))
    req = a.parse_request(SCOPE, {"data": {"rows": [[1, 2], [3, 4]]}}, b"")
    assert req.parsed and req.cost == 2
    doc = {"result": [{"scores": [[0.25, 0.75], [0.5, 0.5]]}], "meta": 1}
    outputs = a.read_response(doc, req)
    assert outputs is not None and outputs.probabilities is not None
    outputs.probabilities = np.asarray([[0.0, 1.0], [1.0, 0.0]])
    written = a.write_response(doc, outputs, req)
    assert written["result"][0]["scores"] == [[0.0, 1.0], [1.0, 0.0]] and written["meta"] == 1
    assert not a.parse_request(SCOPE, {"data": {}}, b"").parsed
    forced = GenericJSON(GenericSettings(outputs="out", output_kind="embeddings"))
    emb = forced.read_response({"out": [[0.1, 0.2]]}, ParsedRequest())
    assert emb is not None and emb.embeddings is not None
    strict = GenericJSON(GenericSettings(outputs="out", output_kind="probabilities"))
    assert strict.read_response({"out": [[3.0, 4.0]]}, ParsedRequest()) is None
