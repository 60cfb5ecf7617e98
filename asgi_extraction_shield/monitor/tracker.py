"""The query-novelty tracker of one identity (or one pool of identities).

Everything is bounded: a ring buffer of recent feature vectors, PRADA's growing sets
(capped), a ring of PRADA distances, a capped SimHash bucket histogram and a few
counters. Observing a query costs O(history · D), whatever the identity's past, and
observations are folded in by batches (see :class:`Tracker`).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .base import Assessment
from .shapiro import shapiro_wilk

Matrix = NDArray[np.float64]
BATCH = 64
"""Queued query rows (or answer batches) that trigger folding them into the state; also
the largest batch compared in one product."""
PRADA_RECENT = 50
"""Recent PRADA distances that set the growing set's threshold (PRADA: 50)."""


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
    novelty: bool = True
    """Measure novelty (cosines to the history); pools do not, it is not a pool signal."""
    repeats: int = 256
    """Recent queries remembered (as 64-bit digests) to recognise a query asked again."""


class _Ring:
    """The last ``size`` values of one kind, in a preallocated array (compact per identity).

    The order of :meth:`view` is not chronological once the ring has wrapped: every reader
    treats the values as a multiset.
    """

    __slots__ = ("filled", "position", "values")

    def __init__(self, size: int, dtype: type) -> None:
        self.values: NDArray[Any] = np.zeros(size, dtype=dtype)
        self.filled = 0
        self.position = 0

    def extend(self, new: Any) -> None:
        """Store several values, oldest first (only the last ``size`` stay)."""
        new = np.asarray(new, dtype=self.values.dtype)
        n, size = len(new), len(self.values)
        if n >= size:
            self.values[:] = new[n - size :]
            self.position, self.filled = 0, size
            return
        end = self.position + n
        if end <= size:
            self.values[self.position : end] = new
        else:
            split = size - self.position
            self.values[self.position :] = new[:split]
            self.values[: end - size] = new[split:]
        self.position = end % size
        self.filled = min(self.filled + n, size)

    def view(self) -> NDArray[Any]:
        return self.values[: self.filled]


class _Share:
    """The share of true values among the last ``size`` observations."""

    __slots__ = ("count", "ring")

    def __init__(self, size: int) -> None:
        self.ring = _Ring(size, np.bool_)
        self.count = 0

    def extend(self, values: Any) -> None:
        if len(values):
            self.ring.extend(values)
            self.count = int(np.count_nonzero(self.ring.view()))

    @property
    def share(self) -> float:
        return self.count / self.ring.filled if self.ring.filled else 0.0


class _Recent:
    """The last :data:`PRADA_RECENT` PRADA distances, as Python floats: they are written one
    at a time, in PRADA's sequential loop, where a numpy scalar costs more than the rest."""

    __slots__ = ("filled", "position", "values")

    def __init__(self) -> None:
        self.values = [0.0] * PRADA_RECENT
        self.filled = 0
        self.position = 0


class _Points:
    """A ring of vectors with their squared norms: distances and cosines in one product."""

    __slots__ = ("filled", "norms2", "points", "position")

    def __init__(self, size: int, dim: int) -> None:
        # float32: half the memory per identity; distances need no more precision.
        self.points = np.zeros((size, dim), dtype=np.float32)
        self.norms2 = np.zeros(size, dtype=np.float32)
        self.filled = 0
        self.position = 0

    def extend(self, x: NDArray[Any], norms2: NDArray[Any]) -> None:
        """Store the rows of ``x`` (with their squared norms), oldest first."""
        size = len(self.points)
        n = min(len(x), size)  # only the last ``size`` rows stay
        if not n:
            return
        x, norms2 = x[len(x) - n :], norms2[len(x) - n :]
        # The ring's slots from ``position`` on, wrapping round: two slices at most.
        first = min(n, size - self.position)
        self.points[self.position : self.position + first] = x[:first]
        self.norms2[self.position : self.position + first] = norms2[:first]
        self.points[: n - first] = x[first:]
        self.norms2[: n - first] = norms2[first:]
        self.position = (self.position + n) % size
        self.filled = min(self.filled + len(x), size)

    def stored(self) -> tuple[NDArray[Any], NDArray[Any]]:
        return self.points[: self.filled], self.norms2[: self.filled]

    def ages(self) -> NDArray[np.int64]:
        """Each stored row's rank from the oldest (0): the order in which rows are replaced."""
        ranks = np.arange(self.filled)
        return ranks if self.filled < len(self.points) else (ranks - self.position) % self.filled

    def replaced_before(self, added: NDArray[Any]) -> NDArray[Any]:
        """How many stored rows are replaced once ``added`` more rows are stored."""
        replaced: NDArray[Any] = np.maximum(self.filled + added - len(self.points), 0)
        return replaced


def _distances2(
    x: NDArray[Any], n2: NDArray[Any], points: NDArray[Any], pn2: NDArray[Any]
) -> tuple[NDArray[Any], NDArray[Any]]:
    """``(dot products, squared distances)`` of each row of ``x`` with each of ``points``."""
    dots = x @ points.T
    return dots, np.maximum(n2[:, None] + pn2[None, :] - 2.0 * dots, 0.0)


class Tracker:
    """State and signals of one identity or pool.

    Observations are queued and folded into the state in batches (at the latest when the
    signals are read): a handful of array operations per batch instead of per query, which
    is what keeps the monitor cheap on the request path. Within a batch each query is
    compared with the stored history and with the batch's earlier queries, so a batch sees
    up to ``batch - 1`` more neighbours than one query at a time would; the signals are the
    same up to that (a test holds them to it).
    """

    __slots__ = (
        "_buckets",
        "_centre",
        "_class_entropy",
        "_classes",
        "_classes_seen",
        "_digests",
        "_entropy",
        "_flags",
        "_history",
        "_margins",
        "_near",
        "_out_buckets",
        "_out_entropy",
        "_pending_answer_rows",
        "_pending_answers",
        "_pending_flags",
        "_pending_queries",
        "_pending_rows",
        "_prada",
        "_prada_distances",
        "_prada_recent",
        "_prada_sums",
        "_prada_threshold",
        "_since_test",
        "assessment",
        "config",
        "cursor",
        "first_seen",
        "last",
        "last_seen",
        "logit_bias_tokens",
        "novelty",
        "on_near",
        "prada_w",
        "queries",
        "queued",
        "requests",
        "route",
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
        self._out_buckets = _Ring(config.window, np.int32)
        self._out_entropy: tuple[float, float] | None = None
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
        self._prada_recent = _Recent()
        self._prada_sums = (0.0, 0.0)  # sum and sum of squares of the recent distances
        self._since_test = 0
        self.prada_w = 1.0
        self.scale = 0.0  # running typical distance between queries
        self._pending_flags: list[bool] = []
        self._pending_queries: list[tuple[Matrix, list[int], list[int], list[str] | None]] = []
        self._centre: Matrix | None = None
        self._pending_rows = 0
        self._pending_answers: list[_Answers] = []
        self._pending_answer_rows = 0
        self.assessment: (
            tuple[int, float, dict[str, float], dict[str, float], Assessment | None] | None
        ) = None
        """``(requests, risk, signals, scores, assessment)`` when last assessed (kept by the
        monitor, which builds the :class:`~.base.Assessment` once, when first asked)."""
        self.last: Assessment | None = None
        """The assessment the monitor last gave the identity (pools' attribution included),
        what its requests get until it is assessed again."""
        self.queued = 0
        """The identity's requests waiting in the monitor's queue (not observed yet)."""
        self.route: tuple[Any, list[str]] | None = None
        """The network the identity's latest request came from, and the pools it fed (kept
        by the monitor: they change only with the network)."""
        self.on_near: Callable[[str], None] | None = None
        """Told who asked each near-duplicate query (a pool's tracker: its members' shares
        of the pool's near-duplicates), given queries with their askers."""
        self.cursor: bytes | None = None
        """How far this tracker has read the observations other processes shared (their
        log's last entry id read), ``None`` before the first read."""

    @property
    def pools(self) -> list[str]:
        """The pools the identity's latest request fed."""
        return self.route[1] if self.route is not None else []

    # -- observing -------------------------------------------------------------------------

    def observe_requests(
        self, distribution: list[bool], logit_bias: list[tuple[str, ...]], now: float
    ) -> None:
        """Requests: whether each asked for full distributions, and the ``logit_bias``
        token ids of those that pushed some."""
        self.requests += len(distribution)
        self.last_seen = now
        self._pending_flags.extend(distribution)
        if len(self._pending_flags) >= self.config.window:
            self._flush_flags()
        for tokens in logit_bias:
            if len(self.logit_bias_tokens) >= 100_000:
                break
            self.logit_bias_tokens.update(tokens)

    def observe_queries(
        self,
        features: Matrix,
        buckets: list[int],
        digests: list[int],
        now: float,
        centre: Matrix | None = None,
        askers: list[str] | None = None,
    ) -> None:
        """Feature rows of one request's queries, their SimHash buckets, and a digest of
        each query's canonical form (to recognise a query asked again).

        ``centre`` is the running mean of the traffic's features (kept up to date by the
        monitor). Distances (PRADA's, near-duplicates') do not depend on the origin and are
        measured between the rows as given; cosines (novelty) are measured about the centre
        as it is when the queued rows are folded in, for new and stored rows alike (the
        centre moves; a stored row must not keep the one it had when it came). ``askers``
        names who asked each query, for :attr:`on_near`."""
        self.last_seen = now
        self.queries += len(buckets)
        if centre is not None:
            self._centre = centre
        self._pending_queries.append((features, buckets, digests, askers))
        self._pending_rows += len(buckets)
        if self._pending_rows >= BATCH:
            self._flush_queries()

    def observe_answers(self, probabilities: Matrix) -> None:
        """Answers' probability rows: margins, and which class each answer's top-1 is
        (summarised when the queue is folded in, a batch at a time)."""
        if probabilities.shape[1] >= 2:
            self._queue_answers(probabilities, len(probabilities))

    def observe_answer_summary(
        self, margins: NDArray[Any], labels: NDArray[Any], width: int
    ) -> None:
        """Answers as :func:`answer_summary` gives them (what another process shares)."""
        self._queue_answers((margins, labels, width), len(margins))

    def _queue_answers(self, answers: _Answers, rows: int) -> None:
        self._pending_answers.append(answers)
        self._pending_answer_rows += rows
        if self._pending_answer_rows >= BATCH:
            self._flush_answers()

    def observe_output_buckets(self, buckets: list[int]) -> None:
        """The SimHash buckets of the embeddings the identity received (its answers' coverage
        of the output space, for embedding endpoints)."""
        if buckets:
            self._out_buckets.extend(buckets)
            self._out_entropy = None

    def flush(self) -> None:
        """Fold the queued observations into the state."""
        if self._pending_flags:
            self._flush_flags()
        if self._pending_queries:
            self._flush_queries()
        if self._pending_answers:
            self._flush_answers()

    def _flush_flags(self) -> None:
        self._flags.extend(self._pending_flags)
        self._pending_flags = []

    def _flush_answers(self) -> None:
        pending, self._pending_answers = self._pending_answers, []
        self._pending_answer_rows = 0
        summaries = _summaries(pending)
        margins = stack_blocks([s[0] for s in summaries])
        labels = stack_blocks([s[1] for s in summaries])
        self._margins.extend(margins < self.config.low_margin)
        self._classes_seen = max(self._classes_seen, *(s[2] for s in summaries))
        self._classes.extend(labels)
        self._class_entropy = None

    def _flush_queries(self) -> None:
        pending, self._pending_queries = self._pending_queries, []
        self._pending_rows = 0
        askers: list[str] | None
        if len(pending) == 1:
            features, buckets, digests, askers = pending[0]
        else:
            features = np.concatenate([p[0] for p in pending])
            buckets = [b for p in pending for b in p[1]]
            digests = [d for p in pending for d in p[2]]
            askers = None
            if any(p[3] is not None for p in pending):
                askers = [a for p in pending for a in (p[3] or [""] * len(p[1]))]
        for start in range(0, len(digests), BATCH):
            stop = start + BATCH
            self._observe_batch(
                features[start:stop],
                buckets[start:stop],
                digests[start:stop],
                None if askers is None else askers[start:stop],
            )

    def _observe_batch(
        self,
        features: Matrix,
        buckets: list[int],
        digests: list[int],
        askers: list[str] | None = None,
    ) -> None:
        x = features.astype(np.float32)
        norms2 = np.einsum("ij,ij->i", x, x)
        # Benign clients ask the same query again; that says nothing of how their queries
        # are made, so a repeat feeds neither PRADA, novelty nor the near-duplicate share.
        seen = set(self._digests.view().tolist())
        repeats = []
        for digest in digests:
            repeats.append(digest in seen)
            seen.add(digest)
        self._digests.extend(digests)
        if self.config.history:
            self._observe_history(x, norms2, repeats, askers)
            self._history.extend(x, norms2)
        self._buckets.extend(buckets)
        self._entropy = None
        fresh = [i for i, repeat in enumerate(repeats) if not repeat]
        if fresh:
            self._prada_steps(x[fresh], norms2[fresh])

    def _observe_history(
        self,
        x: NDArray[Any],
        norms2: NDArray[Any],
        repeats: list[bool],
        askers: list[str] | None = None,
    ) -> None:
        """Novelty (cosines about the centre), near-duplicates and the typical distance,
        against the stored history and the batch's earlier queries."""
        config = self.config
        points, pn2 = self._history.stored()
        candidates = np.concatenate([points, x])
        distances2 = _distances2(x, norms2, candidates, np.concatenate([pn2, norms2]))[1]
        b, h = len(x), len(points)
        valid = np.empty(distances2.shape, dtype=bool)
        # A query sees the batch's earlier queries and the history they have not replaced:
        # exactly what it would have seen, observed alone.
        replaced = self._history.replaced_before(np.arange(b))
        valid[:, :h] = self._history.ages()[None, :] >= np.asarray(replaced)[:, None]
        size = len(self._history.points)
        valid[:, h:] = np.tri(b, b, -1, dtype=bool) & ~np.tri(b, b, -size - 1, dtype=bool)
        counts = valid.sum(axis=1)
        seen = counts > 0  # the very first query has nothing to be compared with
        fresh = seen & ~np.asarray(repeats, dtype=bool)
        if config.novelty and fresh.any():
            similarity = self._similarity(x, norms2, candidates, valid)
            self.novelty = float(
                _moving_average(self.novelty, 1.0 - similarity[fresh], config.novelty_rate)[-1]
            )
        # The typical (root-mean-square) distance, and the scale it moves after each query.
        typical = np.sqrt(np.where(valid, distances2, 0.0).sum(axis=1) / np.maximum(counts, 1))
        scales = np.zeros(b)
        if seen.any():
            scales[seen] = _moving_average(self.scale, typical[seen], 0.05, zero_starts=True)
            self.scale = float(scales[seen][-1])
        # Near, but not the same query again: boundary probing steps a little away from
        # earlier queries.
        nearest2 = np.where(valid[fresh], distances2[fresh], np.inf).min(axis=1)
        near = (nearest2 > 1e-9 * (norms2[fresh] + 1e-12)) & (
            np.sqrt(nearest2) < config.near_duplicate_radius * scales[fresh]
        )
        if askers is not None and self.on_near is not None and near.any():
            for i in np.flatnonzero(fresh)[near].tolist():
                self.on_near(askers[i])
        self._near.extend(near)

    def _similarity(
        self, x: NDArray[Any], norms2: NDArray[Any], candidates: NDArray[Any], valid: NDArray[Any]
    ) -> NDArray[Any]:
        """Each query's highest cosine similarity to the candidates it may see, about the
        centre (the running mean of the traffic, when the monitor keeps one)."""
        if self._centre is not None:
            centre = self._centre.astype(np.float32)
            x = x - centre
            candidates = candidates - centre
            norms2 = np.einsum("ij,ij->i", x, x)
        candidate_n2 = np.einsum("ij,ij->i", candidates, candidates)
        # Cosines of vectors near the centre are noise: floor the norms at a small fraction
        # of the typical distance.
        floor = np.float32((1e-3 * self.scale) ** 2)
        denominators = np.sqrt(
            np.maximum(candidate_n2, floor)[None, :] * np.maximum(norms2, floor)[:, None]
        )
        denominators[denominators == 0] = 1.0
        similarity: NDArray[Any] = np.where(valid, (x @ candidates.T) / denominators, -np.inf).max(
            axis=1
        )
        return similarity

    def _prada_steps(self, x: NDArray[Any], norms2: NDArray[Any]) -> None:
        """PRADA: grow the set, record min distances, test their normality every few queries."""
        config = self.config
        prada = self._prada
        points, pn2 = prada.stored()
        # Squared distances to the set's rows from the oldest on, as suffix minima: with
        # ``e`` rows replaced by this batch's additions, the nearest is ``to_set[i][e]``.
        filled = prada.filled
        to_set = np.full((len(x), filled + 1), np.inf)
        if len(points):
            order = np.argsort(prada.ages())
            by_age = _distances2(x, norms2, points[order], pn2[order])[1]
            to_set[:, :-1] = np.minimum.accumulate(by_age[:, ::-1], axis=1)[:, ::-1]
        within = _distances2(x, norms2, x, norms2)[1]
        # Each query's smallest squared distance to the rows this batch has added so far
        # (the last ``size`` of them: the set keeps no more), kept as rows are added.
        to_added = np.full(len(x), np.inf)
        added: list[int] = []
        distances: list[float] = []
        size = len(prada.points)
        recent = self._prada_recent
        values = recent.values
        total, squares = self._prada_sums
        for i in range(len(x)):
            if not len(points) and not added:
                added.append(i)  # the first point starts the set
                np.minimum(to_added, within[i], out=to_added)
                continue
            # Stored rows replaced by this batch's additions so far (all of them: none left).
            nearest = to_set.item(i, min(filled, max(0, filled + len(added) - size)))
            d = math.sqrt(min(nearest, to_added.item(i)))
            distances.append(d)
            position = recent.position
            old = values[position] if recent.filled == PRADA_RECENT else 0.0
            values[position] = d
            recent.position = position = (position + 1) % PRADA_RECENT
            recent.filled = min(recent.filled + 1, PRADA_RECENT)
            total += d - old
            squares += d * d - old * old
            if position == 0:  # once per lap: exact sums, no drift
                exact = np.asarray(values)
                total, squares = float(exact.sum()), float(exact @ exact)
            if d > self._prada_threshold:
                added.append(i)
                if len(added) <= size:
                    np.minimum(to_added, within[i], out=to_added)
                else:
                    to_added = within[added[-size:]].min(axis=0)
                # T ← max(T, mean − std) of the recent distances (PRADA, Algorithm 1).
                n = recent.filled
                mean = total / n
                std = math.sqrt(max(squares / n - mean * mean, 0.0))
                self._prada_threshold = max(self._prada_threshold, mean - std)
        self._prada_sums = (total, squares)
        prada.extend(x[added], norms2[added])
        self._prada_distances.extend(distances)
        self._since_test += len(distances)
        if (
            self._prada_distances.filled > config.prada_min
            and self._since_test >= config.prada_every
        ):
            self._since_test = 0
            self.prada_w = _prada_statistic(self._prada_distances.view().astype(np.float64))

    # -- signals ---------------------------------------------------------------------------

    def coverage(self) -> tuple[float, float]:
        """Distinct buckets per query and the normalised entropy of the bucket histogram,
        over the window (cached until the next query)."""
        self.flush()
        if self._entropy is None:
            self._entropy = _bucket_coverage(self._buckets.view(), self.config.simhash_bits)
        return self._entropy

    def output_coverage(self) -> tuple[float, float] | None:
        """:meth:`coverage` of the embeddings received, or ``None`` when none was."""
        if not self._out_buckets.filled:
            return None
        if self._out_entropy is None:
            self._out_entropy = _bucket_coverage(self._out_buckets.view(), self.config.simhash_bits)
        return self._out_entropy

    def class_entropy(self) -> float:
        """Normalised entropy of the answers' top-1 classes over the window: extraction needs
        answers from every class, a user mostly asks about a few (cached until an answer)."""
        self.flush()
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
        self.flush()
        coverage, entropy = self.coverage()
        return {
            "queries": float(self.queries),
            "prada_w": self.prada_w,
            "coverage": coverage,
            "entropy": entropy,
            **({"novelty": self.novelty} if self.config.novelty else {}),
            "near_duplicates": self._near.share,
            "low_margin": self._margins.share,
            "class_entropy": self.class_entropy(),
            "distribution_requests": self._flags.share,
            "logit_bias_tokens": float(len(self.logit_bias_tokens)),
            **self._output_signals(),
        }

    def _output_signals(self) -> dict[str, float]:
        outputs = self.output_coverage()
        if outputs is None:
            return {}
        return {"output_coverage": outputs[0], "output_entropy": outputs[1]}


Summary = tuple[NDArray[Any], NDArray[Any], int]
"""Answers as ``(top-1 minus top-2 margins, top-1 classes, classes)``."""
_Answers = Matrix | Summary
"""Queued answers: probability rows (ours) or their summary (another process's)."""


def _summaries(pending: list[_Answers]) -> list[Summary]:
    """The queued answers summarised in order, consecutive rows of one width at once."""
    out: list[Summary] = []
    run: list[Matrix] = []
    for answers in pending:
        if run and (isinstance(answers, tuple) or run[0].shape[1] != answers.shape[1]):
            out.append(answer_summary(stack_blocks(run)))
            run = []
        if isinstance(answers, tuple):
            out.append(answers)
        else:
            run.append(answers)
    if run:
        out.append(answer_summary(stack_blocks(run)))
    return out


def stack_blocks(blocks: list[Any]) -> NDArray[Any]:
    """Blocks of rows (or values) as one array: the block itself when there is one."""
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _bucket_coverage(buckets: NDArray[Any], bits: int) -> tuple[float, float]:
    """Distinct buckets per value and the histogram's entropy, normalised by the largest
    it can be with that many values and ``2**bits`` buckets."""
    window = len(buckets)
    if window == 0:
        return 0.0, 0.0
    counts = np.unique(buckets, return_counts=True)[1]
    entropy = 0.0
    if len(counts) > 1:
        p = counts / window
        entropy = float(-(p * np.log(p)).sum() / math.log(min(window, 2**bits)))
    return len(counts) / window, entropy


def answer_summary(probabilities: Matrix) -> Summary:
    """``(top-1 minus top-2 margins, top-1 classes, classes)`` of probability rows."""
    top2 = np.partition(probabilities, -2, axis=1)[:, -2:]
    margins = np.abs(top2[:, 1] - top2[:, 0])
    labels = np.argmax(probabilities, axis=1).astype(np.int32)
    return margins, labels, int(probabilities.shape[1])


def _moving_average(
    start: float, values: NDArray[Any], rate: float, *, zero_starts: bool = False
) -> NDArray[np.float64]:
    """The exponential moving average after each of ``values``: ``s ← s + rate (v − s)``
    from ``s = start``, in closed form (a batch is at most :data:`BATCH` values, so the
    weights stay well within range). With ``zero_starts``, a zero average is not moved
    but set: it takes the first non-zero value as it is."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(len(values))
    if zero_starts and start == 0:
        nonzero = np.flatnonzero(values)
        if not len(nonzero):
            return out
        first = int(nonzero[0])
        out[first:] = _moving_average(float(values[first]), values[first:], rate)
        return out
    keep = 1.0 - rate
    steps = np.arange(1, len(values) + 1)
    average: NDArray[np.float64] = keep**steps * (
        start + rate * np.cumsum(values * keep ** (-steps.astype(np.float64)))
    )
    return average


def _prada_statistic(distances: Matrix) -> float:
    """W of the distances after dropping those beyond 3σ (PRADA)."""
    mean, std = distances.mean(), distances.std()
    kept = distances[np.abs(distances - mean) <= 3 * std] if std > 0 else distances
    if len(kept) < 3 or np.ptp(kept) == 0:
        return 1.0
    w, _ = shapiro_wilk(kept)
    return float(w)
