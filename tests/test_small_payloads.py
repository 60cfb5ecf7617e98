"""Small payloads (one online request and its answer) take plain-Python paths where
numpy's cost per call would dominate: keying the query, rounding on the simplex, reverse
sigmoid, comparing rows, reading and writing probability rows. Each must give exactly what
the general path gives, to the last bit and byte, so that keys and answers do not change
with the size of the batch they came in."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.formats import base
from asgi_extraction_shield.formats.base import (
    canonical_keys,
    numeric_rows,
    probability_rows,
    write_like,
)
from asgi_extraction_shield.postprocess import chain, perturb

from .conftest import SECRET, client

EXAMPLES = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call after this takes the numpy path, whatever the size of its rows."""
    monkeypatch.setattr(perturb, "SMALL", -1)


# Values where rounding is delicate: exact ties at every number of decimals, zeros of
# both signs, the smallest floats, and shares that plain rounding pushes off the simplex.
TIES = [0.0, -0.0, 0.5, 0.25, 0.125, 0.0625, 0.05, 0.005, 0.0005, 1 / 3, 2 / 3, 0.1, 5e-324]


@st.composite
def small_matrices(draw: st.DrawFn) -> np.ndarray:
    k = draw(st.integers(1, perturb.SMALL))
    n = draw(st.integers(1, perturb.SMALL // k))
    element = st.sampled_from(TIES) | st.floats(0, 1) | st.integers(0, 40).map(lambda i: i / 40)
    rows = draw(st.lists(st.lists(element, min_size=k, max_size=k), min_size=n, max_size=n))
    p = np.array(rows, dtype=np.float64)
    if draw(st.booleans()):  # on the simplex, as answers are
        totals = p.sum(axis=1, keepdims=True)
        p = np.divide(p, totals, out=np.full_like(p, 1.0 / k), where=totals > 0)
    return p


def numpy_path(p: np.ndarray, decimals: int) -> np.ndarray:
    saved = perturb.SMALL
    perturb.SMALL = -1
    try:
        return perturb.round_simplex(p, decimals)
    finally:
        perturb.SMALL = saved


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()  # signs of zeros and NaN payloads included


@EXAMPLES
@given(p=small_matrices(), decimals=st.integers(0, 9))
@example(p=np.array([[0.25, 0.25, 0.5]]), decimals=1)  # one unit short, tied remainders
@example(p=np.array([[0.16, 0.16, 0.16, 0.16, 0.36]]), decimals=1)  # two units over
@example(p=np.array([[-0.0, 1.0]]), decimals=3)  # a negative zero stays one
@example(p=np.array([[1 / 3] * 3] * 2), decimals=3)  # the three thirds, twice
def test_round_simplex_small_path_is_the_numpy_path(p: np.ndarray, decimals: int) -> None:
    assert_same_bits(perturb.round_simplex(p, decimals), numpy_path(p, decimals))


@EXAMPLES
@given(
    rows=st.lists(
        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3),
        min_size=1,
        max_size=3,
    ),
    decimals=st.integers(0, 6),
)
def test_round_simplex_off_the_simplex_is_the_numpy_path(
    rows: list[list[float]], decimals: int
) -> None:
    """Any floats at all (NaN, infinities, huge and negative values): the small path hands
    what it cannot promise to numpy, so the result is numpy's either way."""
    p = np.array(rows, dtype=np.float64)
    with np.errstate(all="ignore"):
        assert_same_bits(perturb.round_simplex(p, decimals), numpy_path(p, decimals))


def numpy_reverse_sigmoid(p: np.ndarray, *args: Any) -> np.ndarray:
    saved = perturb.SMALL
    perturb.SMALL = -1
    try:
        return perturb.reverse_sigmoid(p, *args)
    finally:
        perturb.SMALL = saved


@EXAMPLES
@given(
    p=small_matrices(),
    beta=st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 4),
    gamma=st.sampled_from([0.1, 0.2, 0.5, 1.0, 2.0]) | st.floats(0.01, 5),
    guard=st.booleans(),
)
@example(p=np.array([[0.5, 0.5]]), beta=1.0, gamma=0.2, guard=True)  # a flat row
@example(p=np.array([[-0.0, 1.0]]), beta=1.0, gamma=0.1, guard=False)
def test_reverse_sigmoid_small_path_is_the_numpy_path(
    p: np.ndarray, beta: float, gamma: float, guard: bool
) -> None:
    assert_same_bits(
        perturb.reverse_sigmoid(p, beta, gamma, guard), numpy_reverse_sigmoid(p, beta, gamma, guard)
    )


def test_reverse_sigmoid_guard_restores_flipped_rows_on_both_paths() -> None:
    # Rows whose top class reverse sigmoid moves (a near tie at the top, many classes).
    p = np.random.default_rng(5).dirichlet(np.full(8, 0.2), size=8)
    p[:, 1] = p[:, 0] * (1 - 1e-12)
    p /= p.sum(axis=1, keepdims=True)
    unguarded = perturb.reverse_sigmoid(p, 1.0, 0.5, False)
    assert (unguarded.argmax(axis=1) != p.argmax(axis=1)).any()  # the guard has work to do
    guarded = perturb.reverse_sigmoid(p, 1.0, 0.5, True)
    np.testing.assert_array_equal(guarded.argmax(axis=1), p.argmax(axis=1))
    assert_same_bits(guarded, numpy_reverse_sigmoid(p, 1.0, 0.5, True))


@pytest.mark.parametrize("width", [1, 7, 8, 9, 16, 17, 64, 100, 128])
def test_row_sums_are_numpy_sums(width: int) -> None:
    rng = np.random.default_rng(width)
    rows = rng.dirichlet(np.full(width, 0.3), size=200) * 10.0 ** rng.integers(-3, 7, (200, 1))
    sums = rows.sum(axis=1)
    for row, total in zip(rows.tolist(), sums.tolist(), strict=True):
        assert perturb._numpy_sum(row) == total


def test_round_simplex_layouts_and_sizes_beyond_the_small_path() -> None:
    p = np.random.default_rng(3).dirichlet(np.ones(10), size=8)  # 80 entries: numpy
    assert_same_bits(perturb.round_simplex(p, 2), numpy_path(p, 2))
    transposed = np.asfortranarray(p[:3])  # not C-contiguous: numpy (its sums differ)
    assert_same_bits(perturb.round_simplex(transposed, 2), numpy_path(transposed, 2))
    assert perturb.round_simplex(np.zeros((0, 4)), 3).shape == (0, 4)


@EXAMPLES
@given(p=small_matrices(), decimals=st.integers(0, 4))
def test_changed_small_path_is_the_numpy_path(p: np.ndarray, decimals: int) -> None:
    q = perturb.round_simplex(p, decimals)
    fast = (chain._changed(p, q), chain._changed(p, p.copy()), chain._changed(q, p))
    assert fast == (
        bool((p != q).any()),
        False,
        bool((q != p).any()),
    )
    nan = p.copy()
    nan[0, 0] = math.nan
    assert chain._changed(nan, nan.copy()) is True  # NaN differs from itself, as in numpy


def reference_write_like(original: list[Any], values: np.ndarray) -> list[Any]:
    """write_like's rule, value by value: ints stay ints while integral, all else floats."""
    return [
        [
            int(v) if isinstance(o, int) and float(v).is_integer() else float(v)
            for o, v in zip(row_in, row_out, strict=True)
        ]
        for row_in, row_out in zip(original, values.tolist(), strict=True)
    ]


json_numbers = st.floats(0, 1) | st.integers(0, 3) | st.sampled_from([0.0, -0.0, 1.0, 2.5])


@EXAMPLES
@given(
    rows=st.integers(1, 6).flatmap(
        lambda k: st.lists(st.lists(json_numbers, min_size=k, max_size=k), min_size=1, max_size=4)
    ),
    decimals=st.integers(0, 3),
)
def test_write_like_keeps_json_types_as_the_general_rule(
    rows: list[list[Any]], decimals: int
) -> None:
    values = np.round(np.array(rows, dtype=np.float64), decimals)
    written = write_like(rows, values)
    assert orjson.dumps(written) == orjson.dumps(reference_write_like(rows, values))
    assert [[type(v) for v in row] for row in written] == [
        [type(v) for v in row] for row in reference_write_like(rows, values)
    ]


def test_write_like_rows_of_another_width_still_fail() -> None:
    with pytest.raises(ValueError):
        write_like([[0.5, 0.5]], np.array([[0.2, 0.3, 0.5]]))


@pytest.mark.parametrize(
    ("rows", "accepted"),
    [
        ([[0.25, 0.75]], True),
        ([[0, 1]], True),  # integers are numbers
        ([[0.5, 0.5], [1, 0.0]], True),
        ([[True, False]], False),  # booleans are not
        ([[0.5, "0.5"]], False),
        ([[0.5, None]], False),
        ([[1e308 * 10, 0.0]], False),  # infinity fails the sum check
        ([[-0.1, 1.1]], False),
    ],
)
def test_probability_rows_checks_every_value(rows: list[list[Any]], accepted: bool) -> None:
    assert (probability_rows(rows) is not None) is accepted


# -- the query's keys ------------------------------------------------------------------------

query_numbers = (
    st.floats(allow_nan=False, allow_infinity=False)  # beyond float32's range too
    | st.floats(-1e-38, 1e-38)  # float32 subnormals
    | st.integers(-(2**70), 2**70)
    | st.booleans()
    | st.sampled_from([0.1, -0.0, 3.4028235e38, 3.4028236e38, 16777217, "1.5"])
)
query_rows = st.integers(1, 8).flatmap(
    lambda d: st.lists(
        st.lists(query_numbers, min_size=d, max_size=d)
        | st.lists(st.lists(query_numbers, min_size=1, max_size=1), min_size=d, max_size=d),
        min_size=1,
        max_size=base.FEW_ROWS + 1,
    )
)


@EXAMPLES
@given(items=query_rows)
@example(items=[[1.0, 2.0], [[3.0], [4.0]]])  # flat and nested rows of one width
@example(items=[[1e300, -1e300, 3.4028235e38]])  # beyond float32: inf, as numpy casts
def test_keys_of_few_rows_are_the_numpy_keys(items: list[Any]) -> None:
    features = numeric_rows(items)
    keys = canonical_keys(items, features)
    saved = base.FEW_ROWS
    base.FEW_ROWS = 0
    try:
        assert keys == canonical_keys(items, features)
    finally:
        base.FEW_ROWS = saved
    if features is not None:
        with np.errstate(over="ignore"):
            assert keys == [b"f32:" + row.astype(np.float32).tobytes() for row in features]


# -- the whole answer, through the middleware -----------------------------------------------


def model(answer: list[list[Any]]) -> Starlette:
    body = json.dumps({"predictions": answer, "model": "m"}).encode()

    async def predict(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"])])


async def answer_of(app: Any, instances: list[list[float]]) -> bytes:
    async with client(app) as http:
        response = await http.post(
            "/v1/models/m:predict", json={"instances": instances}, headers={"x-api-key": "k"}
        )
    assert response.status_code == 200
    return response.content


CHAINS = [
    "round:3",
    "reverse_sigmoid:beta=1:gamma=0.2:guard_top1=true,round:3",
    "poison:alpha=0.5:epsilon=0.5,round:2",
    "top_k:3,round:1",
]


@settings(max_examples=40, deadline=None, database=None)
@given(
    answer=st.integers(2, 12).flatmap(
        lambda k: st.lists(
            st.lists(st.floats(0, 1) | st.sampled_from([0, 1, 0.5, 0.25]), min_size=k, max_size=k),
            min_size=1,
            max_size=3,
        )
    ),
    spec=st.sampled_from(CHAINS),
)
def test_answers_are_the_bytes_of_the_numpy_paths(answer: list[list[Any]], spec: str) -> None:
    """A KServe v1 answer rewritten by the shield: the same bytes whichever path ran."""
    totals = [sum(row) for row in answer]
    answer = [
        [v / total for v in row] if total > 0 else [1.0] + [0.0] * (len(row) - 1)
        for row, total in zip(answer, totals, strict=True)
    ]
    instances = [[0.1 * i, 0.2, 0.3] for i in range(len(answer))]

    def run() -> bytes:
        app = ExtractionShield(
            model(answer),
            secret_key=SECRET,
            rate_limit="1000000/minute",
            monitor={"enabled": False},
            perturbation=spec,
        )
        return asyncio.run(answer_of(app, instances))

    fast = run()
    with pytest.MonkeyPatch.context() as patch:
        numpy_only(patch)
        general = run()
    assert fast == general
    rewritten = orjson.loads(fast)
    assert rewritten["model"] == "m"
    unit = 10.0 ** -int(spec.rsplit(":", 1)[1])  # every chain ends by rounding
    for row in rewritten["predictions"]:
        assert sum(row) == pytest.approx(1.0)
        assert all(abs(v / unit - round(v / unit)) < 1e-6 for v in row)
