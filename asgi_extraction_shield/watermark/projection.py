"""Keyed projections of inputs: where a query lies, as the watermarks see it.

A watermark must answer alike for inputs that a substitute model cannot tell apart, or
the mark does not survive training (a wrong label on one exact input is outvoted by its
correctly answered neighbours). So the marks key on *where* an input lies, not on its
bytes: each input becomes a direction ``x̃`` (numeric rows centred on their own mean and
scaled to unit norm, so brightness and contrast changes map alike; texts hashed into
words and character 3-grams), and keyed Gaussian directions ``w`` project it:
``z = ⟨w, x̃⟩``, which is N(0, 1) over keys for any fixed input. DRW's phase is
``Φ(z)`` of a keyed feature map of ``x̃`` (:func:`features`), projected alike; DAWN's regions are cells of a keyed, offset grid over a few projections.
Inputs that are neither numeric rows nor texts have no position (``None``).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..formats.base import Outputs, numeric_rows
from ..monitor.features import Featurizer

Matrix = NDArray[np.float64]

TEXT_DIM = 256
"""Width of the hashed text features."""


def _seed(key: bytes, label: bytes) -> int:
    digest = hashlib.blake2b(label, key=key[:64], digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keyed_gaussian(key: bytes, label: str, shape: tuple[int, ...]) -> Matrix:
    """Standard normals of ``shape``, a pure function of ``(key, label, shape)``."""
    tag = f"{label}:{'x'.join(map(str, shape))}".encode()
    out: Matrix = np.random.default_rng(_seed(key, tag)).standard_normal(shape)
    return out


@functools.lru_cache(maxsize=32)
def keyed_uniform(key: bytes, label: str, size: int) -> Matrix:
    """Uniforms in [0, 1) of ``size``, a pure function of ``(key, label, size)`` (computed
    once; read-only: callers share it)."""
    tag = f"{label}:{size}".encode()
    out: Matrix = np.random.default_rng(_seed(key, tag)).random(size)
    out.setflags(write=False)
    return out


def keyed_index(key: bytes, label: str, n: int) -> int:
    """One keyed integer in ``[0, n)``."""
    return _seed(key, label.encode()) % n


_TEXTS = Featurizer(b"asgi_extraction_shield/watermark-text", TEXT_DIM)
"""Text hashing need not be secret: the keyed projections that follow are."""


def directions(items: Sequence[Any]) -> Matrix | None:
    """``(n, d)`` unit directions of the inputs, or ``None`` when they are not all numeric
    rows of one width or all texts. A constant numeric row (no direction) maps to zeros."""
    rows = numeric_rows(list(items))
    if rows is None:
        if not items or not all(isinstance(item, str) for item in items):
            return None
        return _TEXTS.texts(list(items))
    if rows.shape[1] < 2:
        return None
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    out: Matrix = np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)
    return out


def projections(x: Matrix, key: bytes, label: str, m: int) -> Matrix:
    """``(n, m)`` keyed projections ``⟨w_j, x̃⟩`` of unit directions ``x`` (the keyed
    matrix drawn once per key and width, not at every request)."""
    w = _keyed_matrix(key, label, (x.shape[1], m))
    out: Matrix = x @ w
    return out


QUADRATIC_SHARE = 0.85
"""The share of :func:`features`' variance in their products of projections."""


@functools.lru_cache(maxsize=32)
def _keyed_matrix(key: bytes, label: str, shape: tuple[int, ...]) -> Matrix:
    """:func:`keyed_gaussian`, computed once (read-only: callers share it)."""
    out = keyed_gaussian(key, label, shape)
    out.setflags(write=False)
    return out


PRODUCT_BUDGET = 1 << 20
"""The largest ``d × width`` of :func:`features`' keyed pairs (16 MB of them): wider
inputs keep their direction alone, which already spans ``d`` dimensions."""


def product_width(d: int, width: int) -> int:
    """The products :func:`features` makes for inputs of ``d`` numbers: ``width``, or 0
    when ``d × width`` exceeds :data:`PRODUCT_BUDGET`."""
    return width if d * width <= PRODUCT_BUDGET else 0


@functools.lru_cache(maxsize=4)
def _pairs(key: bytes, d: int, width: int) -> Matrix:
    """The keyed ``a_j`` then ``b_j`` of :func:`features`, side by side (one product)."""
    out = np.hstack(
        [
            keyed_gaussian(key, "features-a", (d, width)),
            keyed_gaussian(key, "features-b", (d, width)),
        ]
    )
    out.setflags(write=False)
    return out


def _products(x: Matrix, key: bytes, width: int) -> Matrix:
    both = x @ _pairs(key, x.shape[1], width)
    out: Matrix = both[:, :width] * both[:, width:] * math.sqrt(QUADRATIC_SHARE / width)
    return out


def features(x: Matrix, key: bytes, width: int) -> Matrix:
    """A keyed feature map of unit directions ``x`` (``(n, d)``) of ``d + width`` columns:
    ``[√(1 − s)·x̃, √s·((⟨a_j, x̃⟩⟨b_j, x̃⟩) / √width)_j]``, ``a_j, b_j`` keyed standard
    normal, ``s`` = :data:`QUADRATIC_SHARE`; ``width`` 0 gives ``x̃`` itself. Each product
    has variance 1 for a unit ``x̃``, so ``|φ(x̃)|² ≈ 1`` as ``|x̃|² = 1``: a keyed
    projection ``⟨w, φ(x̃)⟩`` stays about N(0, 1) over keys for any input. The products are
    a random projection of the quadratic forms of ``x̃``: smooth functions of the input, but
    ``width`` dimensions more for a keyed direction to lie in. Inputs too wide for
    :data:`PRODUCT_BUDGET` keep ``x̃`` alone (:func:`product_width`)."""
    width = product_width(x.shape[1], width)
    if width == 0:
        return x
    out: Matrix = np.hstack([math.sqrt(1.0 - QUADRATIC_SHARE) * x, _products(x, key, width)])
    return out


def phase_direction(key: bytes, dim: int) -> NDArray[np.float64]:
    """DRW's keyed standard normal direction ``w`` in a space of ``dim`` features (for
    ``dim = d``, the column of :func:`projections` with label ``"phase"``)."""
    return _keyed_matrix(key, "phase", (dim, 1))[:, 0]


@functools.lru_cache(maxsize=4)
def _quadratic_form(key: bytes, d: int, width: int) -> Matrix:
    """``M = √(s / width) · Σ_j w_j a_j b_jᵀ`` (``d × d``): the products' part of
    ``⟨w, φ(x̃)⟩`` is the quadratic form ``x̃ᵀ M x̃``."""
    pairs = _pairs(key, d, width)
    w = phase_direction(key, d + width)[d:]
    out: Matrix = (pairs[:, :width] * w) @ pairs[:, width:].T * math.sqrt(QUADRATIC_SHARE / width)
    out.setflags(write=False)
    return out


def scores(x: Matrix, key: bytes, width: int) -> NDArray[np.float64]:
    """``⟨w, φ(x̃)⟩`` for unit directions ``x``, ``φ`` = :func:`features` of ``width``,
    without building ``φ``: its products' part is a ``d × d`` quadratic form of ``x̃``
    (:func:`_quadratic_form`), so marking a row costs ``d²`` operations, not ``2·d·width``."""
    d = x.shape[1]
    width = product_width(d, width)
    w = phase_direction(key, d + width)
    if width == 0:
        out: NDArray[np.float64] = x @ w
        return out
    quadratic = np.einsum("ij,ij->i", x @ _quadratic_form(key, d, width), x)
    out = math.sqrt(1.0 - QUADRATIC_SHARE) * (x @ w[:d]) + quadratic
    return out


def phase(x: Matrix, key: bytes, width: int = 0) -> NDArray[np.float64]:
    """DRW's keyed phase ``t = Φ(⟨w, φ(x̃)⟩)`` in (0, 1) of each unit direction
    (:func:`scores`; ``width`` 0: ``Φ(⟨w, x̃⟩)``)."""
    return to_phase(scores(x, key, width))


def to_phase(z: NDArray[np.float64]) -> NDArray[np.float64]:
    """``Φ(z)``, the standard normal distribution function."""
    erf = [math.erf(v) for v in (np.asarray(z, dtype=np.float64) / math.sqrt(2.0)).ravel().tolist()]
    out: NDArray[np.float64] = 0.5 * (1.0 + np.asarray(erf, dtype=np.float64).reshape(np.shape(z)))
    return out


def cells(x: Matrix, key: bytes, dims: int, width: float) -> list[bytes]:
    """DAWN's keyed regions: ``floor(⟨w_j, x̃⟩ / width + u_j)`` for ``dims`` keyed
    directions and offsets, as bytes (the same cell, the same bytes)."""
    z = projections(x, key, "cells", dims)
    offsets = keyed_uniform(key, "offsets", dims)
    grid = np.floor(z / width + offsets).astype(np.int64)
    return [row.tobytes() for row in grid]


def answered(
    inputs: Sequence[Any],
    outputs: Sequence[Outputs],
    pick: Callable[[Outputs], NDArray[Any] | None],
) -> tuple[list[int], Matrix, NDArray[Any]] | None:
    """The probes a verifier can use: those answered with exactly one row of what ``pick``
    takes from an answer (probabilities, labels), with a direction; rows and directions of
    the most common widths. Returns (probe indices, directions, rows), or ``None``."""
    rows: list[tuple[int, NDArray[Any]]] = []
    for i, out in enumerate(outputs[: len(inputs)]):
        values = pick(out)
        if values is not None and values.ndim >= 1 and len(values) == 1:
            rows.append((i, values[0]))
    together = directions([inputs[i] for i, _ in rows]) if rows else None
    found: list[tuple[int, Matrix, NDArray[Any]]] = []
    for j, (i, values) in enumerate(rows):
        x = together[j : j + 1] if together is not None else directions([inputs[i]])
        if x is not None:
            found.append((i, x[0], values))
    if not found:
        return None
    d = Counter(len(x) for _, x, _ in found).most_common(1)[0][0]
    shape = Counter(np.shape(v) for _, x, v in found if len(x) == d).most_common(1)[0][0]
    kept = [(i, x, v) for i, x, v in found if len(x) == d and np.shape(v) == shape]
    return (
        [i for i, _, _ in kept],
        np.asarray([x for _, x, _ in kept], dtype=np.float64),
        np.asarray([v for _, _, v in kept]),
    )
