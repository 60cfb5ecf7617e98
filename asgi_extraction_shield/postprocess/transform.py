"""The response transform that runs a post-processor chain on a model's answer.

JSON bodies are buffered (up to a bound), decoded, read into :class:`Outputs` by the
request's format adapter, changed by the chain and written back; if nothing changed, the
original bytes go out untouched. Server-sent-event streams (``text/event-stream``) are
processed event by event as they arrive, never buffered whole; ``[DONE]`` and non-data
lines are kept. Anything that cannot be parsed passes unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
from starlette.datastructures import Headers

from ..formats.base import Outputs, ParsedRequest
from ..identity import Identity
from ..policy import Action
from .chain import Chain, Context

Observer = Callable[[Identity, Outputs], None]
"""Sees the outputs of every parsed answer (the monitor's low-margin signal)."""

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_JSON_TYPES = ("application/json",)


def _dumps(doc: Any) -> bytes:
    # Compact UTF-8, as Starlette's JSONResponse writes it. orjson: several times faster
    # than the standard library on the response path (benchmarks/overhead.py).
    return orjson.dumps(doc)


class OutputTransform:
    """Runs ``chain`` on one response (see the module docstring)."""

    def __init__(
        self,
        request: ParsedRequest,
        chain: Chain,
        ctx: Context,
        max_bytes: int,
        observe: Callable[[Outputs], None] | None = None,
    ) -> None:
        assert request.adapter is not None
        self.request = request
        self.adapter = request.adapter
        self.chain = chain
        self.ctx = ctx
        self.max_bytes = max_bytes
        self.observe = observe
        self._buffer = b""
        self._stream = False
        self._passthrough = False
        self.observes_only = not chain
        """No processor: the response is read (for ``observe``), never changed."""

    def accepts(self, status: int, headers: Headers) -> bool:
        if not 200 <= status < 300:
            return False
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "text/event-stream":
            self._stream = True
            return True
        return media in _JSON_TYPES or (
            media.startswith("application/") and media.endswith("+json")
        )

    def feed(self, chunk: bytes, more_body: bool) -> bytes:
        data = self._buffer + chunk
        if self._passthrough:
            self._buffer = b""
            return data
        if self._stream:
            return self._feed_events(data, more_body)
        if more_body:
            if len(data) > self.max_bytes:  # too large to rewrite: stream it out as it is
                self._passthrough = True
                self._buffer = b""
                return data
            self._buffer = data
            return b""
        self._buffer = b""
        return self._process_document(data)

    def unprocessed(self) -> bytes:
        return self._buffer

    def _process_document(self, body: bytes) -> bytes:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
        new = self._process(doc)
        return body if new is None else _dumps(new)

    def _process(self, doc: Any) -> Any | None:
        """The changed document, or ``None`` when nothing changed."""
        outputs = self.adapter.read_response(doc, self.request)
        if outputs is None:
            return None
        if self.observe is not None:
            self.observe(outputs)
        changed = False
        for processor in self.chain:
            changed |= processor.apply(outputs, self.ctx)
        if not changed:
            return None
        return self.adapter.write_response(doc, outputs, self.request)

    def _feed_events(self, data: bytes, more_body: bool) -> bytes:
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            out.append(self._process_event(data[start : match.start()]) + match.group())
            start = match.end()
        rest = data[start:]
        if not more_body:
            out.append(self._process_event(rest) if rest.strip() else rest)
            rest = b""
        elif len(rest) > self.max_bytes:
            self._passthrough = True
            out.append(rest)
            rest = b""
        self._buffer = rest
        return b"".join(out)

    def _process_event(self, event: bytes) -> bytes:
        lines = event.splitlines()
        data_lines = [line for line in lines if line.startswith(b"data:")]
        if not data_lines:
            return event
        payload = b"\n".join(line[5:].removeprefix(b" ") for line in data_lines)
        if payload.strip() == b"[DONE]":
            return event
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        new = self._process(doc)
        if new is None:
            return event
        kept = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*kept, b"data: " + _dumps(new)])


class ChainPostProcessor:
    """Chooses the chain for a request (by the identity's policy level) and builds its
    transform. ``chains`` maps levels to chains; ``default`` serves the other levels."""

    def __init__(
        self,
        key: bytes,
        default: Chain,
        chains: dict[str, Chain] | None = None,
        max_bytes: int = 32 * 1024 * 1024,
        observer: Observer | None = None,
    ) -> None:
        self.key = key
        self.default = default
        self.chains = chains or {}
        self.max_bytes = max_bytes
        self.observer = observer

    def transform_for(
        self, identity: Identity, request: ParsedRequest, action: Action
    ) -> OutputTransform | None:
        if request.adapter is None or not request.parsed:
            return None
        chain = self.chains.get(action.level, self.default)
        observer = self.observer
        if not chain and observer is None:
            return None
        observe = None if observer is None else partial(observer, identity)
        return OutputTransform(
            request, chain, Context(self.key, identity.key, request), self.max_bytes, observe
        )
