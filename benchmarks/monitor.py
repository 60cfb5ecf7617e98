"""The monitor's work per query is bounded: µs per observed query after 100 and 10,000.

An identity (in an IP pool and a cohort, as in production) first sends ``history``
queries, then the next queries are timed; the same run measures both histories, so the
ratio is what to read. Numeric queries (64 features) and short texts are measured.

    python benchmarks/monitor.py
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import time
from typing import Any

import numpy as np

from asgi_extraction_shield.formats.base import ParsedRequest
from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.monitor import ExtractionMonitor
from asgi_extraction_shield.settings import ShieldSettings

WORDS = [
    "the",
    "a",
    "model",
    "price",
    "cat",
    "weather",
    "invoice",
    "refund",
    "image",
    "label",
    "score",
    "token",
    "query",
]


def requests(kind: str, n: int, rng: np.random.Generator) -> list[ParsedRequest]:
    if kind == "numeric":
        rows = rng.normal(size=(n, 64))
        return [ParsedRequest(parsed=True, features=rows[i : i + 1]) for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]
    return [ParsedRequest(parsed=True, texts=[t]) for t in texts]


def settle(monitor: ExtractionMonitor) -> None:
    """Fold everything queued (the monitor's queue, each tracker's) into the state."""
    monitor.flush()
    for tracker in [*monitor.identities.values(), *(t for t, _ in monitor.pools.values())]:
        tracker.flush()


def per_query_us(kind: str, history: int, timed: int, rounds: int) -> float:
    samples = []
    for r in range(rounds):
        rng = np.random.default_rng(r)
        monitor = ExtractionMonitor(
            b"benchmark-key".ljust(32, b"."), ShieldSettings().monitor.rules()
        )
        who = Identity("bench", "header", ipaddress.ip_network("203.0.113.7/32"))
        for request in requests(kind, history, rng):
            monitor.observe(who, request)
        batch = requests(kind, timed, rng)
        settle(monitor)
        start = time.perf_counter()
        for request in batch:
            monitor.observe(who, request)
        settle(monitor)  # the work still queued counts too
        samples.append((time.perf_counter() - start) / timed * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timed", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    for kind in ("numeric", "text"):
        short = per_query_us(kind, 100, args.timed, args.rounds)
        long = per_query_us(kind, 10_000, args.timed, args.rounds)
        result[kind] = {"history_100_us": short, "history_10000_us": long, "ratio": long / short}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| queries | µs/query after 100 | µs/query after 10,000 | ratio |")
        print("|---|---:|---:|---:|")
        for kind, r in result.items():
            print(
                f"| {kind} | {r['history_100_us']:.1f} | {r['history_10000_us']:.1f} | {r['ratio']:.2f} |"
            )
    return result


if __name__ == "__main__":
    main()
