"""From the worlds' traces to the numbers of the report: detection, fidelity, benign cost,
signal values, and the targets."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .lab import LabResult
from .world import BLOCK, DEGRADE, PoolTrace, Trace, WorldResult

SYBIL_DETECTION_BUDGET = 5_000
SINGLE_DETECTION_BUDGET = 500
MAX_BENIGN_FP = 0.01


@dataclass(frozen=True)
class Detection:
    """One attack world: when the shield reacted, in queries the campaign had sent."""

    world: str
    attack: str
    split: str
    sent: int
    to_degrade: int | None
    to_block: int | None
    identities: int
    flagged: int
    """Identities of the attacker ever at degrade or above."""
    blocked: int
    to_half_flagged: int | None
    """Sybils: campaign queries when half of the sybils had been flagged."""
    answered: int
    refused_policy: int
    refused_limit: int
    final_level: int
    flagged_by: dict[str, float]
    """Scores of the assessment that first took one of its identities to degrade."""


@dataclass(frozen=True)
class Cost:
    """What a group of benign users lost: answers whose top-1 is not the victim's own, and
    refused queries (blocked or rate limited)."""

    queries: int
    changed: int
    refused: int

    @property
    def changed_share(self) -> float:
        return _share(self.changed, self.queries - self.refused)

    @property
    def refused_share(self) -> float:
        return _share(self.refused, self.queries)


@dataclass(frozen=True)
class BenignSummary:
    population: str
    users: int
    watch: int
    flagged: int
    blocked: int
    by_network: dict[str, tuple[int, int]]
    """Network kind → (users, flagged)."""
    unflagged: Cost
    flagged_cost: Cost


def detection(world: WorldResult) -> Detection:
    attackers = [t for t in world.traces.values() if t.role == "attacker"]
    degrade = [_pooled_at(t, DEGRADE) for t in attackers]
    block = [_pooled_at(t, BLOCK) for t in attackers]
    flagged = sorted(x for x in degrade if x is not None)
    first = min(
        (t for t, x in zip(attackers, degrade, strict=True) if x is not None),
        key=lambda t: _pooled_at(t, DEGRADE) or 0,
        default=None,
    )
    half = (len(attackers) + 1) // 2
    return Detection(
        world=world.name,
        attack=world.attack or "",
        split=world.split or "",
        sent=sum(t.queries for t in attackers),
        to_degrade=flagged[0] if flagged else None,
        to_block=min((x for x in block if x is not None), default=None),
        identities=len(attackers),
        flagged=len(flagged),
        blocked=sum(x is not None for x in block),
        to_half_flagged=flagged[half - 1] if len(attackers) > 1 and len(flagged) >= half else None,
        answered=sum(t.count("answered") for t in attackers),
        refused_policy=sum(t.count("blocked") for t in attackers),
        refused_limit=sum(t.count("limited") for t in attackers),
        final_level=max((t.level[-1] for t in attackers if t.level), default=0),
        flagged_by=scores(first.flagged_by) if first is not None else {},
    )


def scores(assessment: dict[str, float]) -> dict[str, float]:
    """The signal scores of an assessment, largest first (``pool.`` when a pool's risk won)."""
    found = {k.removeprefix("score."): v for k, v in assessment.items() if k.startswith("score.")}
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def _pooled_at(trace: Trace, level: int) -> int | None:
    first = trace.first_at(level)
    return None if first is None else trace.pooled[first - 1]


def benign_summary(population: str, traces: Iterable[Trace]) -> BenignSummary:
    users = list(traces)
    networks: dict[str, tuple[int, int]] = {}
    for t in users:
        n, f = networks.get(t.network, (0, 0))
        networks[t.network] = (n + 1, f + int(t.max_level >= DEGRADE))
    return BenignSummary(
        population=population,
        users=len(users),
        watch=sum(t.max_level >= 1 for t in users),
        flagged=sum(t.max_level >= DEGRADE for t in users),
        blocked=sum(t.max_level >= BLOCK for t in users),
        by_network=dict(sorted(networks.items())),
        unflagged=cost([t for t in users if t.max_level < DEGRADE]),
        flagged_cost=cost([t for t in users if t.max_level >= DEGRADE]),
    )


def cost(traces: Sequence[Trace]) -> Cost:
    answered = sum(t.count("answered") for t in traces)
    return Cost(
        queries=sum(t.queries for t in traces),
        changed=answered - sum(t.correct for t in traces),
        refused=sum(t.queries for t in traces) - answered,
    )


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def benign_populations(result: LabResult) -> list[BenignSummary]:
    benign = result.worlds.get("benign")
    bystanders = [
        t
        for w in result.worlds.values()
        if w.attack is not None and w.shield_on
        for t in w.traces.values()
        if t.role == "benign"
    ]
    summaries = []
    if benign is not None:
        summaries.append(benign_summary("benign world", benign.traces.values()))
    if bystanders:
        summaries.append(benign_summary("bystanders in attack worlds", bystanders))
    return summaries


# -- signals -----------------------------------------------------------------------------


def rising(rule: str) -> bool:
    """Whether high values of a signal are the suspicious ones (``low:high`` with low < high)."""
    low, high = (float(v) for v in rule.split(":")[:2])
    return high >= low


def value_at(signals: Sequence[dict[str, float]], queries: int) -> dict[str, float]:
    """The last signals recorded with at most ``queries`` queries (the first ones if none)."""
    chosen: dict[str, float] = signals[0] if signals else {}
    for s in signals:
        if s.get("queries", 0.0) > queries:
            break
        chosen = s
    return chosen


def extremes(
    signals: Sequence[dict[str, float]], rules: dict[str, str], min_queries: int
) -> dict[str, float]:
    """Per signal, its most suspicious value once ``min_queries`` had been seen."""
    sampled = [s for s in signals if s.get("queries", 0.0) >= min_queries]
    out: dict[str, float] = {}
    for name, rule in rules.items():
        values = [s[name] for s in sampled if name in s]
        if values:
            out[name] = max(values) if rising(rule) else min(values)
    return out


def pool_extremes(
    pool: PoolTrace, rules: dict[str, str], min_queries: int, upto: int | None = None
) -> dict[str, float]:
    signals = [s for s in pool.signals if upto is None or s.get("queries", 0.0) <= upto]
    out = extremes(signals, rules, min_queries)
    risks = [r for r, s in zip(pool.risk, pool.signals, strict=True) if s in signals]
    out["risk"] = max(risks, default=0.0)
    return out


def attacker_pools(world: WorldResult) -> dict[str, PoolTrace]:
    keys = {k for t in world.traces.values() if t.role == "attacker" for k in t.pools}
    return {k: world.pools[k] for k in sorted(keys) if k in world.pools}


def benign_pools(world: WorldResult) -> dict[str, PoolTrace]:
    return dict(sorted(world.pools.items()))


# -- a candidate signal, computed by the lab (not by the package) ---------------------------

CLASS_ENTROPY = "class_entropy"
"""Normalised entropy of the top-1 classes of a client's last answers: benign users ask
about their own few classes, extraction wants every class."""


def class_entropy(classes: Sequence[int], window: int = 200, n_classes: int = 10) -> list[float]:
    """The candidate signal after each answer (refused queries, -1, are skipped)."""
    out: list[float] = []
    counts = np.zeros(n_classes)
    recent: list[int] = []
    for c in classes:
        if c < 0:
            out.append(out[-1] if out else 0.0)
            continue
        recent.append(c)
        counts[c] += 1
        if len(recent) > window:
            counts[recent.pop(0)] -= 1
        p = counts[counts > 0] / len(recent)
        out.append(float(-(p * np.log(p)).sum() / np.log(n_classes)))
    return out


def series(trace: Trace) -> list[dict[str, float]]:
    """The client's own signals after each request, with the candidate signal added
    (unless the package computes one of that name)."""
    candidate = class_entropy(trace.answer_classes)[-len(trace.signals) :] if trace.signals else []
    # The package's own signal of that name, where it has one, wins.
    return [{CLASS_ENTROPY: c, **s} for s, c in zip(trace.signals, candidate, strict=True)]


def class_entropy_extreme(
    traces: Sequence[Trace], min_queries: int, upto: int | None = None
) -> float:
    """The highest candidate value of the merged answers of ``traces`` (in time order),
    once ``min_queries`` queries had been seen and up to ``upto`` queries."""
    merged = sorted(
        (t, c) for trace in traces for t, c in zip(trace.times, trace.answer_classes, strict=True)
    )
    series = class_entropy([c for _, c in merged])
    end = len(series) if upto is None else min(upto, len(series))
    return max(series[min_queries - 1 : end], default=float("nan"))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    met: bool | None
    """``None``: the budget of this run is too small to tell."""
    detail: str


def targets(result: LabResult) -> list[Target]:
    detections = [detection(w) for w in result.worlds.values() if w.attack and w.shield_on]
    budget = result.config.max_budget
    singles = _missed(
        [d for d in detections if d.split == "single"], SINGLE_DETECTION_BUDGET, budget
    )
    sybils = _missed([d for d in detections if d.split != "single"], SYBIL_DETECTION_BUDGET, budget)
    populations = benign_populations(result)
    users = sum(p.users for p in populations)
    flagged = sum(p.flagged for p in populations)
    clean = Cost(
        queries=sum(p.unflagged.queries for p in populations),
        changed=sum(p.unflagged.changed for p in populations),
        refused=sum(p.unflagged.refused for p in populations),
    )
    return [
        Target(
            f"every attack flagged (≥ degrade) within {SINGLE_DETECTION_BUDGET} queries "
            "from one identity",
            singles[0],
            singles[1],
        ),
        Target(
            f"sybil splits flagged within {SYBIL_DETECTION_BUDGET:,} pooled queries",
            sybils[0],
            sybils[1],
        ),
        Target(
            f"≤ {MAX_BENIGN_FP:.0%} of benign identities ever at degrade",
            _share(flagged, users) <= MAX_BENIGN_FP,
            f"{flagged} of {users} ({_share(flagged, users):.1%})",
        ),
        Target(
            "0.0 accuracy cost for benign users never flagged",
            clean.changed == 0 and clean.refused == 0,
            f"of {clean.queries:,} queries, {clean.changed} answered with another top-1 than "
            f"the victim's, {clean.refused} refused",
        ),
    ]


def _missed(detections: Sequence[Detection], needed: int, budget: int) -> tuple[bool | None, str]:
    """Met when every attack was flagged within ``needed`` queries; unknown when one was
    not flagged at all and the run's budget is below ``needed``."""
    late = [d for d in detections if d.to_degrade is not None and d.to_degrade > needed]
    never = [d for d in detections if d.to_degrade is None]
    names = ", ".join(f"{d.attack}/{d.split}" for d in (*late, *never))
    if late or (never and budget >= needed):
        return False, f"missed: {names}"
    if never:
        return None, f"not flagged within this run's {budget:,} queries: {names}"
    return True, "all flagged"
