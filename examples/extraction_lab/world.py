"""One simulated world: clients querying the victim through ``ExtractionShield``, in process.

Requests go through the real ASGI stack (``httpx.ASGITransport``, one transport per
client address so that the shield sees the right IP; the API key in ``x-api-key``). Time
is a fake clock the simulation sets before each request: clients act in the order of
their own schedules, nobody sleeps, and a run is deterministic. After every request the
world records what the shield now thinks of the client: its policy level and risk
(``shield.policy.inspect``), the monitor's assessment of that request, the client's own
signals (``shield.monitor.signals_of``) and those of the pools it belongs to.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import orjson

from asgi_extraction_shield import ExtractionShield, Identity, ShieldEvent, ShieldSettings
from asgi_extraction_shield.audit.attacks import Campaign
from asgi_extraction_shield.formats.base import ParsedRequest
from asgi_extraction_shield.monitor import Assessment, ExtractionMonitor, SignalRule, risk_of
from asgi_extraction_shield.policy import LEVELS

from .benign import BenignPlan
from .config import SECRET_KEY
from .victim import PREDICT_PATH, Array, Labels, Victim, make_app

Outcome = Literal["answered", "blocked", "limited", "error"]
DEGRADE = LEVELS.index("degrade")
BLOCK = LEVELS.index("block")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingMonitor:
    """The shield's own monitor, unchanged, keeping each identity's last assessment."""

    def __init__(self, inner: ExtractionMonitor) -> None:
        self.inner = inner
        self.last: dict[str, Assessment] = {}

    async def observe_request(self, identity: Identity, request: ParsedRequest) -> Assessment:
        assessment = await self.inner.observe_request(identity, request)
        self.last[identity.key] = assessment
        return assessment


@dataclass
class PoolTrace:
    """A pooled tracker (an IP prefix or a cohort) over time."""

    key: str
    queries: list[int] = field(default_factory=list)
    risk: list[float] = field(default_factory=list)
    signals: list[dict[str, float]] = field(default_factory=list)
    members: int = 0


@dataclass
class Trace:
    """What happened to one client, request by request."""

    name: str
    role: Literal["attacker", "benign"]
    network: str
    key: str = ""
    times: list[float] = field(default_factory=list)
    pooled: list[int] = field(default_factory=list)
    """Attackers: queries the whole campaign had sent when this request was made."""
    risk: list[float] = field(default_factory=list)
    level: list[int] = field(default_factory=list)
    outcome: list[Outcome] = field(default_factory=list)
    signals: list[dict[str, float]] = field(default_factory=list)
    """The client's own tracker after each request (empty while untracked)."""
    flagged_by: dict[str, float] = field(default_factory=dict)
    """The assessment (signals and their scores) that first took it to degrade or above."""
    pools: list[str] = field(default_factory=list)
    correct: int = 0
    """Benign: answers whose top-1 is the victim's own top-1."""
    answer_classes: list[int] = field(default_factory=list)
    """The top-1 class of each answer (-1 when refused)."""

    @property
    def queries(self) -> int:
        return len(self.outcome)

    def first_at(self, level: int) -> int | None:
        """This client's query count when it first reached ``level`` or above."""
        return next((i + 1 for i, v in enumerate(self.level) if v >= level), None)

    @property
    def max_level(self) -> int:
        return max(self.level, default=0)

    def count(self, outcome: Outcome) -> int:
        return self.outcome.count(outcome)


@dataclass
class Actor:
    """A client: an attacking identity (drawing from a campaign) or a benign user (a plan)."""

    trace: Trace
    api_key: str
    ip: str
    next_time: float
    campaign: Campaign | None = None
    interval: float = 0.0
    plan: BenignPlan | None = None
    step: int = 0

    def query(self, held: Array) -> Array | None:
        if self.campaign is not None:
            return self.campaign.next_query()
        assert self.plan is not None
        return held[self.plan.items[self.step]] if self.step < len(self.plan.items) else None

    def advance(self, answer: Array | None, retry_after: float, rng: np.random.Generator) -> None:
        if self.campaign is not None:
            self.campaign.deliver(answer)
            # A scripted client: its own pace, or the server's Retry-After when refused.
            self.next_time += retry_after or self.interval * rng.uniform(0.9, 1.1)
            return
        assert self.plan is not None
        self.step += 1
        if self.step < len(self.plan.items):  # people keep to their own schedule
            self.next_time = self.plan.times[self.step]


@dataclass
class WorldResult:
    name: str
    attack: str | None
    split: str | None
    shield_on: bool
    traces: dict[str, Trace]
    pools: dict[str, PoolTrace]
    campaign_queries: list[Array]
    campaign_answers: list[Array | None]
    events: Counter[str]
    rules: dict[str, str]
    """The monitor's rules, as ``low:high[:weight]``."""
    pool_rules: list[str] = field(default_factory=list)
    """The signals that count for a pool's risk."""
    fidelity: dict[str, dict[int, float]] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Short: asyncio formats the result of the main task when it restores the SIGINT
        # handler, and the full dataclass repr (every array of every trace) takes seconds.
        return f"WorldResult({self.name!r}, {len(self.traces)} clients)"


@contextmanager
def quiet_shield_logs() -> Iterator[None]:
    """Events go to ``on_event``; keep the logger's WARNING lines out of the console."""
    logger = logging.getLogger("asgi_extraction_shield")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def build_shield(
    victim: Victim,
    clock: FakeClock,
    shield_on: bool,
    overrides: Mapping[str, Any],
    events: Counter[str],
) -> ExtractionShield:
    values: dict[str, Any] = {"secret_key": SECRET_KEY}
    if shield_on:
        values.update(overrides)
    else:  # shield off: the limiter alone, no monitor, no perturbation
        values.update(monitor={"enabled": False}, perturbation="none")

    def count(event: ShieldEvent) -> None:
        events[event.kind] += 1

    shield = ExtractionShield(make_app(victim), ShieldSettings(**values), count, clock=clock)
    if isinstance(shield.monitor, ExtractionMonitor):
        # The shield's own monitor, wrapped after construction so that the lab measures
        # exactly what the middleware builds from the settings.
        shield.monitor = RecordingMonitor(shield.monitor)
    return shield


async def simulate(
    name: str,
    victim: Victim,
    held: Array,
    held_labels: Labels,
    actors: list[Actor],
    clock: FakeClock,
    *,
    shield_on: bool,
    overrides: Mapping[str, Any],
    rng: np.random.Generator,
    attack: str | None = None,
    split: str | None = None,
) -> WorldResult:
    events: Counter[str] = Counter()
    shield = build_shield(victim, clock, shield_on, overrides, events)
    recorder = shield.monitor if isinstance(shield.monitor, RecordingMonitor) else None
    campaign = next((a.campaign for a in actors if a.campaign is not None), None)
    pools: dict[str, PoolTrace] = {}
    async with AsyncExitStack() as stack:
        clients: dict[str, httpx.AsyncClient] = {}
        for actor in actors:
            if actor.ip not in clients:
                transport = httpx.ASGITransport(app=shield, client=(actor.ip, 40_000))
                clients[actor.ip] = await stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://lab.test")
                )
            actor.trace.key = _identity_key(shield, actor)
        queue = [(a.next_time, i, i) for i, a in enumerate(actors)]
        heapq.heapify(queue)
        order = len(actors)
        while queue:
            when, _, index = heapq.heappop(queue)
            actor = actors[index]
            x = actor.query(held)
            if x is None:
                continue
            clock.now = when
            sent_before = len(campaign.queries) if campaign is not None else 0
            outcome, answer, retry_after = await _ask(clients[actor.ip], actor.api_key, x)
            await _record(actor.trace, shield, recorder, pools, when, outcome, sent_before + 1)
            actor.trace.answer_classes.append(-1 if answer is None else int(np.argmax(answer)))
            if actor.plan is not None and answer is not None:
                truth = held_labels[actor.plan.items[actor.step]]
                actor.trace.correct += int(np.argmax(answer) == truth)
            actor.advance(answer, retry_after, rng)
            if actor.query(held) is not None:
                order += 1
                heapq.heappush(queue, (actor.next_time, order, index))
    monitor = recorder.inner if recorder is not None else None
    rules = {name: _rule_text(rule) for name, rule in monitor.rules.items()} if monitor else {}
    pool_rules = list(getattr(monitor, "pool_rules", rules)) if monitor else []
    return WorldResult(
        name=name,
        attack=attack,
        split=split,
        shield_on=shield_on,
        traces={a.trace.name: a.trace for a in actors},
        pools=pools,
        campaign_queries=campaign.queries if campaign is not None else [],
        campaign_answers=campaign.answers if campaign is not None else [],
        events=events,
        rules=rules,
        pool_rules=pool_rules,
    )


def _rule_text(rule: SignalRule) -> str:
    text = f"{rule.low:g}:{rule.high:g}"
    return text if rule.weight == 1.0 else f"{text}:{rule.weight:g}"


def _identity_key(shield: ExtractionShield, actor: Actor) -> str:
    scope = {
        "type": "http",
        "headers": [(b"x-api-key", actor.api_key.encode())],
        "client": (actor.ip, 40_000),
    }
    identity = shield.identities.from_sources(scope)
    assert identity is not None
    return identity.key


async def _ask(
    client: httpx.AsyncClient, api_key: str, x: Array
) -> tuple[Outcome, Array | None, float]:
    response = await client.post(
        PREDICT_PATH,
        content=orjson.dumps({"instances": [x.tolist()]}),
        headers={"x-api-key": api_key, "content-type": "application/json"},
    )
    if response.status_code == 200:
        row = np.asarray(orjson.loads(response.content)["predictions"][0], dtype=np.float64)
        return "answered", row, 0.0
    retry_after = float(response.headers.get("retry-after", "0") or 0)
    if response.status_code == 429:
        kind: Outcome = "blocked" if b"abnormal-usage" in response.content else "limited"
        return kind, None, max(retry_after, 1.0)
    return "error", None, retry_after


async def _record(
    trace: Trace,
    shield: ExtractionShield,
    recorder: RecordingMonitor | None,
    pools: dict[str, PoolTrace],
    when: float,
    outcome: Outcome,
    pooled: int,
) -> None:
    trace.times.append(when)
    trace.outcome.append(outcome)
    trace.pooled.append(pooled)
    if recorder is None:
        trace.risk.append(0.0)
        trace.level.append(0)
        return
    state = await shield.policy.inspect(trace.key)
    assessment = recorder.last.pop(trace.key, None)
    if state is not None:
        trace.risk.append(float(state.risk))
        trace.level.append(LEVELS.index(state.level))
        if trace.level[-1] >= DEGRADE and not trace.flagged_by and assessment is not None:
            trace.flagged_by = {"risk": assessment.risk, **assessment.signals}
    else:
        trace.risk.append(assessment.risk if assessment is not None else 0.0)
        trace.level.append(0)
    monitor = recorder.inner
    signals = monitor.signals_of(trace.key)
    if signals is not None:
        trace.signals.append(signals)
    if not trace.pools:
        trace.pools = [
            k for k, (_, members) in monitor.pools.items() if trace.key in members.counts
        ]
    for key in trace.pools:
        entry = monitor.pools.get(key)
        if entry is None:
            continue
        tracker, members = entry
        pool = pools.setdefault(key, PoolTrace(key))
        pool_signals = tracker.signals()
        pool.queries.append(int(pool_signals["queries"]))
        # Pools may count fewer signals than identities (``pool_rules`` where the monitor
        # has them): the pool's risk as the monitor itself computes it.
        rules = getattr(monitor, "pool_rules", monitor.rules)
        pool.risk.append(risk_of(pool_signals, rules, monitor.min_queries)[0])
        pool.signals.append(pool_signals)
        pool.members = len(members.counts)


def aligned_start(cohort_seconds: float, offset: float = 30.0) -> float:
    """A start time just after a cohort window opens (clients first seen together share it)."""
    return math.ceil(1_200_000.0 / cohort_seconds) * cohort_seconds + offset
