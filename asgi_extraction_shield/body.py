"""Reading a request body once, bounded, and replaying it to the application."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Message, Receive, Scope


@dataclass(slots=True)
class BufferedBody:
    """What was read of a request body.

    ``complete`` is false when reading stopped before the end (the rest is still
    unread); ``too_large`` when the body is, or is declared, larger than the bound;
    ``disconnected`` when the client went away while we read.
    """

    body: bytes
    complete: bool
    too_large: bool = False
    disconnected: bool = False
    pending: Message | None = None
    """A message received but not consumed (replayed as it is)."""

    def replay(self, receive: Receive) -> Receive:
        """A ``receive`` that yields what was read, then hands over to the real one.

        After the body (complete or not) every call goes to the server's ``receive``,
        so the rest of an oversized body streams through and ``http.disconnect`` still
        reaches the application.
        """
        if self.pending is not None:
            pending = [self.pending]
        elif self.disconnected:
            pending = [{"type": "http.disconnect"}]
        else:
            pending = [{"type": "http.request", "body": self.body, "more_body": not self.complete}]

        async def replaying_receive() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replaying_receive


def with_body_length(scope: Scope, length: int) -> Scope:
    """A copy of ``scope`` whose ``Content-Length`` is ``length`` (for a rewritten body)."""
    headers = [
        (k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


def declared_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> BufferedBody:
    """Read the body up to ``limit`` bytes (``complete=False`` past it)."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        body = message.get("body", b"")  # the common case: one message
        return BufferedBody(body, complete=True, too_large=len(body) > limit)
    length = declared_length(scope)
    if length is not None and length > limit:
        return BufferedBody(b"", complete=False, too_large=True, pending=message)
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            return BufferedBody(b"".join(chunks), complete=False, disconnected=True)
        chunk = message.get("body", b"")
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
        if not message.get("more_body", False):
            return BufferedBody(b"".join(chunks), complete=True, too_large=size > limit)
        if size > limit:
            return BufferedBody(b"".join(chunks), complete=False, too_large=True)
        message = await receive()
