"""The extraction monitor: trackers per identity and per pool, and the risk they add up to.

Each request's queries become feature vectors (:mod:`.features`) and are observed by the
identity's own :class:`~.tracker.Tracker` and by the trackers of the pools the identity
belongs to: its IP prefix (/24, /48 by default) and its cohort (identities first seen in
the same time window). A sybil attacker who splits an extraction over many keys stays
under every per-identity threshold, but the keys share a prefix or were created together,
and their pool shows the signature (together they cover the space; benign users of one app
overlap). Only signals of how queries are made count for a pool (PRADA's distances,
near-duplicates, answers on decision boundaries, distribution requests): what a pool covers
reflects how many different users it has, not extraction. A pool's risk is attributed to its
members in proportion to what they fed it: a member with at least an average share gets it
in full. The near-duplicates' score goes by each member's share of the pool's
near-duplicates instead: a line search split over many keys shows in the pool, and only
the keys that stepped get it, not the busy honest member of the same NAT.

Tables are bounded LRU caches: evicting a tracker forgets detection history, never a
penalty (levels and blocks live in the policy's own protected table).

Requests are queued and folded into their trackers together (:meth:`ExtractionMonitor.flush`):
when their identity is due to be assessed, or when :data:`INBOX` are waiting. Projecting,
centring and hashing a queue is a few array operations whatever its length, where one
request at a time paid them all per request; until then a request gets its identity's
latest assessment, which is what it would get anyway between two assessments.

Cost: each tracker's risk is re-assessed every ``assess_every`` requests (8) rather than at each one (every 4 ×
that after an identity's first 256 requests, when its windowed signals move slowly), a
pool's every ``pool_assess_every`` (64: a pool's risk moves slowly, and its queued queries
are folded in whole batches): a level can rise up to that many requests late, and the work
per query stays a few array operations.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from cachetools import LRUCache
from numpy.typing import NDArray

from ..formats.base import DISTRIBUTION_FLAGS, Outputs, ParsedRequest
from ..identity import Identity
from ..limiter import Clock
from .base import Assessment
from .features import Featurizer
from .observation import Answers, Observation, SharedObservations
from .risk import SignalRule, risk_of
from .tracker import Tracker, TrackerConfig, answer_summary, stack_blocks

logger = logging.getLogger("asgi_extraction_shield")
Matrix = NDArray[np.float64]
ALL = "all:"
POOL_KINDS = ("net:", "cohort:", ALL)
"""How pool keys begin (identity keys never do: they begin with their source)."""
POOL_SIGNALS = frozenset(
    {"prada_w", "near_duplicates", "low_margin", "distribution_requests", "logit_bias_tokens"}
)
"""Signals that count for pools (see ``pool_rules``)."""
NUMERIC, TEXT, OUTPUTS = 0, 1, 2
"""What a running mean of features is of (see ``ExtractionMonitor._centre``)."""
SETTLED = 256
"""Requests after which an identity is re-assessed ``SETTLED_SLOWER`` times less often:
its signals are measured over windows of a few hundred queries and move slowly by then."""
SETTLED_SLOWER = 4
INBOX = 64
"""Queued requests that are folded into their trackers at once, at the latest."""
INBOX_QUERIES = 1_024
"""Queued queries (rows or texts) that are folded in at once, at the latest: what the queue
holds stays bounded when requests carry large batches."""
MEAN_ROWS = 10_000
"""Rows over which the running means are exact; a moving average of that span after."""
_Queued = tuple[str, Tracker, ParsedRequest, float, list[str]]
"""A request waiting to be observed: identity key, its tracker, the request, when, pools."""


class ExtractionMonitor:
    """Implements the :class:`~.base.Monitor` protocol."""

    def __init__(
        self,
        key: bytes,
        rules: Mapping[str, SignalRule],
        *,
        pool_rules: Mapping[str, SignalRule] | None = None,
        dim: int = 32,
        config: TrackerConfig | None = None,
        min_queries: int = 50,
        max_identities: int = 4_000,
        max_pools: int = 4_096,
        pools: tuple[str, ...] = ("net", "cohort"),
        ipv4_pool_prefix: int = 24,
        ipv6_pool_prefix: int = 48,
        cohort_seconds: float = 600.0,
        max_members: int = 1_000,
        assess_every: int = 8,
        pool_assess_every: int = 64,
        lift_grace: float = 3_600.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.featurizer = Featurizer(key, dim)
        rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
        self.config = config or TrackerConfig()
        self.pool_config = replace(self.config, novelty=False)
        self.assess_every = assess_every
        self.pool_assess_every = pool_assess_every
        self.dim = dim
        self.hyperplanes = rng.standard_normal((dim, self.config.simhash_bits))
        self._powers = 1 << np.arange(self.config.simhash_bits, dtype=np.int64)
        self._pool_nets: LRUCache[Any, str] = LRUCache(4096)
        self._means = [np.zeros(dim), np.zeros(dim), np.zeros(dim)]  # NUMERIC, TEXT, OUTPUTS
        self._seen = [0, 0, 0]
        self.rules = dict(rules)
        # A pool mixes clients who ask about different things: what it covers says nothing,
        # only how its queries are made (synthetic distances, boundary answers) does.
        base = self.rules if pool_rules is None else pool_rules
        self.pool_rules = {k: v for k, v in base.items() if k in POOL_SIGNALS}
        self.min_queries = min_queries
        self.identities: LRUCache[str, Tracker] = LRUCache(max_identities)
        self.pools: LRUCache[str, tuple[Tracker, Members]] = LRUCache(max_pools)
        self.pool_kinds = pools
        self.ipv4_pool_prefix = ipv4_pool_prefix
        self.ipv6_pool_prefix = ipv6_pool_prefix
        self.cohort_seconds = cohort_seconds
        self.max_members = max_members
        self.clock = clock
        self._first_seen: LRUCache[str, float] = LRUCache(max_identities * 4)
        self.lift_grace = lift_grace
        self._lifted: LRUCache[str, float] = LRUCache(max_identities)
        """Identities an operator lifted, and until when pools are not held against them."""
        self.shared: SharedObservations | None = None
        """Where observations are shared with other processes (Redis), if anywhere."""
        self._inbox: list[_Queued] = []
        self._inbox_queries = 0
        self._answers: list[tuple[str, Tracker, Matrix, list[str]]] = []

    # -- the Monitor protocol ---------------------------------------------------------------

    async def observe_request(self, identity: Identity, request: ParsedRequest) -> Assessment:
        assessment = self.observe(identity, request)
        shared = self.shared
        if shared is None:
            return assessment
        # Other processes' observations of this identity and its pools, every
        # ``assess_every`` requests (and at once for an identity new to this process).
        own = self.identities.get(identity.key)
        if own is None or not shared.due(identity.key, own):
            return assessment
        self.flush()  # what this process observed goes out first
        pools = [p for p in own.pools if p != ALL]  # those observe() just fed
        trackers = {identity.key: own}
        for pool in pools:
            entry = self.pools.get(pool)
            if entry is not None:
                trackers[pool] = entry[0]
        received = await shared.exchange(trackers)
        if not received:
            return assessment
        for key, observations in received.items():
            for observation in observations:
                self.replay(key, observation)
            trackers[key].assessment = None  # assess again, with what the others saw
        own.last = self._assessment(identity.key, own.pools)
        return own.last

    def observe(self, identity: Identity, request: ParsedRequest) -> Assessment:
        """Queue the request for the identity's trackers and its pools'; the identity's
        latest assessment, made again (the queue folded in first) when it is due."""
        now = self.clock()
        own = self._tracker(identity.key, now)
        route = own.route
        if route is not None and (route[0] is identity.network or route[0] == identity.network):
            pools = route[1]  # the same network as last time: the same pools
        else:
            pools = self.pool_keys(identity, now)
            own.route = (identity.network, pools)
            for pool in pools:
                self._pool(pool, now)
        own.queued += 1
        inbox = self._inbox
        inbox.append((identity.key, own, request, now, pools))
        features = request.features
        self._inbox_queries += len(features) if features is not None else len(request.texts)
        cached, last = own.assessment, own.last
        if (
            cached is None
            or last is None
            or own.requests + own.queued - cached[0] >= self._every(own)
            or len(inbox) >= INBOX
            or self._inbox_queries >= INBOX_QUERIES
        ):
            self.flush()
            last = own.last = self._assessment(identity.key, pools)
        return last

    def flush(self) -> None:
        """Fold the queued requests into their trackers: featurised, centred and hashed
        together, a few array operations for the whole queue."""
        if self._answers:
            self._flush_answers()
        inbox, self._inbox = self._inbox, []
        self._inbox_queries = 0
        if not inbox:
            return
        for queued in inbox:
            queued[1].queued = 0
        try:
            observations = self._observations(inbox)
        except Exception:
            inbox, observations = self._one_by_one(inbox)
            if not inbox:
                return
        shared = self.shared
        entries: dict[str, tuple[Tracker, Members]] = {}  # each pool looked up once
        batches: dict[int, tuple[Tracker, list[Observation], list[list[int]]]] = {}
        for (key, own, _, now, pools), observation, buckets in zip(
            inbox, observations, self._buckets_of(observations), strict=True
        ):
            trackers = [own]
            for pool in pools:
                entry = entries.get(pool)
                if entry is None:
                    entry = entries[pool] = self._pool(pool, now)
                trackers.append(entry[0])
                entry[1].count(key, observation.queries)
            for tracker in trackers:
                batch = batches.get(id(tracker))
                if batch is None:
                    batch = batches[id(tracker)] = (tracker, [], [])
                batch[1].append(observation)
                batch[2].append(buckets)
            if shared is not None:
                shared.record([key, *(p for p in pools if p != ALL)], observation)
        for tracker, fed, fed_buckets in batches.values():  # each tracker's at once
            self._feed(tracker, fed, fed_buckets, now)  # (seen last at the queue's latest)

    def _one_by_one(self, inbox: list[_Queued]) -> tuple[list[_Queued], list[Observation]]:
        """The queue's observations request by request, without those that cannot be
        observed: one malformed request must neither cost the others their observation nor
        fail the request that happened to fold the queue in."""
        kept: list[_Queued] = []
        observations: list[Observation] = []
        for entry in inbox:
            try:
                observations.extend(self._observations([entry]))
            except Exception:
                logger.warning("the monitor skipped a request it could not observe", exc_info=True)
                continue
            kept.append(entry)
        return kept, observations

    def _flush_answers(self) -> None:
        """Fold the queued answers into their identities' and pools' trackers, each
        tracker's answers of one width at once."""
        answers, self._answers = self._answers, []
        batches: dict[tuple[int, int], tuple[Tracker, list[Matrix]]] = {}
        entries: dict[str, Tracker | None] = {}
        shared = self.shared
        for key, own, probabilities, pools in answers:
            trackers = [own]
            for pool in pools:
                if pool not in entries:
                    entry = self.pools.get(pool)
                    entries[pool] = None if entry is None else entry[0]
                tracker = entries[pool]
                if tracker is not None:
                    trackers.append(tracker)
            for tracker in trackers:
                batch = batches.setdefault((id(tracker), probabilities.shape[1]), (tracker, []))
                batch[1].append(probabilities)
            if shared is not None:
                keys = [key, *(p for p in pools if p != ALL and entries[p] is not None)]
                shared.record(keys, Answers(key, *answer_summary(probabilities)))
        for tracker, rows in batches.values():
            tracker.observe_answers(stack_blocks(rows))

    def _observations(self, inbox: list[_Queued]) -> list[Observation]:
        """The queued requests' observations: numeric rows projected a width at a time,
        texts hashed together."""
        rows: list[Matrix | None] = [None] * len(inbox)
        widths: dict[int, list[int]] = {}
        texts: list[int] = []
        for i, (_, _, request, _, _) in enumerate(inbox):
            features = request.features
            if features is not None and len(features):
                rows[i] = features = features.reshape(len(features), -1)
                widths.setdefault(features.shape[1], []).append(i)
            elif request.texts:
                texts.append(i)
        for group in widths.values():
            raw = [rows[i] for i in group]
            _spread(self.featurizer.numeric(stack_blocks(raw)), group, rows)
        if texts:
            hashed = self.featurizer.texts([t for i in texts for t in inbox[i][2].texts])
            _spread(hashed, texts, rows, [len(inbox[i][2].texts) for i in texts])
        text = set(texts)
        return [
            Observation(
                key,
                rows[i],
                i in text,
                bool(request.flags & DISTRIBUTION_FLAGS),
                request.logit_bias_tokens,
                _digests(request, rows[i]),
            )
            for i, (key, _, request, _, _) in enumerate(inbox)
        ]

    def _buckets_of(self, observations: list[Observation]) -> list[list[int]]:
        """Each observation's SimHash buckets, of its rows centred on the running mean of
        their kind (moved by all of them first)."""
        out: list[list[int]] = [[]] * len(observations)
        for kind, group in _by_kind(observations):
            rows = stack_blocks([observations[i].rows for i in group])
            buckets = self.buckets(rows - self._centre(rows, kind))
            start = 0
            for i in group:
                stop = start + observations[i].queries
                out[i] = buckets[start:stop]
                start = stop
        return out

    def _assessment(self, key: str, pools: list[str]) -> Assessment:
        """The identity's risk: its own, or its pools' attributed to it when larger."""
        own = self.identities[key]
        risk, signals, scores = self._assess(own, self._every(own))
        lifted = self._lifted.get(key) if self._lifted else None
        if lifted is not None and self.clock() < lifted:
            pools = []  # an operator judged it: only its own queries count, for a while
        attributed_from = None
        for pool in pools:
            if pool == ALL:
                continue  # a baseline for operators: mostly benign, never attributed
            entry = self.pools.get(pool)
            if entry is None:
                continue  # evicted since (its history is gone)
            tracker, members = entry
            pool_risk, pool_signals, pool_scores = self._assess(
                tracker, self.pool_assess_every, self.pool_rules
            )
            attributed = _attributed(pool_risk, pool_scores, members, key)
            if attributed > risk:
                risk = attributed
                signals = {
                    **signals,
                    **{f"{pool.split(':')[0]}.{k}": v for k, v in pool_signals.items()},
                }
                scores = {f"pool.{k}": v for k, v in pool_scores.items()}
                signals["pool_risk"] = pool_risk
                attributed_from = pool
        if attributed_from is None:
            return self._own_assessment(own)
        return Assessment(risk, {**signals, **{f"score.{k}": v for k, v in scores.items()}})

    def _every(self, own: Tracker) -> int:
        """Requests between two assessments of an identity (fewer once it has settled)."""
        return self.assess_every if own.requests < SETTLED else SETTLED_SLOWER * self.assess_every

    @staticmethod
    def _own_assessment(tracker: Tracker) -> Assessment:
        """The tracker's latest assessment (its risk, signals and scores), built once."""
        assert tracker.assessment is not None
        at, risk, signals, scores, built = tracker.assessment
        if built is None:
            built = Assessment(risk, {**signals, **{f"score.{k}": v for k, v in scores.items()}})
            tracker.assessment = (at, risk, signals, scores, built)
        return built

    def observe_outputs(self, identity: Identity, outputs: Outputs) -> None:
        """Answers: probability rows (margins and top-1 classes, for the identity and its
        pools) and embeddings (their coverage of the output space, for the identity)."""
        tracker = self.identities.get(identity.key)
        if tracker is None:
            return
        embeddings = outputs.embeddings
        if embeddings is not None and embeddings.ndim == 2 and len(embeddings):
            unit = self.featurizer.embeddings(embeddings)
            tracker.observe_output_buckets(self.buckets(unit - self._centre(unit, OUTPUTS)))
        probabilities = outputs.probabilities
        if probabilities is None or probabilities.ndim != 2 or probabilities.shape[1] < 2:
            return
        # Folded in with the queued requests: for the pools of the request that asked (or
        # of the identity's latest one).
        self._answers.append((identity.key, tracker, probabilities, tracker.pools))
        if len(self._answers) >= INBOX:
            self._flush_answers()

    def replay(self, key: str, observation: Observation | Answers) -> None:
        """Observe what another process observed of tracker ``key`` (an identity or a pool)."""
        now = self.clock()
        pool = self.pools.get(key) if key.startswith(POOL_KINDS) else None
        tracker = pool[0] if pool is not None else self.identities.get(key)
        if tracker is None:
            return
        if isinstance(observation, Answers):
            tracker.observe_answer_summary(
                observation.margins, observation.labels, observation.width
            )
            return
        rows = observation.rows
        # Centred on this process's mean, without moving it: each process's mean follows
        # the traffic it serves, and replayed rows are counted by the process that served them.
        buckets = (
            []
            if rows is None
            else self.buckets(rows - self._means[TEXT if observation.text else NUMERIC])
        )
        if pool is not None:  # a member before its queries are folded in (near-duplicates)
            pool[1].count(observation.identity, observation.queries)
        self._feed(tracker, [observation], [buckets], now)

    def _feed(
        self,
        tracker: Tracker,
        observations: list[Observation],
        buckets: list[list[int]],
        now: float,
    ) -> None:
        """Requests' observations (their rows as projected, not centred) for ``tracker``,
        with each one's buckets: numeric queries at once, texts at once."""
        tracker.observe_requests(
            [o.distribution for o in observations],
            [o.logit_bias for o in observations if o.logit_bias],
            now,
        )
        pooled = tracker.on_near is not None  # a pool's: who asked each query
        for kind, chosen in _by_kind(observations):
            tracker.observe_queries(
                stack_blocks([observations[i].rows for i in chosen]),
                [b for i in chosen for b in buckets[i]],
                [d for i in chosen for d in observations[i].digests],
                now,
                self._means[kind],
                [observations[i].identity for i in chosen for _ in observations[i].digests]
                if pooled
                else None,
            )

    # -- pieces -----------------------------------------------------------------------------

    def _centre(self, rows: Matrix, index: int) -> Matrix:
        """The running mean of numeric or text features, or of embedding outputs (``index``:
        :data:`NUMERIC`, :data:`TEXT`, :data:`OUTPUTS`), moved by ``rows``: exact for the
        first :data:`MEAN_ROWS` rows, then a moving average of that span."""
        count = self._seen[index]
        mean = self._means[index]
        n = len(rows)
        exact = min(n, max(0, MEAN_ROWS - count))
        if exact:
            mean *= count / (count + exact)
            mean += rows[:exact].sum(axis=0) / (count + exact)
        rest = n - exact
        if rest:  # each row moves the mean by 1/MEAN_ROWS of its distance from it
            keep = 1.0 - 1.0 / MEAN_ROWS
            mean *= keep**rest
            mean += (keep ** np.arange(rest - 1, -1, -1) / MEAN_ROWS) @ rows[exact:]
        self._seen[index] = count + n
        return mean

    def buckets(self, features: Matrix) -> list[int]:
        """The keyed SimHash bucket of each feature row (random hyperplanes, Charikar 2002)."""
        bits = (features @ self.hyperplanes) > 0
        buckets: list[int] = (bits @ self._powers).tolist()
        return buckets

    def pool_keys(self, identity: Identity, now: float) -> list[str]:
        keys = []
        for kind in self.pool_kinds:
            if kind == "all":
                keys.append(ALL)
            elif kind == "net" and identity.network is not None:
                keys.append(self._net_pool(identity.network))
            elif kind == "cohort":
                first = self._first_seen.get(identity.key)
                if first is None:
                    first = self._first_seen[identity.key] = now
                keys.append(f"cohort:{int(first // self.cohort_seconds)}")
        return keys

    def _net_pool(self, net: Any) -> str:
        key = self._pool_nets.get(net)
        if key is None:
            prefix = self.ipv4_pool_prefix if net.version == 4 else self.ipv6_pool_prefix
            key = self._pool_nets[net] = (
                f"net:{net.supernet(new_prefix=min(prefix, net.prefixlen))}"
            )
        return key

    def _tracker(self, key: str, now: float) -> Tracker:
        tracker = self.identities.get(key)
        if tracker is None:
            tracker = self.identities[key] = Tracker(self.config, self.dim, now)
        return tracker

    def _pool(self, key: str, now: float) -> tuple[Tracker, Members]:
        entry = self.pools.get(key)
        if entry is None:
            tracker, members = Tracker(self.pool_config, self.dim, now), Members(self.max_members)
            tracker.on_near = members.count_near
            entry = self.pools[key] = (tracker, members)
        return entry

    def _assess(
        self, tracker: Tracker, every: int, rules: Mapping[str, SignalRule] | None = None
    ) -> tuple[float, dict[str, float], dict[str, float]]:
        """The tracker's risk, re-computed every ``every`` requests."""
        cached = tracker.assessment
        if cached is not None and tracker.requests - cached[0] < every:
            return cached[1], cached[2], cached[3]
        signals = tracker.signals()
        risk, scores = risk_of(signals, self.rules if rules is None else rules, self.min_queries)
        tracker.assessment = (tracker.requests, risk, signals, scores, None)
        return risk, signals, scores

    def signals_of(self, key: str) -> dict[str, float] | None:
        self.flush()
        tracker = self.identities.get(key)
        return None if tracker is None else tracker.signals()

    def assessment_of(self, key: str) -> Assessment | None:
        """The identity's own latest assessment (pools aside), for introspection."""
        tracker = self.identities.get(key)
        if tracker is None or tracker.assessment is None:
            return None
        return self._own_assessment(tracker)

    def forget(self, key: str) -> bool:
        """Drop the identity's tracker (when a block is lifted: it starts afresh). For
        ``lift_grace`` seconds its pools' risk is not attributed to it either: otherwise the
        pool it shares (a NAT, a cohort) would flag it again at its next request, for
        queries the operator has just judged. Its own queries still count in full."""
        self._lifted[key] = self.clock() + self.lift_grace
        return self.identities.pop(key, None) is not None


def _digests(request: ParsedRequest, rows: Matrix | None) -> list[int]:
    """A 64-bit digest of each query's canonical form, alike in every process (BLAKE2b)."""
    if rows is None:
        return []
    keys = request.keys if len(request.keys) == len(rows) else [row.tobytes() for row in rows]
    return [
        int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)
        for key in keys
    ]


def _attributed(pool_risk: float, scores: Mapping[str, float], members: Members, key: str) -> float:
    """A pool's risk attributed to member ``key``: in proportion to its share of the pool's
    queries, except the near-duplicates' score, in proportion to its share of the pool's
    near-duplicates (members who asked none are not probing, however much they asked)."""
    near = scores.get("near_duplicates", 0.0)
    if not near:
        return pool_risk * members.share_ratio(key)
    keep = 1.0
    for name, score in scores.items():
        if name != "near_duplicates":
            keep *= 1.0 - score
    others = (1.0 - keep) * members.share_ratio(key)
    return 1.0 - (1.0 - others) * (1.0 - near * members.near_ratio(key))


class Members:
    """Queries per member of a pool (at most ``limit`` members: the one with the fewest
    goes first) and their total, kept as they change; and likewise the near-duplicate
    queries each member asked."""

    __slots__ = ("counts", "limit", "near", "near_total", "total")

    def __init__(self, limit: int) -> None:
        self.counts: dict[str, int] = {}
        self.limit = limit
        self.total = 0
        self.near: dict[str, int] = {}
        self.near_total = 0

    def count(self, key: str, queries: int) -> None:
        counts = self.counts
        if key not in counts and len(counts) >= self.limit:
            smallest = min(counts, key=counts.__getitem__)
            self.total -= counts.pop(smallest)
            self.near_total -= self.near.pop(smallest, 0)
        counts[key] = counts.get(key, 0) + queries
        self.total += queries

    def count_near(self, key: str) -> None:
        """One near-duplicate query of member ``key`` (of members only: the table stays
        bounded by theirs)."""
        if key in self.counts:
            self.near[key] = self.near.get(key, 0) + 1
            self.near_total += 1

    def share_ratio(self, key: str) -> float:
        """The member's share of the pool's queries relative to an even share, capped at 1."""
        return self._ratio(self.counts.get(key, 0), self.total)

    def near_ratio(self, key: str) -> float:
        """The member's share of the pool's near-duplicates relative to an even share (among
        all members), capped at 1."""
        return self._ratio(self.near.get(key, 0), self.near_total)

    def _ratio(self, part: int, total: int) -> float:
        return min(1.0, part / total * len(self.counts)) if total else 0.0


def _by_kind(observations: list[Observation]) -> Iterator[tuple[int, list[int]]]:
    """The observations with rows, by kind: :data:`NUMERIC` ones, then :data:`TEXT` ones
    (their indices, in order; kinds with none are skipped)."""
    for kind in (NUMERIC, TEXT):
        chosen = [
            i for i, o in enumerate(observations) if o.rows is not None and o.text is (kind == TEXT)
        ]
        if chosen:
            yield kind, chosen


def _spread(
    stacked: Matrix, group: list[int], out: list[Matrix | None], sizes: list[int] | None = None
) -> None:
    """``out[i]`` for each ``i`` of ``group``: its block of ``stacked``, in order (blocks of
    ``sizes`` rows, else of as many rows as ``out[i]`` has)."""
    start = 0
    for n, i in enumerate(group):
        stop = start + (len(out[i]) if sizes is None else sizes[n])  # type: ignore[arg-type]
        out[i] = stacked[start:stop]
        start = stop
