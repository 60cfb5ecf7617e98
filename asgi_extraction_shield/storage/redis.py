"""Redis storage: limiter buckets shared by every worker and replica.

Each decision is **one** Lua script run on the server (``EVALSHA``), so it is atomic
however many processes share a bucket, and costs one round-trip, which the concurrent
decisions of a process share (automatic pipelining, see ``_submit``). The script is the GCRA
step of :func:`asgi_extraction_shield.limiter.gcra`, line for line, with two
differences that make it safe to share:

- the clock is the server's ``TIME``, never the client's, so processes on hosts
  whose clocks disagree still agree on every bucket (the ``now`` argument is ignored);
- times are microseconds since the epoch (TAT, ``TIME``), kept as Lua doubles, which
  hold integers exactly up to 2^53 µs (about 285 years); the TAT is stored and the
  durations returned as ``%.17g`` text, because Redis truncates a Lua number to an
  integer reply and Lua prints numbers with 14 digits only. The whole reply is one
  string, not an array: redis-py's parser reads one bulk string faster than an array of
  five, and the client's CPU, not Redis, is what limits the decisions per second.

One key per identity, ``{<prefix>:<identity>}:tat``, holding its TAT. The braces are a
Redis Cluster hash tag: every key of one identity (later state included) lands in the
same slot, so a script may touch several of them. Every write sets a TTL equal to the
time until the bucket is full again; a full bucket carries no information (a missing
key *is* a full bucket), so idle identities vanish by themselves and Redis memory
follows the live identities only.

Failures are bounded and contained. ``timeout`` caps one whole decision (connecting,
the command, a script reload): the request never waits longer. A
:class:`~.breaker.CircuitBreaker` stops calling a Redis that keeps failing and probes
it once per cool-down. While Redis is unavailable, a decision either comes from
``fallback`` (an in-process :class:`~.memory.MemoryStorage`, for ``FAILURE_MODE=open``),
marked ``Decision.degraded`` so that the middleware reports it, or raises
:class:`~asgi_extraction_shield.errors.StorageError` (``FAILURE_MODE=closed``: 503).

redis-py (the ``redis`` extra) is imported when a ``RedisStorage`` is built, so the
core package never needs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigurationError, StorageError
from ..limiter import Clock, Decision
from .base import Storage
from .breaker import CircuitBreaker

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger("asgi_extraction_shield")

_T = TypeVar("_T")

PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""Key prefixes: no braces (they would end the hash tag), no spaces, at most 64 characters."""

GCRA_FUNCTION = """
-- One GCRA step (asgi_extraction_shield.limiter.gcra) on the server's clock, in us.
-- key: the identity's TAT; cost, emission interval (us), burst.
-- Returns 'allowed remaining reset_after_us retry_after_us over_capacity', one string.
local function gcra(key, cost, interval, burst)
  if redis.replicate_commands then redis.replicate_commands() end -- TIME, then a write
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local base = now
  local stored = redis.call('GET', key)
  if stored then
    local tat = tonumber(stored)
    if tat > now then base = tat end
  end
  local capacity = burst * interval
  local function tokens(x) -- Python's int(x + 1e-9): truncates toward zero
    x = x + 1e-9
    if x < 0 then return math.ceil(x) end
    return math.floor(x)
  end
  local function reply(allowed, remaining, reset_after, retry_after, over)
    return string.format('%d %d %.17g %.17g %d', allowed, remaining, reset_after, retry_after,
      over)
  end
  if cost > burst then
    return reply(0, tokens((capacity - (base - now)) / interval), base - now, capacity, 1)
  end
  local new_tat = base + cost * interval
  local allow_at = new_tat - capacity
  if allow_at > now + 0.001 then -- 1e-9 s of slack, as in gcra
    local remaining = math.max(0, tokens((capacity - (base - now)) / interval))
    return reply(0, remaining, base - now, allow_at - now, 0)
  end
  if cost > 0 then
    -- Expire when the bucket is full again: a missing key is a full bucket.
    local ttl = string.format('%d', math.ceil((new_tat - now) / 1000))
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', ttl)
  end
  return reply(1, math.max(0, tokens((capacity - (new_tat - now)) / interval)), new_tat - now,
    0, 0)
end
"""

GCRA_SCRIPT = (
    GCRA_FUNCTION
    + """
-- KEYS[1]: the identity's TAT; ARGV: cost, emission interval (us), burst.
return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
"""
)


@dataclass(frozen=True)
class Script:
    """A Lua script run with ``EVALSHA`` (its SHA-1 computed once), ``EVAL`` after NOSCRIPT."""

    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())


GCRA = Script(GCRA_SCRIPT)
GCRA_SHA = GCRA.sha

MAX_PIPELINE = 256
"""Most script calls sent in one pipeline; more concurrent calls use more connections."""

_Call = tuple[Script, tuple[str, ...], tuple[Any, ...]]
"""One script call: the script, its keys, its arguments."""
_Batch = list[tuple[_Call, "asyncio.Future[Any]"]]

if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        # asyncio.timeout, unlike wait_for before 3.12, needs no extra task per call.
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


def decision_of(reply: bytes, burst: int) -> Decision:
    """The :class:`Decision` of a GCRA script's reply."""
    allowed, remaining, reset_us, retry_us, over = reply.split()
    return Decision(
        int(allowed) == 1,
        burst,
        int(remaining),
        float(reset_us) / 1e6,
        float(retry_us) / 1e6,
        over_capacity=int(over) == 1,
    )


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisStorage(Storage):
    """Buckets in Redis, shared by every process; ``redis://`` or ``rediss://`` (TLS).

    ``url`` is a redis-py URL (``redis://[user:password@]host:port/db``; query
    parameters such as ``max_connections`` are passed to redis-py's connection pool).
    ``timeout`` bounds a whole decision in seconds; ``failure_threshold`` consecutive
    failures open the circuit for ``cooldown`` seconds (``clock`` times it). With a
    ``fallback`` storage a decision Redis cannot make comes from it, marked
    ``degraded``; without one it raises :class:`StorageError`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss")
    shared: ClassVar[bool] = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "shield",
        timeout: float = 0.1,
        fallback: Storage | None = None,
        failure_threshold: int = 3,
        cooldown: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        try:
            import redis.asyncio
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise ConfigurationError(
                f"EXTRACTION_SHIELD_STORAGE_URL={redact(url)!r} needs the Redis client: "
                "pip install 'asgi-extraction-shield[redis]'"
            ) from None
        if not PREFIX_RE.match(prefix):
            raise ConfigurationError(
                f"Redis key prefix {prefix!r}: expected 1 to 64 letters, digits or '_.:-'"
            )
        if timeout <= 0:
            raise ConfigurationError(f"Redis timeout {timeout!r}: expected a positive number")
        self.url = redact(url)
        self.prefix = prefix
        self.timeout = timeout
        self.fallback = fallback
        self.breaker = CircuitBreaker(failure_threshold, cooldown, clock)
        try:
            # The deadline around each decision bounds connecting, sending and reading
            # at once, so no socket_timeout: with one, redis-py wraps every send in
            # asyncio.wait_for, a task per command, which cost a third of the throughput.
            # When the deadline cancels a command, redis-py drops that connection, so no
            # late reply is ever read as the answer to another command.
            # One immediate retry, on a broken connection only: a pooled connection that
            # died with a Redis restart or failover is then replaced at once instead of
            # failing one request per pooled connection. Timeouts are never retried, and
            # the deadline covers the retry too.
            self._client: Redis = redis.asyncio.Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
                retry_on_error=[redis.exceptions.ConnectionError],  # redis-py 5 needs both
                health_check_interval=0,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"EXTRACTION_SHIELD_STORAGE_URL={self.url!r} is not a valid Redis URL: {exc}"
            ) from None
        # redis-py leaves execute_command untyped.
        self._execute = cast(Callable[..., Awaitable[Any]], self._client.execute_command)
        self._noscript = redis.exceptions.NoScriptError
        self._batch: _Batch | None = None
        self.round_trips = 0
        """Round-trips to Redis so far (a pipeline counts once), for the benchmark."""
        self._senders: set[asyncio.Task[None]] = set()  # strong references: tasks are weak
        self._failures: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError,
            OSError,
            asyncio.TimeoutError,
        )

    @property
    def client(self) -> Redis:
        """The redis-py client (its pool is closed by :meth:`close`)."""
        return self._client

    @property
    def failing(self) -> bool:
        """True after a failed call, until a call succeeds: the policy's update and the
        monitor's exchange then leave Redis to the limiter's calls, which probe it, so a
        request waits on a failing Redis once at the most."""
        return self.breaker.failures > 0

    def key(self, identity: str) -> str:
        """The Redis key of ``identity``'s TAT, hash-tagged for Redis Cluster."""
        return f"{{{self.prefix}:{identity}}}:tat"

    async def acquire(
        self, key: str, cost: int, interval: float, burst: int, now: float
    ) -> Decision:
        try:
            reply = await self.guarded(
                lambda: self._submit(GCRA, (self.key(key),), (cost, interval * 1e6, burst))
            )
        except StorageError:
            if self.fallback is None:
                raise
            decision = await self.fallback.acquire(key, cost, interval, burst, now)
            return replace(decision, degraded=True)
        return decision_of(reply, burst)

    async def peek(self, key: str, interval: float, burst: int, now: float) -> Decision:
        # The script writes nothing at cost 0: a peek is the same one round-trip.
        try:
            reply = await self.guarded(
                lambda: self._submit(GCRA, (self.key(key),), (0, interval * 1e6, burst))
            )
        except StorageError:
            if self.fallback is None:
                raise
            decision = await self.fallback.peek(key, interval, burst, now)
            return replace(decision, degraded=True)
        return decision_of(reply, burst)

    async def guarded(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """``await make()`` within the timeout and through the circuit breaker.

        Raises :class:`StorageError` when Redis fails or the circuit is open; the
        breaker counts the failures of every caller (limiter, policy, monitor) alike.
        """
        breaker = self.breaker
        if not breaker.allow():
            raise StorageError(
                f"Redis storage {self.url} unavailable: circuit open after "
                f"{breaker.failures} consecutive failures"
            )
        try:
            result = await _within(make(), self.timeout)
        except self._failures as exc:
            if breaker.failed():
                logger.warning(
                    "Redis storage %s failed %d times in a row (%r): circuit open for %g s, "
                    "decisions %s meanwhile",
                    self.url,
                    breaker.failures,
                    exc,
                    breaker.cooldown,
                    "fall back to this process's memory" if self.fallback else "fail",
                )
            raise StorageError(f"Redis storage {self.url} unavailable: {exc!r}") from exc
        except BaseException:
            breaker.abandoned()
            raise
        if breaker.succeeded():
            logger.warning("Redis storage %s answers again: circuit closed", self.url)
        return result

    def call(self, script: Script, keys: tuple[str, ...], argv: tuple[Any, ...]) -> Awaitable[Any]:
        """Run ``script`` (guarded, pipelined with the other calls of this turn)."""
        return self.guarded(lambda: self._submit(script, keys, argv))

    def call_all(self, calls: Sequence[_Call]) -> Awaitable[list[Any]]:
        """Run several scripts in one pipeline, guarded as one call; their replies."""
        return self.guarded(lambda: asyncio.gather(*(self._submit(*call) for call in calls)))

    def _submit(
        self, script: Script, keys: tuple[str, ...], argv: tuple[Any, ...]
    ) -> asyncio.Future[Any]:
        """Queue one script call; the future gets its reply (or the error).

        Automatic pipelining, as in ioredis: the calls made while the event loop runs
        other work are sent together, as one pipeline, by a task that starts on the
        loop's next turn. A lone call costs a loop turn more; concurrent calls share
        one round-trip and redis-py's per-command overhead, which dominates the cost of
        a decision on the client (more than twice the decisions per second at 50 in
        flight).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        batch = self._batch
        if batch is None or len(batch) >= MAX_PIPELINE:
            batch = self._batch = []
            sender = loop.create_task(self._send(batch))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        batch.append(((script, keys, argv), future))
        return future

    async def _send(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None  # later calls start the next batch
        try:
            # Bounded too: a frozen Redis must not hold a pooled connection for ever.
            replies = await _within(self._pipeline([call for call, _ in batch]), self.timeout)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller gave up (deadline, or cancelled)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        self.round_trips += 1
        if len(calls) == 1:  # alone: a plain command costs less than a pipeline of one
            script, keys, argv = calls[0]
            try:
                return [await self._execute("EVALSHA", script.sha, len(keys), *keys, *argv)]
            except self._noscript:
                return [await self._execute("EVAL", script.body, len(keys), *keys, *argv)]
        pipe = self._client.pipeline(transaction=False)
        for script, keys, argv in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *argv)
        replies = await pipe.execute(raise_on_error=False)
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, self._noscript)]
        if lost:
            # The server lost its script cache (restart, failover, SCRIPT FLUSH). EVAL
            # sends the body, which also caches it again: one more round-trip, once.
            self.round_trips += 1
            pipe = self._client.pipeline(transaction=False)
            for i in lost:
                script, keys, argv = calls[i]
                pipe.execute_command("EVAL", script.body, len(keys), *keys, *argv)
            for i, reply in zip(lost, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        """Close the connection pool (on application shutdown)."""
        await self._client.aclose()
        if self.fallback is not None:
            await self.fallback.close()
