"""Identities by level on Redis: the sorted sets of levels against GradedPolicy.level_counts,
shared by every worker, and the ``extraction_shield_identities`` gauge they feed.

Skipped without ``redis-server`` outside CI, failed under CI (fixtures in conftest).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.monitor import Assessment
from asgi_extraction_shield.policy import GradedPolicy, Thresholds
from asgi_extraction_shield.storage import RedisStorage
from asgi_extraction_shield.storage.redis_policy import RedisPolicy

from .conftest import FakeClock, client, scripted_shield
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio
BODY = {"instances": [[1.0, 2.0]]}


async def test_counts_are_graded_policy_level_counts_in_every_worker(
    redis_server: RedisServer, raw: Any
) -> None:
    """Random updates, reads, lifts and pauses on a few identities: after every step both
    workers count what GradedPolicy.level_counts counts (decay, hysteresis, blocks)."""
    clock = FakeClock()
    options: dict[str, Any] = {"half_life": 100.0, "block_seconds": 60.0}
    thresholds = Thresholds(0.3, 0.5, 0.7, 0.9, hysteresis=0.1)
    memory = GradedPolicy(thresholds, clock=clock, **options)
    storage = RedisStorage(redis_server.url, prefix="levels", timeout=2.0)
    one, two = (RedisPolicy(storage, thresholds, clock=clock, **options) for _ in range(2))
    rng = np.random.default_rng(11)
    seen = {"watch": 0, "degrade": 0, "throttle": 0, "block": 0}
    for step in range(300):
        clock.advance(float(rng.choice([0.0, 3.0, 25.0, 80.0, 250.0], p=[0.2, 0.3, 0.2, 0.2, 0.1])))
        who = Identity(f"header:{rng.integers(6)}", "header")
        worker = (one, two)[step % 2]
        move = rng.choice(["update", "current", "lift", "wait"], p=[0.55, 0.2, 0.05, 0.2])
        if move == "update":
            risk = float(rng.choice([0.1, 0.35, 0.55, 0.75, 0.95]) + rng.uniform(-0.05, 0.05))
            for policy in (memory, worker):
                await policy.current(who)
                await policy.update(who, Assessment(risk))
        elif move == "current":
            await memory.current(who)
            await worker.current(who)
        elif move == "lift":
            assert await memory.lift(who.key) == await worker.lift(who.key)
        expected = memory.level_counts()
        assert await one.refresh_level_counts() == expected, (step, move)
        assert await two.refresh_level_counts() == expected, (step, move)
        assert one.level_counts() == two.level_counts() == expected  # the snapshot
        for level, count in expected.items():
            seen[level] = max(seen[level], count)
    assert min(seen.values()) >= 1 and max(seen.values()) >= 2  # every level, at once too
    # Once every state has decayed, a count trims the sets: nothing is left of them.
    clock.advance(10_000.0)
    assert await one.refresh_level_counts() == dict.fromkeys(seen, 0) == memory.level_counts()
    assert [k async for k in raw.scan_iter("{levels}:levels:*")] == []
    await storage.close()


async def test_sets_follow_the_state_lift_and_expiry(redis_server: RedisServer, raw: Any) -> None:
    clock = FakeClock()
    storage = RedisStorage(redis_server.url, prefix="p", timeout=2.0)
    policy = RedisPolicy(storage, half_life=100.0, block_seconds=60.0, clock=clock)
    who = Identity("header:abc", "header")
    await policy.update(who, Assessment(0.95))
    member = policy.key(who.key).encode()
    # Blocked for 60 s, then throttle until 0.95 * 0.5^(t/100) < 0.6, degrade until < 0.4,
    # watch until < 0.2: until when it is at each level or above.
    start = clock()
    ends = {name: start + 60 + 100 * math.log2(0.95 / low) for name, low in
            (("throttle", 0.6), ("degrade", 0.4), ("watch", 0.2))}  # fmt: skip
    ends["block"] = start + 60
    for name, end in ends.items():
        assert await raw.zscore(f"{{p}}:levels:{name}", member) == pytest.approx(end)
    # The sets outlive their members (by up to as long again).
    ttl = await raw.pttl(member)
    assert ttl - 50 <= await raw.pttl("{p}:levels:block") <= 2 * ttl + 50
    clock.advance(ends["degrade"] - start - 1.0)
    assert await policy.refresh_level_counts() == {
        "watch": 0,
        "degrade": 1,
        "throttle": 0,
        "block": 0,
    }
    # Finished levels are trimmed by the count; a lift removes the rest.
    assert await raw.exists("{p}:levels:block", "{p}:levels:throttle") == 0
    assert await raw.zcard("{p}:levels:watch") == 1
    assert await policy.lift(who.key)
    assert [k async for k in raw.scan_iter("{p}:levels:*")] == []
    assert (await policy.refresh_level_counts())["degrade"] == 0
    # Updates alone (nobody counting) trim finished members too: the sets stay bounded.
    for i in range(20):
        await policy.update(Identity(f"header:old{i}", "header"), Assessment(0.35))
    clock.advance(10_000.0)
    for i in range(20):
        await policy.update(Identity(f"header:new{i}", "header"), Assessment(0.35))
    assert await raw.zcard("{p}:levels:watch") == 20
    assert await raw.zscore("{p}:levels:watch", b"{p:header:old3}:policy") is None
    # Without decay a level lasts as long as its state is kept (max_ttl), not longer.
    kept = RedisPolicy(storage, half_life=0.0, max_ttl=100.0, block_seconds=60.0, clock=clock)
    await kept.update(who, Assessment(0.55))
    clock.advance(100.5)
    assert (await kept.refresh_level_counts())["degrade"] == 1
    clock.advance(1.0)  # 100 s and the 1 s of slack the state's TTL has
    assert (await kept.refresh_level_counts())["degrade"] == 0
    # A read that keeps such a state longer (its TTL starts again) keeps its level longer.
    await kept.update(who, Assessment(0.55))
    clock.advance(50.0)
    assert (await kept.current(who)).level == "degrade"
    clock.advance(100.5)
    assert (await kept.refresh_level_counts())["degrade"] == 1
    clock.advance(1.0)
    assert (await kept.refresh_level_counts())["degrade"] == 0
    await storage.close()


def _identities(text: str) -> dict[str, float]:
    return {
        s.labels["level"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "extraction_shield_identities"
    }


async def test_gauge_on_redis_counts_every_worker_and_survives_an_outage(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    storage = RedisStorage(redis_server.url, timeout=0.5, cooldown=60.0)
    workers = []
    for _ in range(2):
        policy = RedisPolicy(storage)  # Redis's own clock
        app, monitor = scripted_shield(
            clock,
            policy,
            storage=storage,
            identity="header:x-api-key",
            metrics_registry=CollectorRegistry(),  # type: ignore[arg-type]
        )
        workers.append((app, monitor))
    (first, first_monitor), (second, second_monitor) = workers
    thief = first.identities.keys_for("thief")[0]
    first_monitor.risk[thief] = 0.95
    suspect = second.identities.keys_for("suspect")[0]
    second_monitor.risk[suspect] = 0.75
    async with client(first) as a, client(second) as b:
        await a.post("/predict", json=BODY, headers={"x-api-key": "thief"})
        await b.post("/predict", json=BODY, headers={"x-api-key": "suspect"})
        for c in (a, b):  # each worker counts the other's identities too
            scrape = await c.get("/metrics")
            assert _identities(scrape.text) == {
                "watch": 0,
                "degrade": 0,
                "throttle": 1,
                "block": 1,
            }
        assert await first.lift("thief")
        assert _identities((await a.get("/metrics")).text)["block"] == 0
        redis_server.stop()
        down = await b.get("/metrics")  # the last counts, and the failure counted
        assert down.status_code == 200
        assert _identities(down.text)["throttle"] == 1
        samples = {s.name: s.value for f in text_string_to_metric_families(down.text)
                   for s in f.samples}  # fmt: skip
        assert samples["extraction_shield_storage_errors_total"] >= 1
    await storage.close()


async def test_requests_refresh_a_registry_scraped_elsewhere(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    storage = RedisStorage(redis_server.url, timeout=2.0)
    registry = CollectorRegistry()
    app, monitor = scripted_shield(
        clock,
        RedisPolicy(storage),
        storage=storage,
        identity="header:x-api-key",
        metrics_registry=registry,
        metrics_path="",  # type: ignore[arg-type]
    )
    assert app.metrics is not None and app.metrics.levels is not None
    refresher = app.metrics.levels
    refresher.clock = clock  # the refresh interval on the test's clock

    def gauge(level: str) -> float | None:
        return registry.get_sample_value("extraction_shield_identities", {"level": level})

    async def settled() -> None:  # the refresh runs in a task of its own
        for _ in range(200):
            task = refresher._task
            if task is None:
                return
            await asyncio.sleep(0.01)

    monitor.risk[app.identities.keys_for("a")[0]] = 0.55
    monitor.risk[app.identities.keys_for("b")[0]] = 0.55
    async with client(app) as c:
        await c.post("/predict", json=BODY, headers={"x-api-key": "a"})
        await settled()  # the first request's refresh ran before its update
        assert gauge("degrade") == 0
        clock.advance(11.0)
        await c.post("/predict", json=BODY, headers={"x-api-key": "b"})
        await settled()
        assert gauge("degrade") == 1  # a's update, seen by b's refresh
        clock.advance(5.0)  # within the interval: no refresh, the gauge lags
        await c.post("/predict", json=BODY, headers={"x-api-key": "c"})
        await settled()
        assert gauge("degrade") == 1
        clock.advance(5.0)
        await c.post("/predict", json=BODY, headers={"x-api-key": "c"})
        await settled()
        assert gauge("degrade") == 2
    await storage.close()
