"""Benign users: people and integrations replaying natural data at human rates.

Each user asks about held-out digits, mostly of one to three classes of their own (a
postcode reader mostly sees some digits, a form checker others), repeats some earlier
queries exactly (re-submitted forms, retries), and comes and goes at their own pace with
occasional long pauses. Users sit in three kinds of network: their own address (home,
mobile), an office /24 shared by colleagues, and one NAT address shared by several API
keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .victim import Digits

TOPIC_SHARE = 0.85
"""Share of a user's fresh queries about their own classes."""
REPEAT_SHARE = 0.25
"""Share of queries that exactly repeat one of the user's earlier queries."""
PAUSE_CHANCE = 0.03
PAUSE_MEAN = 1_800.0


@dataclass(frozen=True)
class BenignPlan:
    name: str
    api_key: str
    ip: str
    network: str
    """``home``, ``office`` (a shared /24) or ``nat`` (one shared address)."""
    topics: tuple[int, ...]
    times: tuple[float, ...]
    items: tuple[int, ...]
    """Indices into the held-out digits, one per query, in order."""


def population(
    prefix: str,
    count: int,
    data: Digits,
    rng: np.random.Generator,
    *,
    start: float,
    spread: float,
    median_queries: int,
    max_queries: int,
    shared_networks: bool = True,
    ip_base: int = 64,
) -> list[BenignPlan]:
    """``count`` users whose first queries fall in ``[start, start + spread]``."""
    offices = max(2, count // 6) if shared_networks else 0
    nats = max(2, count // 8) if shared_networks else 0
    by_class = [np.flatnonzero(data.y_held == c) for c in range(10)]
    plans = []
    for i in range(count):
        if i < offices:
            network, ip = "office", f"198.51.100.{20 + i}"
        elif i < offices + nats:
            network, ip = "nat", "203.0.113.200"
        else:  # a /24 of its own
            network, ip = "home", f"100.{ip_base + i // 256}.{i % 256}.{int(rng.integers(2, 254))}"
        n_topics = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        topics = tuple(sorted(int(c) for c in rng.choice(10, size=n_topics, replace=False)))
        n = int(np.clip(rng.lognormal(np.log(median_queries), 0.8), 20, max_queries))
        items: list[int] = []
        for _ in range(n):
            if items and rng.random() < REPEAT_SHARE:
                items.append(items[int(rng.integers(len(items)))])
                continue
            digit = int(rng.choice(topics)) if rng.random() < TOPIC_SHARE else int(rng.integers(10))
            items.append(int(rng.choice(by_class[digit])))
        mean_gap = float(np.exp(rng.uniform(np.log(3.0), np.log(60.0))))
        gaps = rng.exponential(mean_gap, n)
        gaps += np.where(rng.random(n) < PAUSE_CHANCE, rng.exponential(PAUSE_MEAN, n), 0.0)
        gaps[0] = rng.uniform(0.0, spread)
        times = start + np.cumsum(gaps)
        plans.append(
            BenignPlan(
                name=f"{prefix}-{i:02d}",
                api_key=f"key-{prefix}-{i:02d}",
                ip=ip,
                network=network,
                topics=topics,
                times=tuple(float(t) for t in times),
                items=tuple(items),
            )
        )
    return plans
