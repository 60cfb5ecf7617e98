"""The policy: from risk to action.

Levels grow ``normal → watch → degrade → throttle → block``. The middleware asks the
policy for an identity's current :class:`Action` before charging the limiter (a
throttled identity pays ``cost_multiplier`` times the cost) and hands it the monitor's
assessment afterwards (which may raise the level, or block). This version ships the
static policy (always ``normal``); the graded policy plugs in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from .identity import Identity
from .monitor.base import Assessment

Level = Literal["normal", "watch", "degrade", "throttle", "block"]
LEVELS: tuple[Level, ...] = ("normal", "watch", "degrade", "throttle", "block")


@dataclass(frozen=True, slots=True)
class Action:
    """What to do with an identity's requests.

    ``cost_multiplier`` scales the limiter cost; ``block_seconds`` > 0 refuses the
    request with 429 abnormal-usage-detected and that Retry-After.
    """

    level: Level = "normal"
    cost_multiplier: float = 1.0
    block_seconds: float = 0.0
    assessment: Assessment = field(default_factory=Assessment)


NORMAL = Action()


class Policy(Protocol):
    async def current(self, identity: Identity) -> Action:
        """The identity's action before this request is observed."""
        ...

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        """The identity's action once this request is observed."""
        ...


class StaticPolicy:
    """Always the same action (``normal`` by default): the limiter alone decides."""

    def __init__(self, action: Action = NORMAL) -> None:
        self.action = action

    async def current(self, identity: Identity) -> Action:
        return self.action

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        return self.action
