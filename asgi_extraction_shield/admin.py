"""The admin route: identity state as JSON, and lifting a penalty. Off by default.

Served by the middleware itself under ``ADMIN_PATH`` (``/_shield``) when ``ADMIN_TOKEN``
is set, before any limiting, so it works however the app is built::

    GET  /_shield/identities/<hash>        the state of a hashed identity (as in events)
    POST /_shield/identities/<hash>/lift   forget its level, risk, block and history
    GET  /_shield/identity                 the same for a raw key sent in X-Shield-Key
    POST /_shield/identity/lift

Every request needs ``Authorization: Bearer <ADMIN_TOKEN>`` (compared in constant time;
401 before anything else is looked at). Raw keys travel in a header, never in the URL,
so they stay out of access logs; answers name identities by their hashes only. Errors
are problem+json: 400 (no key, not a hash), 401, 404 (unknown route, or nothing is held
for the identity), 405.
"""

from __future__ import annotations

import hmac
import logging

from starlette.types import Receive, Scope, Send

from .identity import HASHED_KEY
from .introspection import Inspector
from .problem import send_json, send_problem

logger = logging.getLogger("asgi_extraction_shield")

RAW_KEY_HEADER = b"x-shield-key"


class AdminRoute:
    """The ASGI app of the admin route (see the module docstring)."""

    def __init__(self, path: str, token: str, inspector: Inspector) -> None:
        self.path = path.rstrip("/")
        self._expected = b"Bearer " + token.encode()
        self.inspector = inspector

    def serves(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if not hmac.compare_digest(headers.get(b"authorization", b""), self._expected):
            await send_problem(
                send,
                401,
                "about:blank",
                "Unauthorized",
                "The admin route needs the bearer token of EXTRACTION_SHIELD_ADMIN_TOKEN.",
                [(b"www-authenticate", b'Bearer realm="extraction-shield"')],
            )
            return
        parts = scope["path"][len(self.path) :].strip("/").split("/")
        lift = parts[-1] == "lift"
        if lift:
            parts.pop()
        if parts[0] == "identity" and len(parts) == 1:
            who = headers.get(RAW_KEY_HEADER, b"").decode("latin-1").strip()
            if not who:
                await _problem(send, 400, "Send the raw key in the X-Shield-Key header.")
                return
        elif parts[0] == "identities" and len(parts) == 2:
            who = parts[1]
            if not HASHED_KEY.match(who):  # never echoed: it may be a raw key sent by mistake
                detail = (
                    "Expected an identity hash such as 'header:<24 hex digits>'; "
                    "send raw keys in the X-Shield-Key header to GET /identity."
                )
                await _problem(send, 400, detail)
                return
        else:
            await _problem(send, 404, "No such admin route.", "Not Found")
            return
        method = "POST" if lift else "GET"
        if scope["method"] != method:
            await _problem(
                send, 405, f"Use {method}.", "Method Not Allowed", [(b"allow", method.encode())]
            )
            return
        if lift:
            lifted = await self.inspector.lift(who)
            if not lifted:
                await _problem(send, 404, "Nothing is held for this identity.", "Not Found")
                return
            logger.warning("admin route lifted the penalties of %s", ", ".join(lifted))
            await send_json(send, 200, {"lifted": lifted})
            return
        try:
            state = await self.inspector.inspect(who)
        except ValueError:  # a raw value that no configured source could have produced
            state = None
        if state is None or not state.known:
            await _problem(send, 404, "Nothing is held for this identity.", "Not Found")
            return
        await send_json(send, 200, state.to_dict())


async def _problem(
    send: Send,
    status: int,
    detail: str,
    title: str = "Bad Request",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_problem(send, status, "about:blank", title, detail, headers or [])
