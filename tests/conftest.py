"""Shared fixtures: a small model app (FastAPI or bare Starlette), a fake clock, clients."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import settings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket

from asgi_extraction_shield import ExtractionShield, Identity
from asgi_extraction_shield.formats.base import ParsedRequest
from asgi_extraction_shield.monitor import Assessment
from asgi_extraction_shield.policy import GradedPolicy

from .redis_server import RedisServer

SECRET = "test-secret-key-0123456789abcdef"

# CI runs on shared, noisy machines: no per-example deadline, and a fixed example sequence
# so that a red run can be reproduced; locally, hypothesis explores new examples each run.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _predict(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"predictions": [[0.25, 0.75]], "received": len(body)})


async def _echo(request: Request) -> Response:
    chunks = [chunk async for chunk in request.stream()]
    return Response(b"".join(chunks), media_type="application/octet-stream")


async def _stream(request: Request) -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"data: part {i}\n\n".encode()

    return StreamingResponse(parts(), media_type="text/event-stream")


async def _health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def _ws(websocket: WebSocket) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    await websocket.send_text(text.upper())
    await websocket.close()


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/predict", _predict, methods=["POST", "GET"]),
            Route("/echo", _echo, methods=["POST"]),
            Route("/stream", _stream),
            Route("/health", _health),
            WebSocketRoute("/ws", _ws),
        ]
    )


def fastapi_app() -> FastAPI:
    app = FastAPI()
    app.add_api_route("/predict", _predict, methods=["POST", "GET"])
    app.add_api_route("/echo", _echo, methods=["POST"])
    app.add_api_route("/stream", _stream)
    app.add_api_route("/health", _health)
    app.add_api_websocket_route("/ws", _ws)
    return app


APPS: dict[str, Callable[[], ASGIApp]] = {"starlette": starlette_app, "fastapi": fastapi_app}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(APPS))
def inner_app(request: pytest.FixtureRequest) -> ASGIApp:
    """The model app, once as bare Starlette and once as FastAPI."""
    return APPS[request.param]()


def shield(app: ASGIApp, clock: FakeClock, **overrides: Any) -> ExtractionShield:
    overrides.setdefault("secret_key", SECRET)
    return ExtractionShield(app, clock=clock, **overrides)


def client(app: ASGIApp, ip: str = "203.0.113.7") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(ip, 40000)), base_url="http://shield.test"
    )


# -- a real redis-server (tests/redis_server.py) ---------------------------------------------


def _missing(what: str) -> NoReturn:
    message = f"{what}; the Redis tests need it"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
    pytest.skip(message)


@pytest.fixture
def redis_py() -> None:
    """redis-py, the ``redis`` extra (part of the ``test`` extra)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _missing("the redis package is not installed (pip install 'asgi-extraction-shield[redis]')")


@pytest.fixture
def redis_server(redis_py: None) -> Iterator[RedisServer]:
    """A fresh redis-server for this test only."""
    if shutil.which("redis-server") is None:
        _missing("redis-server is not on PATH (apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain redis-py client, to look at what the storage wrote."""
    import redis.asyncio

    client_ = redis.asyncio.Redis.from_url(redis_server.url)
    yield client_
    await client_.aclose()


class ScriptedMonitor:
    """A monitor whose risk per identity key the test sets (``risk[key] = 0.95``)."""

    def __init__(self) -> None:
        self.risk: dict[str, float] = {}

    async def observe_request(self, identity: Identity, request: ParsedRequest) -> Assessment:
        risk = self.risk.get(identity.key, 0.0)
        return Assessment(risk, {"coverage": risk, "queries": 60.0})

    def forget(self, key: str) -> bool:
        return self.risk.pop(key, None) is not None


def scripted_shield(
    clock: FakeClock, policy: GradedPolicy | None = None, **overrides: Any
) -> tuple[ExtractionShield, ScriptedMonitor]:
    """The Starlette app behind a shield graded by a :class:`ScriptedMonitor`."""
    monitor = ScriptedMonitor()
    overrides.setdefault("secret_key", SECRET)
    app = ExtractionShield(
        starlette_app(),
        clock=clock,
        query_monitor=monitor,
        risk_policy=policy or GradedPolicy(clock=clock),
        **overrides,
    )
    return app, monitor
