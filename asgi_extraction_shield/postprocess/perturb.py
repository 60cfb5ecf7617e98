"""Output perturbations: pure numpy functions over rows of model outputs.

Each takes an ``(n, k)`` array of probability rows (non-negative, summing to 1) or an
``(n, d)`` array of embeddings and returns a new array of the same shape; keyed ones
take one 64-bit seed per row (see :mod:`.keyed`) so that the same query always gets
the same answer. None of them imports ASGI: they are reused by the verifier and tests.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from .keyed import choice, normal, uniform

Rows = NDArray[np.float64]
Seeds = NDArray[np.uint64]


def renormalise(q: Rows) -> Rows:
    """Rows scaled to sum to 1 (a row of zeros stays zeros)."""
    total = q.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    out: Rows = q / total
    return out


def round_simplex(p: Rows, decimals: int) -> Rows:
    """Round to ``decimals`` places, keeping each row's sum (largest-remainder method).

    Rounding is Tramèr et al.'s (USENIX Security 2016) counter-measure to equation-solving
    attacks. Plain ``np.round`` breaks the simplex (three thirds round to 0.999); here each
    row is floored to units of 10^-decimals and the missing units go to the largest
    remainders (Hamilton's method), so rows still sum to their original (rounded) total.
    Where remainders tie exactly, which tied share gets the unit is fixed but arbitrary:
    plain rounding's (half to even) when that already keeps the sum, else the lowest index.
    """
    scale = 10.0**decimals
    scaled = p * scale
    plain = np.rint(scaled)
    if _small(scaled):
        small = _largest_remainders_small(scaled.tolist(), plain.tolist())
        if small is not None:
            moved, rows = small
            if moved:
                plain = np.array(rows, dtype=np.float64)
            out: Rows = plain / scale
            return out
    target = np.rint(scaled.sum(axis=1))
    missing = target - plain.sum(axis=1)
    if not missing.any():  # the common case: plain rounding already keeps every sum
        rounded: Rows = plain / scale
        return rounded
    bad = np.flatnonzero(missing)
    # Largest remainders, as corrections of plain rounding: a row short of units gives one
    # more to the entries rounded down the most (the largest remainders not rounded up), a
    # row over gives one back from those rounded up the most (the smallest remainders
    # among those rounded up); ties as a stable sort of the remainders would break them.
    for i, units in zip(bad.tolist(), missing[bad].astype(np.int64).tolist(), strict=True):
        residue = scaled[i] - plain[i]
        if units > 0:
            plain[i, np.argsort(-residue, kind="stable")[:units]] += 1.0
        else:
            last = len(residue) - 1
            plain[i, last - np.argsort(residue[::-1], kind="stable")[:-units]] -= 1.0
    corrected: Rows = plain / scale
    return corrected


# Up to this many entries, :func:`round_simplex` sums rows and moves units, and
# :func:`reverse_sigmoid` computes, on Python floats: numpy's cost per call outweighs the
# arithmetic on one online answer (a row of ten classes, say). On such a row rounding
# takes about 20% less time (half where units move), reverse sigmoid about 25% less.
SMALL = 64


def _small(rows: Rows) -> bool:
    """Whether ``rows`` is one answer's float64 matrix, small enough for the Python-float
    paths (:data:`SMALL`)."""
    return (
        rows.size <= SMALL
        and rows.ndim == 2
        and rows.dtype == np.float64
        and rows.flags.c_contiguous
    )


def _largest_remainders_small(
    scaled: list[list[float]], plain: list[list[float]]
) -> tuple[bool, list[list[float]]] | None:
    """:func:`round_simplex`'s corrections of ``plain`` on Python floats, with the very
    same float operations in the same order, so that the result is identical to the last
    bit: the sums are numpy's (see :func:`_numpy_sum`) and the argsorts are stable sorts.
    Whether a unit moved, and the rows; ``None`` where numpy must decide (NaN, infinities,
    corrections larger than a row)."""
    moved = False
    for s, q in zip(scaled, plain, strict=True):
        try:
            missing = float(round(_numpy_sum(s))) - _numpy_sum(q)  # round() is np.rint here
        except (ValueError, OverflowError):  # NaN or infinity
            return None
        if not missing:  # the common case: plain rounding already keeps the sum
            continue
        k = len(s)
        if not -k <= missing <= k:
            return None
        moved = True
        units = int(missing)
        residue = [a - b for a, b in zip(s, q, strict=True)]
        if units > 0:
            for j in sorted(range(k), key=lambda j: -residue[j])[:units]:
                q[j] += 1.0
        else:
            last = k - 1
            for j in sorted(range(k), key=lambda j: residue[last - j])[:-units]:
                q[last - j] -= 1.0
    return moved, plain


def _numpy_sum(row: list[float]) -> float:
    """The float64 sum numpy's ``add.reduce`` gives a contiguous row of up to 128 values
    (its pairwise summation below the block size): eight interleaved partial sums added
    as a tree, then the tail, so that rounding errors fall exactly where numpy's do."""
    n = len(row)
    if n < 8:
        total = 0.0
        for v in row:
            total += v
        return total
    r0, r1, r2, r3, r4, r5, r6, r7 = row[:8]
    end = n - n % 8
    for i in range(8, end, 8):
        r0 += row[i]
        r1 += row[i + 1]
        r2 += row[i + 2]
        r3 += row[i + 3]
        r4 += row[i + 4]
        r5 += row[i + 5]
        r6 += row[i + 6]
        r7 += row[i + 7]
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for v in row[end:]:
        total += v
    return total


def round_values(x: Rows, decimals: int) -> Rows:
    """Plain rounding, for rows that are not probability distributions."""
    out: Rows = np.round(x, decimals)
    return out


def top_k(p: Rows, k: int, renormalize: bool = True) -> Rows:
    """Keep the ``k`` largest entries of each row, zero the rest (ties: lowest index first)."""
    if k >= p.shape[1]:
        same: Rows = p.copy()
        return same
    order = np.argsort(-p, axis=1, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    np.put_along_axis(keep, order[:, :k], True, axis=1)
    q = np.where(keep, p, 0.0)
    return renormalise(q) if renormalize else q


def label_only(p: Rows) -> Rows:
    """One-hot of each row's argmax (row by row: ART's ClassLabels batch bug avoided)."""
    q = np.zeros_like(p)
    q[np.arange(len(p)), np.argmax(p, axis=1)] = 1.0
    return q


def reverse_sigmoid(
    p: Rows, beta: float = 1.0, gamma: float = 0.1, guard_top1: bool = False
) -> Rows:
    """Reverse sigmoid (Lee et al., 2019), as ART's ``ReverseSigmoid`` post-processor.

    ``p_c = clip(p, 1e-9, 1 - 1e-9)``, ``r = β(σ(γ·logit(p_c)) − 0.5)``,
    ``q = clip(p − r, 0, 1)``, ``q /= Σq``. It can flip the top label (0.1–4% of rows at
    γ = 0.1); with ``guard_top1`` the original top class and the new one swap values in
    such rows, which restores the top-1 label and keeps the row on the simplex.
    """
    if _small(p) and beta != 0:  # (beta 0: q = p, where numpy's max may give -0.0 a sign)
        small = _reverse_sigmoid_small(p.tolist(), beta, gamma, guard_top1)
        if small is not None:
            return np.array(small, dtype=np.float64).reshape(p.shape)
    pc = np.minimum(np.maximum(p, 1e-9), 1.0 - 1e-9)
    # σ(γ·logit(p)) = 1 / (1 + ((1 − p) / p)^γ): the same value in fewer array operations.
    r = beta * (1.0 / (1.0 + ((1.0 - pc) / pc) ** gamma) - 0.5)
    q = p - r
    np.minimum(np.maximum(q, 0.0, out=q), 1.0, out=q)
    q = renormalise(q)
    if guard_top1:
        _restore_top1(p, q)
    return q


def _restore_top1(p: Rows, q: Rows) -> None:
    """Give rows whose argmax moved their original top class back, in place."""
    rows = np.arange(len(p))
    before, after = np.argmax(p, axis=1), np.argmax(q, axis=1)
    flipped = rows[before != after]
    if not flipped.size:
        return
    b, a = before[flipped], after[flipped]
    q[flipped, b], q[flipped, a] = q[flipped, a], q[flipped, b].copy()
    # A maximum shared with another class (a flat row, say) still loses argmax's tie-break:
    # lift the top class just above the others and renormalise those rows.
    tied = flipped[np.argmax(q[flipped], axis=1) != b]
    if tied.size:
        top = before[tied]
        q[tied, top] = q[tied].max(axis=1) + 1e-9
        q[tied] /= q[tied].sum(axis=1, keepdims=True)


def _reverse_sigmoid_small(
    rows: list[list[float]], beta: float, gamma: float, guard_top1: bool
) -> list[list[float]] | None:
    """:func:`reverse_sigmoid` of one answer's rows on Python floats, with the same float
    operations in the same order; only the power is numpy's (its SIMD ``pow`` is not the C
    library's to the last bit). ``None`` for non-finite input: numpy then decides."""
    try:
        if not all(math.isfinite(math.fsum(row)) for row in rows):
            return None
    except (OverflowError, ValueError):  # huge values, or inf - inf: numpy decides
        return None
    # Conditional expressions rather than min() and max(), several times faster; they pick
    # what np.minimum and np.maximum pick (q is never a negative zero, as beta != 0).
    low, high = 1e-9, 1.0 - 1e-9
    ratios = []
    for row in rows:
        pc = [low if v < low else high if v > high else v for v in row]
        ratios.append([(1.0 - c) / c for c in pc])
    powers: list[list[float]] = (np.array(ratios, dtype=np.float64) ** gamma).tolist()
    out = []
    for row, x in zip(rows, powers, strict=True):
        q = [v - beta * (1.0 / (1.0 + w) - 0.5) for v, w in zip(row, x, strict=False)]
        q = [0.0 if v < 0.0 else 1.0 if v > 1.0 else v for v in q]
        total = _numpy_sum(q) or 1.0  # renormalise: a row of zeros stays zeros
        q = [v / total for v in q]
        if guard_top1:  # _restore_top1, row by row
            before, after = row.index(max(row)), q.index(max(q))
            if before != after:
                q[before], q[after] = q[after], q[before]
                if q.index(max(q)) != before:
                    q[before] = max(q) + 1e-9
                    total = _numpy_sum(q)
                    q = [v / total for v in q]
        out.append(q)
    return out


def poison(p: Rows, seeds: Seeds, alpha: float = 0.5, epsilon: float = 0.5) -> Rows:
    """Bounded, argmax-preserving poisoning toward a keyed simplex point (MAD-lite).

    After Orekondy et al. (ICLR 2020, "Prediction Poisoning"), in the variant that needs no
    surrogate model (G = I): each row moves toward ``y* = (e_top + e_j) / 2``, the midpoint
    of the simplex edge joining its top class and a keyed other class ``j``:
    ``ỹ = (1 − a)·y + a·y*`` with ``a = min(alpha, epsilon / ‖y* − y‖₁)``, so
    ``‖ỹ − y‖₁ ≤ epsilon``. The top class loses no ground to ``j`` and gains on every
    other class, so the top-1 label is kept (exact ties aside) for ``alpha < 1``.
    """
    n, k = p.shape
    top = np.argmax(p, axis=1)
    other = choice(seeds, k - 1)
    other = other + (other >= top)  # a keyed class that is not the top one
    target = np.zeros_like(p)
    target[np.arange(n), top] = 0.5
    target[np.arange(n), other] += 0.5
    distance = np.abs(target - p).sum(axis=1)
    a = np.minimum(alpha, np.divide(epsilon, distance, out=np.full(n, alpha), where=distance > 0))
    out: Rows = (1.0 - a)[:, None] * p + a[:, None] * target
    return out


def misinformation(p: Rows, seeds: Seeds, tau: float = 0.5, nu: float = 10.0) -> Rows:
    """Adaptive misinformation (Kariyappa & Qureshi, CVPR 2020), without a trained model.

    ``y′ = (1 − α)·y + α·ŷ`` with ``α = σ(ν(τ − max y))``: confident answers (typical of
    benign, in-distribution queries) are nearly untouched, low-confidence ones (typical of
    synthetic extraction queries) are pulled toward ``ŷ``, a keyed anti-prediction that
    puts its mass away from the likely classes: ``ŷ ∝ (1 − y)·u`` with keyed ``u ∈ [0.5, 1.5)``.
    """
    alpha = 1.0 / (1.0 + np.exp(-nu * (tau - p.max(axis=1))))
    anti = renormalise((1.0 - p) * (0.5 + uniform(seeds, p.shape[1])))
    out: Rows = (1.0 - alpha)[:, None] * p + alpha[:, None] * anti
    return out


def embedding_noise(e: Rows, seeds: Seeds, epsilon: float = 0.05) -> Rows:
    """Keyed noise of norm ``epsilon·‖e‖`` on each embedding, the norm convention kept.

    ``e′ = e + ε‖e‖·n`` with ``n`` a keyed unit direction; rows that were unit-norm are
    renormalised to unit norm, other rows are rescaled to their original norm, so cosine
    similarities between embeddings move by O(ε) while a copy trained on them inherits the
    noise. Keyed per query (and, if the caller salts the seeds per identity, per client,
    which breaks pooling across accounts as in B4B, Dubiński et al., NeurIPS 2023).
    """
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    direction = normal(seeds, e.shape[1])
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    moved = e + epsilon * norms * direction
    new_norms = np.linalg.norm(moved, axis=1, keepdims=True)
    # A row the noise cancelled exactly (possible only at epsilon = 1) keeps its value.
    out: Rows = np.divide(moved * norms, new_norms, out=e.copy(), where=new_norms > 0)
    return out
