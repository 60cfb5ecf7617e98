"""Identities by level on Redis: what the sorted sets of levels cost.

1. Updates. Redis's own time per policy update (``INFO commandstats``: the ``EVALSHA``
   and every command inside it), with the sets of levels kept, against the same script
   without them (``track`` and ``trim`` removed), over the same random updates; and the
   same for the admission script (``current`` and the limiter's charge) of identities
   held above normal, whose ``current`` saves their decayed state at every request.
2. Counts. ``RedisPolicy.refresh_level_counts`` (one script on Redis's clock, every
   worker's identities) at ``n`` identities held, against ``GradedPolicy.level_counts``
   (one process's identities, a scan), and the sets' memory per identity
   (``MEMORY USAGE``).

Starts its own ``redis-server`` on a free loopback port unless ``--url`` is given.

    python benchmarks/redis_levels.py            # markdown tables
    python benchmarks/redis_levels.py --json     # for machines
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.limiter import Limiter, Rate
from asgi_extraction_shield.monitor import Assessment
from asgi_extraction_shield.policy import LEVELS, GradedPolicy
from asgi_extraction_shield.storage import RedisStorage, redis_policy
from asgi_extraction_shield.storage.redis import Script
from asgi_extraction_shield.storage.redis_policy import RedisPolicy

_TRACK = "    track(risk, level, updated, blocked_until, ttl, above) --"
_TRIM = "trim((math.floor(now * 1000000) + string.byte(KEYS[1], -9)) % 4 + 1, 8)"
assert redis_policy.UPDATE.body.count(_TRACK) == redis_policy.UPDATE.body.count(_TRIM) == 1
UNTRACKED = Script(redis_policy.UPDATE.body.replace(_TRACK, "    --").replace(_TRIM, ""))
"""The update script without the sets of levels."""
UNTRACKED_ADMIT = Script(redis_policy.ADMIT.body.replace(_TRACK, "    --"))
"""The admission script (``current`` and the charge) without the sets of levels."""


@contextmanager
def script_as(name: str, script: Script) -> Iterator[None]:
    """``redis_policy.<name>`` replaced by ``script`` for the ``with`` block."""
    saved = getattr(redis_policy, name)
    setattr(redis_policy, name, script)
    try:
        yield
    finally:
        setattr(redis_policy, name, saved)


async def script_usec(raw: Any) -> float:
    """Redis's µs spent in EVALSHA since the last reset (commands inside included)."""
    stats = await raw.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0.0))


async def fill(policy: RedisPolicy, memory: GradedPolicy | None, n: int, seed: int) -> None:
    """``n`` identities, each updated with a risk in [watch, 1), 50 concurrent updates (and
    the same in ``memory``, when given)."""
    rng = np.random.default_rng(seed)
    risks = rng.uniform(0.3, 1.0, n)
    for start in range(0, n, 50):
        batch = [(Identity(f"ip:{i}", "ip"), Assessment(float(risks[i]))) for i in
                 range(start, min(n, start + 50))]  # fmt: skip
        await asyncio.gather(*(policy.update(who, a) for who, a in batch))
        if memory is not None:
            for who, a in batch:
                await memory.update(who, a)


async def updates(url: str, n: int, seed: int) -> dict[str, float]:
    import redis.asyncio

    raw = redis.asyncio.Redis.from_url(url)
    usec: dict[str, float] = {}
    for name, script in (("tracked", redis_policy.UPDATE), ("untracked", UNTRACKED)):
        await raw.flushdb()
        storage = RedisStorage(url, prefix=f"upd-{name}", timeout=5.0)
        policy = RedisPolicy(storage)
        with script_as("UPDATE", script):
            await raw.config_resetstat()
            await fill(policy, None, n, seed)
            usec[name] = await script_usec(raw) / n
        await storage.close()
    await raw.aclose()
    return usec


async def admits(url: str, n: int, seed: int) -> dict[str, float]:
    """Redis µs per admission of an identity held above normal, whose ``current`` saves
    its decayed state (and, tracked, its new scores) at every request."""
    import redis.asyncio

    raw = redis.asyncio.Redis.from_url(url)
    storage = RedisStorage(url, prefix="admit", timeout=5.0)
    policy = RedisPolicy(storage)
    limiter = Limiter(storage, Rate.parse("1000000/second"), burst=10**9)
    held = min(n, 1000)
    await fill(policy, None, held, seed)
    who = [Identity(f"ip:{i}", "ip") for i in range(held)]
    usec: dict[str, float] = {}
    for name, script in (("tracked", redis_policy.ADMIT), ("untracked", UNTRACKED_ADMIT)):
        with script_as("ADMIT", script):
            await raw.config_resetstat()
            for start in range(0, n, 50):
                batch = [who[i % held] for i in range(start, min(n, start + 50))]
                await asyncio.gather(*(policy.admit(w, 1, limiter, True) for w in batch))
            usec[name] = await script_usec(raw) / n
    await storage.close()
    await raw.aclose()
    return usec


async def counts(url: str, sizes: list[int], repeats: int, seed: int) -> list[dict[str, float]]:
    import redis.asyncio

    raw = redis.asyncio.Redis.from_url(url)
    rows = []
    for n in sizes:
        await raw.flushdb()
        storage = RedisStorage(url, prefix="cnt", timeout=5.0)
        policy, memory = RedisPolicy(storage), GradedPolicy(max_identities=10 * n)
        await fill(policy, memory, n, seed)
        await raw.config_resetstat()
        walls = []
        for _ in range(repeats):
            start = time.perf_counter()
            got = await policy.refresh_level_counts()
            walls.append(time.perf_counter() - start)
        server = await script_usec(raw) / repeats
        scans = []
        for _ in range(repeats):
            start = time.perf_counter()
            expected = memory.level_counts()
            scans.append(time.perf_counter() - start)
        if got != expected:  # real time passed between the two: only a crossing may differ
            drift = sum(abs(got[k] - expected[k]) for k in LEVELS[1:])
            if drift > max(2, n // 1000):
                raise RuntimeError(f"counts disagree: {got} vs {expected}")
        memory_bytes = 0
        for level in LEVELS[1:]:
            memory_bytes += await raw.memory_usage(f"{{cnt}}:levels:{level}") or 0
        rows.append(
            {
                "identities": n,
                "redis_count_server_us": server,
                "redis_count_wall_us": statistics.median(walls) * 1e6,
                "memory_scan_us": statistics.median(scans) * 1e6,
                "set_bytes_per_identity": memory_bytes / n,
            }
        )
        await storage.close()
    await raw.aclose()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="a Redis to use (it is flushed!); default: start one")
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with ExitStack() as stack:
        url = args.url
        if url is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.redis_server import RedisServer

            url = stack.enter_context(RedisServer()).url
        per_update = asyncio.run(updates(url, args.updates, 1))
        per_admit = asyncio.run(admits(url, args.updates, 3))
        rows = asyncio.run(counts(url, sizes, args.repeats, 2))
    result: dict[str, Any] = {
        "update_server_us": per_update,
        "ratio_tracked_to_untracked": per_update["tracked"] / per_update["untracked"],
        "admit_held_server_us": per_admit,
        "counts": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print("| policy script on Redis | Redis µs per call |")
    print("|---|---:|")
    print(f"| update, with the sets of levels | {per_update['tracked']:.1f} |")
    print(f"| without | {per_update['untracked']:.1f} |")
    print(
        f"| admission of an identity held above normal, with the sets | "
        f"{per_admit['tracked']:.1f} |"
    )
    print(f"| without | {per_admit['untracked']:.1f} |")
    admit_ratio = per_admit["tracked"] / per_admit["untracked"]
    print(
        f"\nwith / without: updates {result['ratio_tracked_to_untracked']:.2f}, "
        f"admissions {admit_ratio:.2f}\n"
    )
    print(
        "| identities | Redis count: server µs | Redis count: wall µs | "
        "GradedPolicy scan µs | scan / Redis wall | set bytes per identity |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['identities']:,} | {row['redis_count_server_us']:.0f} "
            f"| {row['redis_count_wall_us']:.0f} | {row['memory_scan_us']:.0f} "
            f"| {row['memory_scan_us'] / row['redis_count_wall_us']:.1f} "
            f"| {row['set_bytes_per_identity']:.0f} |"
        )
    return result


if __name__ == "__main__":
    main()
