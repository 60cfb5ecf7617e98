"""Watermark records on Redis: what every worker and replica marked, in one place.

A record-keeping watermark (``dawn``) keeps the queries it marked in process memory and,
with ``WATERMARK_RECORDS_PATH``, in a local JSONL file. With ``STORAGE_URL=redis://…`` it
also appends them to one Redis list per identity, ``{<prefix>:<identity>}:wm``: capped to
the most recent ``per_identity`` records and expiring ``ttl`` seconds after the identity's
last mark, so the records of several workers or replicas on several hosts end up together,
and ``extraction-shield records`` exports them as the JSONL that ``verify --records`` reads.

Writes never delay or fail a response: each is sent in the background (pipelined with the
other Redis calls of the moment) and at most ``max_inflight`` are in flight; a write that
fails or finds Redis unavailable is counted, logged at most once a minute, and dropped
(the memory and file copies keep it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

import orjson

from ..errors import StorageError
from ..events import OccasionalErrorLog
from .base import Storage
from .redis import RedisStorage, Script

SUFFIX = ":wm"
CHUNK = 500
"""Records per script call (Lua's ``unpack`` has a stack limit)."""

APPEND = Script(
    """
-- KEYS[1]: an identity's records. ARGV[1]: TTL (ms); ARGV[2]: records kept; ARGV[3..]: new.
redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return redis.call('LLEN', KEYS[1])
"""
)


def records_key(prefix: str, identity: str) -> str:
    """The list of ``identity``'s records (hash-tagged like the identity's other keys)."""
    return f"{{{prefix}:{identity}}}{SUFFIX}"


class RedisRecordSink:
    """Appends watermark records to Redis in the background (see the module docstring)."""

    def __init__(
        self,
        storage: RedisStorage,
        *,
        per_identity: int = 10_000,
        ttl: float = 30 * 86_400.0,
        max_inflight: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_identity < 1 or ttl <= 0 or max_inflight < 1:
            raise ValueError("records: per_identity, ttl and max_inflight must be positive")
        self.storage = storage
        self.per_identity = per_identity
        self.ttl = ttl
        self.max_inflight = max_inflight
        self.written = 0
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: tasks are weak
        self._errors = OccasionalErrorLog("watermark records on Redis", clock=clock)

    def key(self, identity: str) -> str:
        return records_key(self.storage.prefix, identity)

    def add(self, identity: str, records: list[dict[str, Any]]) -> None:
        """Queue ``records`` of ``identity`` for Redis; returns at once."""
        if not records:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the server's event loop (a script, a test): no Redis
            self._dropped(len(records), "no running event loop")
            return
        if len(self._tasks) >= self.max_inflight or self.storage.failing:
            self._dropped(len(records), "Redis unavailable or too slow")
            return
        lines = [orjson.dumps(record) for record in records]
        task = loop.create_task(self._write(identity, lines))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Wait for the writes in flight (at shutdown, and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _write(self, identity: str, lines: list[bytes]) -> None:
        ttl_ms = int(self.ttl * 1000)
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start : start + CHUNK]
            try:
                await self.storage.call(
                    APPEND, (self.key(identity),), (ttl_ms, self.per_identity, *chunk)
                )
            except StorageError as exc:
                self._dropped(len(lines) - start, repr(exc))
                return
            self.written += len(chunk)

    def _dropped(self, count: int, why: str) -> None:
        self.dropped += count
        self._errors.report(error=why, dropped=self.dropped)


def attach_record_sink(watermark: Any, storage: Storage) -> RedisRecordSink | None:
    """On Redis, send the records of a record-keeping watermark (one with a ``store`` that
    takes a ``sink``) there too; the sink, or ``None`` when there is nothing to do."""
    store: Any = getattr(watermark, "store", None)
    if not isinstance(storage, RedisStorage) or not hasattr(store, "sink"):
        return None
    sink = RedisRecordSink(storage)
    store.sink = sink
    return sink


async def read_records(
    storage: RedisStorage, identity: str | None = None
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``(identity, record)`` for the records on Redis, of one identity or of all."""
    client = storage.client
    if identity is not None:
        keys = [records_key(storage.prefix, identity)]
    else:
        keys = [
            key.decode() if isinstance(key, bytes) else key
            async for key in client.scan_iter(match=records_key(storage.prefix, "*"), count=500)
        ]
    start = len(storage.prefix) + 2
    for key in sorted(keys):
        who = key[start : -len("}" + SUFFIX)]
        for raw in await client.lrange(key, 0, -1):
            yield who, orjson.loads(raw)


async def export_records(storage: RedisStorage, out: IO[bytes], identity: str | None = None) -> int:
    """Write the records on Redis to ``out`` as JSONL (what ``verify --records`` reads);
    the number written."""
    count = 0
    async for _, record in read_records(storage, identity):
        out.write(orjson.dumps(record) + b"\n")
        count += 1
    return count
