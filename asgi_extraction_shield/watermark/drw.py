"""DRW: a keyed periodic signal in the probabilities (Zhao et al., "Distillation-Resistant
Watermarking", EMNLP Findings 2022; GINSEW, ACL 2023, is its generative sibling).

Each input gets a keyed phase ``t = Φ(⟨w, φ(x̃)⟩) ∈ (0, 1)`` (:func:`~.projection.phase`):
``φ`` is a keyed feature map of the input's direction ``x̃`` (:func:`~.projection.features`:
``x̃`` and ``features`` keyed products of its projections, 1,088 dimensions on 64 pixels;
``features=0``: ``x̃`` alone) and ``w`` a keyed standard normal direction. A keyed target
class ``c*`` receives a sinusoid of angular frequency ``k`` and amplitude ``ε``:

    p̃_c = (p_c + ε_c (1 + cos(k·t + φ_c))) / (1 + 2ε),
    ε_c = ε, φ_c = 0 for c*;   ε_c = ε / (K − 1), φ_c = π for the others.

Rows stay on the simplex. A substitute trained on such rows (soft labels) learns the
signal with the rest; verification probes the suspect with any inputs of its domain and
uses its probability of ``c*`` over the probes whose top class is another, centred within
each top class. Nothing needs to be recorded.

Below ``k = 2π`` (less than one period over the phases' range; default ``k = 3``, where
``cos(k·t)`` falls over the whole range) the mark is mostly a slope along ``w`` in the
feature space, and a copy learns that slope: the test is :func:`linear_z`, ``z`` from the
ridge regression of that probability on ``φ``: exact (N(0, 1) for any model that never saw
the key, since ``w`` is a standard normal vector independent of it and of ``φ``'s own
keyed draws), one-sided, without random keys. Its evidence grows with the dimension the
mark lives in: a perfect copy's ``z`` is bounded by about the square root of ``φ``'s
effective rank on the probes, about 7 for the 64 pixels' directions alone and 12 with
1,024 products (extraction lab). The products are quadratic forms of ``x̃``: smooth, so
that an MLP copy learns them from a few thousand answers; on the lab, over 32 keys, a
copy of 2,000 soft answers reaches a mean ``z`` of 4.5 (4.0 on ``x̃`` alone), and over 12
keys 5.8 at 5,000 (5.0). With the owner's model without the mark as a reference
(:meth:`DRW.test_against`), the reference's regression is subtracted from the suspect's:
what any copy shares with the model cancels, the null stays exact, and the copy's mean
``z`` at 2,000 answers rises to 5.1 over 48 keys (4.5 without; 32 and 21 keys of 48 below
p = 1e-6: ``python -m examples.extraction_lab.drw_keys --keys 48``).

From ``k = 2π`` on (the paper's 16) the test is the Lomb–Scargle power at ``k`` against
the power at the other frequencies; its p-value compares that power to the same
statistic for random phases, each made orthogonal (over the probes) to ours: real inputs
lie near a low-dimensional manifold, so random projections of them are correlated, and
an unadjusted random phase would carry part of the mark into the null. Its small
p-values are an extrapolated tail. A fast signal is learned far less (on the lab, an MLP
trained on 5,000 soft answers follows it with correlation 0.21 at k = 16, 0.73 at k = 4,
both measured on the phase of the input's direction alone, ``features=0``),
but a perfect copy of a model of a few clusters is provable there.

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
    features,
    keyed_index,
    phase,
    phase_direction,
    scores,
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


def ridge_solution(xs: NDArray[np.float64], y: NDArray[np.float64], ridge: float) -> Rows:
    """``(XᵀX + λI)⁻¹ Xᵀ y`` with ``λ`` = ``ridge`` times the mean eigenvalue of ``XᵀX``;
    through the ``n × n`` system ``X (XXᵀ + λI)⁻¹ y`` (the same vector) when there are
    fewer rows than columns."""
    n, dim = xs.shape
    if n < dim:
        gram = xs @ xs.T
        lam = ridge * float(np.trace(gram)) / dim
        out: Rows = xs.T @ np.linalg.solve(gram + lam * np.eye(n), y)
        return out
    gram = xs.T @ xs
    lam = ridge * float(np.trace(gram)) / dim
    out = np.linalg.solve(gram + lam * np.eye(dim), xs.T @ y)
    return out


def linear_z(
    phi: NDArray[np.float64],
    p: Rows,
    target: int,
    w: NDArray[np.float64],
    ridge: float,
    reference: Rows | None = None,
) -> float:
    """The exact test of the mark's slow part: ``z = −⟨b, w⟩ / |b|``, with ``b`` the ridge
    regression (relative ``ridge``) of the target class's probability on the input's
    features ``phi`` (both centred within each top class, over the probes whose top class
    is another) and ``w`` the phase's keyed direction. ``w`` is standard normal and, for a
    model that never saw the key, independent of ``b`` (the features may be keyed too,
    with other keyed draws): ``z`` is then exactly N(0, 1), whatever the inputs'
    structure. Below ``k = 2π`` the mark ``ε(1 + cos(k·Φ(⟨w, φ⟩)))`` falls, over most of
    the phases, as ``⟨w, φ⟩`` grows, and a copy's ``b`` leans towards ``−w``: ``z > 0``.

    With ``reference``, the owner's model's rows on the same probes *without* the mark,
    ``b`` is the difference of the suspect's regression and the reference's (on the same
    probes and classes): what a copy shares with the model anyway cancels and the mark is
    left, while for a model that never saw the key both regressions, and so their
    difference, are still independent of ``w`` (the null stays exact)."""
    keep, groups = _within_classes(p, target)
    if keep.sum() <= 2 or not np.all(np.isfinite(p[keep, target])):
        return 0.0
    y = p[keep, target]
    if reference is not None:
        # Centring and the ridge solution are linear in y: the difference of the two
        # regressions is the regression of the difference (one solve, not two).
        y = y - reference[keep, target]
        if not np.all(np.isfinite(y)):
            return 0.0
    b = ridge_solution(_centred(phi[keep], groups), _centred(y, groups), ridge)
    norm = float(np.linalg.norm(b))
    return -float(b @ w) / norm if norm > 0 else 0.0


FEATURES = 1024
"""The default ``features`` below ``k = 2π`` (the exact test); from ``2π`` on the default
is 0, the phase of the input's direction alone, which the periodogram reads better (a
perfect copy of a few clusters: p < 1e-6 with it, 2e-4 with 1,024 products)."""

MAX_FEATURES = 8192
"""The largest ``features``: the keyed pairs hold ``d × 2·features`` numbers and the
verifier regresses on ``d + features`` columns (marking is a ``d × d`` quadratic form
whatever ``features``; inputs with ``d × features`` above
:data:`~.projection.PRODUCT_BUDGET` keep their direction alone)."""

LINEAR_BELOW = 2.0 * np.pi
"""Below this ``k`` the mark is less than one period over the phases' range, mostly a
slope in ``⟨w, φ(x̃)⟩``: DRW is then tested by :func:`linear_z` (exact), above it by the
periodogram (calibrated against random keys)."""

RIDGE_LINEAR = 0.3
"""Ridge of :func:`linear_z` on the input directions alone (``features=0``), relative to
the mean eigenvalue of their Gram matrix (key-independent; chosen on the extraction lab's
digits, 0.01 to 3 all work)."""

RIDGE_FEATURES = 10.0
"""Ridge of :func:`linear_z` on :func:`~.projection.features` (chosen on the extraction
lab's digits over 12 keys: a copy's mean ``z`` at 2,000 answers is 4.8 at 10, 4.6 at 3,
3.2 at 0.3: the products' many weak directions are where a copy learned the mark least)."""


def statistic(t: NDArray[np.float64], p: Rows, target: int, k: float) -> float:
    """DRW's test statistic on a suspect's rows ``p`` at phases ``t``: the SNR at ``k`` of
    the target class's probability, over the probes whose top class is another, centred
    within each top class. Any model's probability of a class depends on which class the
    input looks like, and the phase (a projection of the input) does too: that shared
    structure, not a watermark, would otherwise put power at low frequencies for
    independent models. Within one top class it is flat, and the signal is what is left."""
    keep, groups = _within_classes(p, target)
    return snr(t[keep], _centred(p[keep, target], groups), k)


def _reference_rows(
    reference: Sequence[Outputs], used: Sequence[int], width: int
) -> tuple[NDArray[np.int64], Rows]:
    """Of the probes ``used`` (indices into the probes), the positions whose reference
    answer is one probability row of ``width``, and those rows."""
    kept: list[int] = []
    rows: list[NDArray[np.float64]] = []
    for position, i in enumerate(used):
        answer = reference[i].probabilities if i < len(reference) else None
        if answer is not None and answer.shape == (1, width):
            kept.append(position)
            rows.append(answer[0].astype(np.float64))
    table: Rows = np.array(rows, dtype=np.float64).reshape(len(rows), width)
    return np.array(kept, dtype=np.int64), table


class DRW(Watermark):
    name = "drw"
    params: ClassVar[dict[str, type]] = {"k": float, "eps": float, "nulls": int, "features": int}

    def __init__(
        self, k: float = 3.0, eps: float = 0.2, nulls: int = 200, features: int | None = None
    ) -> None:
        if not 1.0 <= k <= 1000.0:
            raise ValueError("drw: k (angular frequency) must be between 1 and 1000")
        if not 0.0 < eps <= 1.0:
            raise ValueError("drw: eps must be in (0, 1]")
        if not 10 <= nulls <= 100_000:
            raise ValueError(
                "drw: nulls (random keys of the verifier's null) must be in [10, 100000]"
            )
        if features is None:
            features = FEATURES if k < LINEAR_BELOW else 0
        if not 0 <= features <= MAX_FEATURES:
            raise ValueError(
                f"drw: features (keyed products of the phase's feature map; 0: the input's "
                f"direction alone) must be an integer in [0, {MAX_FEATURES}]"
            )
        self.k, self.eps, self.nulls, self.features = k, eps, nulls, features

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
        t = phase(x, self.key, self.features)
        outputs.probabilities = signal(p, t, target, self.k, self.eps)
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
        return self._test(key, inputs, outputs, None, alpha)

    def test_against(
        self,
        key: bytes,
        inputs: Sequence[Any],
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs],
        alpha: float,
    ) -> VerifyResult:
        """:meth:`test` with the owner's unwatermarked model's answers to the same probes
        (:func:`linear_z`'s ``reference``; the periodogram test, ``k`` ≥ 2π, has no use
        for them). Only probes both answered with one probability row of a width count."""
        return self._test(key, inputs, outputs, reference, alpha)

    def _test(
        self,
        key: bytes,
        inputs: Sequence[Any],
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs] | None,
        alpha: float,
    ) -> VerifyResult:
        usable = answered(inputs, outputs, lambda out: out.probabilities)
        if usable is None or usable[2].ndim != 2 or usable[2].shape[1] < 2:
            return VerifyResult.decide(self.name, 0.0, 1.0, 0, alpha, reason="no probability rows")
        used, x, p = usable
        p = p.astype(np.float64)
        target = keyed_index(key, "target", p.shape[1])
        if self.k < LINEAR_BELOW:
            ref: Rows | None = None
            if reference is not None:
                kept, ref = _reference_rows(reference, used, p.shape[1])
                x, p = x[kept], p[kept]
            phi = features(x, key, self.features)
            ridge = RIDGE_FEATURES if self.features else RIDGE_LINEAR
            z = linear_z(phi, p, target, phase_direction(key, phi.shape[1]), ridge, ref)
            extra = {"reference": True} if ref is not None else {}
            return VerifyResult.decide(
                self.name, z, normal_sf(z), len(x), alpha, k=self.k, test="linear", z=z, **extra
            )

        # The null keeps the target class and draws the phase from random keys: given the
        # target (a function of the key), a model that never saw the key is as likely to
        # follow any keyed phase as ours, and the class's own structure stays the same.

        z_true = scores(x, key, self.features)
        unit = z_true / (np.linalg.norm(z_true) or 1.0)

        def of_key(k: bytes) -> float:
            if k == key:
                return statistic(to_phase(z_true), p, target, self.k)
            # A random phase, made orthogonal (over the probes) to ours: inputs from a
            # low-dimensional manifold make random projections correlated, and a phase
            # correlated with ours would carry part of the mark into the null.
            z = scores(x, k, self.features)
            norm = np.linalg.norm(z)
            z = z - (z @ unit) * unit
            z *= norm / (np.linalg.norm(z) or 1.0)
            return statistic(to_phase(z), p, target, self.k)

        observed = of_key(key)
        p_value, details = calibrated_tail(observed, key, of_key, self.nulls)
        return VerifyResult.decide(
            self.name, observed, p_value, len(x), alpha, k=self.k, test="periodogram", **details
        )
