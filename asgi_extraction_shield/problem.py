"""``application/problem+json`` responses (RFC 9457) and the other JSON the shield sends itself."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.types import Send

PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
QUOTA_EXCEEDED = PROBLEM_TYPES + "quota-exceeded"
ABNORMAL_USAGE = PROBLEM_TYPES + "abnormal-usage-detected"


async def send_problem(
    send: Send,
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    **extra: Any,
) -> None:
    """Send a complete problem+json response."""
    payload = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    await send_json(send, status, payload, headers, b"application/problem+json")


async def send_json(
    send: Send,
    status: int,
    payload: Any,
    headers: Iterable[tuple[bytes, bytes]] = (),
    content_type: bytes = b"application/json",
) -> None:
    """Send a complete JSON response, never cached."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
