"""GCRA maths, rate parsing and the rate-limit header values, without ASGI."""

from __future__ import annotations

import pytest

from asgi_extraction_shield.limiter import (
    Decision,
    Limiter,
    Rate,
    gcra,
    rate_limit_header,
    retry_after_seconds,
)
from asgi_extraction_shield.storage.memory import MemoryStorage


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("600/minute", 600, 60.0),
        ("10/second", 10, 1.0),
        ("5 per hour", 5, 3600.0),
        ("1/day", 1, 86400.0),
        ("10/5 seconds", 10, 5.0),
        ("  7 / Minutes ", 7, 60.0),
    ],
)
def test_rate_parse(text: str, count: int, period: float) -> None:
    rate = Rate.parse(text)
    assert (rate.count, rate.period) == (count, period)
    assert rate.interval == pytest.approx(period / count)


@pytest.mark.parametrize(
    "text", ["", "600", "600/fortnight", "0/minute", "-1/second", "ten/minute", "5/0 seconds"]
)
def test_rate_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        Rate.parse(text)


def test_burst_then_denied_with_exact_retry_after() -> None:
    # 6/minute: one token every 10 s; burst 3.
    interval, burst, now = 10.0, 3, 100.0
    tat = None
    for remaining in (2, 1, 0):
        decision, tat = gcra(tat, now, 1, interval, burst)
        assert decision.allowed and decision.remaining == remaining
    denied, unchanged = gcra(tat, now, 1, interval, burst)
    assert not denied.allowed and unchanged is None
    assert denied.retry_after == pytest.approx(10.0)
    assert denied.reset_after == pytest.approx(30.0)
    # 9.9 s later still denied, with 0.1 s to wait; at 10 s exactly, allowed again.
    assert gcra(tat, now + 9.9, 1, interval, burst)[0].retry_after == pytest.approx(0.1)
    again, _ = gcra(tat, now + 10.0, 1, interval, burst)
    assert again.allowed and again.remaining == 0


def test_refill_is_capped_at_burst() -> None:
    decision, tat = gcra(None, 0.0, 3, 1.0, 3)
    assert decision.allowed and decision.remaining == 0
    later, _ = gcra(tat, 1000.0, 1, 1.0, 3)
    assert later.allowed and later.remaining == 2  # never more than burst - cost


def test_cost_is_charged() -> None:
    decision, tat = gcra(None, 0.0, 4, 1.0, 10)
    assert decision.remaining == 6
    denied, _ = gcra(tat, 0.0, 7, 1.0, 10)
    assert not denied.allowed and denied.retry_after == pytest.approx(1.0)
    assert denied.remaining == 6


def test_cost_above_burst_is_over_capacity() -> None:
    decision, tat = gcra(None, 0.0, 11, 1.0, 10)
    assert not decision.allowed and decision.over_capacity and tat is None
    assert decision.remaining == 10


def test_zero_cost_is_always_allowed_and_free() -> None:
    _, tat = gcra(None, 0.0, 5, 1.0, 5)
    decision, new_tat = gcra(tat, 0.0, 0, 1.0, 5)
    assert decision.allowed and new_tat == tat


@pytest.mark.parametrize(
    ("retry_after", "seconds"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.0000001, 2), (59.5, 60)]
)
def test_retry_after_is_whole_seconds_at_least_one(retry_after: float, seconds: int) -> None:
    assert retry_after_seconds(Decision(False, 1, 0, 1.0, retry_after)) == seconds


def test_headers_structured_fields() -> None:
    limiter = Limiter(MemoryStorage(), Rate.parse("600/minute"))
    assert limiter.policy_header() == '"default";q=600;w=60'
    assert rate_limit_header(Decision(True, 600, 599, 0.1, 0.0)) == b'"default";r=599;t=1'
    assert rate_limit_header(Decision(True, 600, 600, 0.0, 0.0)) == b'"default";r=600;t=0'


@pytest.mark.anyio
async def test_limiter_uses_injected_clock() -> None:
    now = [0.0]
    limiter = Limiter(MemoryStorage(), Rate.parse("2/second"), burst=2, clock=lambda: now[0])
    assert (await limiter.acquire("a")).allowed
    assert (await limiter.acquire("a")).allowed
    assert not (await limiter.acquire("a")).allowed
    now[0] += 0.5
    assert (await limiter.acquire("a")).allowed
    with pytest.raises(ValueError):
        await limiter.acquire("a", -1)
    with pytest.raises(ValueError):
        Limiter(MemoryStorage(), Rate.parse("2/second"), burst=0)
