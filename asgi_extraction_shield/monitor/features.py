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
        """Texts → ``(n, dim)`` unit vectors of hashed words and character 3-grams.

        All the texts' 3-grams are hashed in one pass over their bytes, and every count is
        added in one ``np.add.at``: a handful of array operations for a batch of texts.
        Counts are multiples of 0.5, so the order of the additions does not matter."""
        n, dim, salt = len(texts), self.dim, self._salt
        out = np.zeros((n, dim))
        lowered = [text[:MAX_TEXT_CHARS].lower() for text in texts]
        rows: list[int] = []
        columns: list[int] = []
        signs: list[float] = []
        # Words: one keyed CRC per word (few per query).
        for i, text in enumerate(lowered):
            for word in _WORD.findall(text):
                h = zlib.crc32(word.encode("utf-8", "surrogatepass"), salt)
                rows.append(i)
                columns.append(h % dim)
                signs.append(1.0 if (h >> 31) & 1 else -1.0)
        if rows:
            np.add.at(out, (rows, columns), signs)
        # Character 3-grams: a vectorised rolling hash over the UTF-8 bytes of all texts,
        # keeping the 3-grams that lie within one text.
        encoded = [text.encode("utf-8", "surrogatepass") for text in lowered]
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
        if len(data) >= 3:
            owner = np.repeat(np.arange(n), [len(e) for e in encoded])
            inside = owner[:-2] == owner[2:]
            with np.errstate(over="ignore"):
                h3 = (data[:-2] * np.uint64(65599) + data[1:-1]) * np.uint64(65599) + data[2:]
                h3 = (h3[inside] ^ np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
            index = ((h3 >> np.uint64(33)) % np.uint64(dim)).astype(np.int64)
            sign = np.where((h3 >> np.uint64(7)) & np.uint64(1), 0.5, -0.5)
            np.add.at(out, (owner[:-2][inside], index), sign)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        result: Matrix = out / norms
        return result

    def embeddings(self, vectors: Matrix) -> Matrix:
        """Embedding outputs as features: unit vectors of ``dim`` dimensions."""
        vectors = np.asarray(vectors, dtype=np.float64)
        projected = vectors if vectors.shape[1] == self.dim else self.numeric(vectors)
        norms = np.linalg.norm(projected, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out: Matrix = projected / norms
        return out
