"""The monitor interface: how risky is what an identity has been asking?

A monitor observes each admitted request and returns an :class:`Assessment`, the
risk in [0, 1] and the named signals behind it. This version ships the null monitor
(no risk); the query-novelty tracker plugs in here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..formats.base import ParsedRequest
from ..identity import Identity


@dataclass(frozen=True, slots=True)
class Assessment:
    risk: float = 0.0
    signals: Mapping[str, float] = field(default_factory=dict)


NO_RISK = Assessment()


class Monitor(Protocol):
    async def observe_request(self, identity: Identity, request: ParsedRequest) -> Assessment: ...


class NullMonitor:
    """Observes nothing; every identity is risk-free (``MONITOR__ENABLED=false``)."""

    async def observe_request(self, identity: Identity, request: ParsedRequest) -> Assessment:
        return NO_RISK
