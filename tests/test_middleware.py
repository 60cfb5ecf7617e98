"""The middleware through real ASGI: limiting, headers, paths, bodies, streaming, modes."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.types import Message, Receive, Scope, Send

from asgi_extraction_shield import ConfigurationError, ExtractionShield, ShieldEvent
from asgi_extraction_shield.formats import FlatCost

from .conftest import SECRET, FakeClock, client, shield, starlette_app

pytestmark = pytest.mark.anyio

QUOTA = "https://iana.org/assignments/http-problem-types#quota-exceeded"


async def test_burst_then_429_with_exact_retry_after(inner_app: Any, clock: FakeClock) -> None:
    app = shield(inner_app, clock, rate_limit="6/minute", burst=3)
    async with client(app) as c:
        for remaining in (2, 1, 0):
            r = await c.post("/predict", json={"instances": [[1.0]]})
            assert r.status_code == 200
            assert r.headers["ratelimit-policy"] == '"default";q=6;w=60'
            assert r.headers["ratelimit"].startswith(f'"default";r={remaining};')
        clock.advance(3.5)  # one token every 10 s: 6.5 s still to wait
        r = await c.post("/predict", json={"instances": [[1.0]]})
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "7"
    assert r.headers["ratelimit"] == '"default";r=0;t=27'
    problem = r.json()
    assert problem["type"] == QUOTA and problem["status"] == 429
    assert problem["retry_after"] == 7 and problem["title"] and problem["detail"]


async def test_refill(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="1/second", burst=1)
    async with client(app) as c:
        assert (await c.get("/predict")).status_code == 200
        assert (await c.get("/predict")).status_code == 429
        clock.advance(1.0)
        assert (await c.get("/predict")).status_code == 200


async def test_cost_from_the_request_adapter(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="10/minute", adapter=FlatCost(4))
    async with client(app) as c:
        assert (await c.get("/predict")).headers["ratelimit"].startswith('"default";r=6;')
        assert (await c.get("/predict")).headers["ratelimit"].startswith('"default";r=2;')
        r = await c.get("/predict")
    assert r.status_code == 429 and r.headers["retry-after"] == "12"


async def test_cost_above_burst_says_so(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="10/minute", burst=3, adapter=FlatCost(5))
    async with client(app) as c:
        r = await c.get("/predict")
    assert r.status_code == 429 and "5 tokens" in r.json()["detail"]


async def test_exempt_paths_pass_untouched_and_404s_are_limited(
    inner_app: Any, clock: FakeClock
) -> None:
    app = shield(inner_app, clock, rate_limit="1/minute")
    async with client(app) as c:
        for _ in range(3):
            r = await c.get("/health")
            assert r.status_code == 200 and "ratelimit" not in r.headers
        first = await c.get("/no-such-route")
        second = await c.get("/no-such-route")
    assert first.status_code == 404 and "ratelimit" in first.headers
    assert second.status_code == 429


async def test_protected_path_globs(clock: FakeClock) -> None:
    app = shield(
        starlette_app(),
        clock,
        rate_limit="1/minute",
        protected_paths="/pred*,/echo",
        exempt_paths="/health",
    )
    async with client(app) as c:
        assert (await c.get("/predict")).status_code == 200
        assert (await c.get("/predict")).status_code == 429
        for _ in range(3):
            assert "ratelimit" not in (await c.get("/stream")).headers


async def test_separate_identities_have_separate_buckets(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="1/minute")
    async with client(app, ip="198.51.100.1") as a, client(app, ip="198.51.100.2") as b:
        assert (await a.get("/predict")).status_code == 200
        assert (await b.get("/predict")).status_code == 200
        assert (await a.get("/predict")).status_code == 429
        assert (await a.get("/predict", headers={"x-api-key": "k1"})).status_code == 200


async def test_expose_headers_false(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="1/minute", expose_headers=False)
    async with client(app) as c:
        ok = await c.get("/predict")
        limited = await c.get("/predict")
    assert "ratelimit" not in ok.headers and "ratelimit-policy" not in ok.headers
    assert limited.status_code == 429 and "ratelimit" not in limited.headers
    assert limited.headers["retry-after"] == "60"


# -- request bodies -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65_536, 3_000_000])
async def test_body_is_replayed_exactly(inner_app: Any, clock: FakeClock, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    app = shield(inner_app, clock)
    async with client(app) as c:
        r = await c.post("/echo", content=payload)
    assert r.status_code == 200 and r.content == payload


async def test_chunked_body_is_replayed_exactly(clock: FakeClock) -> None:
    parts = [b"alpha-", b"", b"beta-" * 1000, b"gamma"]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    app = shield(starlette_app(), clock)
    async with client(app) as c:
        r = await c.post("/echo", content=chunks())
    assert r.content == b"".join(parts)


async def test_app_reading_in_chunks_gets_the_same_bytes(clock: FakeClock) -> None:
    received: list[bytes] = []

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            received.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages = [b"one", b"two", b"three"]
    await call(shield(raw_app, clock), body_messages=messages)
    assert b"".join(received) == b"onetwothree"


async def test_413_on_declared_and_streamed_oversize(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"y" * 400

    async with client(app) as c:
        declared = await c.post("/echo", content=b"x" * 1001)
        streamed = await c.post("/echo", content=chunks())
        fits = await c.post("/echo", content=b"x" * 1000)
    for r in (declared, streamed):
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/problem+json"
        assert "1000 bytes" in r.json()["detail"]
    assert fits.status_code == 200 and len(fits.content) == 1000


async def test_shadow_passes_oversize_bodies_through_intact(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, max_body_bytes=1000, mode="shadow")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([65 + i]) * 400

    async with client(app) as c:
        r = await c.post("/echo", content=chunks())
    assert r.status_code == 200 and r.content == b"".join(bytes([65 + i]) * 400 for i in range(5))


async def test_client_disconnect_reaches_the_app(clock: FakeClock) -> None:
    seen: list[str] = []

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["type"])
        seen.append((await receive())["type"])  # the server's next message: the disconnect

    await call(shield(raw_app, clock), body_messages=[b"{}"], then_disconnect=True)
    assert seen == ["http.request", "http.disconnect"]


async def test_disconnect_while_the_shield_reads_reaches_the_app(clock: FakeClock) -> None:
    seen: list[str] = []

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((await receive())["type"])

    await call(shield(raw_app, clock), body_messages=[], then_disconnect=True, more=True)
    assert seen == ["http.disconnect"]


# -- pass-through ---------------------------------------------------------------------------


async def test_lifespan_passes_through(clock: FakeClock) -> None:
    scopes: list[str] = []

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        scopes.append(scope["type"])
        message = await receive()
        await send({"type": message["type"] + ".complete"})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    await shield(raw_app, clock)({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert scopes == ["lifespan"] and sent == [{"type": "lifespan.startup.complete"}]


async def test_websocket_passes_through(clock: FakeClock) -> None:
    app = shield(starlette_app(), clock, rate_limit="1/minute")
    for _ in range(3):  # never limited
        sent = await websocket_call(app, ["hello"])
        assert [m["type"] for m in sent] == [
            "websocket.accept",
            "websocket.send",
            "websocket.close",
        ]
        assert sent[1]["text"] == "HELLO"


async def websocket_call(app: Any, texts: list[str]) -> list[Message]:
    incoming: list[Message] = [{"type": "websocket.connect"}]
    incoming += [{"type": "websocket.receive", "text": text} for text in texts]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [],
        "client": ("192.0.2.1", 1),
        "server": ("t", 80),
        "subprotocols": [],
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "root_path": "",
    }
    await app(scope, receive, send)
    return sent


async def test_streaming_response_is_not_buffered(clock: FakeClock) -> None:
    messages = await call(shield(starlette_app(), clock), path="/stream", method="GET")
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    parts = [m["body"] for m in bodies if m["body"]]
    assert parts == [f"data: part {i}\n\n".encode() for i in range(5)]
    start = messages[0]
    assert start["type"] == "http.response.start"
    assert (b"ratelimit", b'"default";r=599;t=1') in start["headers"]


async def test_file_response_passes_through(tmp_path: Any, clock: FakeClock) -> None:
    from starlette.applications import Starlette
    from starlette.responses import FileResponse
    from starlette.routing import Route

    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01" * 100_000)
    inner = Starlette(routes=[Route("/file", lambda request: FileResponse(path))])
    async with client(shield(inner, clock)) as c:
        r = await c.get("/file")
    assert r.content == path.read_bytes()
    assert r.headers["content-length"] == "200000" and "ratelimit" in r.headers


# -- modes, failures, events ----------------------------------------------------------------


async def test_shadow_mode_enforces_nothing_but_reports(clock: FakeClock) -> None:
    events: list[ShieldEvent] = []
    app = shield(
        starlette_app(), clock, rate_limit="1/minute", mode="shadow", on_event=events.append
    )
    async with client(app) as c:
        responses = [
            await c.get("/predict", headers={"x-api-key": "sk-live-123"}) for _ in range(3)
        ]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all("ratelimit" not in r.headers for r in responses)
    assert [e.kind for e in events] == ["rate_limited", "rate_limited"]
    assert all(e.shadow for e in events)


class BrokenStorage:
    shared = False

    async def acquire(self, *args: Any) -> Any:
        from asgi_extraction_shield import StorageError

        raise StorageError("connection refused")

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("failure_mode", "status"), [("open", 200), ("closed", 503)])
async def test_storage_failure_modes(clock: FakeClock, failure_mode: str, status: int) -> None:
    events: list[ShieldEvent] = []
    app = shield(
        starlette_app(),
        clock,
        storage=BrokenStorage(),
        failure_mode=failure_mode,  # type: ignore[arg-type]
        on_event=events.append,
    )
    async with client(app) as c:
        r = await c.post("/echo", content=b"payload")
    assert r.status_code == status
    if status == 200:
        assert r.content == b"payload"  # the body read by the shield still reaches the app
    else:
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["retry-after"] == "1"
    assert [e.kind for e in events] == ["storage_error"]


async def test_internal_error_never_becomes_the_apps_500(clock: FakeClock) -> None:
    class Exploding:
        def parse_request(self, scope: Scope, body: bytes) -> Any:
            raise RuntimeError("bug in an adapter")

    events: list[ShieldEvent] = []
    app = shield(starlette_app(), clock, adapter=Exploding(), on_event=events.append)
    async with client(app) as c:
        r = await c.post("/predict", content=b"{}")
    assert r.status_code == 200 and r.json()["received"] == 2
    assert [e.kind for e in events] == ["internal_error"]
    assert app.internal_errors == 1


async def test_app_errors_are_not_swallowed(clock: FakeClock) -> None:
    async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError("the model crashed")

    with pytest.raises(ValueError, match="model crashed"):
        await call(shield(failing_app, clock))


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_events_reach_on_event_and_the_log_without_raw_keys(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    events: list[ShieldEvent] = []

    def sync_hook(event: ShieldEvent) -> None:
        events.append(event)

    async def async_hook(event: ShieldEvent) -> None:
        events.append(event)

    app = shield(
        starlette_app(),
        clock,
        rate_limit="1/minute",
        on_event=sync_hook if kind == "sync" else async_hook,
    )
    caplog.set_level(logging.INFO, logger="asgi_extraction_shield")
    async with client(app) as c:
        await c.get("/predict", headers={"x-api-key": "sk-live-SECRET-42"})
        await c.get("/predict", headers={"x-api-key": "sk-live-SECRET-42"})
    assert len(events) == 1
    event = events[0]
    assert event.kind == "rate_limited" and event.path == "/predict" and event.level == "normal"
    assert event.identity.startswith("header:") and "SECRET" not in event.identity
    lines = [r.getMessage() for r in caplog.records if r.name == "asgi_extraction_shield"]
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert logged and logged[0]["kind"] == "rate_limited"
    assert logged[0]["identity"] == event.identity
    assert "sk-live-SECRET-42" not in caplog.text and SECRET not in caplog.text


async def test_failing_event_hook_does_not_fail_the_request(clock: FakeClock) -> None:
    def hook(event: ShieldEvent) -> None:
        raise RuntimeError("alerting is down")

    app = shield(starlette_app(), clock, rate_limit="1/minute", on_event=hook)
    async with client(app) as c:
        await c.get("/predict")
        r = await c.get("/predict")
    assert r.status_code == 429 and app.events.hook_errors == 1


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_add_middleware_with_environment_only(
    monkeypatch: pytest.MonkeyPatch, framework: str
) -> None:
    from .conftest import APPS

    monkeypatch.setenv("EXTRACTION_SHIELD_RATE_LIMIT", "2/minute")
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", SECRET)
    app = APPS[framework]()
    app.add_middleware(ExtractionShield)  # type: ignore[attr-defined]
    async with client(app) as c:
        codes = [(await c.get("/predict")).status_code for _ in range(3)]
        health = await c.get("/health")
    assert codes == [200, 200, 429] and health.status_code == 200


async def test_bad_environment_fails_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_RATE_LIMIT", "lots")
    app = starlette_app()
    app.add_middleware(ExtractionShield)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    # Starlette builds its middleware stack on the first call: lifespan startup.
    with pytest.raises(ConfigurationError, match="EXTRACTION_SHIELD_RATE_LIMIT='lots'"):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)


def test_overrides_are_validated(clock: FakeClock) -> None:
    from asgi_extraction_shield import ShieldSettings

    base = ShieldSettings(secret_key=SECRET)
    app = ExtractionShield(starlette_app(), base, rate_limit="5/second")
    assert app.limiter.rate.count == 5 and app.settings.secret_key == base.secret_key
    with pytest.raises(ConfigurationError, match="unknown settings: rate"):
        ExtractionShield(starlette_app(), base, rate="5/second")
    with pytest.raises(ConfigurationError, match="EXTRACTION_SHIELD_BURST"):
        ExtractionShield(starlette_app(), base, burst=-1)
    with pytest.raises(ConfigurationError, match="STORAGE_URL"):
        ExtractionShield(starlette_app(), base, storage_url="redis+sentinel://localhost/m")
    with pytest.raises(ConfigurationError, match="unknown scheme"):
        ExtractionShield(starlette_app(), base, storage_url="etcd://x")


async def test_missing_secret_warns_once_and_works(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asgi_extraction_shield")
    app = ExtractionShield(starlette_app())
    async with client(app) as c:
        assert (await c.get("/predict")).status_code == 200
        assert (await c.get("/predict")).status_code == 200
    warnings = [r for r in caplog.records if "SECRET_KEY is not set" in r.getMessage()]
    assert len(warnings) == 1


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="too short"):
        ExtractionShield(starlette_app(), secret_key="short")


# -- helpers --------------------------------------------------------------------------------


async def call(
    app: Any,
    path: str = "/predict",
    method: str = "POST",
    body_messages: list[bytes] | None = None,
    then_disconnect: bool = False,
    more: bool = False,
) -> list[Message]:
    """Drive ``app`` with hand-made ASGI messages; returns what it sent."""
    pending: list[Message] = []
    bodies = body_messages if body_messages is not None else [b""]
    for i, chunk in enumerate(bodies):
        last = i == len(bodies) - 1 and not more
        pending.append({"type": "http.request", "body": chunk, "more_body": not last})
    if then_disconnect:
        pending.append({"type": "http.disconnect"})
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await anyio.sleep_forever()  # a client that neither sends nor leaves
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"shield.test")],
        "client": ("192.0.2.1", 1),
        "server": ("shield.test", 80),
    }
    await app(scope, receive, send)
    return sent
