"""The numpy Shapiro–Wilk test (``monitor/shapiro.py``) against ``scipy.stats.shapiro``.

scipy implements the same algorithm (Royston, AS R94), so W and the p-value must agree
closely. scipy is a test dependency only: without it the comparisons skip locally and
fail under CI (``CI`` set).
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from asgi_extraction_shield.monitor.shapiro import (
    _coefficients,
    _normal_quantile,
    shapiro_wilk,
)

try:
    from scipy import stats as scipy_stats
except ImportError:  # pragma: no cover - scipy is in the test extra
    scipy_stats = None

Reference = Callable[[np.ndarray], tuple[float, float]]

SIZES = [*range(3, 21), 50, 100, 500, 1000, 2000, 5000]
W_TOL = 1e-6
P_ABS_TOL = 1e-5
P_REL_TOL = 1e-4  # for small p, where an absolute tolerance says nothing


def _sample(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, n])
    if kind == "normal":
        return rng.normal(3.0, 2.0, n)
    if kind == "uniform":
        return rng.uniform(-1.0, 1.0, n)
    if kind == "exponential":
        return rng.exponential(1.0, n)
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if kind == "bimodal":
        return np.where(rng.random(n) < 0.5, rng.normal(-3.0, 1.0, n), rng.normal(3.0, 1.0, n))
    if kind == "integer_ties":
        return rng.integers(0, 6, n).astype(float)
    raise AssertionError(kind)


KINDS = ["normal", "uniform", "exponential", "lognormal", "bimodal", "integer_ties"]


@pytest.fixture(scope="module")
def scipy_shapiro() -> Reference:
    if scipy_stats is None:
        message = "scipy is needed to compare against scipy.stats.shapiro"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)
    stats = scipy_stats

    def reference(x: np.ndarray) -> tuple[float, float]:
        with warnings.catch_warnings():
            # "range zero" for constant samples, "may not be accurate" above n = 5000
            warnings.simplefilter("ignore", UserWarning)
            result = stats.shapiro(x)
        return float(result.statistic), float(result.pvalue)

    return reference


def assert_close(
    ours: tuple[float, float], theirs: tuple[float, float], w_tol: float, p_floor: float = 0.0
) -> None:
    (w, p), (w_ref, p_ref) = ours, theirs
    assert abs(w - w_ref) <= w_tol, (w, w_ref)
    assert abs(p - p_ref) <= P_ABS_TOL, (p, p_ref)
    if p_ref < 1e-3:
        assert abs(p - p_ref) <= P_REL_TOL * p_ref + p_floor, (p, p_ref)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_scipy(kind: str, n: int, scipy_shapiro: Reference) -> None:
    for seed in (1, 2):
        x = _sample(kind, n, seed)
        assert_close(shapiro_wilk(x), scipy_shapiro(x), W_TOL)


@pytest.mark.parametrize(
    ("x", "w"),
    [
        ([0.0, 1.0, 2.0], 1.0),  # evenly spaced: the largest W
        ([0.0, 0.0, 1.0], 0.75),  # a tie at one end: the smallest W
        ([0.0, 1.0, 3.0], 40.5 / 42.0),  # (3/√2)² / (42/9)
    ],
)
def test_n3_exact(x: list[float], w: float, scipy_shapiro: Reference) -> None:
    got_w, got_p = shapiro_wilk(x)
    assert got_w == pytest.approx(w, abs=1e-12)
    # For n = 3 the null distribution is known: p = (6/π)(arcsin √W − π/3).
    assert got_p == pytest.approx(6.0 / math.pi * (math.asin(math.sqrt(w)) - math.pi / 3.0))
    assert 0.0 <= got_p <= 1.0
    # At W = 3/4, p ~ 1e-15 is all rounding, in scipy as here.
    assert_close((got_w, got_p), scipy_shapiro(np.array(x)), 1e-12, p_floor=1e-14)


def test_n3_extremes() -> None:
    assert shapiro_wilk([0.0, 1.0, 2.0]) == pytest.approx((1.0, 1.0))
    assert shapiro_wilk([5.0, 5.0, 7.0]) == pytest.approx((0.75, 0.0), abs=1e-14)


@pytest.mark.parametrize("x", [[], [1.0], [1.0, 2.0], np.zeros((1, 2))])
def test_too_few_values(x: object) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        shapiro_wilk(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite(bad: float) -> None:
    x = np.random.default_rng(0).normal(size=20)
    x[7] = bad
    with pytest.raises(ValueError, match="finite"):
        shapiro_wilk(x)


@pytest.mark.parametrize("n", [3, 4, 12, 5000])
def test_constant_sample(n: int, scipy_shapiro: Reference) -> None:
    x = np.full(n, 4.25)
    assert shapiro_wilk(x) == (1.0, 1.0)
    assert scipy_shapiro(x) == (1.0, 1.0)  # the same convention as scipy


@pytest.mark.parametrize("n", [3, 4, 9, 30, 1000])
def test_invariant_to_shift_scale_order_and_reflection(n: int) -> None:
    rng = np.random.default_rng([7, n])
    x = rng.gamma(2.0, size=n)
    w, p = shapiro_wilk(x)
    for shift, scale in [(1e3, 1.0), (-5.0, 1e-3), (0.0, 1e250), (0.0, 1e-250), (1e6, 7.5)]:
        w2, p2 = shapiro_wilk(shift + scale * x)
        assert w2 == pytest.approx(w, rel=1e-9)
        assert p2 == pytest.approx(p, rel=1e-6, abs=1e-12)
    assert shapiro_wilk(rng.permutation(x)) == (w, p)  # sorted first: exactly equal
    assert shapiro_wilk(x[::-1]) == (w, p)
    w3, p3 = shapiro_wilk(-x)  # a is antisymmetric: reflection leaves W unchanged
    assert w3 == pytest.approx(w, rel=1e-12)
    assert p3 == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_flattens_its_input() -> None:
    x = np.random.default_rng(3).normal(size=(6, 5))
    assert shapiro_wilk(x) == shapiro_wilk(x.ravel())
    assert shapiro_wilk(x.tolist()) == shapiro_wilk(x.ravel())


def test_p_values_of_normal_samples_are_roughly_uniform() -> None:
    rng = np.random.default_rng(2019)
    p = np.array([shapiro_wilk(rng.normal(size=50))[1] for _ in range(400)])
    assert 0.02 <= np.mean(p < 0.05) <= 0.09
    assert 0.4 <= np.mean(p < 0.5) <= 0.6


@pytest.mark.parametrize("kind", ["exponential", "lognormal", "bimodal"])
def test_rejects_non_normal_samples(kind: str) -> None:
    w, p = shapiro_wilk(_sample(kind, 300, 11))
    assert w < 0.97
    assert p < 1e-4


def test_beyond_5000_still_computes(scipy_shapiro: Reference) -> None:
    x = _sample("normal", 8000, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from us
        w, p = shapiro_wilk(x)
    assert 0.99 < w <= 1.0
    assert 0.0 <= p <= 1.0
    assert_close((w, p), scipy_shapiro(x), W_TOL)


def test_coefficients() -> None:
    for n in [3, 4, 5, 6, 7, 11, 12, 50, 5001]:
        a = _coefficients(n)
        assert a.shape == (n // 2,)
        assert not a.flags.writeable  # shared through the cache
        assert float(a @ a) * 2.0 == pytest.approx(1.0, rel=1e-12)  # Σ a_i² = 1
        assert (a > 0.0).all()
        assert (np.diff(a) < 0.0).all()  # the extremes weigh most


def test_normal_quantile_matches_the_standard_library() -> None:
    # The standard library's NormalDist.inv_cdf is also Wichura's AS 241.
    p = np.concatenate(
        [np.logspace(-300, -1, 400), np.linspace(0.01, 0.99, 401), 1.0 - np.logspace(-15, -1, 200)]
    )
    reference = np.array([statistics.NormalDist().inv_cdf(float(v)) for v in p])
    z = _normal_quantile(p)
    np.testing.assert_allclose(z, reference, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(_normal_quantile(1.0 - p[400:801]), -z[400:801], rtol=1e-13)


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(st.lists(finite, min_size=3, max_size=200))
def test_property_ranges_and_scipy(values: list[float]) -> None:
    x = np.array(values)
    spread = np.ptp(x)
    # Near-constant samples are left out: W then depends on rounding in any implementation.
    assume(spread > 1e-6 * max(1.0, float(np.max(np.abs(x)))))
    if scipy_stats is None and os.environ.get("CI"):
        pytest.fail("scipy is needed to compare against scipy.stats.shapiro (CI is set)")
    w, p = shapiro_wilk(x)
    assert 0.0 < w <= 1.0
    assert 0.0 <= p <= 1.0
    if scipy_stats is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            w_ref = float(scipy_stats.shapiro(x).statistic)
        assert abs(w - w_ref) <= 1e-3
