"""Introspection: ``shield.inspect`` / ``shield.lift``, the handle, and the admin route."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI

from asgi_extraction_shield import ConfigurationError, ExtractionShield, ShieldEvent, ShieldHandle
from asgi_extraction_shield.introspection import IdentityState, Inspector
from asgi_extraction_shield.monitor import NullMonitor
from asgi_extraction_shield.policy import GradedPolicy, StaticPolicy

from .conftest import SECRET, FakeClock, client, fastapi_app, scripted_shield, shield, starlette_app

pytestmark = pytest.mark.anyio
TOKEN = "admin-token-0123456789abcdef"
THIEF = "thief-raw-key-123"
AUTH = {"authorization": f"Bearer {TOKEN}"}
BODY = {"instances": [[1.0, 2.0]]}


def _shield(clock: FakeClock, events: list[ShieldEvent] | None = None, **overrides: Any) -> Any:
    app, monitor = scripted_shield(
        clock,
        GradedPolicy(block_seconds=60.0, clock=clock),
        rate_limit="10/hour",
        on_event=None if events is None else events.append,
        **overrides,
    )
    thief = app.identities.keys_for(THIEF)[0]  # header:x-api-key comes first
    monitor.risk[thief] = 0.95
    return app, thief


async def _attack(app: ExtractionShield, requests: int = 3) -> list[int]:
    async with client(app) as c:
        return [
            (await c.post("/predict", json=BODY, headers={"x-api-key": THIEF})).status_code
            for _ in range(requests)
        ]


async def test_inspect_by_raw_key_or_hash_and_lift(clock: FakeClock) -> None:
    events: list[ShieldEvent] = []
    app, thief = _shield(clock, events)
    assert await _attack(app) == [429, 429, 429]  # blocked at the first request
    clock.advance(10.0)
    state = await app.inspect(THIEF)
    assert state == await app.inspect(thief)
    assert state.identity == thief and state.known
    assert (state.level, state.risk, state.block_seconds) == ("block", 0.95, 50.0)
    assert state.signals == {"coverage": 0.95, "queries": 60.0}
    # charged once: the later requests were refused before the limiter (10/hour, burst 10)
    assert (state.bucket.limit, state.bucket.remaining) == (10, 9)
    assert THIEF not in json.dumps(state.to_dict())
    fresh = await app.inspect("someone-else")
    assert not fresh.known and fresh.level == "normal" and fresh.bucket.remaining == 10

    assert await app.lift(THIEF) == [thief]
    assert [e.identity for e in events if e.kind == "lifted"] == [thief]
    after = await app.inspect(thief)
    assert (after.level, after.risk, after.block_seconds) == ("normal", 0.0, 0.0)
    assert await _attack(app, 1) == [200]  # the monitor's history went too: not re-blocked
    assert await app.lift(THIEF) == []


async def test_handle_reaches_a_middleware_fastapi_builds_lazily(clock: FakeClock) -> None:
    handle = ShieldHandle()
    app: FastAPI = fastapi_app()
    app.add_middleware(ExtractionShield, secret_key=SECRET, handle=handle, clock=clock)
    with pytest.raises(RuntimeError, match="not built yet"):
        await handle.inspect("k")
    async with client(app) as c:
        assert (await c.post("/predict", json=BODY, headers={"x-api-key": "k"})).status_code == 200
    state = await handle.inspect("k")
    assert state.known and state.bucket.remaining == state.bucket.limit - 1


async def test_admin_route_serves_state_and_lifts(clock: FakeClock) -> None:
    app, thief = _shield(clock, admin_token=TOKEN)
    await _attack(app)
    async with client(app) as c:
        by_hash = await c.get(f"/_shield/identities/{thief}", headers=AUTH)
        by_key = await c.get("/_shield/identity", headers={**AUTH, "x-shield-key": THIEF})
        assert by_hash.status_code == by_key.status_code == 200
        assert by_hash.json() == by_key.json()
        assert by_hash.json()["level"] == "block" and by_hash.json()["identity"] == thief
        assert by_hash.headers["cache-control"] == "no-store"
        for _ in range(20):  # the admin route is never limited (10/hour)
            assert (await c.get(f"/_shield/identities/{thief}", headers=AUTH)).status_code == 200
        lifted = await c.post(f"/_shield/identities/{thief}/lift", headers=AUTH)
        assert lifted.status_code == 200 and lifted.json() == {"lifted": [thief]}
        assert (await c.get(f"/_shield/identities/{thief}", headers=AUTH)).json()["level"] == (
            "normal"
        )
        again = await c.post("/_shield/identity/lift", headers={**AUTH, "x-shield-key": THIEF})
        assert again.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/_shield/identities/anonymous", {}, 401),
        ("GET", "/_shield/identities/anonymous", {"authorization": "Bearer wrong"}, 401),
        ("GET", "/_shield/identities/anonymous", {"authorization": TOKEN}, 401),  # no scheme
        ("GET", "/_shield/nothing-here", AUTH, 404),
        ("GET", "/_shield", AUTH, 404),
        ("GET", "/_shield/identities/header:" + "0" * 24, AUTH, 404),  # nothing held
        ("GET", "/_shield/identity", {**AUTH, "x-shield-key": "nobody"}, 404),
        ("GET", "/_shield/identity", AUTH, 400),  # no key sent
        ("GET", f"/_shield/identities/{THIEF}", AUTH, 400),  # a raw key in the URL
        ("POST", "/_shield/identities/anonymous", AUTH, 405),
        ("GET", "/_shield/identities/anonymous/lift", AUTH, 405),
    ],
)
async def test_admin_route_refusals_are_problems_that_leak_nothing(
    clock: FakeClock, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    app, _ = _shield(clock, admin_token=TOKEN)
    async with client(app) as c:
        r = await c.request(method, path, headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    for secret in (TOKEN, SECRET, THIEF):
        assert secret not in r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    if status == 405:
        assert r.headers["allow"] in ("GET", "POST")


async def test_admin_route_is_off_by_default(clock: FakeClock) -> None:
    app, _ = _shield(clock)
    async with client(app) as c:
        r = await c.get("/_shield/identities/anonymous", headers=AUTH)
    # not intercepted: the app answers (its own 404), as for any protected path
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/plain")
    assert "ratelimit" in r.headers


def test_admin_settings_are_checked_and_the_token_masked() -> None:
    with pytest.raises(ConfigurationError) as short:
        ExtractionShield(starlette_app(), secret_key=SECRET, admin_token="tiny-tok")
    assert "EXTRACTION_SHIELD_ADMIN_TOKEN" in str(short.value)
    assert "tiny-tok" not in str(short.value)
    with pytest.raises(ConfigurationError, match="EXTRACTION_SHIELD_ADMIN_PATH"):
        ExtractionShield(starlette_app(), secret_key=SECRET, admin_path="admin/*")
    app = ExtractionShield(starlette_app(), secret_key=SECRET, admin_token=TOKEN)
    assert TOKEN not in repr(app.settings)
    assert all(TOKEN not in value for _, value, _ in app.settings.describe())


async def test_ip_identities_are_found_by_address(clock: FakeClock) -> None:
    app = ExtractionShield(starlette_app(), secret_key=SECRET, identity="ip", clock=clock)
    async with client(app, ip="198.51.100.9") as c:
        await c.post("/predict", json=BODY)
    state = await app.inspect("198.51.100.9")
    assert state.known and state.identity.startswith("ip:")
    with pytest.raises(ValueError, match="identifies nobody"):
        await app.inspect("not-an-address")


# -- the Inspector on its own: components without the optional capabilities ---------------


async def test_inspector_reads_through_minimal_components(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="10/minute", monitor={"enabled": False})
    lifted: list[str] = []

    async def on_lift(key: str) -> None:
        lifted.append(key)

    # A monitor without assessment_of/forget and a policy that holds nothing.
    inspector = Inspector(app.identities, StaticPolicy(), NullMonitor(), app.limiter, on_lift)
    # A raw value is hashed under every configured source; a hash is itself.
    keys = inspector.keys("203.0.113.7")
    (key,) = [k for k in keys if k.startswith("ip:")]
    assert len(keys) > 1 and inspector.keys(key) == [key]
    fresh = await inspector.inspect(key)
    assert isinstance(fresh, IdentityState) and not fresh.known
    assert (fresh.level, fresh.risk, fresh.block_seconds, fresh.signals) == ("normal", 0, 0, {})
    assert fresh.bucket.remaining == fresh.bucket.limit == 10
    async with client(app) as c:
        await c.get("/predict")
    spent = await inspector.inspect("203.0.113.7")
    assert spent.known and spent.bucket.remaining == 9  # known by its bucket alone
    assert "203.0.113.7" not in json.dumps(spent.to_dict())  # the raw address is not kept
    assert await inspector.lift(key) == [] and lifted == []  # nothing to lift: no event


async def test_an_unbound_handle_says_so() -> None:
    with pytest.raises(RuntimeError, match="not built yet"):
        await ShieldHandle().inspect("header:0123456789abcdef01234567")
