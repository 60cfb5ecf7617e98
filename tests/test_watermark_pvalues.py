"""The tail probabilities of the verifiers, against SciPy's, far into the tail."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from asgi_extraction_shield.watermark import pvalues


@pytest.mark.parametrize("t", [-3.0, -0.5, 0.0, 0.7, 2.5, 8.0, 40.0])
@pytest.mark.parametrize("df", [1, 5, 63, 767])
def test_student_t_tail(t: float, df: int) -> None:
    assert pvalues.student_t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_poisson_binomial_tail_matches_a_simulation_and_the_binomial() -> None:
    probabilities = [0.5] * 30 + [1 / 3] * 20
    rng = np.random.default_rng(0)
    draws = (rng.random((200_000, 50)) < np.array(probabilities)).sum(axis=1)
    for k in (15, 22, 28, 34):
        assert pvalues.poisson_binomial_sf(k, probabilities) == pytest.approx(
            (draws >= k).mean(), abs=4e-3
        )
    assert pvalues.poisson_binomial_sf(40, [0.5] * 60) == pytest.approx(
        stats.binom.sf(39, 60, 0.5), rel=1e-9
    )
    assert pvalues.poisson_binomial_sf(0, [0.5]) == 1.0
    assert pvalues.poisson_binomial_sf(2, [0.5]) == 0.0
    assert pvalues.poisson_binomial_sf(300, [0.5] * 300) == pytest.approx(0.5**300, rel=1e-6)


def test_normal_and_ks() -> None:
    for z in (-2.0, 0.0, 1.5, 6.0, 30.0):
        assert pvalues.normal_sf(z) == pytest.approx(stats.norm.sf(z), rel=1e-12, abs=1e-300)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(0.3, 1, size=250)
    d, p = pvalues.ks_2samp(a, b)
    reference = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(reference.statistic)
    assert p == pytest.approx(reference.pvalue, rel=0.1)  # Stephens: a small-n correction
    assert pvalues.ks_2samp(np.array([]), a) == (0.0, 1.0)


def test_bonferroni() -> None:
    assert pvalues.bonferroni([0.01, 0.2, 0.5]) == pytest.approx(0.03)
    assert pvalues.bonferroni([0.6, 0.9]) == 1.0
    assert pvalues.bonferroni([]) == 1.0
    assert math.isclose(pvalues.betainc(2.0, 3.0, 0.4), stats.beta.cdf(0.4, 2, 3))


@pytest.mark.parametrize(
    ("k", "n_all", "good", "draws"),
    [
        (0, 50, 10, 5),
        (3, 50, 10, 5),
        (30, 1000, 250, 80),
        (60, 1000, 250, 100),
        (11, 48, 12, 20),
        (13, 48, 12, 20),
    ],
)
def test_hypergeometric_tail(k: int, n_all: int, good: int, draws: int) -> None:
    expected = stats.hypergeom.sf(k - 1, n_all, good, draws)
    assert pvalues.hypergeometric_sf(k, n_all, good, draws) == pytest.approx(
        expected, rel=1e-9, abs=1e-300
    )
