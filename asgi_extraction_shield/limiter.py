"""Token-bucket rate limiting, as GCRA (the Generic Cell Rate Algorithm).

A bucket of ``burst`` tokens refills at ``count`` tokens per ``period`` seconds. GCRA
keeps one number per identity, the *theoretical arrival time* (TAT): the instant at
which the bucket would be full again. A request of cost ``c`` is allowed when
``max(TAT, now) + c·T − burst·T <= now`` (``T = period / count``, the emission
interval), and then moves TAT forward by ``c·T``. This is exactly a token bucket,
with O(1) state and no timer: a bucket that is full again carries no information,
which is what lets the memory storage forget idle identities safely.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .storage.base import Storage

Clock = Callable[[], float]

_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RATE_RE = re.compile(
    r"^\s*([0-9]{1,12})\s*(?:/|per)\s*([0-9]{1,9}\s*)?(second|minute|hour|day)s?\s*$", re.I
)
_EPSILON = 1e-9  # float slack so that a request exactly on time is allowed


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` tokens per ``period`` seconds, e.g. ``Rate.parse("600/minute")``."""

    count: int
    period: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``"<count>/<unit>"`` or ``"<count>/<n> <unit>"`` (unit second, minute, hour, day)."""
        match = _RATE_RE.match(text)
        if not match:
            raise ValueError(
                f"{text!r} is not a rate: expected '<count>/<unit>' with unit second, minute, "
                "hour or day, e.g. '600/minute' or '10/5 seconds'"
            )
        count = int(match.group(1))
        multiple = int(match.group(2) or 1)
        if count < 1 or multiple < 1:
            raise ValueError(f"{text!r} is not a rate: count and period must be at least 1")
        return cls(count, multiple * _UNITS[match.group(3).lower()])

    @property
    def interval(self) -> float:
        """Seconds for one token to refill (GCRA's emission interval T)."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


@dataclass(slots=True)
class Decision:
    """The outcome of one limiter call.

    ``remaining`` tokens are left after this request (or now, when denied);
    ``reset_after`` seconds until the bucket is full again; ``retry_after`` seconds
    until a request of the same cost would be allowed (0 when allowed).
    ``over_capacity`` is true when the cost exceeds the burst, so that waiting is useless.
    ``degraded`` is true when a shared storage could not be reached and the decision was
    taken by its in-process fallback instead (``FAILURE_MODE=open``); the middleware
    reports it as a ``storage_error`` event and otherwise acts on it as usual.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    over_capacity: bool = False
    degraded: bool = False


def gcra(
    tat: float | None, now: float, cost: int, interval: float, burst: int
) -> tuple[Decision, float | None]:
    """One GCRA step: the decision and the new TAT (``None`` when the state is unchanged).

    Pure function, shared by every storage that keeps TATs itself and mirrored by the
    Redis script, so that all backends decide alike.
    """
    base = now if tat is None or tat < now else tat
    capacity = burst * interval
    if cost > burst:
        remaining = int((capacity - (base - now)) / interval + _EPSILON)
        return Decision(False, burst, remaining, base - now, capacity, over_capacity=True), None
    new_tat = base + cost * interval
    allow_at = new_tat - capacity
    if allow_at > now + _EPSILON:
        remaining = max(0, int((capacity - (base - now)) / interval + _EPSILON))
        return Decision(False, burst, remaining, base - now, allow_at - now), None
    remaining = max(0, int((capacity - (new_tat - now)) / interval + _EPSILON))
    return Decision(True, burst, remaining, new_tat - now, 0.0), new_tat


class Limiter:
    """Charges a cost to an identity's bucket in a storage.

    The clock is injected (``time.monotonic`` by default) so tests need no sleeps;
    storages that own a clock (Redis uses the server's ``TIME``) ignore it.
    """

    def __init__(
        self, storage: Storage, rate: Rate, burst: int | None = None, clock: Clock = time.monotonic
    ) -> None:
        self.storage = storage
        self.rate = rate
        self.burst = rate.count if burst is None else burst
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self.clock = clock
        self._interval = rate.interval

    def acquire(self, key: str, cost: int = 1) -> Awaitable[Decision]:
        """Charge ``cost`` tokens to ``key``; never blocks waiting for tokens.

        Returns the storage's awaitable directly (one coroutine frame less per request).
        """
        if cost < 0:
            raise ValueError("cost must be non-negative")
        return self.storage.acquire(key, cost, self._interval, self.burst, self.clock())

    def peek(self, key: str) -> Awaitable[Decision]:
        """The state of ``key``'s bucket now, without charging it (for introspection)."""
        return self.storage.peek(key, self._interval, self.burst, self.clock())

    def policy_header(self) -> str:
        """``RateLimit-Policy`` value (IETF httpapi ratelimit-headers, structured-field form)."""
        return f'"default";q={self.rate.count};w={max(1, math.ceil(self.rate.period))}'


def rate_limit_header(decision: Decision) -> bytes:
    """``RateLimit`` value: tokens remaining and whole seconds until the bucket is full."""
    reset = math.ceil(decision.reset_after - _EPSILON)
    return b'"default";r=%d;t=%d' % (decision.remaining, reset if reset > 0 else 0)


def retry_after_seconds(decision: Decision) -> int:
    """``Retry-After`` in whole seconds, at least 1 (RFC 9110 delay-seconds)."""
    return max(1, math.ceil(decision.retry_after - _EPSILON))
