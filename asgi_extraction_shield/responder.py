"""The ``send`` wrapper of one protected request: headers added, body optionally rewritten.

Made per request (state never lives on the middleware). Without a transform, messages
pass through as they come, so streaming responses stay streaming. With one, the
response start is held until the first body message: a single-message body is rewritten
whole and gets a correct ``Content-Length``; a multi-message body is rewritten chunk by
chunk and sent without ``Content-Length``. If the transform fails, the original bytes
are sent instead and the rest passes through untouched. A transform that only reads the
response (``observes_only``: the monitor's margins, no perturbation) holds nothing back:
the start and every chunk go out as they come, read on the way.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.types import Message, Send

from .postprocess.base import ResponseTransform

logger = logging.getLogger("asgi_extraction_shield")


def with_headers(send: Send, extra_headers: list[tuple[bytes, bytes]]) -> Send:
    """A ``send`` that adds headers to the response start: the common, cheapest case."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra_headers]}
        await send(message)

    return send_with_headers


class Responder:
    __slots__ = ("extra_headers", "reading", "send", "start", "transform", "transform_errors")

    def __init__(
        self,
        send: Send,
        extra_headers: list[tuple[bytes, bytes]],
        transform: ResponseTransform | None = None,
    ) -> None:
        self.send = send
        self.extra_headers = extra_headers
        self.transform = transform
        self.reading = bool(getattr(transform, "observes_only", False))
        """The transform only reads the response: nothing is held back."""
        self.start: Message | None = None
        self.transform_errors = 0

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.extra_headers:
                message = {**message, "headers": [*message.get("headers", ()), *self.extra_headers]}
            if self.transform is not None and self._offered(message):
                if self.reading:
                    await self.send(message)  # nothing will change: no reason to hold it
                    return
                self.start = message
                return
            self.transform = None
            await self.send(message)
        elif kind == "http.response.body" and self.transform is not None:
            await self._body(message)
        else:
            if self.start is not None:  # e.g. pathsend: nothing to rewrite
                await self.send(self.start)
                self.start = None
                self.transform = None
            await self.send(message)

    def _offered(self, start: Message) -> bool:
        assert self.transform is not None
        headers = Headers(raw=start.get("headers", []))
        if "content-encoding" in headers:
            return False
        try:
            return self.transform.accepts(start["status"], headers)
        except Exception:
            self._failed()
            return False

    async def _body(self, message: Message) -> None:
        transform = self.transform
        assert transform is not None
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if self.reading:
            try:  # read, for the monitor; the bytes go out as they came
                transform.feed(chunk, more)
            except Exception:
                self._failed()
                self.transform = None
            await self.send(message)
            return
        start, self.start = self.start, None
        try:
            out = transform.feed(chunk, more)
        except Exception:
            self._failed()
            out = transform.unprocessed() + chunk if start is None else chunk
            self.transform = None
        if start is not None:
            headers = [
                (k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"
            ]
            if not more:
                headers.append((b"content-length", str(len(out)).encode()))
            await self.send({**start, "headers": headers})
        await self.send({**message, "body": out, "more_body": more})

    def _failed(self) -> None:
        self.transform_errors += 1
        logger.exception("response transform failed; the original response is sent")
