"""In-process storage: bounded, expiring, flood-resistant.

Each identity's GCRA state is one float, its TAT, the instant its bucket is full
again. An entry whose TAT has passed carries no information (a missing entry means a
full bucket), so it is dead: it is overwritten when its identity returns and swept
when room is needed. The table holds at most ``max_identities`` entries.

Flood resistance: when the table is full of live entries (identities whose buckets
are not full), a new identity does **not** evict anyone, because eviction would hand a
throttled client a fresh full bucket. It is charged instead to one shared *overflow*
bucket with the configured rate and burst, as if every newcomer were one client. An
identity flood therefore throttles itself, penalised identities keep their state, and
the cost falls on identities first seen during the flood, which share one allowance
until the table drains. Sweeps of dead entries run at most once per
``sweep_interval`` seconds, so a flood cannot make every request pay an O(n) sweep.
"""

from __future__ import annotations

import time
from typing import ClassVar

from ..limiter import Clock, Decision, gcra
from .base import Storage


class MemoryStorage(Storage):
    """State in this process only; ``memory://`` (the default)."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(
        self,
        max_identities: int = 100_000,
        clock: Clock = time.monotonic,
        sweep_interval: float = 1.0,
    ) -> None:
        if max_identities < 1:
            raise ValueError("max_identities must be at least 1")
        self.max_identities = max_identities
        self.sweep_interval = sweep_interval
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._overflow_tat: float | None = None
        self._next_sweep = float("-inf")
        self.overflowed = 0
        """Requests charged to the overflow bucket because the table was full."""

    def __len__(self) -> int:
        """Entries held, live or dead (what memory is spent on)."""
        return len(self._tats)

    def live(self, now: float | None = None) -> int:
        """Identities whose bucket is not full at ``now``."""
        now = self._clock() if now is None else now
        return sum(1 for tat in self._tats.values() if tat > now)

    async def acquire(
        self, key: str, cost: int, interval: float, burst: int, now: float
    ) -> Decision:
        tats = self._tats
        tat = tats.get(key)
        if tat is None and len(tats) >= self.max_identities and not self._sweep(now):
            self.overflowed += 1
            decision, new_tat = gcra(self._overflow_tat, now, cost, interval, burst)
            if new_tat is not None:
                self._overflow_tat = new_tat
            return decision
        decision, new_tat = gcra(tat, now, cost, interval, burst)
        if new_tat is not None:
            self._tats[key] = new_tat  # not ``tats``: a sweep rebinds the table
        return decision

    async def peek(self, key: str, interval: float, burst: int, now: float) -> Decision:
        # Never written back, so a peek neither creates an entry nor touches the overflow.
        return gcra(self._tats.get(key), now, 0, interval, burst)[0]

    def _sweep(self, now: float) -> bool:
        """Drop dead entries if a sweep is due; true when there is room afterwards."""
        if now < self._next_sweep:
            return False
        self._next_sweep = now + self.sweep_interval
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        return len(self._tats) < self.max_identities
