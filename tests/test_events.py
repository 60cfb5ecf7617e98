"""Event delivery: on_event gets every event; the log samples the kinds that come per request."""

from __future__ import annotations

import json
import logging

import pytest

from asgi_extraction_shield import ShieldEvent
from asgi_extraction_shield.events import EventEmitter

from .conftest import FakeClock, client, shield, starlette_app

pytestmark = pytest.mark.anyio


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "asgi_extraction_shield" and r.getMessage().startswith("{")
    ]


async def test_repeated_kinds_are_logged_once_an_interval_with_a_count(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_extraction_shield")
    seen: list[ShieldEvent] = []
    events = EventEmitter(seen.append, log_interval=10.0, clock=clock)
    for _ in range(5):
        await events.emit(ShieldEvent("rate_limited", "header:a"))
        clock.advance(1.0)
    await events.emit(ShieldEvent("rate_limited", "header:b"))  # another identity: its own
    await events.emit(ShieldEvent("level_changed", "header:a"))  # never sampled
    await events.emit(ShieldEvent("level_changed", "header:a"))
    clock.advance(6.0)  # 11 s after the first line of header:a
    await events.emit(ShieldEvent("rate_limited", "header:a"))
    logged = [(e["kind"], e["identity"], e["signals"].get("suppressed")) for e in lines(caplog)]  # type: ignore[union-attr]
    assert logged == [
        ("rate_limited", "header:a", None),
        ("rate_limited", "header:b", None),
        ("level_changed", "header:a", None),
        ("level_changed", "header:a", None),
        ("rate_limited", "header:a", 4),  # it stands for the 4 not logged before it
    ]
    assert len(seen) == 9  # the hook gets every event


async def test_interval_zero_logs_every_event_and_the_table_is_bounded(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_extraction_shield")
    every = EventEmitter(log_interval=0.0, clock=clock)
    for _ in range(3):
        await every.emit(ShieldEvent("storage_error", "header:a"))
    assert len(lines(caplog)) == 3
    bounded = EventEmitter(log_interval=10.0, clock=clock, max_tracked=2)
    for who in ("a", "b", "c", "a"):  # "a" was forgotten when "c" came: logged again
        await bounded.emit(ShieldEvent("rate_limited", f"header:{who}"))
    assert len(lines(caplog)) == 3 + 4 and len(bounded._last) == 2


async def test_a_hammering_client_does_not_flood_the_log(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_extraction_shield")
    seen: list[ShieldEvent] = []
    app = shield(starlette_app(), clock, rate_limit="1/minute", burst=1, on_event=seen.append)
    async with client(app) as c:
        codes = [(await c.get("/predict")).status_code for _ in range(50)]
    assert codes.count(429) == 49 and len(seen) == 49
    assert [e["kind"] for e in lines(caplog)] == ["rate_limited"]
