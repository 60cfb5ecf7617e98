"""Structured events: what the shield decided, for logs, alerts and dashboards.

Every event is logged as one JSON object per line on the ``asgi_extraction_shield``
logger and handed to the optional ``on_event`` callable (sync or async). Identities
in events are the keyed hashes of :mod:`~asgi_extraction_shield.identity`, never raw
API keys or tokens.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

logger = logging.getLogger("asgi_extraction_shield")

EventKind = Literal["rate_limited", "level_changed", "blocked", "storage_error", "internal_error"]
OnEvent = Callable[["ShieldEvent"], Awaitable[None] | None]

_LEVELS: dict[str, int] = {
    "rate_limited": logging.INFO,
    "level_changed": logging.WARNING,
    "blocked": logging.WARNING,
    "storage_error": logging.ERROR,
    "internal_error": logging.ERROR,
}


@dataclass(frozen=True, slots=True)
class ShieldEvent:
    """One decision of the shield.

    ``identity`` is a hashed identity key; ``level`` the policy level of the identity
    (``normal`` until the monitor raises it); ``risk`` in [0, 1]; ``signals`` the named
    numbers behind the decision; ``time`` seconds since the epoch; ``shadow`` is true
    when the decision was not enforced (``MODE=shadow``).
    """

    kind: EventKind
    identity: str
    level: str = "normal"
    risk: float = 0.0
    signals: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""
    time: float = field(default_factory=time.time)
    shadow: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["signals"] = dict(self.signals)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)


class EventEmitter:
    """Logs events and forwards them to ``on_event``; a failing hook never fails a request."""

    def __init__(self, on_event: OnEvent | None = None) -> None:
        self.on_event = on_event
        self.hook_errors = 0

    async def emit(self, event: ShieldEvent) -> None:
        level = _LEVELS.get(event.kind, logging.INFO)
        if logger.isEnabledFor(level):
            logger.log(level, event.to_json())
        if self.on_event is None:
            return
        try:
            result = self.on_event(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.hook_errors += 1
            logger.exception("on_event hook failed for a %s event", event.kind)
