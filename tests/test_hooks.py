"""The monitor and policy seams: the middleware charges, blocks and reports as they say."""

from __future__ import annotations

from typing import Any

import pytest

from asgi_extraction_shield import ShieldEvent
from asgi_extraction_shield.formats import ParsedRequest
from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.monitor import Assessment, NullMonitor
from asgi_extraction_shield.policy import Action, StaticPolicy

from .conftest import FakeClock, client, shield, starlette_app

pytestmark = pytest.mark.anyio

ABNORMAL = "https://iana.org/assignments/http-problem-types#abnormal-usage-detected"


class CountingMonitor:
    """Risk grows by 0.25 per request of an identity."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    async def observe_request(self, identity: Identity, request: ParsedRequest) -> Assessment:
        self.seen[identity.key] = self.seen.get(identity.key, 0) + 1
        risk = min(1.0, 0.25 * self.seen[identity.key])
        return Assessment(risk, {"requests": float(self.seen[identity.key])})


class ThresholdPolicy:
    """watch at 0.5, throttle (cost x3) at 0.75, block at 1.0."""

    def __init__(self) -> None:
        self.levels: dict[str, Action] = {}

    async def current(self, identity: Identity) -> Action:
        return self.levels.get(identity.key, Action())

    async def update(self, identity: Identity, assessment: Assessment) -> Action:
        if assessment.risk >= 1.0:
            action = Action("block", 1.0, 30.0, assessment)
        elif assessment.risk >= 0.75:
            action = Action("throttle", 3.0, 0.0, assessment)
        elif assessment.risk >= 0.5:
            action = Action("watch", 1.0, 0.0, assessment)
        else:
            action = Action("normal", 1.0, 0.0, assessment)
        self.levels[identity.key] = action
        return action


async def test_policy_levels_throttle_and_block(clock: FakeClock) -> None:
    events: list[ShieldEvent] = []
    app = shield(
        starlette_app(),
        clock,
        rate_limit="100/minute",
        query_monitor=CountingMonitor(),
        risk_policy=ThresholdPolicy(),
        on_event=events.append,
    )
    async with client(app) as c:
        remaining = []
        for _ in range(4):
            r = await c.get("/predict")
            remaining.append(r.headers.get("ratelimit"))
        blocked = r
    # Requests 1-3 cost 1 each; request 4 is charged at the throttle level (x3).
    assert remaining[:3] == ['"default";r=99;t=1', '"default";r=98;t=2', '"default";r=97;t=2']
    key = next(iter(app.monitor.seen))  # type: ignore[attr-defined]
    assert (await app.limiter.acquire(key, 0)).remaining == 94
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "30"
    assert blocked.json()["type"] == ABNORMAL and blocked.json()["retry_after"] == 30
    kinds = [(e.kind, e.level) for e in events]
    assert kinds == [
        ("level_changed", "watch"),
        ("level_changed", "throttle"),
        ("level_changed", "block"),
        ("blocked", "block"),
    ]
    assert events[-1].risk == 1.0 and events[-1].signals["requests"] == 4.0
    assert events[0].signals["previous"] == "normal"


async def test_blocks_are_reported_but_not_enforced_in_shadow(clock: FakeClock) -> None:
    events: list[ShieldEvent] = []
    app = shield(
        starlette_app(),
        clock,
        mode="shadow",
        query_monitor=CountingMonitor(),
        risk_policy=ThresholdPolicy(),
        on_event=events.append,
    )
    async with client(app) as c:
        codes = [(await c.get("/predict")).status_code for _ in range(5)]
    assert codes == [200] * 5
    # One event when the block begins, not one per request it would refuse.
    assert [e.kind for e in events].count("blocked") == 1 and all(e.shadow for e in events)


class RecordingPostProcessor:
    """Records the level each response would be post-processed at; changes nothing."""

    def __init__(self) -> None:
        self.levels: list[str] = []

    def transform_for(self, identity: Identity, request: ParsedRequest, action: Action) -> None:
        self.levels.append(action.level)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("enforce", ["normal", "watch", "throttle"]),
        ("shadow", ["normal"] * 5),  # graded and reported, but answers are never degraded
    ],
)
async def test_answers_are_degraded_by_level_only_when_enforcing(
    clock: FakeClock, mode: str, expected: list[str]
) -> None:
    post = RecordingPostProcessor()
    app = shield(
        starlette_app(),
        clock,
        mode=mode,
        query_monitor=CountingMonitor(),
        risk_policy=ThresholdPolicy(),
        postprocessor=post,
    )
    async with client(app) as c:
        for _ in range(5):
            await c.get("/predict")
    assert post.levels == expected


async def test_null_components_are_neutral() -> None:
    ident = Identity("k", "header")
    assert (await NullMonitor().observe_request(ident, ParsedRequest())).risk == 0.0
    policy = StaticPolicy()
    assert (await policy.current(ident)).level == "normal"
    assert (await policy.update(ident, Assessment(0.9))).block_seconds == 0.0


async def test_monitor_sees_hashed_identity(clock: FakeClock) -> None:
    monitor = CountingMonitor()
    app: Any = shield(starlette_app(), clock, query_monitor=monitor)
    async with client(app) as c:
        await c.get("/predict", headers={"authorization": "Bearer tok-123"})
    (key,) = monitor.seen
    assert key.startswith("bearer:") and "tok-123" not in key
