"""From signals to risk: each signal scored in [0, 1] between two thresholds, combined.

A signal contributes nothing below its ``low`` threshold and fully at its ``high`` one,
linearly in between (reversed for ``prada_w``, where low values are suspicious). Scores
are combined as a weighted noisy-OR, ``risk = 1 − Π(1 − wᵢ·sᵢ)``: one strong signal is
enough, several weak ones add up, and risk stays in [0, 1]. Signals that need a sample
(coverage, entropy, shares) count only after ``min_queries`` queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SignalRule:
    low: float
    high: float
    weight: float = 1.0
    needs_sample: bool = True

    def score(self, value: float) -> float:
        if self.high == self.low:
            return self.weight if value >= self.high else 0.0
        fraction = (value - self.low) / (self.high - self.low)
        return self.weight * min(1.0, max(0.0, fraction))


def risk_of(
    signals: Mapping[str, float], rules: Mapping[str, SignalRule], min_queries: int
) -> tuple[float, dict[str, float]]:
    """``(risk, per-signal scores)`` of a tracker's signals."""
    sampled = signals.get("queries", 0.0) >= min_queries
    scores: dict[str, float] = {}
    keep = 1.0
    for name, rule in rules.items():
        if name not in signals or (rule.needs_sample and not sampled):
            continue
        score = rule.score(signals[name])
        if score > 0:
            scores[name] = score
            keep *= 1.0 - score
    return 1.0 - keep, scores
