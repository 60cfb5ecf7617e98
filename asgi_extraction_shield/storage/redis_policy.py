"""The graded policy with its state in Redis: one level, one risk and one block per client,
whichever worker or replica serves it.

Each identity's state is one hash, ``{<prefix>:<identity>}:policy`` (the same hash tag as
its bucket: one Cluster slot), with the fields of :class:`~..policy.GradedPolicy`'s
state: ``r`` risk, ``l`` level (0 normal … 4 block), ``u`` when the risk was last
updated, ``b`` when the block ends, ``a`` and ``s`` the last assessment's risk and
signals (JSON). ``current`` and ``update`` are each one Lua script that mirrors
``GradedPolicy.current`` / ``GradedPolicy.update`` line for line (the same thresholds,
hysteresis, decay and block rules, on the same numbers), so a sequence of requests gets
the same levels on ``memory://`` and on ``redis://``. The update is atomic: it merges the
worker's new assessment into the stored state (the larger of the new risk and the stored
risk decayed) and returns the level the state had just before, so the worker whose
update changed the level, and only that one, emits ``level_changed`` (and ``blocked``).

Times are the Redis server's ``TIME`` in seconds (a ``clock`` may be given instead, for
tests), so hosts whose clocks disagree agree on every block.

Bounded: a hash lives only as long as it can matter, until its block is over and its risk
has decayed below the point where the lowest level is left (``watch − hysteresis``), at
most ``max_ttl`` seconds after its last update (with ``half_life`` 0, risk never decays:
``max_ttl`` is the bound). A state that expires is one that would grade the client
``normal`` anyway. An identity whose risk stays below ``watch`` writes nothing, as in
memory.

Counted by level, for the ``extraction_shield_identities`` gauge, without a scan: an
identity's level at any later time, absent further updates, is already determined when its
state is saved (a block ends on time, then the risk decays, and the thresholds' hysteresis
is known), and it only goes down. So the save also records, for each level ``L``, until
when the identity will be at ``L`` or above: its score in the sorted set
``{<prefix>}:levels:<L>``. At time ``t`` the identities at ``L`` or above are
``ZCOUNT({<prefix>}:levels:<L>, (t, +inf)``, and those at ``L`` the difference with the
level above: exactly :meth:`~..policy.GradedPolicy.level_counts` (``LEVEL_COUNTS``, one
script on Redis's clock, shared by every worker). Members whose time is over are trimmed a
few at a time by every update and by every count, so the sets follow the live identities;
they expire together, at most twice the longest state's life after the last write.

Calls go through the storage's timeout and circuit breaker, pipelined with its limiter
calls. When Redis is unavailable the ``fallback`` policy (in this process) decides and
the action is marked ``degraded``; without a fallback the
:class:`~..errors.StorageError` propagates (``FAILURE_MODE=closed``: 503).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from cachetools import LRUCache

from ..errors import StorageError
from ..identity import Identity
from ..limiter import Clock, Decision, Limiter
from ..monitor.base import Assessment
from ..policy import LEVELS, NORMAL, Action, GradedPolicy, Level, PolicyState, Thresholds
from .redis import GCRA_FUNCTION, RedisStorage, Script, decision_of

_PRELUDE = """
-- KEYS[1]: the identity's policy hash. ARGV[1]: now in seconds, or '' for the server's
-- TIME; ARGV[2..5]: watch, degrade, throttle, block; ARGV[6]: hysteresis; ARGV[7]:
-- half-life (s); ARGV[8]: the longest a state is kept (s); ARGV[9]: '{<prefix>}:levels',
-- the base name of the sorted sets of levels.
if redis.replicate_commands then redis.replicate_commands() end -- TIME before a write, Redis < 5
local now = tonumber(ARGV[1])
if ARGV[1] == '' then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local starts = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local hysteresis = tonumber(ARGV[6])
local half_life = tonumber(ARGV[7])
local max_ttl = tonumber(ARGV[8])
local levels = ARGV[9]
local names = {'watch', 'degrade', 'throttle', 'block'}
local sets -- the sorted set of each level, named when first needed
local function name_sets()
  if sets then return end
  sets = {}
  for i = 1, 4 do sets[i] = levels .. ':' .. names[i] end
end
local function num(x) return string.format('%.17g', x) end
local function decayed(risk, updated) -- GradedPolicy._decayed
  if half_life <= 0 or now <= updated then return risk end
  return risk * 0.5 ^ (math.max(0, now - updated) / half_life)
end
local function level_of(risk, rank) -- Thresholds.level, levels as 0..4
  for index = 4, 1, -1 do
    local start = starts[index]
    if risk >= start or (index <= rank and risk >= start - hysteresis) then return index end
  end
  return 0
end
-- GradedPolicy.level_counts ahead of time. Levels only go down until the next update (the
-- block ends, then the risk decays), so the state is at level i or above from now until a
-- time E_i, and no more after it: E_i is the member KEYS[1]'s score in the sorted set
-- '<levels>:<name of i>', and at any later time t the identities at level i or above are
-- ZCOUNT(set i, (t, +inf)). These are cross-identity keys, outside the identity's hash
-- tag: the scripts that write them need one Redis, not a Cluster. 'above': the highest
-- level the state's previous scores may still hold after now (a score passed by now
-- counts for no later time, and is trimmed: it needs no removal here).
local function track(risk, level, updated, blocked_until, ttl, above)
  local expiry = now + ttl / 1000 -- the state is gone then: normal
  local blocked = -math.huge
  if blocked_until > now then blocked = blocked_until end
  name_sets()
  local added = false
  for i = 4, 1, -1 do
    local last = blocked -- level 4 while blocked, and only then
    if i < 4 then
      -- After the block, level_of(risk, level) >= i while the risk is >= the least
      -- threshold, hysteresis applied, of level i or any above it (a finished block counts
      -- as throttle: level_of's 4 is 3).
      local low = math.huge
      for j = i, 4 do
        local start = starts[j]
        if j <= level then start = start - hysteresis end
        low = math.min(low, start)
      end
      local decays = -math.huge -- the last time the risk is >= low
      if low <= 0 or (risk >= low and half_life <= 0) then
        decays = math.huge
      elseif risk >= low then
        decays = updated + half_life * math.log(risk / low) / math.log(2)
      end
      last = math.max(last, decays)
    end
    last = math.min(last, expiry)
    if last > now then
      redis.call('ZADD', sets[i], num(last), KEYS[1])
      added = true
    elseif i <= above then
      redis.call('ZREM', sets[i], KEYS[1])
    end
  end
  -- The sets outlive every member (whose scores end with its state, 'ttl' ms from now, and
  -- whose score at watch is its greatest): the four expire together, extended to twice the
  -- need once the need passes their TTL.
  if added and redis.call('PTTL', sets[1]) < ttl then
    for i = 1, 4 do redis.call('PEXPIRE', sets[i], 2 * ttl) end
  end
end
-- Forget up to 'limit' members of level i whose time there is over (the lowest scores).
local function trim(i, limit)
  name_sets()
  local over = redis.call('ZCOUNT', sets[i], '-inf', num(now))
  if over > 0 then redis.call('ZREMRANGEBYRANK', sets[i], 0, math.min(over, limit) - 1) end
end
-- 'decayed': the state is the stored one decayed to now (current), whose scores stand, unless
-- 'max_ttl' cut its life short (the new TTL then ends its levels later).
local function save(risk, level, updated, blocked_until, above, decayed_only)
  redis.call('HSET', KEYS[1], 'r', num(risk), 'l', level, 'u', num(updated),
    'b', num(blocked_until))
  -- Kept while it can matter: until the risk has decayed below where the lowest level is
  -- left (the state then grades 'normal', as no state does) and the block is over.
  local floor = starts[1] - hysteresis
  local life = max_ttl
  if half_life > 0 and floor > 0 then
    life = math.max(0, updated - now)
    if risk > floor then life = life + half_life * math.log(risk / floor) / math.log(2) end
  end
  local cut = life >= max_ttl
  life = math.max(math.min(life, max_ttl), blocked_until - now)
  local ttl = math.ceil(life * 1000) + 1000
  redis.call('PEXPIRE', KEYS[1], ttl)
  if cut or not decayed_only then
    track(risk, level, updated, blocked_until, ttl, above) -- the state is gone then: normal
  end
end
-- 'level blocked_until risk assessed_risk previous_level now' then a newline, the signals.
local function reply(level, blocked_until, risk, assessed, previous, signals)
  return string.format('%d %s %s %s %d %s\\n', level, num(blocked_until), num(risk), assessed,
    previous, num(now)) .. (signals or '')
end
"""

_CURRENT = """
-- GradedPolicy.current: a finished block, or a decayed risk, steps the level down.
-- Returns the reply ('' without a state), the level and when the block ends.
local function current()
  local s = redis.call('HMGET', KEYS[1], 'r', 'l', 'u', 'b', 'a', 's')
  if not s[1] then return '', 0, 0 end
  local risk, level, updated = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
  local blocked_until = tonumber(s[4])
  if blocked_until <= now and level ~= 0 then
    local stored = level
    risk = decayed(risk, updated)
    level = level_of(risk, level)
    if level == 4 then level = 3 end -- a finished block steps down, it does not renew itself
    save(risk, level, now, blocked_until, stored, true)
  end
  return reply(level, blocked_until, risk, s[5] or '0', level, s[6]), level, blocked_until
end
"""

CURRENT = Script(_PRELUDE + _CURRENT + "return (current())")

ADMIT = Script(
    _PRELUDE
    + _CURRENT
    + GCRA_FUNCTION
    + """
-- The policy's current action, then (unless it blocks) the limiter charged with the cost
-- the action asks for, in one round-trip. KEYS[2]: the identity's TAT. ARGV[10]: the
-- throttle multiplier; ARGV[11..13]: cost, emission interval (us), burst; ARGV[14]: '1'
-- when a block refuses the request (MODE=enforce). Returns {policy reply, GCRA reply}.
local policy, level, blocked_until = current()
if blocked_until > now and ARGV[14] == '1' then return {policy, ''} end
local cost = tonumber(ARGV[11])
if level >= 3 then cost = math.ceil(cost * tonumber(ARGV[10])) end
return {policy, gcra(KEYS[2], cost, tonumber(ARGV[12]), tonumber(ARGV[13]))}
"""
)

UPDATE = Script(
    _PRELUDE
    + """
-- GradedPolicy.update. ARGV[10]: block seconds; ARGV[11]: the new assessment's risk;
-- ARGV[12]: its signals (JSON).
local block_seconds = tonumber(ARGV[10])
local assessed = tonumber(ARGV[11])
local s = redis.call('HMGET', KEYS[1], 'r', 'l', 'u', 'b')
local risk, level, updated, blocked_until = 0, 0, now, 0
if s[1] then
  risk, level, updated = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
  blocked_until = tonumber(s[4])
elseif assessed < starts[1] then
  return '' -- nothing to remember
end
-- An update adds at most one member to each level: trimming up to 8 finished ones of a
-- level picked at random (the microseconds of now, a character of the identity's hash)
-- keeps the sets to live members, a command per update.
trim((math.floor(now * 1000000) + string.byte(KEYS[1], -9)) % 4 + 1, 8)
local previous = level
local above = level
if blocked_until > now then above = 4 end
risk = math.max(assessed, decayed(risk, updated))
local new_level = level_of(risk, level)
updated = now
if new_level == 4 and blocked_until <= now then
  if level ~= 4 then
    blocked_until = now + block_seconds
    -- Risk does not decay while the client sits out its block.
    updated = blocked_until
  else
    new_level = 3 -- served its block: back to throttle until risk rises again
  end
end
save(risk, new_level, updated, blocked_until, above, false)
redis.call('HSET', KEYS[1], 'a', ARGV[11], 's', ARGV[12])
return reply(new_level, blocked_until, risk, ARGV[11], previous, '')
"""
)

INSPECT = Script(
    _PRELUDE
    + """
local s = redis.call('HMGET', KEYS[1], 'r', 'l', 'u', 'b', 'a', 's')
if not s[1] then return '' end
local level = tonumber(s[2])
return reply(level, tonumber(s[4]), decayed(tonumber(s[1]), tonumber(s[3])), s[5] or '0', level,
  s[6])
"""
)

LIFT = Script(
    _PRELUDE
    + """
-- Forget the state, and its place in the sets of levels. Returns 1 if there was one.
name_sets()
for i = 1, 4 do redis.call('ZREM', sets[i], KEYS[1]) end
return redis.call('DEL', KEYS[1])
"""
)

LEVEL_COUNTS = Script(
    _PRELUDE
    + """
-- The identities at watch, degrade, throttle and block now (no KEYS: the sets are
-- '<levels>:<name>'), after trimming up to ARGV[10] finished members per level.
for i = 1, 4 do trim(i, tonumber(ARGV[10])) end
local counts, at_least = {}, {}
local after = '(' .. num(now)
for i = 1, 4 do at_least[i] = redis.call('ZCOUNT', sets[i], after, '+inf') end
at_least[5] = 0
for i = 1, 4 do counts[i] = at_least[i] - at_least[i + 1] end
return table.concat(counts, ' ')
"""
)

TRIM_PER_COUNT = 1000
"""Most finished members a count forgets per level (the rest, at the next count)."""


class RedisPolicy:
    """Implements the :class:`~..policy.Policy` protocol on a :class:`RedisStorage`'s Redis.

    Parameters as :class:`~..policy.GradedPolicy`'s; ``max_ttl`` bounds how long a state
    is kept after its last change (at least ``block_seconds``); ``clock`` replaces the
    server's clock (tests); ``fallback`` decides while Redis is unavailable.
    """

    def __init__(
        self,
        storage: RedisStorage,
        thresholds: Thresholds | None = None,
        *,
        half_life: float = 600.0,
        block_seconds: float = 900.0,
        throttle_multiplier: float = 4.0,
        max_ttl: float = 86_400.0,
        clock: Clock | None = None,
        fallback: GradedPolicy | None = None,
    ) -> None:
        self.storage = storage
        self.thresholds = thresholds = thresholds or Thresholds()
        self.half_life = half_life
        self.block_seconds = block_seconds
        self.throttle_multiplier = throttle_multiplier
        self.max_ttl = max(max_ttl, block_seconds)
        self.clock = clock
        self.fallback = fallback
        self._stateless: LRUCache[str, bool] = LRUCache(65_536)
        """Identities whose last ``current`` found no state (their low risks need no write)."""
        self._argv = (
            *(thresholds.watch, thresholds.degrade, thresholds.throttle, thresholds.block),
            thresholds.hysteresis,
            half_life,
            self.max_ttl,
            f"{{{storage.prefix}}}:levels",
        )
        self._level_counts: dict[Level, int] = dict.fromkeys(LEVELS[1:], 0)

    def key(self, identity: str) -> str:
        """The Redis key of ``identity``'s policy state (hash-tagged like its bucket)."""
        return f"{{{self.storage.prefix}:{identity}}}:policy"

    def _now(self) -> Any:
        return "" if self.clock is None else repr(self.clock())

    def _action(self, head: str, assessment: Assessment | None, signals: bytes) -> Action:
        level_index, blocked_until, _, assessed, previous, now = head.split()
        level = LEVELS[int(level_index)]
        if assessment is None:
            assessment = Assessment(float(assessed), json.loads(signals) if signals else {})
        block = float(blocked_until) - float(now)
        return Action(
            level,
            self.throttle_multiplier if level in ("throttle", "block") else 1.0,
            block if block > 0 else 0.0,
            assessment,
            previous=LEVELS[int(previous)],
        )

    async def current(self, identity: Identity) -> Action:
        try:
            reply = await self.storage.call(
                CURRENT, (self.key(identity.key),), (self._now(), *self._argv)
            )
            self._remember(identity.key, reply)
        except StorageError:
            if self.fallback is None:
                raise
            action = await self.fallback.current(identity)
            return replace(action, degraded=True)
        return self._parse(reply)

    def _remember(self, key: str, reply: bytes) -> None:
        if reply:
            self._stateless.pop(key, None)
        else:
            self._stateless[key] = True

    def _parse(self, reply: bytes) -> Action:
        if not reply:
            return NORMAL
        head, _, signals = reply.partition(b"\n")
        return self._action(head.decode(), None, signals)

    async def admit(
        self, identity: Identity, cost: int, limiter: Limiter, enforce: bool
    ) -> tuple[Action, Decision | None]:
        """``current`` and the limiter's charge (of the cost the action asks for) in one
        round-trip, when the limiter's storage is this policy's; no decision when a
        block refuses the request (``enforce``)."""
        interval, burst = limiter.rate.interval, limiter.burst
        keys = (self.key(identity.key), self.storage.key(identity.key))
        argv = (
            self._now(),
            *self._argv,
            self.throttle_multiplier,
            cost,
            interval * 1e6,
            burst,
            "1" if enforce else "0",
        )
        try:
            policy, charged = await self.storage.call(ADMIT, keys, argv)
        except StorageError:
            # Both parts decided in this process (FAILURE_MODE=open), without asking Redis
            # again: a request waits on Redis one timeout at the most.
            memory = self.storage.fallback
            if self.fallback is None or memory is None:
                raise
            action = replace(await self.fallback.current(identity), degraded=True)
            if action.block_seconds > 0 and enforce:
                return action, None
            if action.cost_multiplier != 1.0:
                cost = math.ceil(cost * action.cost_multiplier)
            decision = await memory.acquire(identity.key, cost, interval, burst, limiter.clock())
            return action, replace(decision, degraded=True)
        self._remember(identity.key, policy)
        return self._parse(policy), decision_of(charged, burst) if charged else None

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        argv = (
            self._now(),
            *self._argv,
            self.block_seconds,
            repr(float(assessment.risk)),
            json.dumps(dict(assessment.signals), separators=(",", ":")),
        )
        if assessment.risk < self.thresholds.watch and self._stateless.get(identity.key):
            # Redis had nothing to remember of it a moment ago (this request's ``current``),
            # and this assessment adds nothing: no round-trip, as in GradedPolicy.update.
            return Action(assessment=assessment, previous="normal")
        try:
            if self.storage.failing:  # this request found Redis failing already
                raise StorageError("Redis is failing")
            reply = await self.storage.call(UPDATE, (self.key(identity.key),), argv)
        except StorageError:
            if self.fallback is None:
                raise
            action = await self.fallback.update(identity, assessment)
            return replace(action, degraded=True)
        if not reply:
            return Action(assessment=assessment, previous="normal")
        return self._action(reply.partition(b"\n")[0].decode(), assessment, b"")

    async def inspect(self, key: str) -> PolicyState | None:
        reply = await self.storage.call(INSPECT, (self.key(key),), (self._now(), *self._argv))
        if not reply:
            return None
        head, _, signals = reply.partition(b"\n")
        level_index, blocked_until, risk, assessed, _, now = head.decode().split()
        return PolicyState(
            float(risk),
            LEVELS[int(level_index)],
            max(0.0, float(blocked_until) - float(now)),
            Assessment(float(assessed), json.loads(signals) if signals else {}),
        )

    async def lift(self, key: str) -> bool:
        deleted = await self.storage.call(LIFT, (self.key(key),), (self._now(), *self._argv))
        return bool(deleted)

    async def refresh_level_counts(self) -> dict[Level, int]:
        """Counts the identities at each level above ``normal`` now, as every worker sees
        them (one script, O(log n) per level, plus the trimming of finished members);
        :meth:`level_counts` returns them until the next refresh. Raises
        :class:`~..errors.StorageError` when Redis is unavailable (the counts stay)."""
        reply = await self.storage.call(
            LEVEL_COUNTS, (), (self._now(), *self._argv, TRIM_PER_COUNT)
        )
        counts = [int(n) for n in reply.split()]
        self._level_counts = dict(zip(LEVELS[1:], counts, strict=True))
        return dict(self._level_counts)

    def level_counts(self) -> dict[Level, int]:
        """The counts of the last :meth:`refresh_level_counts` (zeros before the first), as
        :meth:`GradedPolicy.level_counts <..policy.GradedPolicy.level_counts>` says them:
        prometheus-client collects synchronously, the refresh is a Redis round-trip."""
        return dict(self._level_counts)
