"""The graded policy: levels, hysteresis, decay, blocks, lifting, bounded state."""

from __future__ import annotations

import pytest

from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.monitor import Assessment
from asgi_extraction_shield.policy import GradedPolicy, Thresholds

from .conftest import FakeClock

pytestmark = pytest.mark.anyio
WHO = Identity("header:abc", "header")


@pytest.mark.parametrize(
    ("risk", "current", "expected"),
    [
        (0.0, "normal", "normal"),
        (0.3, "normal", "watch"),
        (0.55, "normal", "degrade"),
        (0.75, "watch", "throttle"),
        (0.95, "normal", "block"),
        (0.45, "degrade", "degrade"),  # within the hysteresis band: stays
        (0.39, "degrade", "watch"),  # below it: steps down
        (0.45, "watch", "watch"),  # climbing needs the threshold itself
        (0.25, "watch", "watch"),
        (0.19, "watch", "normal"),
    ],
)
def test_levels_with_hysteresis(risk: float, current: str, expected: str) -> None:
    assert Thresholds().level(risk, current) == expected  # type: ignore[arg-type]


async def test_levels_rise_at_once_and_decay_with_time(clock: FakeClock) -> None:
    policy = GradedPolicy(half_life=100.0, clock=clock)
    assert (await policy.update(WHO, Assessment(0.1))).level == "normal"
    assert await policy.inspect(WHO.key) is None  # low risk leaves no state behind
    action = await policy.update(WHO, Assessment(0.75, {"coverage": 0.9}))
    assert action.level == "throttle" and action.cost_multiplier == 4.0
    assert action.assessment.signals["coverage"] == 0.9
    # a quiet request does not clear a suspicious history
    assert (await policy.update(WHO, Assessment(0.0))).level == "throttle"
    clock.advance(100.0)  # risk halves: 0.375, below degrade - hysteresis
    assert (await policy.current(WHO)).level == "watch"
    clock.advance(1000.0)
    assert (await policy.current(WHO)).level == "normal"


async def test_block_lasts_block_seconds_then_steps_down(clock: FakeClock) -> None:
    policy = GradedPolicy(block_seconds=60.0, half_life=0.0, clock=clock)
    action = await policy.update(WHO, Assessment(0.95))
    assert action.level == "block" and action.block_seconds == 60.0
    clock.advance(30.0)
    assert (await policy.current(WHO)).block_seconds == 30.0
    clock.advance(30.0)
    after = await policy.current(WHO)
    assert after.block_seconds == 0.0 and after.level == "throttle"  # served; not renewed
    again = await policy.update(WHO, Assessment(0.95))
    assert again.level == "block" and again.block_seconds == 60.0  # risk still there: blocked again


async def test_lift_forgets_everything(clock: FakeClock) -> None:
    policy = GradedPolicy(clock=clock)
    await policy.update(WHO, Assessment(0.95))
    assert await policy.lift(WHO.key) and await policy.inspect(WHO.key) is None
    assert (await policy.current(WHO)).level == "normal"
    assert not await policy.lift(WHO.key)


async def test_a_flood_of_watched_identities_cannot_evict_penalties(clock: FakeClock) -> None:
    policy = GradedPolicy(max_identities=100, clock=clock)
    await policy.update(WHO, Assessment(0.8))  # throttled
    for i in range(1000):
        await policy.update(Identity(f"sybil-{i}", "header"), Assessment(0.35))  # watch
    assert len(policy._states) <= 100
    state = await policy.inspect(WHO.key)
    assert state is not None and state.level == "throttle"


async def test_risk_does_not_decay_during_a_block(clock: FakeClock) -> None:
    # A client that sits out its block comes back as suspicious as it left.
    policy = GradedPolicy(block_seconds=900.0, half_life=600.0, clock=clock)
    assert (await policy.update(WHO, Assessment(0.95))).level == "block"
    clock.advance(900.0)
    back = await policy.current(WHO)
    assert back.block_seconds == 0.0 and back.level == "throttle"
    state = await policy.inspect(WHO.key)
    assert state is not None and state.risk == pytest.approx(0.95)
    # carrying on with the same behaviour: blocked again at once
    again = await policy.update(WHO, Assessment(0.95))
    assert again.level == "block" and again.block_seconds == 900.0
    # an honest client's risk decays after the block, from the block's end
    clock.advance(900.0 + 600.0)
    state = await policy.inspect(WHO.key)
    assert state is not None and state.risk == pytest.approx(0.475)


async def test_inspect_reports_decayed_risk_block_and_signals(clock: FakeClock) -> None:
    policy = GradedPolicy(block_seconds=60.0, half_life=100.0, clock=clock)
    await policy.update(WHO, Assessment(0.95, {"coverage": 0.8}))
    clock.advance(20.0)
    state = await policy.inspect(WHO.key)
    assert state is not None and state.level == "block"
    assert state.block_seconds == pytest.approx(40.0)
    assert state.assessment.signals == {"coverage": 0.8}
    # risk is frozen during the block (it decays from the block's end)
    assert state.risk == pytest.approx(0.95)


async def test_level_counts_apply_decay_and_finished_blocks(clock: FakeClock) -> None:
    policy = GradedPolicy(block_seconds=60.0, half_life=100.0, clock=clock)
    await policy.update(Identity("a", "header"), Assessment(0.95))  # block
    await policy.update(Identity("b", "header"), Assessment(0.75))  # throttle
    await policy.update(Identity("c", "header"), Assessment(0.35))  # watch
    assert policy.level_counts() == {"watch": 1, "degrade": 0, "throttle": 1, "block": 1}
    # 60 s on: a's block is over (throttle); b decays to 0.75 * 2^-0.6 = 0.49 (degrade);
    # c to 0.35 * 2^-0.6 = 0.23, still watch within the hysteresis band
    clock.advance(60.0)
    assert policy.level_counts() == {"watch": 1, "degrade": 1, "throttle": 1, "block": 0}
