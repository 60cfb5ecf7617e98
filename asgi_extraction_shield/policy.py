"""The policy: from risk to action.

Levels grow ``normal → watch → degrade → throttle → block``. The middleware asks the
policy for an identity's current :class:`Action` before charging the limiter (a
throttled identity pays ``cost_multiplier`` times the cost) and hands it the monitor's
assessment afterwards (which may raise the level, or block). ``inspect`` and ``lift`` serve
introspection (``ExtractionShield.inspect``, the admin route): a policy that keeps its
state elsewhere (Redis) implements them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .errors import ConfigurationError
from .identity import Identity
from .monitor.base import Assessment

if TYPE_CHECKING:
    from .settings import PolicySettings
    from .storage.base import Storage
    from .storage.redis_policy import RedisPolicy

Level = Literal["normal", "watch", "degrade", "throttle", "block"]
LEVELS: tuple[Level, ...] = ("normal", "watch", "degrade", "throttle", "block")


@dataclass(frozen=True, slots=True)
class Action:
    """What to do with an identity's requests.

    ``cost_multiplier`` scales the limiter cost; ``block_seconds`` > 0 refuses the
    request with 429 abnormal-usage-detected and that Retry-After. ``previous`` is the
    level the identity had just before an ``update`` changed it, when the state is shared
    by several processes (another process may have changed it since this request's
    ``current``): the process whose update made the change reports it, once.
    ``degraded`` is true when a shared state was unreachable and this process decided alone.
    """

    level: Level = "normal"
    cost_multiplier: float = 1.0
    block_seconds: float = 0.0
    assessment: Assessment = field(default_factory=Assessment)
    previous: Level | None = None
    degraded: bool = False


NORMAL = Action()


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What a policy remembers of one identity, for introspection: its risk now (decayed),
    its level, the seconds of block left and the assessment that last updated it."""

    risk: float
    level: Level
    block_seconds: float
    assessment: Assessment = field(default_factory=Assessment)


class Policy(Protocol):
    async def current(self, identity: Identity) -> Action:
        """The identity's action before this request is observed."""
        ...

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        """The identity's action once this request is observed."""
        ...

    async def inspect(self, key: str) -> PolicyState | None:
        """The state of the identity hashed as ``key``; ``None`` when nothing is remembered."""
        ...

    async def lift(self, key: str) -> bool:
        """Forget the identity's risk, level and block; true if there was anything to lift."""
        ...


class StaticPolicy:
    """Always the same action (``normal`` by default): the limiter alone decides."""

    def __init__(self, action: Action = NORMAL) -> None:
        self.action = action

    async def current(self, identity: Identity) -> Action:
        return self.action

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        return self.action

    async def inspect(self, key: str) -> PolicyState | None:
        return None  # nothing is remembered

    async def lift(self, key: str) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Risk at which each level starts; a level is left only ``hysteresis`` below it."""

    watch: float = 0.3
    degrade: float = 0.5
    throttle: float = 0.7
    block: float = 0.9
    hysteresis: float = 0.1

    def level(self, risk: float, current: Level) -> Level:
        rank = LEVELS.index(current)
        for index in range(len(LEVELS) - 1, 0, -1):
            start = (self.watch, self.degrade, self.throttle, self.block)[index - 1]
            # Climbing needs the threshold; staying needs the threshold minus hysteresis.
            if risk >= start or (index <= rank and risk >= start - self.hysteresis):
                return LEVELS[index]
        return "normal"


@dataclass(slots=True)
class _State:
    risk: float
    level: Level
    updated: float
    blocked_until: float = 0.0
    assessment: Assessment = field(default_factory=Assessment)


class GradedPolicy:
    """Risk → level, with hysteresis and decay: normal → watch → degrade → throttle → block.

    An identity's risk is the larger of the monitor's latest assessment and its previous
    risk decayed with ``half_life`` seconds, so one quiet request does not clear a
    suspicious history and an idle identity returns to normal by itself. ``throttle``
    multiplies the limiter cost by ``throttle_multiplier``; ``block`` refuses requests for
    ``block_seconds``. States are kept per identity in a bounded table from which
    identities at ``degrade`` or above are evicted only when nothing else is left (a flood
    of new identities cannot wash a penalty away); among equals the least risky go first.
    """

    def __init__(
        self,
        thresholds: Thresholds | None = None,
        *,
        half_life: float = 600.0,
        block_seconds: float = 900.0,
        throttle_multiplier: float = 4.0,
        max_identities: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.thresholds = thresholds or Thresholds()
        self.half_life = half_life
        self.block_seconds = block_seconds
        self.throttle_multiplier = throttle_multiplier
        self.max_identities = max_identities
        self.clock = clock
        self._states: dict[str, _State] = {}

    def _decayed(self, state: _State, now: float) -> float:
        if self.half_life <= 0 or now <= state.updated:
            return state.risk
        return float(state.risk * 0.5 ** (max(0.0, now - state.updated) / self.half_life))

    def _action(self, state: _State, now: float) -> Action:
        level = state.level
        block = state.blocked_until - now if state.blocked_until > now else 0.0
        multiplier = self.throttle_multiplier if level in ("throttle", "block") else 1.0
        return Action(level, multiplier, block, state.assessment)

    async def current(self, identity: Identity) -> Action:
        state = self._states.get(identity.key)
        if state is None:
            return NORMAL
        now = self.clock()
        if state.blocked_until <= now and state.level != "normal":
            risk = self._decayed(state, now)
            level = self.thresholds.level(risk, state.level)
            if level == "block":  # a finished block steps down, it does not renew itself
                level = "throttle"
            state.risk, state.level, state.updated = risk, level, now
        return self._action(state, now)

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        now = self.clock()
        state = self._states.get(identity.key)
        if state is None:
            if assessment.risk < self.thresholds.watch:
                return Action(assessment=assessment)  # nothing to remember
            state = self._insert(identity.key, _State(0.0, "normal", now))
        risk = max(assessment.risk, self._decayed(state, now))
        level = self.thresholds.level(risk, state.level)
        updated = now
        if level == "block" and state.blocked_until <= now:
            if state.level != "block":
                state.blocked_until = now + self.block_seconds
                # Risk does not decay while the client sits out its block: it comes back
                # as suspicious as it left, and is blocked again if it carries on.
                updated = state.blocked_until
            else:
                level = "throttle"  # served its block: back to throttle until risk rises again
        state.risk, state.level, state.updated, state.assessment = risk, level, updated, assessment
        return self._action(state, now)

    async def inspect(self, key: str) -> PolicyState | None:
        state = self._states.get(key)
        if state is None:
            return None
        now = self.clock()
        block = max(0.0, state.blocked_until - now)
        return PolicyState(self._decayed(state, now), state.level, block, state.assessment)

    async def lift(self, key: str) -> bool:
        return self._states.pop(key, None) is not None

    def level_counts(self) -> dict[Level, int]:
        """Identities at each level above ``normal`` now (decay and finished blocks applied),
        for metrics. O(identities held): meant for a scrape every few seconds, not for each
        request. Identities at ``normal`` are not remembered, so not counted."""
        now = self.clock()
        counts = dict.fromkeys(LEVELS[1:], 0)
        for state in list(self._states.values()):
            if state.blocked_until > now:
                level: Level = "block"
            else:
                level = self.thresholds.level(self._decayed(state, now), state.level)
                if level == "block":
                    level = "throttle"  # as in ``current``: a finished block steps down
            if level != "normal":
                counts[level] += 1
        return counts

    def _insert(self, key: str, state: _State) -> _State:
        states = self._states
        if len(states) >= self.max_identities:
            # Make room for a tenth of the table at once (amortised O(log n) per insert):
            # unpenalised identities first, least risky first.
            now = self.clock()
            order = sorted(
                states,
                key=lambda k: (LEVELS.index(states[k].level) >= 2, self._decayed(states[k], now)),
            )
            for victim in order[: max(1, self.max_identities // 10)]:
                del states[victim]
        states[key] = state
        return state


def build_policy(
    settings: PolicySettings, clock: Callable[[], float], storage: Storage | None = None
) -> GradedPolicy | RedisPolicy:
    """The graded policy ``POLICY__*`` describes; on a Redis ``storage``, with its state in
    Redis (and, when the storage falls back to memory, an in-process fallback)."""
    starts = (settings.watch, settings.degrade, settings.throttle, settings.block)
    if list(starts) != sorted(starts):
        raise ConfigurationError(
            "EXTRACTION_SHIELD_POLICY__WATCH <= DEGRADE <= THROTTLE <= BLOCK is required, got "
            + ", ".join(f"{v:g}" for v in starts)
        )
    thresholds = Thresholds(*starts, hysteresis=settings.hysteresis)
    options: dict[str, Any] = {
        "half_life": settings.half_life,
        "block_seconds": settings.block_seconds,
        "throttle_multiplier": settings.throttle_multiplier,
    }
    local = GradedPolicy(thresholds, clock=clock, **options)
    from .storage.redis import RedisStorage

    if not isinstance(storage, RedisStorage):
        return local
    from .storage.redis_policy import RedisPolicy

    fallback = local if storage.fallback is not None else None
    return RedisPolicy(storage, thresholds, fallback=fallback, **options)
