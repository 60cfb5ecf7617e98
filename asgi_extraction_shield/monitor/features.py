"""Query features: every query as a vector of a fixed dimension ``D``, keyed.

Numeric inputs (flattened) are mapped by a keyed Gaussian random projection to ``D``
dimensions, scaled so that Euclidean distances are preserved in expectation
(Johnson–Lindenstrauss): PRADA's distances and the SimHash buckets are computed on these.
Texts are hashed (words and character 3-grams, signed feature hashing, Weinberger et al.
2009) into ``D`` dimensions and L2-normalised, so that cosine similarity measures overlap
of vocabulary. Embedding outputs can be used as features as they are (projected the same
way when their width is not ``D``). Keys come from ``SECRET_KEY``: an attacker cannot
predict which queries collide.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Matrix = NDArray[np.float64]
_WORD = re.compile(r"\w+")
MAX_TEXT_CHARS = 4096
MAX_WIDTHS = 32  # distinct input widths whose projection is kept


class Featurizer:
    """Maps numeric rows and texts to ``dim``-dimensional feature vectors."""

    def __init__(self, key: bytes, dim: int = 64) -> None:
        if dim < 2:
            raise ValueError("feature dimension must be at least 2")
        self.dim = dim
        self._key = key
        self._salt = zlib.crc32(key) & 0xFFFFFFFF
        self._projections: dict[int, Matrix] = {}

    def projection(self, width: int) -> Matrix:
        """The keyed ``(width, dim)`` projection for inputs of ``width`` numbers."""
        matrix = self._projections.get(width)
        if matrix is None:
            seed = int.from_bytes(
                hashlib.blake2b(
                    b"projection:%d" % width, key=self._key[:64], digest_size=8
                ).digest(),
                "little",
            )
            rng = np.random.default_rng(seed)
            matrix = rng.standard_normal((width, self.dim)) / np.sqrt(self.dim)
            if len(self._projections) >= MAX_WIDTHS:
                self._projections.pop(next(iter(self._projections)))
            self._projections[width] = matrix
        return matrix

    def numeric(self, rows: Matrix) -> Matrix:
        """``(n, width)`` numeric queries → ``(n, dim)``, distances preserved in expectation."""
        rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        if rows.shape[1] == 0:
            return np.zeros((len(rows), self.dim))
        out: Matrix = rows @ self.projection(rows.shape[1])
        return out

    def texts(self, texts: Sequence[str]) -> Matrix:
        """Texts → ``(n, dim)`` unit vectors of hashed words and character 3-grams."""
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            self._hash_into(out[i], text[:MAX_TEXT_CHARS].lower())
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        result: Matrix = out / norms
        return result

    def _hash_into(self, row: Matrix, text: str) -> None:
        salt = self._salt
        dim = self.dim
        # Words: one keyed CRC per word (few per query).
        for word in _WORD.findall(text):
            h = zlib.crc32(word.encode("utf-8", "surrogatepass"), salt)
            row[h % dim] += 1.0 if (h >> 31) & 1 else -1.0
        # Character 3-grams: a vectorised rolling hash over the UTF-8 bytes.
        data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8).astype(
            np.uint64
        )
        if len(data) >= 3:
            with np.errstate(over="ignore"):
                h3 = (data[:-2] * np.uint64(65599) + data[1:-1]) * np.uint64(65599) + data[2:]
                h3 = (h3 ^ np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
            index = ((h3 >> np.uint64(33)) % np.uint64(dim)).astype(np.int64)
            sign = np.where((h3 >> np.uint64(7)) & np.uint64(1), 0.5, -0.5)
            np.add.at(row, index, sign)

    def embeddings(self, vectors: Matrix) -> Matrix:
        """Embedding outputs as features: unit vectors of ``dim`` dimensions."""
        vectors = np.asarray(vectors, dtype=np.float64)
        projected = vectors if vectors.shape[1] == self.dim else self.numeric(vectors)
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out: Matrix = projected / norms
        return out
