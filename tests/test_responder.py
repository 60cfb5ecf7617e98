"""Response rewriting through the post-processor seam: lengths fixed, failures harmless."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from asgi_extraction_shield.formats import ParsedRequest
from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.policy import Action

from .conftest import FakeClock, client, shield

pytestmark = pytest.mark.anyio


class Doubling:
    """Doubles every byte of JSON bodies; with ``fail_on`` set, raises on that call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on

    def accepts(self, status: int, headers: Headers) -> bool:
        return status == 200 and headers.get("content-type", "").startswith("application/json")

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("transform bug")
        return bytes(b for byte in chunk for b in (byte, byte))

    def unprocessed(self) -> bytes:
        return b""


class PostProcessor:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.transforms: list[Doubling] = []

    def transform_for(self, identity: Identity, request: ParsedRequest, action: Action) -> Doubling:
        transform = Doubling(**self.kwargs)
        self.transforms.append(transform)
        return transform


async def _json(request: Request) -> Response:
    return Response(b'{"p":[0.5]}', media_type="application/json")


GZIPPED = gzip.compress(b'{"p":[0.5]}')


async def _gzipped(request: Request) -> Response:
    return Response(GZIPPED, media_type="application/json", headers={"content-encoding": "gzip"})


async def _text(request: Request) -> Response:
    return Response(b"plain", media_type="text/plain")


async def _stream(request: Request) -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"ab", b"cd", b"ef"):
            yield part

    return StreamingResponse(parts(), media_type="application/json")


APP = Starlette(
    routes=[
        Route("/json", _json),
        Route("/gzip", _gzipped),
        Route("/text", _text),
        Route("/stream", _stream),
    ]
)


async def test_single_body_rewritten_with_correct_length(clock: FakeClock) -> None:
    async with client(shield(APP, clock, postprocessor=PostProcessor())) as c:
        r = await c.get("/json")
    assert r.content == b'{{""pp""::[[00..55]]}}'
    assert r.headers["content-length"] == str(len(r.content))
    assert "ratelimit" in r.headers


async def test_streaming_body_rewritten_chunk_by_chunk(clock: FakeClock) -> None:
    post = PostProcessor()
    async with client(shield(APP, clock, postprocessor=post)) as c:
        r = await c.get("/stream")
    assert r.content == b"aabbccddeeff" and "content-length" not in r.headers
    assert post.transforms[0].calls >= 3


@pytest.mark.parametrize(("path", "body"), [("/gzip", b'{"p":[0.5]}'), ("/text", b"plain")])
async def test_encoded_or_declined_responses_pass_untouched(
    clock: FakeClock, path: str, body: bytes
) -> None:
    post = PostProcessor()
    async with client(shield(APP, clock, postprocessor=post)) as c:
        r = await c.get(path)
    assert r.content == body and post.transforms[0].calls == 0


async def test_failing_transform_sends_the_original(clock: FakeClock) -> None:
    async with client(shield(APP, clock, postprocessor=PostProcessor(fail_on=1))) as c:
        r = await c.get("/json")
    assert r.status_code == 200 and r.content == b'{"p":[0.5]}'
    assert r.headers["content-length"] == "11"


async def test_transform_failing_mid_stream_passes_the_rest_through(clock: FakeClock) -> None:
    async with client(shield(APP, clock, postprocessor=PostProcessor(fail_on=2))) as c:
        r = await c.get("/stream")
    assert r.content == b"aabbcdef"


class Reading(Doubling):
    """Only reads (``observes_only``): whatever ``feed`` returns must be ignored."""

    observes_only = True

    def __init__(self, fail_on: int | None = None) -> None:
        super().__init__(fail_on)
        self.seen: list[bytes] = []

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        self.seen.append(chunk)
        return super().feed(chunk, more_body)


@pytest.mark.parametrize("fail_on", [None, 1])
async def test_a_reading_transform_holds_nothing_back(fail_on: int | None) -> None:
    from asgi_extraction_shield.responder import Responder

    sent: list[dict[str, Any]] = []
    reading = Reading(fail_on)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    responder = Responder(send, [(b"ratelimit", b"x")], reading)
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")],
    }
    await responder(start)
    assert len(sent) == 1 and not reading.seen  # the start went out before any body
    assert sent[0]["headers"][-1] == (b"ratelimit", b"x")
    for part, more in ((b'{"p":', True), (b"[0.5]}", False)):
        await responder({"type": "http.response.body", "body": part, "more_body": more})
    assert [m["body"] for m in sent[1:]] == [b'{"p":', b"[0.5]}"]  # as they came
    assert reading.seen == ([b'{"p":', b"[0.5]}"] if fail_on is None else [b'{"p":'])
    assert sent[0]["headers"][1] == (b"content-length", b"11")
