"""Tail probabilities the verifiers need, in plain Python (no SciPy at run time).

Every function returns an upper-tail probability that stays accurate far into the tail
(down to ~1e-300), because a stolen model's evidence is a p-value like 1e-40 and its
order of magnitude is the evidence. The regularised incomplete beta function is
evaluated by Lentz's continued fraction (Numerical Recipes, 3rd ed., §6.4); Student's t
tail is written through it. (The plain binomial tail is :func:`.stats.binomial_sf`.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_TINY = 1e-300
_EPS = 3e-16


def normal_sf(z: float) -> float:
    """``P(Z >= z)`` for a standard normal ``Z``."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _beta_fraction(a: float, b: float, x: float) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def betainc_upper(a: float, b: float, x: float) -> float:
    """``1 − I_x(a, b)``, accurate when it is tiny."""
    return betainc(b, a, 1.0 - x)


def student_t_sf(t: float, df: float) -> float:
    """``P(T >= t)`` for Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2.0, 0.5, x)
    return tail if t >= 0 else 1.0 - tail


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeometric_sf(k: int, population: int, successes: int, draws: int) -> float:
    """``P(X >= k)`` for ``X`` the successes among ``draws`` taken without replacement from
    ``population`` items of which ``successes`` are successes."""
    top = min(draws, successes)
    low = max(k, 0, draws - (population - successes))
    if low > top:
        return 0.0 if k > top else 1.0
    base = _log_choose(population, draws)
    logs = [
        _log_choose(successes, x) + _log_choose(population - successes, draws - x) - base
        for x in range(low, top + 1)
    ]
    peak = max(logs)
    return float(min(1.0, math.exp(peak) * sum(math.exp(v - peak) for v in logs)))


def poisson_binomial_sf(k: int, probabilities: Sequence[float]) -> float:
    """``P(X >= k)`` for ``X`` a sum of independent Bernoulli(``p_i``) (exact recursion).

    Trials that share a probability are convolved as one binomial block, so the usual
    case (a few distinct probabilities, such as ``1/2`` and ``1/3``) costs a few
    convolutions however many trials there are.
    """
    n = len(probabilities)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    values, counts = np.unique(np.asarray(probabilities, dtype=np.float64), return_counts=True)
    pmf = np.ones(1)
    for p, count in zip(values.tolist(), counts.tolist(), strict=True):
        pmf = np.convolve(pmf, _binomial_pmf(int(count), float(p)))
    return float(min(1.0, max(0.0, pmf[k:].sum())))


def _binomial_pmf(n: int, p: float) -> np.ndarray:
    j = np.arange(n + 1, dtype=np.float64)
    if p <= 0.0 or p >= 1.0:
        point = np.zeros(n + 1)
        point[0 if p <= 0.0 else n] = 1.0
        return point
    log_pmf = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(v + 1) for v in j])
        - np.array([math.lgamma(n - v + 1) for v in j])
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )
    out: np.ndarray = np.exp(log_pmf)
    return out


def kolmogorov_sf(d: float, n: int, m: int) -> float:
    """Asymptotic p-value of the two-sample Kolmogorov–Smirnov statistic ``d``
    (Stephens' small-sample correction of the effective size)."""
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for j in range(1, 101):
        term = 2.0 * (-1.0) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-300:
            break
    return float(min(1.0, max(0.0, total)))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic ``sup |F_a − F_b|`` and its asymptotic p-value."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if not len(a) or not len(b):
        return 0.0, 1.0
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    d = float(np.abs(cdf_a - cdf_b).max())
    return d, kolmogorov_sf(d, len(a), len(b))


def bonferroni(p_values: Sequence[float]) -> float:
    """The family-wise p-value of the smallest of ``p_values``."""
    if not p_values:
        return 1.0
    return min(1.0, len(p_values) * min(p_values))


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)``, summed in log space (exact for the sizes
    verification uses, no underflow to 0 before 1e-300)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
        for j in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def keyed_choice_sf(observed: int, counts: list[list[int]]) -> float:
    """``P(T >= observed)`` for ``T = Σ_j counts[j][c_j]`` with each ``c_j`` uniform over
    the ``K`` entries of ``counts[j]``, independently: the exact conditional null of a
    count of answers agreeing with keyed uniform labels, given the answers. Computed by
    convolution over the integer totals (exact, no sampling)."""
    total = sum(max(row) for row in counts)
    if observed <= 0:
        return 1.0
    if observed > total:
        return 0.0
    dist = np.zeros(total + 1)
    dist[0] = 1.0
    reach = 0
    for row in counts:
        step = np.zeros(total + 1)
        for value in row:
            step[value : reach + value + 1] += dist[: reach + 1]
        dist = step / len(row)
        reach += max(row)
    return float(min(1.0, dist[observed:].sum()))
