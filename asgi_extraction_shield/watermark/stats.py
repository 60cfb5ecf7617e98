"""The statistics the verifiers share: binomial tails, the Lomb–Scargle periodogram, and
p-values calibrated against the same statistic under random keys."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]


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


def lomb_scargle(t: Vector, y: Vector, omegas: Vector) -> Vector:
    """The classical Lomb–Scargle periodogram (Lomb 1976; Scargle 1982) of samples ``y``
    taken at times ``t``, at angular frequencies ``omegas``:
    ``P(ω) = ½[(Σ y cos ω(t−τ))² / Σ cos² ω(t−τ) + (Σ y sin ω(t−τ))² / Σ sin² ω(t−τ)]``
    with ``tan 2ωτ = Σ sin 2ωt / Σ cos 2ωt`` (``scipy.signal.lombscargle`` with its
    defaults, for ``y`` centred by the caller)."""
    wt = omegas[:, None] * t[None, :]
    cos_wt, sin_wt = np.cos(wt), np.sin(wt)
    # Double-angle and difference identities: two trigonometric arrays instead of four.
    two_wtau = np.arctan2(
        2.0 * (sin_wt * cos_wt).sum(axis=1), (cos_wt * cos_wt - sin_wt * sin_wt).sum(axis=1)
    )
    cos_wtau, sin_wtau = np.cos(two_wtau / 2)[:, None], np.sin(two_wtau / 2)[:, None]
    c = cos_wt * cos_wtau + sin_wt * sin_wtau
    s = sin_wt * cos_wtau - cos_wt * sin_wtau
    yc, ys = c @ y, s @ y
    cc, ss = (c * c).sum(axis=1), (s * s).sum(axis=1)
    out: Vector = 0.5 * (
        np.divide(yc * yc, cc, out=np.zeros_like(yc), where=cc > 0)
        + np.divide(ys * ys, ss, out=np.zeros_like(ys), where=ss > 0)
    )
    return out


def null_keys(key: bytes, count: int) -> list[bytes]:
    """``count`` keys unrelated to ``key`` for a model that never saw it (derived from it,
    so that a verification is reproducible)."""
    return [
        hashlib.blake2b(b"null:%d" % i, key=key[:64], digest_size=32).digest() for i in range(count)
    ]


def calibrated_tail(
    statistic: float, key: bytes, of_key: Callable[[bytes], float], count: int
) -> tuple[float, dict[str, float]]:
    """The p-value of ``statistic`` (computed with ``key``) against the same statistic
    under ``count`` random keys, for statistics with an exponential tail (a periodogram's
    power, and ratios of it): ``p = exp(−S / mean of the null)``, which reaches far below
    ``1 / count``; the empirical tail is reported with it."""
    null = np.asarray([of_key(k) for k in null_keys(key, count)], dtype=np.float64)
    null = null[np.isfinite(null)]
    if not null.size or not math.isfinite(statistic):
        return 1.0, {"null_mean": float("nan"), "empirical_p": 1.0}
    scale = float(null.mean())
    p = 1.0 if scale <= 0 else min(1.0, math.exp(-max(statistic, 0.0) / scale))
    empirical = float((1 + np.count_nonzero(null >= statistic)) / (1 + null.size))
    return p, {"null_mean": scale, "empirical_p": empirical}
