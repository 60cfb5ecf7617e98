"""The query-novelty tracker of one identity (or one pool of identities).

Everything is bounded: a ring buffer of recent feature vectors, PRADA's growing sets
(capped), a ring of PRADA distances, a capped SimHash bucket histogram and a few
counters. Observing a query costs O(history · D), whatever the identity's past.

Signals (each a plain number, see :meth:`Tracker.signals`):

- ``prada_w``: Shapiro–Wilk W of the minimum distances between each new query and the
  earlier queries that grew the set (PRADA, Juuti et al. 2019); natural queries give
  roughly normal distances (W near 1), synthetic attack queries do not. One growing set
  per identity, not one per predicted class as in the paper: queries are observed before
  the model has answered them.
- ``coverage``: distinct keyed-SimHash buckets touched per query (over the last queries),
  and ``entropy``, the bucket histogram's normalised entropy: extractors spread over the
  input space, benign users concentrate on their topics (Kesarwani et al. 2018; B4B).
- ``novelty``: moving average of 1 − the highest cosine similarity to the recent history.
- ``near_duplicates``: share of queries within a small distance of a recent one
  (boundary probing, SEAT-lite, Zhang et al. 2021).
- ``low_margin``: share of answers whose top-1 / top-2 margin is small.
- ``class_entropy``: normalised entropy of the answers' top-1 classes: a substitute needs
  answers of every class, a benign user mostly asks about a few.
- ``distribution_requests``: share of requests asking for full distributions / logprobs;
  ``logit_bias_tokens``: distinct token ids pushed with ``logit_bias`` (Carlini et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .shapiro import shapiro_wilk

Matrix = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    history: int = 64
    """Recent feature vectors kept (novelty, near-duplicates); 0 turns both off."""
    simhash_bits: int = 10
    """Hyperplanes of the keyed SimHash: 2^bits buckets."""
    prada_points: int = 64
    """Points kept in PRADA's growing set (the oldest are forgotten)."""
    prada_distances: int = 500
    """Minimum distances kept for the Shapiro–Wilk test (the most recent)."""
    prada_min: int = 100
    """Distances needed before the test runs (PRADA: 100)."""
    prada_every: int = 10
    """The test runs every this many queries (PRADA: 10)."""
    near_duplicate_radius: float = 0.05
    """Near-duplicate: within this fraction of the typical distance between queries."""
    low_margin: float = 0.1
    """An answer whose top-1 minus top-2 probability is below this has a low margin."""
    window: int = 200
    """Queries (or requests, or answers) over which shares and coverage are measured."""
    novelty_rate: float = 0.05
    """Weight of each new query in the novelty moving average."""
    repeats: int = 256
    """Recent queries remembered (as 64-bit digests) to recognise a query asked again."""


class _Ring:
    """The last ``size`` values of one kind, in a preallocated array (compact per identity)."""

    __slots__ = ("filled", "position", "values")

    def __init__(self, size: int, dtype: type) -> None:
        self.values: NDArray[Any] = np.zeros(size, dtype=dtype)
        self.filled = 0
        self.position = 0

    def push(self, value: float) -> float:
        """Store ``value``; returns the value it replaced (0 while filling)."""
        values = self.values
        old = values[self.position] if self.filled == len(values) else 0
        values[self.position] = value
        self.position = (self.position + 1) % len(values)
        self.filled = min(self.filled + 1, len(values))
        return float(old)

    def view(self) -> NDArray[Any]:
        return self.values[: self.filled]


class _Share:
    """The share of true values among the last ``size`` observations, in O(1)."""

    __slots__ = ("count", "ring")

    def __init__(self, size: int) -> None:
        self.ring = _Ring(size, np.bool_)
        self.count = 0

    def push(self, value: bool) -> None:
        self.count += value - int(self.ring.push(value))

    @property
    def share(self) -> float:
        return self.count / self.ring.filled if self.ring.filled else 0.0


class _Points:
    """A ring of vectors with their squared norms: distances and cosines in one product."""

    __slots__ = ("filled", "norms2", "points", "position")

    def __init__(self, size: int, dim: int) -> None:
        # float32: half the memory per identity; distances need no more precision.
        self.points = np.zeros((size, dim), dtype=np.float32)
        self.norms2 = np.zeros(size, dtype=np.float32)
        self.filled = 0
        self.position = 0

    def add(self, x: Matrix, norm2: float) -> None:
        self.points[self.position] = x
        self.norms2[self.position] = norm2
        self.position = (self.position + 1) % len(self.points)
        self.filled = min(self.filled + 1, len(self.points))

    def products(self, x: Matrix, norm2: float) -> tuple[NDArray[Any], NDArray[Any]]:
        """``(dot products, squared distances)`` of ``x`` with the stored points."""
        dots = self.points[: self.filled] @ x.astype(np.float32)
        distances2 = np.maximum(self.norms2[: self.filled] + np.float32(norm2) - 2.0 * dots, 0.0)
        return dots, distances2


class Tracker:
    """State and signals of one identity or pool."""

    __slots__ = (
        "_buckets",
        "_class_entropy",
        "_classes",
        "_classes_seen",
        "_digests",
        "_entropy",
        "_flags",
        "_history",
        "_margins",
        "_near",
        "_prada",
        "_prada_distances",
        "_prada_recent",
        "_prada_threshold",
        "_since_test",
        "assessment",
        "config",
        "cursor",
        "first_seen",
        "last_seen",
        "logit_bias_tokens",
        "novelty",
        "prada_w",
        "queries",
        "requests",
        "scale",
    )

    def __init__(self, config: TrackerConfig, dim: int, now: float) -> None:
        self.config = config
        self._history = _Points(max(1, config.history), dim)
        self.queries = 0
        self.requests = 0
        self.first_seen = now
        self.last_seen = now
        self._buckets = _Ring(config.window, np.int32)
        self._digests = _Ring(config.repeats, np.int64)
        self._entropy: tuple[float, float] | None = None  # (coverage, entropy), cached
        self.novelty = 0.0
        self._near = _Share(config.window)
        self._margins = _Share(config.window)
        self._classes = _Ring(config.window, np.int32)
        self._classes_seen = 0
        self._class_entropy: float | None = None
        self._flags = _Share(config.window)
        self.logit_bias_tokens: set[str] = set()
        self._prada = _Points(config.prada_points, dim)
        self._prada_threshold = 0.0
        self._prada_distances = _Ring(config.prada_distances, np.float32)
        self._prada_recent = _Ring(50, np.float32)
        self._since_test = 0
        self.prada_w = 1.0
        self.scale = 0.0  # running typical distance between queries
        self.assessment: tuple[int, float, dict[str, float], dict[str, float]] | None = None
        """``(requests, risk, signals, scores)`` when last assessed (kept by the monitor)."""
        self.cursor: bytes | None = None
        """How far this tracker has read the observations other processes shared (their
        log's last entry id read), ``None`` before the first read."""

    # -- observing -------------------------------------------------------------------------

    def observe_request(self, distribution: bool, logit_bias: tuple[str, ...], now: float) -> None:
        self.requests += 1
        self.last_seen = now
        self._flags.push(distribution)
        if logit_bias and len(self.logit_bias_tokens) < 100_000:
            self.logit_bias_tokens.update(logit_bias)

    def observe_queries(
        self, features: Matrix, buckets: list[int], digests: list[int], now: float
    ) -> None:
        """Feature rows of one request's queries, their SimHash buckets, and a digest of
        each query's canonical form (to recognise a query asked again)."""
        self.last_seen = now
        norms2 = np.einsum("ij,ij->i", features, features).tolist()
        for x, norm2, bucket, digest in zip(features, norms2, buckets, digests, strict=True):
            self._observe_one(x, norm2, bucket, digest)
        self.queries += len(buckets)

    def _observe_one(self, x: Matrix, norm2: float, bucket: int, digest: int) -> None:
        config = self.config
        history = self._history
        # Benign clients ask the same query again; that says nothing of how their queries
        # are made, so a repeat feeds neither PRADA nor the near-duplicate share.
        repeat = bool(self._digests.filled and (self._digests.view() == digest).any())
        self._digests.push(digest)
        if history.filled and config.history:
            dots, distances2 = history.products(x, norm2)
            nearest2 = float(distances2.min())
            nearest = math.sqrt(nearest2)
            if not repeat:
                # Cosines of vectors near the centre are noise: floor the norms at a small
                # fraction of the typical distance.
                floor = (1e-3 * self.scale) ** 2
                denominators = np.sqrt(
                    np.maximum(history.norms2[: history.filled], floor) * max(norm2, floor)
                )
                denominators[denominators == 0] = 1.0
                similarity = float((dots / denominators).max())
                self.novelty += config.novelty_rate * ((1.0 - similarity) - self.novelty)
            typical = math.sqrt(float(distances2.mean()))  # root-mean-square distance
            self.scale = typical if self.scale == 0 else self.scale + 0.05 * (typical - self.scale)
            # Near, but not the same query again: boundary probing steps a little away
            # from earlier queries.
            if not repeat:
                radius = config.near_duplicate_radius * self.scale
                self._near.push(nearest2 > 1e-9 * (norm2 + 1e-12) and nearest < radius)
        if config.history:
            history.add(x, norm2)
        self._count_bucket(bucket)
        if not repeat:
            self._prada_step(x, norm2)

    def observe_answers(self, probabilities: Matrix) -> None:
        """Answers' probability rows: margins, and which class each answer's top-1 is."""
        if probabilities.shape[1] < 2:
            return
        self.observe_answer_summary(*answer_summary(probabilities))

    def observe_answer_summary(
        self, margins: NDArray[Any], labels: NDArray[Any], width: int
    ) -> None:
        """Answers as :func:`answer_summary` gives them (what another process shares)."""
        for low in (margins < self.config.low_margin).tolist():
            self._margins.push(bool(low))
        self._classes_seen = max(self._classes_seen, width)
        for label in labels.tolist():
            self._classes.push(label)
        self._class_entropy = None

    def _count_bucket(self, bucket: int) -> None:
        self._buckets.push(bucket)
        self._entropy = None

    def _prada_step(self, x: Matrix, norm2: float) -> None:
        """PRADA: grow the set, record min distances, test their normality every few queries."""
        config = self.config
        prada = self._prada
        if not prada.filled:
            prada.add(x, norm2)
            return
        d = math.sqrt(float(prada.products(x, norm2)[1].min()))
        self._prada_distances.push(d)
        self._prada_recent.push(d)
        if d > self._prada_threshold:
            prada.add(x, norm2)
            # T ← max(T, mean − std) of the recent distances (PRADA, Algorithm 1).
            recent = self._prada_recent.view()
            self._prada_threshold = max(self._prada_threshold, float(recent.mean() - recent.std()))
        self._since_test += 1
        distances = self._prada_distances
        if distances.filled > config.prada_min and self._since_test >= config.prada_every:
            self._since_test = 0
            self.prada_w = _prada_statistic(distances.view().astype(np.float64))

    # -- signals ---------------------------------------------------------------------------

    def coverage(self) -> tuple[float, float]:
        """Distinct buckets per query and the normalised entropy of the bucket histogram,
        over the window (cached until the next query)."""
        if self._entropy is None:
            window = self._buckets.filled
            if window == 0:
                self._entropy = (0.0, 0.0)
            else:
                counts = np.unique(self._buckets.view(), return_counts=True)[1]
                entropy = 0.0
                if len(counts) > 1:
                    p = counts / window
                    top = math.log(min(window, 2**self.config.simhash_bits))
                    entropy = float(-(p * np.log(p)).sum() / top)
                self._entropy = (len(counts) / window, entropy)
        return self._entropy

    def class_entropy(self) -> float:
        """Normalised entropy of the answers' top-1 classes over the window: extraction needs
        answers from every class, a user mostly asks about a few (cached until an answer)."""
        if self._class_entropy is None:
            labels = self._classes.view()
            value = 0.0
            if len(labels) > 1 and self._classes_seen > 1:
                counts = np.unique(labels, return_counts=True)[1]
                p = counts / len(labels)
                top = math.log(min(len(labels), self._classes_seen))
                value = float(-(p * np.log(p)).sum() / top) if top > 0 else 0.0
            self._class_entropy = value
        return self._class_entropy

    def signals(self) -> dict[str, float]:
        coverage, entropy = self.coverage()
        return {
            "queries": float(self.queries),
            "prada_w": self.prada_w,
            "coverage": coverage,
            "entropy": entropy,
            "novelty": self.novelty,
            "near_duplicates": self._near.share,
            "low_margin": self._margins.share,
            "class_entropy": self.class_entropy(),
            "distribution_requests": self._flags.share,
            "logit_bias_tokens": float(len(self.logit_bias_tokens)),
        }


def answer_summary(probabilities: Matrix) -> tuple[NDArray[Any], NDArray[Any], int]:
    """``(top-1 minus top-2 margins, top-1 classes, classes)`` of probability rows."""
    top2 = np.partition(probabilities, -2, axis=1)[:, -2:]
    margins = np.abs(top2[:, 1] - top2[:, 0])
    labels = np.argmax(probabilities, axis=1).astype(np.int32)
    return margins, labels, int(probabilities.shape[1])


def _prada_statistic(distances: Matrix) -> float:
    """W of the distances after dropping those beyond 3σ (PRADA)."""
    mean, std = distances.mean(), distances.std()
    kept = distances[np.abs(distances - mean) <= 3 * std] if std > 0 else distances
    if len(kept) < 3 or np.ptp(kept) == 0:
        return 1.0
    w, _ = shapiro_wilk(kept)
    return float(w)
