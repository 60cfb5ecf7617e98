"""Keyed, deterministic randomness for post-processors, vectorised over rows.

Every random choice a post-processor makes is a function of (secret, canonical query):
the same query always gets the same answer, so an attacker gains nothing by asking it
again and averaging (fresh noise per request would be averaged away). Each row gets a
64-bit seed, the keyed BLAKE2b hash of its canonical input; the numbers a row needs are
then drawn by SplitMix64 (Steele et al., 2014) over (seed, counter), in numpy, for all
rows at once: no per-row generator objects on the response path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def row_seeds(key: bytes, rows: Sequence[bytes], salt: bytes = b"") -> NDArray[np.uint64]:
    """One 64-bit seed per row: BLAKE2b keyed by ``key`` (at most 64 bytes, the BLAKE2b
    key size; the shield passes a 32-byte derived key) over ``salt ‖ 0x00 ‖ row``, or over
    ``row`` alone when there is no salt."""
    base = hashlib.blake2b(key=key[:64], digest_size=8)
    if salt:
        base.update(salt + b"\x00")
    out = np.empty(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        h = base.copy()
        h.update(row)
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def _splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        z = (x ^ (x >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        out: NDArray[np.uint64] = z ^ (z >> _S31)
        return out


def uniform(seeds: NDArray[np.uint64], size: int, stream: int = 0) -> NDArray[np.float64]:
    """``(rows, size)`` uniforms in [0, 1), a pure function of (seed, stream, column)."""
    with np.errstate(over="ignore"):
        counters = np.arange(size, dtype=np.uint64) + np.uint64(stream) * np.uint64(1 << 32)
        x = seeds[:, None] + (counters[None, :] + np.uint64(1)) * _GOLDEN
    bits = _splitmix64(x) >> _S11  # 53 random bits
    out: NDArray[np.float64] = bits.astype(np.float64) / float(1 << 53)
    return out


def normal(seeds: NDArray[np.uint64], size: int, stream: int = 0) -> NDArray[np.float64]:
    """``(rows, size)`` standard normals (Box–Muller over two keyed uniform streams)."""
    u1 = uniform(seeds, size, 2 * stream + 1)
    u2 = uniform(seeds, size, 2 * stream + 2)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def choice(seeds: NDArray[np.uint64], n: int, stream: int = 0) -> NDArray[np.int64]:
    """One keyed integer in ``[0, n)`` per row."""
    return np.minimum((uniform(seeds, 1, stream)[:, 0] * n).astype(np.int64), n - 1)
