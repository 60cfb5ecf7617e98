"""The monitor's observations shared through Redis: one capped stream per tracker.

Each identity (and each pool: IP prefix, cohort) has a Redis stream,
``{<prefix>:<identity>}:obs`` (``{<prefix>:pool:<pool>}:obs`` for a pool), of the
observations every process made of it (:mod:`~..monitor.observation`, a few hundred bytes
a request). A process queues its own observations and, every ``assess_every`` requests of
an identity (and on the first request of an identity it has not seen), exchanges them in
one round-trip: for each of the identity's trackers one Lua script, atomic on its stream,
returns the entries other processes added since the tracker's cursor and appends the
queued ones. The process replays those into its trackers, so every signal is computed
over the client's whole traffic, whichever worker served it.

Bounded: a stream keeps about ``max_entries`` entries (``XADD MAXLEN ~``) and expires
``ttl`` seconds after its last write; a process queues at most ``max_pending`` entries a
tracker (the oldest are dropped) and remembers at most ``max_keys`` trackers' queues. When
Redis is unavailable an exchange is skipped (the monitor goes on with what this process
sees; the limiter and the policy report the outage) and its entries stay queued.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from cachetools import LRUCache

from ..errors import StorageError
from ..monitor.observation import Answers, Observation, pack, unpack
from ..monitor.tracker import Tracker
from .redis import RedisStorage, Script

EXCHANGE = Script(
    """
-- KEYS[1]: a tracker's stream. ARGV[1]: the cursor ('' before the first read); ARGV[2]:
-- this process's id; ARGV[3]: entries kept; ARGV[4]: TTL (ms); ARGV[5..]: new entries.
-- Returns the new cursor, then the other processes' entries after the old cursor.
local cursor, worker = ARGV[1], ARGV[2]
local keep = tonumber(ARGV[3])
local out = {cursor}
local entries = redis.call('XRANGE', KEYS[1], cursor == '' and '-' or cursor, '+',
  'COUNT', 2 * keep + 1)
for _, entry in ipairs(entries) do
  if entry[1] ~= cursor then -- XRANGE starts at the cursor itself
    out[1] = entry[1]
    local fields = entry[2]
    if fields[2] ~= worker then out[#out + 1] = fields[4] end
  end
end
for i = 5, #ARGV do
  out[1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', keep, '*', 'w', worker, 'o', ARGV[i])
end
if #ARGV >= 5 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return out
"""
)


class RedisObservations:
    """Implements :class:`~..monitor.observation.SharedObservations` on a :class:`RedisStorage`."""

    def __init__(
        self,
        storage: RedisStorage,
        *,
        every: int = 8,
        max_entries: int = 256,
        ttl: float = 3600.0,
        max_pending: int = 64,
        max_keys: int = 8192,
    ) -> None:
        self.storage = storage
        self.every = every
        self.max_entries = max_entries
        self.ttl_ms = int(ttl * 1000)
        self.max_pending = max(max_pending, every)
        self.worker = os.urandom(8).hex().encode()
        self._pending: LRUCache[str, deque[bytes]] = LRUCache(max_keys)
        self.dropped = 0
        """Queued entries dropped (queue full: Redis unavailable, or a very busy pool)."""

    def key(self, tracker: str) -> str:
        pool = tracker.startswith(("net:", "cohort:"))
        return f"{{{self.storage.prefix}:{'pool:' if pool else ''}{tracker}}}:obs"

    def record(self, keys: list[str], observation: Observation | Answers) -> None:
        data = pack(observation)
        for key in keys:
            queue = self._pending.get(key)
            if queue is None:
                queue = self._pending[key] = deque(maxlen=self.max_pending)
            if len(queue) == self.max_pending:
                self.dropped += 1
            queue.append(data)

    def due(self, key: str, tracker: Tracker) -> bool:
        if tracker.cursor is None:
            return True
        queue = self._pending.get(key)
        return queue is not None and len(queue) >= self.every

    async def exchange(
        self, trackers: dict[str, Tracker]
    ) -> dict[str, list[Observation | Answers]]:
        if self.storage.failing:
            return {}  # the entries stay queued; a request waits on Redis one timeout at most
        calls = []
        sent: dict[str, list[bytes]] = {}
        for key, tracker in trackers.items():
            queue = self._pending.get(key)
            entries = list(queue) if queue else []
            sent[key] = entries
            argv: tuple[Any, ...] = (
                tracker.cursor or b"",
                self.worker,
                self.max_entries,
                self.ttl_ms,
                *entries,
            )
            calls.append((EXCHANGE, (self.key(key),), argv))
        try:
            replies = await self.storage.call_all(calls)
        except StorageError:
            return {}
        received: dict[str, list[Observation | Answers]] = {}
        for (key, tracker), reply in zip(trackers.items(), replies, strict=True):
            queue = self._pending.get(key)
            for _ in sent[key]:
                if queue:
                    queue.popleft()  # sent; entries queued meanwhile stay
            tracker.cursor = reply[0] or b"0-0"
            if len(reply) > 1:
                received[key] = [unpack(data) for data in reply[1:]]
        return received
