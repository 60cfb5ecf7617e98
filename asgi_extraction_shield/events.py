"""Structured events: what the shield decided, for logs, alerts and dashboards.

Every event is logged as one JSON object per line on the ``asgi_extraction_shield``
logger and handed to the optional ``on_event`` callable (sync or async). Identities
in events are the keyed hashes of :mod:`~asgi_extraction_shield.identity`, never raw
API keys or tokens.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from cachetools import LRUCache

if TYPE_CHECKING:
    from .monitor.base import Assessment

logger = logging.getLogger("asgi_extraction_shield")

EventKind = Literal[
    "rate_limited",
    "level_changed",
    "blocked",
    "storage_error",
    "internal_error",
    "assessed",
    "lifted",
]
OnEvent = Callable[["ShieldEvent"], Awaitable[None] | None]

_LEVELS: dict[str, int] = {
    "rate_limited": logging.INFO,
    "level_changed": logging.WARNING,
    "blocked": logging.WARNING,
    "storage_error": logging.ERROR,
    "internal_error": logging.ERROR,
    "assessed": logging.INFO,
    "lifted": logging.WARNING,
}


@dataclass(frozen=True, slots=True)
class ShieldEvent:
    """One decision of the shield.

    ``identity`` is a hashed identity key; ``level`` the policy level of the identity
    (``normal`` until the monitor raises it); ``risk`` in [0, 1]; ``signals`` the named
    numbers behind the decision; ``time`` seconds since the epoch; ``shadow`` is true
    when the decision was not enforced (``MODE=shadow``).
    """

    kind: EventKind
    identity: str
    level: str = "normal"
    risk: float = 0.0
    signals: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""
    time: float = field(default_factory=time.time)
    shadow: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["signals"] = dict(self.signals)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


class OccasionalErrorLog:
    """``storage_error`` lines of a background writer (records to a file or to Redis), at
    most one per ``interval`` seconds, each with the running count: an outage is reported
    without a line per failed write."""

    def __init__(
        self, what: str, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.what = what
        self.interval = interval
        self.clock = clock
        self._last = -float("inf")

    def report(self, **signals: Any) -> None:
        now = self.clock()
        if now - self._last >= self.interval:
            self._last = now
            logger.error(
                json.dumps({"kind": "storage_error", "signals": {"what": self.what, **signals}})
            )


REPEATED_KINDS = frozenset({"rate_limited", "storage_error", "internal_error"})
"""Kinds a client (or an outage) can cause on every request: their log lines are sampled."""


class EventEmitter:
    """Logs events and forwards them to ``on_event``; a failing hook never fails a request.

    ``on_event`` gets every event. The log gets every event too, but for the kinds that can
    come once a request (:data:`REPEATED_KINDS`): at most one line per ``log_interval``
    seconds for one kind and identity, the next one saying in ``suppressed`` how many it
    stands for, so a client hammering the API (or a Redis outage) does not flood the log.
    ``log_interval=0`` logs every event. At most ``max_tracked`` (kind, identity) pairs are
    remembered; a pair forgotten is logged again at its next event.
    """

    def __init__(
        self,
        on_event: OnEvent | None = None,
        *,
        log_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 10_000,
    ) -> None:
        self.on_event = on_event
        self.hook_errors = 0
        self.log_interval = log_interval
        self.clock = clock
        self.max_tracked = max_tracked
        self._last: LRUCache[tuple[str, str], tuple[float, int]] = LRUCache(max_tracked)

    async def emit(self, event: ShieldEvent) -> None:
        level = _LEVELS.get(event.kind, logging.INFO)
        if logger.isEnabledFor(level):
            line = self._log_line(event)
            if line is not None:
                logger.log(level, line)
        if self.on_event is None:
            return
        try:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.hook_errors += 1
            logger.exception("on_event hook failed for a %s event", event.kind)

    def _log_line(self, event: ShieldEvent) -> str | None:
        """The event's JSON line, or ``None`` while its (kind, identity) is sampled out."""
        if self.log_interval <= 0 or event.kind not in REPEATED_KINDS:
            return event.to_json()
        key = (event.kind, event.identity)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.log_interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        self._last[key] = (now, 0)
        if not last or not last[1]:
            return event.to_json()
        return replace(event, signals={**event.signals, "suppressed": last[1]}).to_json()


class AssessedSampler:
    """When to emit ``assessed`` events (``ASSESSED_INTERVAL``): for each identity, one at
    its first assessment, then at most one per ``interval`` seconds carrying the riskiest
    assessment since the previous one, so a peak between two events is not lost (only the
    peak of an identity's last interval before it goes quiet is). At most
    ``max_identities`` identities are followed; the longest unreported is dropped first.
    """

    def __init__(
        self, interval: float, clock: Callable[[], float], max_identities: int = 100_000
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.max_identities = max_identities
        self._due: dict[str, tuple[float, Assessment | None]] = {}

    def offer(self, key: str, assessment: Assessment) -> Assessment | None:
        """The assessment to report now for ``key``, or ``None`` when it is not due."""
        now = self.clock()
        entry = self._due.get(key)
        if entry is not None:
            due, peak = entry
            if peak is None or assessment.risk >= peak.risk:
                peak = assessment
            if now < due:
                self._due[key] = (due, peak)
                return None
            assessment = peak
            del self._due[key]  # re-inserted last: the dict's order is the order of reports
        elif len(self._due) >= self.max_identities:
            del self._due[next(iter(self._due))]
        self._due[key] = (now + self.interval, None)
        return assessment
