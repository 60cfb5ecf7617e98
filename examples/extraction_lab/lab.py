"""The lab's worlds, run one by one or in worker processes.

Worlds (each with a fresh shield, a fresh fake clock and its own seeded randomness):

- ``benign``: the benign population alone, shield on: false positives and accuracy cost;
- ``<attack>/off``: the attack from one identity, shield off (no monitor, no perturbation);
- ``<attack>/single``, ``<attack>/sybil``, ``<attack>/spread``: shield on, the attack from
  one identity, from sybils sharing two /24s, and from sybils each in a /24 of its own;
  a few benign bystanders are first seen in the attacker's cohort window.

The same attack sends the same queries in every world until answers differ (adaptive
attacks then diverge), so off and on are paired comparisons.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from threadpoolctl import threadpool_limits

from asgi_extraction_shield import ShieldSettings

from .attacks import strategies
from .benign import BenignPlan, population
from .config import SECRET_KEY, SPLITS, LabConfig
from .thieves import fidelity_curve
from .victim import Digits, Victim, load_data
from .world import (
    Actor,
    Campaign,
    FakeClock,
    Trace,
    WorldResult,
    aligned_start,
    quiet_shield_logs,
    simulate,
)

SINGLE_IP = "203.0.113.66"
SYBIL_IPS = ("192.0.2.10", "192.0.2.11", "192.0.2.12", "172.31.7.10", "172.31.7.11")
"""The ``sybil`` split: five addresses in two /24s."""


@dataclass(frozen=True)
class WorldSpec:
    name: str
    attack: str | None = None
    split: str | None = None
    shield_on: bool = True


@dataclass
class LabResult:
    config: LabConfig
    victim_accuracy: float
    held_out: int
    settings: ShieldSettings
    worlds: dict[str, WorldResult]
    seconds: float


def world_specs(config: LabConfig) -> list[WorldSpec]:
    """Longest first, so that worker processes finish together."""
    specs = [
        WorldSpec(f"{attack}/{split}", attack, split)
        for split in SPLITS
        for attack in config.attacks
    ]
    specs.append(WorldSpec("benign"))
    specs += [WorldSpec(f"{a}/off", a, "single", shield_on=False) for a in config.attacks]
    return specs


def shield_settings(config: LabConfig) -> ShieldSettings:
    return ShieldSettings(secret_key=SECRET_KEY, **config.shield)


def run_lab(config: LabConfig, progress: Callable[[str], None] | None = None) -> LabResult:
    started = time.perf_counter()
    settings = shield_settings(config)  # fails fast on a bad override
    with threadpool_limits(1):  # the same arithmetic whatever the number of processes
        data = load_data(config.seed_of("data"))
        victim = Victim(data, config.seed_of("victim"))
        specs = world_specs(config)
        worlds: dict[str, WorldResult] = {}
        if config.jobs > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                config.jobs, mp_context=context, initializer=_limit_threads
            ) as pool:
                futures = [pool.submit(run_world, s, config, data, victim) for s in specs]
                for spec, future in zip(specs, futures, strict=True):
                    worlds[spec.name] = future.result()
                    if progress:
                        progress(spec.name)
        else:
            for spec in specs:
                worlds[spec.name] = run_world(spec, config, data, victim)
                if progress:
                    progress(spec.name)
    return LabResult(
        config,
        victim.accuracy,
        len(data.y_held),
        settings,
        worlds,
        time.perf_counter() - started,
    )


def _limit_threads() -> None:
    threadpool_limits(1)


def run_world(spec: WorldSpec, config: LabConfig, data: Digits, victim: Victim) -> WorldResult:
    """Simulate one world and, for an attack, train the thieves on what it got."""
    cohort = shield_settings(config).monitor.cohort_seconds
    start = aligned_start(cohort)
    actors = _actors(spec, config, data, start)
    held_labels = victim.labels(data.x_held)
    with quiet_shield_logs():
        result = asyncio.run(
            simulate(
                spec.name,
                victim,
                data.x_held,
                held_labels,
                actors,
                FakeClock(start),
                shield_on=spec.shield_on,
                overrides=config.shield,
                rng=config.rng("pace", spec.name),
                attack=spec.attack,
                split=spec.split,
            )
        )
    if spec.attack is not None:
        budgets = sorted({*config.budgets, *config.curve})
        result.fidelity = fidelity_curve(
            result.campaign_queries,
            result.campaign_answers,
            budgets,
            data.x_held,
            held_labels,
            [config.seed_of("thief", str(i)) for i in range(config.thief_seeds)],
        )
        # The thieves have learned what they could; the raw log is not needed any more.
        result = replace(result, campaign_queries=[], campaign_answers=[])
    return result


def _actors(spec: WorldSpec, config: LabConfig, data: Digits, start: float) -> list[Actor]:
    if spec.attack is None:
        plans = population(
            "benign",
            config.benign_users,
            data,
            config.rng("benign"),
            start=start,
            spread=config.benign_spread_hours * 3600,
            median_queries=config.benign_median_queries,
            max_queries=config.benign_max_queries,
        )
        return [_benign_actor(p) for p in plans]
    factory = strategies(config.jbda_seeds, config.jbda_rounds)[spec.attack]
    # The same queries for the same attack in every world: one rng per attack, not per world.
    strategy = factory(data.x_pool, config.rng("attack", spec.attack), config.seed_of("jbda"))
    campaign = Campaign(strategy, config.max_budget)
    actors: list[Actor] = []
    if spec.split == "single":
        trace = Trace("attacker", "attacker", "single")
        actors.append(
            Actor(trace, "key-attacker", SINGLE_IP, start, campaign, config.attacker_interval)
        )
    else:
        for i in range(config.sybils):
            ip = SYBIL_IPS[i % len(SYBIL_IPS)] if spec.split == "sybil" else _spread_ip(i)
            trace = Trace(f"sybil-{i:02d}", "attacker", spec.split or "sybil")
            # New accounts, all created within the first minute (one cohort window).
            actors.append(
                Actor(
                    trace,
                    f"key-sybil-{i:02d}",
                    ip,
                    start + 2.0 * i,
                    campaign,
                    config.sybil_interval,
                )
            )
    if spec.shield_on and config.bystanders:
        plans = population(
            "bystander",
            config.bystanders,
            data,
            config.rng("bystanders", spec.name),
            start=start,
            spread=300.0,
            median_queries=config.benign_median_queries,
            max_queries=config.benign_max_queries,
            shared_networks=False,
            ip_base=120,
        )
        actors += [_benign_actor(p) for p in plans]
    return actors


def _spread_ip(i: int) -> str:
    return f"172.{16 + i // 256}.{i % 256}.9"


def _benign_actor(plan: BenignPlan) -> Actor:
    trace = Trace(plan.name, "benign", plan.network)
    return Actor(trace, plan.api_key, plan.ip, plan.times[0], plan=plan)
