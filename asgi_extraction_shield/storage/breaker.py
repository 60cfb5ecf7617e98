"""A circuit breaker: stop calling a backend that keeps failing, and probe it for recovery.

The circuit-breaker pattern (M. Nygard, *Release It!*, 2007): a remote call that fails
repeatedly is likely to keep failing, and every attempt costs the caller a full timeout.
After ``threshold`` consecutive failures the circuit *opens*: calls are refused at once
(the caller falls back or fails fast) for ``cooldown`` seconds. Then it is *half-open*:
exactly one call, the trial, goes through while the others are still refused; its
success *closes* the circuit, its failure opens it for another cool-down. A backend that
comes back is thus noticed within one cool-down, at the price of one trial per
cool-down while it is down.
"""

from __future__ import annotations

import time
from typing import Literal

from ..limiter import Clock

State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Counts consecutive failures of one backend; not thread-safe (one event loop)."""

    def __init__(self, threshold: int = 3, cooldown: float = 1.0, clock: Clock = time.monotonic):
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if cooldown <= 0:
            raise ValueError("cooldown must be positive")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.failures = 0
        """Consecutive failures so far (reset by a success)."""
        self._open_until: float | None = None
        self._trial = False

    @property
    def state(self) -> State:
        if self._open_until is None:
            return "closed"
        return "half-open" if self._trial or self._clock() >= self._open_until else "open"

    def allow(self) -> bool:
        """True when a call may go through now (closed, or the one trial of half-open)."""
        if self._open_until is None:
            return True
        if self._trial or self._clock() < self._open_until:
            return False
        self._trial = True
        return True

    def succeeded(self) -> bool:
        """Record a success; true when it closed an open circuit (the backend recovered)."""
        recovered = self._open_until is not None
        self.failures = 0
        self._open_until = None
        self._trial = False
        return recovered

    def failed(self) -> bool:
        """Record a failure; true when it opened a closed circuit (to report it once)."""
        self.failures += 1
        was_closed = self._open_until is None
        if self.failures >= self.threshold or not was_closed:
            self._open_until = self._clock() + self.cooldown
        self._trial = False
        return was_closed and self._open_until is not None

    def abandoned(self) -> None:
        """A call ended without an answer either way (cancelled): free the trial slot.

        Without this, a trial whose request was cancelled (client gone) would leave the
        circuit open for ever.
        """
        self._trial = False
