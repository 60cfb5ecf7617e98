"""The storage interface: where limiter state lives.

A storage implements the whole limiter step for one key, so that a remote backend can
run it atomically in one round-trip (a Lua script on Redis) instead of a racy
read-modify-write from several processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..limiter import Decision


class Storage(ABC):
    """Async storage of per-identity state, chosen by URL scheme (``memory://``, ``redis://``)."""

    schemes: ClassVar[tuple[str, ...]] = ()
    shared: ClassVar[bool] = False
    """True when several processes see the same state (they then need the same SECRET_KEY)."""

    @abstractmethod
    async def acquire(
        self, key: str, cost: int, interval: float, burst: int, now: float
    ) -> Decision:
        """Apply one GCRA step (see :func:`asgi_extraction_shield.limiter.gcra`) to ``key``.

        Raises :class:`~asgi_extraction_shield.errors.StorageError` when the backend fails.
        """

    async def peek(self, key: str, interval: float, burst: int, now: float) -> Decision:
        """The state of ``key``'s bucket at ``now`` (remaining tokens, seconds until full),
        without charging it: a GCRA step of cost 0, which a storage must not record."""
        return await self.acquire(key, 0, interval, burst, now)

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections; called on application shutdown."""
