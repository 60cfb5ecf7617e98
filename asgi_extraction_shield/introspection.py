"""What the shield knows of one identity, and lifting a penalty: for operators.

:class:`Inspector` reads an identity's policy state, the monitor's latest assessment and
its limiter bucket through the components' own interfaces (``Policy.inspect``,
``Limiter.peek``), so a policy or storage kept in Redis answers alike. An identity is
named by its hash (``header:3fa…``, as in events) or by the raw value a client sends (an
API key, a bearer token, an address), which is hashed under each configured source and
never kept. Nothing returned holds a raw key.

FastAPI builds ``app.add_middleware(ExtractionShield)`` lazily, at the app's first
request, so there is no instance to hold at import time: pass a :class:`ShieldHandle`
(``add_middleware(ExtractionShield, handle=handle)``) and the middleware binds itself to
it when it is built; ``await handle.inspect(...)`` then works from anywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .identity import HASHED_KEY

if TYPE_CHECKING:  # type names only: this module is imported early, by the middleware's admin
    from .identity import IdentityResolver
    from .limiter import Limiter
    from .middleware import ExtractionShield
    from .monitor.base import Assessment, Monitor
    from .policy import Policy


@dataclass(frozen=True, slots=True)
class Bucket:
    """An identity's limiter bucket: tokens left of ``limit``, seconds until it is full."""

    limit: int
    remaining: int
    reset_after: float


@dataclass(frozen=True, slots=True)
class IdentityState:
    """What the shield knows of one identity. ``known`` is false when nothing is held
    (a fresh identity: level ``normal``, no risk, a full bucket)."""

    identity: str
    known: bool
    level: str
    risk: float
    block_seconds: float
    bucket: Bucket
    signals: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Inspector:
    """Reads and lifts identity state through the components' interfaces."""

    def __init__(
        self,
        identities: IdentityResolver,
        policy: Policy,
        monitor: Monitor,
        limiter: Limiter,
        on_lift: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.identities = identities
        self.policy = policy
        self.limiter = limiter
        # Optional monitor capabilities (ExtractionMonitor has them; a custom one may not).
        self._assessment_of: Callable[[str], Assessment | None] | None = getattr(
            monitor, "assessment_of", None
        )
        self._forget: Callable[[str], bool] | None = getattr(monitor, "forget", None)
        self.on_lift = on_lift

    def keys(self, who: str) -> list[str]:
        """The hashed keys ``who`` may be: itself if it is a hash, else its hash per source."""
        return [who] if HASHED_KEY.match(who) else self.identities.keys_for(who)

    async def inspect(self, who: str) -> IdentityState:
        """The state of ``who`` (a hash or a raw value). A raw value hashed under several
        sources is reported under the first key the shield holds anything for."""
        states = [await self._state(key) for key in self.keys(who)]
        if not states:
            raise ValueError("the value identifies nobody under the configured sources")
        return next((state for state in states if state.known), states[0])

    async def lift(self, who: str) -> list[str]:
        """Forget the penalties of ``who`` (policy level, risk, block; monitor history).
        Returns the keys that had anything to lift. The limiter bucket is left as is: it
        refills by itself, and resetting it would hand out a free burst."""
        lifted: list[str] = []
        for key in self.keys(who):
            held = await self.policy.lift(key)
            if self._forget is not None:
                held = self._forget(key) or held
            if held:
                lifted.append(key)
                if self.on_lift is not None:
                    await self.on_lift(key)
        return lifted

    async def _state(self, key: str) -> IdentityState:
        policy = await self.policy.inspect(key)
        decision = await self.limiter.peek(key)
        bucket = Bucket(decision.limit, decision.remaining, round(decision.reset_after, 3))
        own = self._assessment_of(key) if self._assessment_of is not None else None
        assessment = policy.assessment if policy is not None else own
        known = policy is not None or own is not None or decision.remaining < decision.limit
        return IdentityState(
            identity=key,
            known=known,
            level=policy.level if policy is not None else "normal",
            risk=round(policy.risk if policy is not None else (own.risk if own else 0.0), 6),
            block_seconds=round(policy.block_seconds, 3) if policy is not None else 0.0,
            bucket=bucket,
            signals=dict(assessment.signals) if assessment is not None else {},
        )


class ShieldHandle:
    """A way to reach a middleware that the framework builds later (see the module doc)."""

    def __init__(self) -> None:
        self.shield: ExtractionShield | None = None

    def bind(self, shield: ExtractionShield) -> None:
        self.shield = shield

    def _bound(self) -> ExtractionShield:
        if self.shield is None:
            raise RuntimeError(
                "the ExtractionShield of this handle is not built yet: frameworks build "
                "middleware at the app's first request or lifespan startup"
            )
        return self.shield

    async def inspect(self, who: str) -> IdentityState:
        return await self._bound().inspect(who)

    async def lift(self, who: str) -> list[str]:
        return await self._bound().lift(who)
