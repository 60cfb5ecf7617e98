"""Request adapters: what a request asks of the model, and what it costs.

An adapter reads the (already buffered) body of a request and tells the limiter its
cost and the monitor its queries. This version ships the flat adapter (every request
costs one token); format-aware adapters (OpenAI, KServe, ...) plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from starlette.types import Scope


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the shield understood of a request.

    ``cost`` tokens are charged to the limiter; ``parsed`` is false when no adapter
    understood the body (the monitor treats such requests as opaque).
    """

    cost: int = 1
    parsed: bool = False


class RequestAdapter(Protocol):
    def parse_request(self, scope: Scope, body: bytes) -> ParsedRequest:
        """Never raises on bad input: an unparseable body gives ``parsed=False``."""
        ...


class FlatCost:
    """Every request costs ``cost`` tokens, whatever its body."""

    def __init__(self, cost: int = 1) -> None:
        if cost < 0:
            raise ValueError("cost must be non-negative")
        self._request = ParsedRequest(cost=cost)

    def parse_request(self, scope: Scope, body: bytes) -> ParsedRequest:
        return self._request
