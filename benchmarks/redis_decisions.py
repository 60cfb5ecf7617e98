"""Redis storage: decisions per second, and the middleware's overhead on Redis vs memory.

1. Throughput. GCRA decisions through ``RedisStorage.acquire`` (one ``EVALSHA`` each)
   with ``--inflight`` concurrent callers on one connection pool, against raw redis-py
   ``INCR`` (the cheapest useful command) on the same server, with the same concurrency,
   in the same run. Rounds are interleaved and each figure is the median over rounds; the
   verdict is the ratio (target >= 0.8): what the limiter costs on top of the cheapest
   round-trip redis-py can make.
2. Overhead. ``benchmarks/overhead.py``'s in-process driver (no server, no HTTP client):
   the bare model app, the shield on ``memory://`` and the shield on ``redis://``, one
   request at a time, so the Redis figure includes one full round-trip to the server;
   the limiter alone, and the full path (payload parsed, queries monitored, outputs
   perturbed), where Redis also holds the policy state and the monitor's shared
   observations. Then the round-trips to Redis per request of each path on ``redis://``
   (a pipeline counts once) and the commands Redis ran per request.

Starts its own ``redis-server`` on a free loopback port unless ``--url`` is given.

    python benchmarks/redis_decisions.py            # markdown tables
    python benchmarks/redis_decisions.py --json     # for machines
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from overhead import FULL_CHAIN, measure, model_app, run_round, shield_app, shield_full_app
from starlette.types import ASGIApp

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.storage import RedisStorage

IDENTITIES = 1000
LONE = ("decisions, one at a time", "incr, one at a time")
INTERVAL, BURST = 1e-6, 10**9  # a limit that never denies: every decision writes


async def per_second(call: Callable[[int], Awaitable[Any]], n: int, inflight: int) -> float:
    """Calls per second of ``call(i)`` for ``i < n``, ``inflight`` of them at a time."""
    todo = iter(range(n))

    async def lane() -> None:
        for i in todo:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    return n / (time.perf_counter() - start)


async def throughput(url: str, rounds: int, n: int, inflight: int) -> dict[str, float]:
    import redis.asyncio

    storage = RedisStorage(url, prefix="bench", timeout=1.0)
    raw = redis.asyncio.Redis.from_url(url)

    async def decide(i: int) -> None:
        decision = await storage.acquire(f"ip:{i % IDENTITIES}", 1, INTERVAL, BURST, 0.0)
        if not decision.allowed or decision.degraded:
            raise RuntimeError(f"unexpected decision {decision}")

    async def incr(i: int) -> None:
        await raw.incr(f"bench-incr:{i % IDENTITIES}")

    variants = {"decisions": decide, "incr": incr}
    samples: dict[str, list[float]] = {name: [] for name in [*variants, *LONE]}
    for call in variants.values():  # warm-up: connections, script cache
        await per_second(call, n // 4 or 1, inflight)
    for r in range(rounds):
        for name in list(variants)[r % 2 :] + list(variants)[: r % 2]:
            samples[name].append(await per_second(variants[name], n, inflight))
            lone = await per_second(variants[name], n // 10 or 1, 1)
            samples[f"{name}, one at a time"].append(lone)
    await storage.close()
    await raw.aclose()
    return {name: statistics.median(values) for name, values in samples.items()}


def redis_shield_app(url: str) -> ExtractionShield:
    return ExtractionShield(
        model_app(),
        rate_limit="100000000/minute",
        secret_key="benchmark-secret-key-0123456789",
        storage_url=url,
        redis_timeout=1.0,
    )


def redis_full_app(url: str) -> ASGIApp:
    """The full path (as ``overhead.shield_full_app``) on Redis."""
    return shield_app(
        format="auto",
        perturbation=FULL_CHAIN,
        monitor={"enabled": True},
        storage_url=url,
        redis_timeout=1.0,
    )


VARIANTS = {
    "bare Starlette app": lambda url: model_app(),
    "limiter on memory://": lambda url: shield_app(),
    "limiter on redis://": lambda url: shield_app(storage_url=url, redis_timeout=1.0),
    "full path on memory://": lambda url: shield_full_app(),
    "full path on redis://": redis_full_app,
}


async def overheads(url: str, rounds: int, n: int) -> dict[str, float]:
    return await measure({name: build(url) for name, build in VARIANTS.items()}, rounds, n)


async def round_trips(url: str, n: int) -> dict[str, dict[str, float]]:
    """Round-trips and Redis commands per request, on each path on ``redis://``."""
    import redis.asyncio

    raw = redis.asyncio.Redis.from_url(url)
    counts = {}
    for name, build in VARIANTS.items():
        if "redis://" not in name:
            continue
        app = build(url)
        storage = app.storage  # type: ignore[attr-defined]
        await run_round(app, n)  # warm: scripts loaded, identity known
        trips = storage.round_trips
        commands = (await raw.info("stats"))["total_commands_processed"]
        await run_round(app, n)
        after = (await raw.info("stats"))["total_commands_processed"]
        counts[name] = {
            "round_trips": (storage.round_trips - trips) / n,
            "commands": (after - commands - 1) / n,  # less our INFO
        }
        await storage.close()
    await raw.aclose()
    return counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="a Redis to use; default: start a redis-server")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decisions", type=int, default=10_000, help="calls per round")
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("asgi_extraction_shield").setLevel(logging.ERROR)

    with ExitStack() as stack:
        url = args.url
        if url is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.redis_server import RedisServer

            url = stack.enter_context(RedisServer()).url
        rates = asyncio.run(throughput(url, args.rounds, args.decisions, args.inflight))
        medians = asyncio.run(overheads(url, args.rounds, args.requests))
        trips = asyncio.run(round_trips(url, args.requests))

    bare = medians["bare Starlette app"]
    result: dict[str, Any] = {
        "per_second": rates,
        "ratio_decisions_to_incr": rates["decisions"] / rates["incr"],
        "us_per_request": medians,
        "overhead_us": {k: v - bare for k, v in medians.items() if k != "bare Starlette app"},
        "per_request_on_redis": trips,
        "rounds": args.rounds,
        "inflight": args.inflight,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"| one pool | per second, {args.inflight} in flight | µs each, one at a time |")
    print("|---|---:|---:|")
    for name, label in (
        ("decisions", "GCRA decisions (`RedisStorage.acquire`)"),
        ("incr", "raw redis-py `INCR`"),
    ):
        lone = 1e6 / rates[f"{name}, one at a time"]
        print(f"| {label} | {rates[name]:,.0f} | {lone:.0f} |")
    print(f"\ndecisions / INCR = {result['ratio_decisions_to_incr']:.2f}\n")
    print("| variant | µs/request | overhead µs |")
    print("|---|---:|---:|")
    for name, value in medians.items():
        overhead = "" if name == "bare Starlette app" else f"{value - bare:.1f}"
        print(f"| {name} | {value:.1f} | {overhead} |")
    print("\n| on redis:// | round-trips / request | Redis commands / request (in scripts too) |")
    print("|---|---:|---:|")
    for name, count in trips.items():
        print(f"| {name} | {count['round_trips']:.2f} | {count['commands']:.2f} |")
    return result


if __name__ == "__main__":
    main()
