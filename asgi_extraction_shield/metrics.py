"""Prometheus metrics of the shield (the ``metrics`` extra: prometheus-client, imported lazily).

``METRICS=true`` (or a ``metrics_registry`` passed to the middleware) turns them on; the
middleware then serves the registry at ``METRICS_PATH`` (``/metrics``) itself, before any
limiting. With metrics off, the middleware holds ``None`` and pays one ``None`` check.

Labels are bounded: ``route`` is the protected path *pattern* a request matched (one of
``PROTECTED_PATHS``), never the raw path; ``format`` an adapter name; ``outcome`` and
``level`` fixed sets.

=========================================== ========= ===========================================
name                                        type      what
=========================================== ========= ===========================================
``extraction_shield_requests_total``        counter   protected requests examined, by ``route``, ``format``
``extraction_shield_decisions_total``       counter   by ``outcome``: allowed, rate_limited, blocked, refused
``extraction_shield_unparsed_total``        counter   bodies the format could not parse, by ``route``
``extraction_shield_identities``            gauge     identities at each ``level`` above normal (at scrape time; on Redis, every worker's)
``extraction_shield_risk``                  histogram the monitor's risk of each assessed request
``extraction_shield_postprocess_seconds``   histogram time spent rewriting one response
``extraction_shield_storage_errors_total``  counter   storage failures (and decisions taken by the fallback)
``extraction_shield_internal_errors_total`` counter   internal failures of the shield
=========================================== ========= ===========================================

The identities gauge reads the policy's ``level_counts``. A policy that keeps its state in
Redis counts every worker's identities with a round-trip, which a synchronous collector
cannot make: such a policy has a ``refresh_level_counts`` coroutine, which the built-in
endpoint awaits before rendering (the gauge is then as of the scrape), and which protected
requests start in a task of its own at most every :data:`LEVELS_REFRESH_SECONDS` (for a
registry scraped elsewhere). A failed refresh leaves the last counts and counts a storage
error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from fnmatch import translate
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ConfigurationError, StorageError
from .formats.base import ParsedRequest
from .postprocess.base import ResponseTransform
from .problem import ABNORMAL_USAGE, QUOTA_EXCEEDED

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

logger = logging.getLogger("asgi_extraction_shield")

LEVELS_REFRESH_SECONDS = 10.0
"""At most this often a protected request refreshes a shared policy's level counts (in a
task of its own: the request never waits for it)."""

OUTCOMES = ("allowed", "rate_limited", "blocked", "refused")
_REFUSALS = {QUOTA_EXCEEDED: "rate_limited", ABNORMAL_USAGE: "blocked"}
RISK_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25)


class RouteLabels:
    """The ``route`` label of a path: the first protected pattern that matches it (an
    exact path first), cached per path in a bounded table."""

    def __init__(self, patterns: Sequence[str], max_cached: int = 4096) -> None:
        globbed = [p for p in patterns if any(c in p for c in "*?[")]
        self.exact = frozenset(p for p in patterns if p not in globbed)
        self.globs = [(p, re.compile(translate(p))) for p in globbed]
        self.max_cached = max_cached
        self._cache: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        label = self._cache.get(path)
        if label is None:
            label = path if path in self.exact else "other"
            if label == "other":
                label = next((p for p, regex in self.globs if regex.match(path)), "other")
            if len(self._cache) >= self.max_cached:
                self._cache.clear()
            self._cache[path] = label
        return label


class _LevelCollector:
    """``extraction_shield_identities{level}``, read from the policy at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def _family(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(
            "extraction_shield_identities",
            "Identities at each policy level above normal.",
            labels=["level"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for level, count in self.counts().items():
            family.add_metric([level], count)
        yield family


class LevelRefresher:
    """Keeps a shared policy's level counts fresh: ``refresh`` (awaited, never raises) before
    the built-in endpoint renders; ``poll`` from the request path, which starts a refresh
    in a task of its own when the last one is ``interval`` seconds old."""

    def __init__(
        self,
        refresh: Callable[[], Awaitable[object]],
        failed: Callable[[str], None],
        interval: float = LEVELS_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._refresh = refresh
        self.failed = failed
        self.interval = interval
        self.clock = clock
        self._last = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Refresh the counts; on failure they stay as they were and the failure is counted
        (a storage error, or an internal one)."""
        self._last = self.clock()
        try:
            await self._refresh()
        except StorageError as exc:
            logger.warning("counting the identities by level failed: %s", exc)
            self.failed("storage_error")
        except Exception:
            logger.exception("counting the identities by level failed")
            self.failed("internal_error")

    def poll(self) -> None:
        """From the request path: start a refresh if the counts are ``interval`` old and
        none is running. Costs one clock read otherwise."""
        if self.clock() - self._last < self.interval or self._task is not None:
            return
        self._last = self.clock()
        try:
            self._task = asyncio.get_running_loop().create_task(self.refresh())
        except RuntimeError:  # not on asyncio (the scrape's own refresh still runs)
            return
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None

    def endpoint(self, app: ASGIApp) -> ASGIApp:
        """``app`` (the registry's), served once the counts are refreshed."""

        async def refreshed(scope: Scope, receive: Receive, send: Send) -> None:
            await self.refresh()
            await app(scope, receive, send)

        return refreshed


class ShieldMetrics:
    """The shield's metrics in ``registry`` (prometheus-client's default one if ``None``).

    ``level_counts`` (the policy's, when it has one) feeds the identities gauge;
    ``refresh_levels`` (a shared policy's ``refresh_level_counts``) keeps it fresh, see
    :class:`LevelRefresher`.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        protected_paths: Sequence[str] = ("*",),
        level_counts: Callable[[], Mapping[str, int]] | None = None,
        refresh_levels: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        try:
            import prometheus_client
        except ImportError:
            raise ConfigurationError(
                "EXTRACTION_SHIELD_METRICS=true needs prometheus-client: "
                "pip install 'asgi-extraction-shield[metrics]'"
            ) from None
        from prometheus_client import Counter, Histogram

        self.registry = prometheus_client.REGISTRY if registry is None else registry
        r = self.registry
        try:
            self.requests = Counter(
                "extraction_shield_requests",
                "Protected requests examined, by matched route pattern and payload format.",
                ["route", "format"],
                registry=r,
            )
            self.decisions = Counter(
                "extraction_shield_decisions",
                "Decisions by outcome (in shadow mode: what would have been decided).",
                ["outcome"],
                registry=r,
            )
            self.unparsed = Counter(
                "extraction_shield_unparsed",
                "Protected requests whose body the format could not parse, by route pattern.",
                ["route"],
                registry=r,
            )
            self.risk = Histogram(
                "extraction_shield_risk",
                "The monitor's extraction risk of each assessed request.",
                buckets=RISK_BUCKETS,
                registry=r,
            )
            self.postprocess_seconds = Histogram(
                "extraction_shield_postprocess_seconds",
                "Time spent rewriting one response (perturbations, watermarks).",
                buckets=SECONDS_BUCKETS,
                registry=r,
            )
            self.storage_errors = Counter(
                "extraction_shield_storage_errors",
                "Storage failures, and decisions taken by the in-process fallback.",
                registry=r,
            )
            self.internal_errors = Counter(
                "extraction_shield_internal_errors",
                "Internal failures of the shield (the request went on or got 503).",
                registry=r,
            )
            if level_counts is not None:
                r.register(_LevelCollector(level_counts))
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise ConfigurationError(
                f"the shield's metrics are already registered ({exc}): give each "
                "ExtractionShield its own registry (metrics_registry=CollectorRegistry())"
            ) from None
        self.route = RouteLabels(protected_paths)
        self.levels = (
            None if refresh_levels is None else LevelRefresher(refresh_levels, self.failed)
        )
        self._outcomes = {outcome: self.decisions.labels(outcome) for outcome in OUTCOMES}
        self._examined: dict[tuple[str, str], Any] = {}
        self._unparsed: dict[str, Any] = {}

    def examined(self, path: str, request: ParsedRequest) -> None:
        if self.levels is not None:
            self.levels.poll()
        route = self.route(path)
        adapter = request.adapter
        fmt = adapter.name if adapter is not None else "unparsed" if request.problem else "none"
        child = self._examined.get((route, fmt))
        if child is None:
            child = self._examined[(route, fmt)] = self.requests.labels(route, fmt)
        child.inc()
        if request.problem is not None and not request.parsed:
            unparsed = self._unparsed.get(route)
            if unparsed is None:
                unparsed = self._unparsed[route] = self.unparsed.labels(route)
            unparsed.inc()

    def decided(self, outcome: str) -> None:
        self._outcomes[outcome].inc()

    def refused(self, problem_type: str) -> None:
        """Counts a refusal by its problem type: quota (429), abnormal usage (429), other."""
        self._outcomes[_REFUSALS.get(problem_type, "refused")].inc()

    def failed(self, kind: str) -> None:
        (self.storage_errors if kind == "storage_error" else self.internal_errors).inc()

    def timed(self, transform: ResponseTransform) -> ResponseTransform:
        return _TimedTransform(transform, self.postprocess_seconds.observe)

    def app(self) -> ASGIApp:
        """The ASGI app that serves this registry in Prometheus' text format."""
        from prometheus_client import make_asgi_app

        app: ASGIApp = make_asgi_app(self.registry)
        return app if self.levels is None else self.levels.endpoint(app)


class _TimedTransform:
    """A response transform whose work is timed, summed over chunks, observed once."""

    __slots__ = ("elapsed", "inner", "observe")

    def __init__(self, inner: ResponseTransform, observe: Callable[[float], None]) -> None:
        self.inner = inner
        self.observe = observe
        self.elapsed = 0.0

    @property
    def observes_only(self) -> bool:
        return bool(getattr(self.inner, "observes_only", False))

    def accepts(self, status: int, headers: Headers) -> bool:
        return self.inner.accepts(status, headers)

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        start = time.perf_counter()
        try:
            return self.inner.feed(chunk, more_body)
        finally:
            self.elapsed += time.perf_counter() - start
            if not more_body:
                self.observe(self.elapsed)

    def unprocessed(self) -> bytes:
        return self.inner.unprocessed()
