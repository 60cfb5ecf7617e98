"""DRW: a keyed periodic signal in the probabilities (Zhao et al., "Distillation-Resistant
Watermarking", EMNLP Findings 2022; GINSEW, ACL 2023, is its generative sibling).

Each input gets a keyed phase ``t ∈ (0, 1)`` (:func:`~.projection.phase`); a keyed target
class ``c*`` receives a sinusoid of angular frequency ``k`` and amplitude ``ε``:

    p̃_c = (p_c + ε_c (1 + cos(k·t + φ_c))) / (1 + 2ε),
    ε_c = ε, φ_c = 0 for c*;   ε_c = ε / (K − 1), φ_c = π for the others.

Rows stay on the simplex. A substitute trained on such rows (soft labels) learns the
signal with the rest; verification probes the suspect with any inputs of its domain,
pairs each phase with the suspect's probability of ``c*`` and measures the
Lomb–Scargle power at ``k`` against the power at the other frequencies. Nothing needs to
be recorded. The p-value compares that power to the same statistic for random phases,
each made orthogonal (over the probes) to ours: real inputs lie near a low-dimensional
manifold, so random projections of them are correlated, and an unadjusted random phase
would carry part of the mark into the null (on the lab's digits the stolen copy's power
sat inside the null's range until the null phases were decorrelated).

``k`` (default 4; the paper's is 16) trades how easily a substitute learns the signal against
how wide the null is: on the extraction lab an MLP trained on 5,000 soft answers follows
a slow signal (correlation 0.73 with it at k = 4) and hardly a fast one (0.21 on its own
training queries at k = 16), while at low k the structure every model shares (classes
lying at different phases) widens the null, so a perfect copy of a model of a few
clusters is provable at k = 16 and not at k = 4. Measure it on your own inputs.

Below ``k = 2π`` (less than one period over the phases' range) the mark is mostly a
slope in ``⟨w, x̃⟩``, and a copy learns that slope: there the test is :func:`linear_z`,
exact (N(0, 1) for any model that never saw the key, since ``w`` is a standard normal
vector independent of it) and without random keys. Its evidence is bounded by the
inputs' width: a perfect copy's ``z`` is at most about ``√d`` (8 on 64 pixels, p ≈ 1e-15);
on the extraction lab an MLP copy of 2,000 to 5,000 soft answers reaches ``|z|`` ≈ 3
(p ≈ 3e-3), where the periodogram gave 0.1. That test is exact where the periodogram's
p-value, beyond its sample of random keys, is an extrapolated tail: hence the default
``k = 4``, below 2π.

Cost to legitimate users: every probability moves by at most ``2ε / (1 + 2ε)`` (0.29 at
ε = 0.2; the bound the tests hold), and the top label changes only where the top-1 margin
is below that (measured in the extraction lab).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from ..formats.base import Outputs
from ..postprocess.chain import Context
from .base import VerifyResult, Watermark
from .projection import (
    answered,
    directions,
    keyed_gaussian,
    keyed_index,
    phase,
    projections,
    to_phase,
)
from .pvalues import normal_sf
from .stats import calibrated_tail, lomb_scargle

Rows = NDArray[np.float64]


def signal(p: Rows, t: NDArray[np.float64], target: int, k: float, eps: float) -> Rows:
    """DRW's rows (module docstring) for probability rows ``p`` and phases ``t``."""
    n_classes = p.shape[1]
    wave = np.cos(k * t)
    bonus = np.empty_like(p)
    bonus[:] = (eps / (n_classes - 1)) * (1.0 - wave)[:, None]  # cos(kt + π) = −cos(kt)
    bonus[:, target] = eps * (1.0 + wave)
    out: Rows = (p + bonus) / (1.0 + 2.0 * eps)
    return out


def frequencies(k: float) -> NDArray[np.float64]:
    """The periodogram's grid: ``k`` first, then the rest from 2 to 4k (step 0.5),
    leaving out the main lobe around ``k`` (±2π, the resolution over a unit range)."""
    grid = np.arange(2.0, 4.0 * k + 8.0, 0.5)
    rest = grid[np.abs(grid - k) > 2.0 * np.pi]
    out: NDArray[np.float64] = np.concatenate([[k], rest])
    return out


def snr(t: NDArray[np.float64], y: NDArray[np.float64], k: float) -> float:
    """Power at ``k`` over the mean power at the other frequencies (``y`` centred)."""
    if len(y) < 3 or float(np.ptp(y)) == 0.0:
        return 0.0
    power = lomb_scargle(t, y, frequencies(k))
    rest = float(power[1:].mean())
    return float(power[0] / rest) if rest > 0 else 0.0


def _within_classes(p: Rows, target: int) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """The probes whose top class is not ``target``, and their top classes."""
    top = np.argmax(p, axis=1)
    keep = top != target
    return keep, top[keep]


def _centred(values: NDArray[np.float64], groups: NDArray[np.int64]) -> NDArray[np.float64]:
    """``values`` less their mean within each group."""
    out: NDArray[np.float64] = np.array(values, dtype=np.float64)
    for c in np.unique(groups):
        members = groups == c
        out[members] -= out[members].mean(axis=0)
    return out


def linear_z(x: NDArray[np.float64], p: Rows, target: int, w: NDArray[np.float64]) -> float:
    """The exact test of the mark's slow part: ``z = ⟨b, w⟩ / |b|``, with ``b`` the ridge
    regression of the target class's probability on the input directions ``x`` (both
    centred within each top class, over the probes whose top class is another) and ``w``
    the phase's keyed direction. ``w`` is standard normal and, for a model that never saw
    the key, independent of ``b``: ``z`` is then exactly N(0, 1), whatever the inputs'
    structure. At a low ``k`` the mark is close to linear in ``⟨w, x̃⟩`` over the inputs,
    and a copy's ``b`` leans towards ``w``."""
    keep, groups = _within_classes(p, target)
    if keep.sum() <= x.shape[1] or not np.all(np.isfinite(p[keep, target])):
        return 0.0
    xs = _centred(x[keep], groups)
    y = _centred(p[keep, target], groups)
    gram = xs.T @ xs
    ridge = RIDGE * float(np.trace(gram)) / x.shape[1]
    b = np.linalg.solve(gram + ridge * np.eye(x.shape[1]), xs.T @ y)
    norm = float(np.linalg.norm(b))
    return float(b @ w) / norm if norm > 0 else 0.0


LINEAR_BELOW = 2.0 * np.pi
"""Below this ``k`` the mark is less than one period over the phases' range, mostly a
slope in ``⟨w, x̃⟩``: DRW is then tested by :func:`linear_z` (exact), above it by the
periodogram (calibrated against random keys)."""

RIDGE = 0.3
"""Ridge of :func:`linear_z`, relative to the mean eigenvalue of the directions' Gram
matrix (key-independent; chosen on the extraction lab's digits, 0.01 to 3 all work)."""


def statistic(t: NDArray[np.float64], p: Rows, target: int, k: float) -> float:
    """DRW's test statistic on a suspect's rows ``p`` at phases ``t``: the SNR at ``k`` of
    the target class's probability, over the probes whose top class is another, centred
    within each top class. Any model's probability of a class depends on which class the
    input looks like, and the phase (a projection of the input) does too: that shared
    structure, not a watermark, would otherwise put power at low frequencies for
    independent models. Within one top class it is flat, and the signal is what is left."""
    keep, groups = _within_classes(p, target)
    return snr(t[keep], _centred(p[keep, target], groups), k)


class DRW(Watermark):
    name = "drw"
    params: ClassVar[dict[str, type]] = {"k": float, "eps": float, "nulls": int}

    def __init__(self, k: float = 4.0, eps: float = 0.2, nulls: int = 200) -> None:
        if not 1.0 <= k <= 1000.0:
            raise ValueError("drw: k (angular frequency) must be between 1 and 1000")
        if not 0.0 < eps <= 1.0:
            raise ValueError("drw: eps must be in (0, 1]")
        if not 10 <= nulls <= 100_000:
            raise ValueError(
                "drw: nulls (random keys of the verifier's null) must be in [10, 100000]"
            )
        self.k, self.eps, self.nulls = k, eps, nulls

    # -- marking ------------------------------------------------------------------------------

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        p = outputs.probabilities
        request = ctx.request
        if p is None or p.shape[1] < 2 or request is None or request.keys != outputs.keys:
            return False
        x = directions(request.inputs)
        if x is None:
            return False
        target = keyed_index(self.key, "target", p.shape[1])
        outputs.probabilities = signal(p, phase(x, self.key), target, self.k, self.eps)
        return True

    # -- verification -------------------------------------------------------------------------

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        inputs = [r["input"] for r in records][:n]
        if not inputs:
            raise ValueError(
                "drw probes with inputs of the suspect's domain: give a JSONL file of "
                '{"input": ...} lines (records), or a JSONL suspect of answers'
            )
        return inputs

    def test(
        self, key: bytes, inputs: Sequence[Any], outputs: Sequence[Outputs], alpha: float
    ) -> VerifyResult:
        usable = answered(inputs, outputs, lambda out: out.probabilities)
        if usable is None or usable[2].ndim != 2 or usable[2].shape[1] < 2:
            return VerifyResult.decide(self.name, 0.0, 1.0, 0, alpha, reason="no probability rows")
        _, x, p = usable
        p = p.astype(np.float64)
        if self.k < LINEAR_BELOW:
            target = keyed_index(key, "target", p.shape[1])
            z = linear_z(x, p, target, keyed_gaussian(key, "phase", (x.shape[1], 1))[:, 0])
            p_value = min(1.0, 2.0 * normal_sf(abs(z)))
            return VerifyResult.decide(
                self.name, abs(z), p_value, len(x), alpha, k=self.k, test="linear", z=z
            )

        # The null keeps the target class and draws the phase from random keys: given the
        # target (a function of the key), a model that never saw the key is as likely to
        # follow any keyed phase as ours, and the class's own structure stays the same.
        target = keyed_index(key, "target", p.shape[1])

        z_true = projections(x, key, "phase", 1)[:, 0]
        unit = z_true / (np.linalg.norm(z_true) or 1.0)

        def of_key(k: bytes) -> float:
            if k == key:
                return statistic(to_phase(z_true), p, target, self.k)
            # A random phase, made orthogonal (over the probes) to ours: inputs from a
            # low-dimensional manifold make random projections correlated, and a phase
            # correlated with ours would carry part of the mark into the null.
            z = projections(x, k, "phase", 1)[:, 0]
            norm = np.linalg.norm(z)
            z = z - (z @ unit) * unit
            z *= norm / (np.linalg.norm(z) or 1.0)
            return statistic(to_phase(z), p, target, self.k)

        observed = of_key(key)
        p_value, details = calibrated_tail(observed, key, of_key, self.nulls)
        return VerifyResult.decide(
            self.name, observed, p_value, len(x), alpha, k=self.k, test="periodogram", **details
        )
