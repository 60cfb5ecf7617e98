"""The query-novelty tracker of one identity (or one pool of identities).

Everything is bounded: a ring buffer of recent feature vectors, PRADA's growing sets
(capped), a ring of PRADA distances, a capped SimHash bucket histogram and a few
counters. Observing a query costs O(history · D), whatever the identity's past.

Signals (each a plain number, see :meth:`Tracker.signals`):

- ``prada_w``: Shapiro–Wilk W of the minimum distances between each new query and the
  earlier queries that grew the set (PRADA, Juuti et al. 2019); natural queries give
  roughly normal distances (W near 1), synthetic attack queries do not.
- ``coverage``: distinct keyed-SimHash buckets touched per query (over the last queries),
  and ``entropy``, the bucket histogram's normalised entropy: extractors spread over the
  input space, benign users concentrate on their topics (Kesarwani et al. 2018; B4B).
- ``novelty``: moving average of 1 − the highest cosine similarity to the recent history.
- ``near_duplicates``: share of queries within a small distance of a recent one
  (boundary probing, SEAT-lite, Zhang et al. 2021).
- ``low_margin``: share of answers whose top-1 / top-2 margin is small.
- ``distribution_requests``: share of requests asking for full distributions / logprobs;
  ``logit_bias_tokens``: distinct token ids pushed with ``logit_bias`` (Carlini et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .shapiro import shapiro_wilk

Matrix = NDArray[np.float64]
_POWERS = 1 << np.arange(62, dtype=np.int64)  # SimHash bits → bucket number


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    history: int = 64
    """Recent feature vectors kept (novelty, near-duplicates)."""
    simhash_bits: int = 10
    """Hyperplanes of the keyed SimHash: 2^bits buckets."""
    max_buckets: int = 1024
    """Distinct buckets counted at most."""
    prada_points: int = 64
    """Points kept in PRADA's growing sets, over all classes."""
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
    """Queries over which shares and coverage are measured."""
    novelty_rate: float = 0.05
    """Weight of each new query in the novelty moving average."""


class Tracker:
    """State and signals of one identity or pool. ``hyperplanes`` is the shared keyed SimHash."""

    __slots__ = (
        "_bucket_order",
        "_buckets",
        "_flags",
        "_history",
        "_margins",
        "_near",
        "_prada_classes",
        "_prada_distances",
        "_prada_points",
        "_prada_threshold",
        "_since_test",
        "config",
        "filled",
        "first_seen",
        "hyperplanes",
        "last_seen",
        "logit_bias_tokens",
        "novelty",
        "prada_w",
        "queries",
        "requests",
        "scale",
    )

    def __init__(self, config: TrackerConfig, hyperplanes: Matrix, now: float) -> None:
        dim = hyperplanes.shape[0]
        self.config = config
        self.hyperplanes = hyperplanes
        self._history = np.zeros((config.history, dim))
        self.filled = 0
        self.queries = 0
        self.requests = 0
        self.first_seen = now
        self.last_seen = now
        self._buckets: dict[int, int] = {}
        self._bucket_order: list[int] = []  # the bucket of each of the last ``window`` queries
        self.novelty = 0.0
        self._near: list[bool] = []
        self._margins: list[bool] = []
        self._flags: list[bool] = []
        self.logit_bias_tokens: set[str] = set()
        self._prada_points = np.zeros((0, dim))
        self._prada_classes = np.zeros(0, dtype=np.int64)
        self._prada_threshold: dict[int, float] = {}
        self._prada_distances: list[float] = []
        self._since_test = 0
        self.prada_w = 1.0
        self.scale = 0.0  # running typical distance between queries (EMA)

    # -- observing -------------------------------------------------------------------------

    def observe_request(self, distribution: bool, logit_bias: tuple[str, ...], now: float) -> None:
        self.requests += 1
        self.last_seen = now
        _push(self._flags, distribution, self.config.window)
        if logit_bias and len(self.logit_bias_tokens) < 100_000:
            self.logit_bias_tokens.update(logit_bias)

    def observe_queries(
        self, features: Matrix, now: float, classes: NDArray[np.int64] | None = None
    ) -> None:
        """Feature rows of one request's queries (and their predicted classes, if known)."""
        self.last_seen = now
        for i, x in enumerate(features):
            cls = int(classes[i]) if classes is not None and i < len(classes) else 0
            self._observe_one(x, cls)
        self.queries += len(features)

    def _observe_one(self, x: Matrix, cls: int) -> None:
        config = self.config
        history = self._history[: self.filled]
        if self.filled:
            distances = np.sqrt(((history - x) ** 2).sum(axis=1))
            nearest = float(distances.min())
            norms = np.linalg.norm(history, axis=1) * (np.linalg.norm(x) or 1.0)
            norms[norms == 0] = 1.0
            similarity = float((history @ x / norms).max())
            self.novelty += config.novelty_rate * ((1.0 - similarity) - self.novelty)
            typical = float(np.median(distances))
            self.scale = typical if self.scale == 0 else self.scale + 0.05 * (typical - self.scale)
            # Near, but not the same query again: benign clients repeat queries exactly,
            # boundary probing steps a little away from earlier ones.
            radius = config.near_duplicate_radius * self.scale
            _push(self._near, 1e-9 * (self.scale or 1.0) < nearest < radius, config.window)
        slot = self.queries % config.history if self.filled == config.history else self.filled
        self._history[slot] = x
        self.filled = min(self.filled + 1, config.history)
        self._count_bucket(x)
        self._prada(x, cls)

    def observe_margins(self, probabilities: Matrix) -> None:
        """Answers' probability rows: the share with a small top-1 / top-2 margin."""
        if probabilities.shape[1] < 2:
            return
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        for low in (top2[:, 1] - top2[:, 0] < self.config.low_margin).tolist():
            _push(self._margins, bool(low), self.config.window)

    def _count_bucket(self, x: Matrix) -> None:
        bits = (x @ self.hyperplanes) > 0
        bucket = int(bits @ _POWERS[: len(bits)])
        order = self._bucket_order
        order.append(bucket)
        self._buckets[bucket] = self._buckets.get(bucket, 0) + 1
        if len(order) > self.config.window:
            old = order.pop(0)
            left = self._buckets[old] - 1
            if left:
                self._buckets[old] = left
            else:
                del self._buckets[old]

    def _prada(self, x: Matrix, cls: int) -> None:
        """PRADA: grow per-class sets, record min distances, test their normality."""
        config = self.config
        same = self._prada_points[self._prada_classes == cls]
        if len(same) == 0:
            self._add_prada_point(x, cls)
            return
        distances = np.sqrt(((same - x) ** 2).sum(axis=1))
        d = float(distances.min())
        _push(self._prada_distances, d, config.prada_distances)
        threshold = self._prada_threshold.get(cls, 0.0)
        if d > threshold:
            self._add_prada_point(x, cls)
            # T_c ← max(T_c, mean − std) of the set's distances (PRADA, Algorithm 1).
            recent = np.asarray(self._prada_distances[-50:])
            self._prada_threshold[cls] = max(threshold, float(recent.mean() - recent.std()))
        self._since_test += 1
        if len(self._prada_distances) > config.prada_min and self._since_test >= config.prada_every:
            self._since_test = 0
            self.prada_w = _prada_statistic(np.asarray(self._prada_distances))

    def _add_prada_point(self, x: Matrix, cls: int) -> None:
        points, classes = self._prada_points, self._prada_classes
        if len(points) >= self.config.prada_points:  # capped: forget the oldest point
            points, classes = points[1:], classes[1:]
        self._prada_points = np.vstack([points, x[None, :]])
        self._prada_classes = np.append(classes, cls)

    # -- signals ---------------------------------------------------------------------------

    def signals(self) -> dict[str, float]:
        window = len(self._bucket_order)
        coverage = len(self._buckets) / window if window else 0.0
        entropy = 0.0
        if len(self._buckets) > 1:
            counts = np.fromiter(self._buckets.values(), dtype=np.float64)
            p = counts / counts.sum()
            entropy = float(
                -(p * np.log(p)).sum() / math.log(min(window, 2**self.config.simhash_bits))
            )
        return {
            "queries": float(self.queries),
            "prada_w": self.prada_w,
            "coverage": coverage,
            "entropy": entropy,
            "novelty": self.novelty,
            "near_duplicates": _share(self._near),
            "low_margin": _share(self._margins),
            "distribution_requests": _share(self._flags),
            "logit_bias_tokens": float(len(self.logit_bias_tokens)),
        }


def _prada_statistic(distances: Matrix) -> float:
    """W of the distances after dropping those beyond 3σ (PRADA)."""
    mean, std = distances.mean(), distances.std()
    kept = distances[np.abs(distances - mean) <= 3 * std] if std > 0 else distances
    if len(kept) < 3 or np.ptp(kept) == 0:
        return 1.0
    w, _ = shapiro_wilk(kept)
    return float(w)


def _push(values: list[bool] | list[float], value: bool | float, limit: int) -> None:
    values.append(value)  # type: ignore[arg-type]
    if len(values) > limit:
        del values[0]


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0
