"""The memory storage stays bounded, and an identity flood cannot reset a penalty."""

from __future__ import annotations

import pytest

from asgi_extraction_shield.limiter import Limiter, Rate
from asgi_extraction_shield.storage.memory import MemoryStorage

from .conftest import FakeClock

pytestmark = pytest.mark.anyio


async def test_idle_buckets_are_forgotten(clock: FakeClock) -> None:
    storage = MemoryStorage(max_identities=10, clock=clock)
    limiter = Limiter(storage, Rate.parse("1/second"), burst=5, clock=clock)
    for key in "abcde":
        await limiter.acquire(key)
    assert storage.live() == 5
    clock.advance(1.0)  # every bucket refilled: entries are dead
    assert storage.live() == 0
    # Dead entries are swept when room is needed: 10 newcomers all get their own bucket.
    for i in range(10):
        assert (await limiter.acquire(f"n{i}")).remaining == 4
    assert len(storage) <= 10 and storage.overflowed == 0


async def test_200k_identities_never_exceed_the_bound(clock: FakeClock) -> None:
    bound = 1000
    storage = MemoryStorage(max_identities=bound, clock=clock)
    limiter = Limiter(storage, Rate.parse("10/minute"), clock=clock)
    largest = 0
    for i in range(200_000):
        await limiter.acquire(f"flood-{i}")
        if i % 997 == 0:
            largest = max(largest, len(storage))
        clock.advance(0.0001)
    assert max(largest, len(storage)) <= bound
    assert storage.overflowed > 190_000


async def test_flood_cannot_reset_a_throttled_client(clock: FakeClock) -> None:
    storage = MemoryStorage(max_identities=100, clock=clock)
    limiter = Limiter(storage, Rate.parse("10/minute"), burst=10, clock=clock)
    for _ in range(10):
        assert (await limiter.acquire("attacker")).allowed
    assert not (await limiter.acquire("attacker")).allowed
    # A flood of fresh identities (random keys / IPv6 addresses) fills the table ...
    for i in range(5000):
        await limiter.acquire(f"sybil-{i}")
        clock.advance(0.001)
    assert len(storage) <= 100
    # ... but the attacker is still throttled, with the same wait as without the flood.
    denied = await limiter.acquire("attacker")
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(6.0 - 5.0, abs=0.01)


async def test_newcomers_share_the_overflow_bucket_while_full(clock: FakeClock) -> None:
    storage = MemoryStorage(max_identities=2, clock=clock)
    limiter = Limiter(storage, Rate.parse("3/minute"), burst=3, clock=clock)
    await limiter.acquire("a")
    await limiter.acquire("b")
    results = [(await limiter.acquire(f"new-{i}")).allowed for i in range(5)]
    assert results == [True, True, True, False, False]  # one shared burst of 3
    assert storage.overflowed == 5
    assert (await limiter.acquire("a")).allowed  # existing identities keep their own bucket


async def test_sweeps_are_rate_limited(clock: FakeClock) -> None:
    storage = MemoryStorage(max_identities=1, clock=clock, sweep_interval=5.0)
    limiter = Limiter(storage, Rate.parse("1/second"), burst=1, clock=clock)
    await limiter.acquire("a")
    await limiter.acquire("b")  # sweep happens (nothing dead yet), b overflows
    clock.advance(1.5)  # "a" is dead now, but the next sweep is not due before t+5
    await limiter.acquire("c")
    assert storage.overflowed == 2
    clock.advance(4.0)
    await limiter.acquire("d")  # sweep due: "a" is swept, "d" gets its own entry
    assert storage.overflowed == 2 and len(storage) == 1


def test_rejects_bad_bound() -> None:
    with pytest.raises(ValueError):
        MemoryStorage(max_identities=0)


async def test_peek_reads_a_bucket_without_charging_or_storing(clock: FakeClock) -> None:
    storage = MemoryStorage(max_identities=1, clock=clock)
    limiter = Limiter(storage, Rate.parse("1/second"), burst=5, clock=clock)
    fresh = await limiter.peek("a")
    assert (fresh.allowed, fresh.remaining, fresh.reset_after) == (True, 5, 0.0)
    assert len(storage) == 0  # a peek creates no entry
    await limiter.acquire("a", 3)
    clock.advance(1.0)  # one token back: 3 remaining, full in 2 s
    for _ in range(3):
        seen = await limiter.peek("a")
        assert (seen.remaining, seen.reset_after) == (3, pytest.approx(2.0))
    # the table is full: a newcomer's peek neither takes the overflow bucket nor a place
    assert (await limiter.peek("b")).remaining == 5 and storage.overflowed == 0
