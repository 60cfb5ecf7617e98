"""What one run of the lab does: budgets, populations, pacing, and the shield's settings.

Two presets: :func:`quick` (small budgets and populations, a few seconds, for CI) and
:func:`full` (budgets up to 10,000 queries per attack, 60 benign users). Everything
random is drawn from generators seeded by ``seed`` and the name of what draws, so a run
is reproducible whatever the number of worker processes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

ATTACKS = ("uniform", "jbda", "knockoff", "boundary")
SPLITS = ("single", "sybil", "spread")
"""One identity; sybils sharing two /24s; sybils each in their own /24 (only the cohort
pool sees them together). All sybils of a split are first seen within one cohort window."""

SECRET_KEY = "extraction-lab-fixed-secret-key-0001"


@dataclass(frozen=True)
class LabConfig:
    name: str
    seed: int = 20261129
    budgets: tuple[int, ...] = (500, 2_000, 10_000)
    """Budgets of the fidelity table (queries sent, refused ones included)."""
    curve: tuple[int, ...] = (250, 500, 1_000, 2_000, 5_000, 10_000)
    """Budgets of the fidelity plot."""
    attacks: tuple[str, ...] = ATTACKS
    sybils: int = 25
    benign_users: int = 60
    bystanders: int = 8
    """Benign users first seen in the same cohort window as the attacker, in every
    shielded attack world (they share its cohort pool)."""
    benign_median_queries: int = 120
    benign_max_queries: int = 1_000
    benign_spread_hours: float = 4.0
    """Benign users' first requests are spread over this many hours."""
    attacker_interval: float = 0.2
    """Seconds between two queries of a single-identity attacker (5 per second)."""
    sybil_interval: float = 5.0
    """Seconds between two queries of one sybil (25 sybils: 5 per second together)."""
    jbda_seeds: int = 156
    thief_seeds: int = 3
    """Training seeds the soft-label thief's fidelity is averaged over."""
    jbda_rounds: int = 6
    jobs: int = 2
    shield: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`ShieldSettings` for the shielded worlds, e.g.
    ``{"monitor": {"coverage": "0.3:0.6"}, "policy": {"degrade": 0.5}}``."""

    @property
    def max_budget(self) -> int:
        return max((*self.budgets, *self.curve))

    def rng(self, *names: str) -> np.random.Generator:
        """A generator of its own for each named random source."""
        words = [zlib.crc32(name.encode()) for name in names]
        return np.random.default_rng(np.random.SeedSequence([self.seed, *words]))

    def seed_of(self, *names: str) -> int:
        return int(self.rng(*names).integers(2**31 - 1))

    def with_overrides(self, overrides: dict[str, Any]) -> LabConfig:
        """This configuration with more shield settings (nested groups merged)."""
        return replace(self, shield=_merge(self.shield, overrides))


def quick() -> LabConfig:
    return LabConfig(
        name="quick",
        budgets=(100, 200),
        curve=(100, 200),
        sybils=20,
        benign_users=12,
        bystanders=2,
        benign_median_queries=60,
        benign_max_queries=150,
        benign_spread_hours=1.0,
        jbda_seeds=150,
        jbda_rounds=1,
        thief_seeds=1,
    )


def full() -> LabConfig:
    return LabConfig(name="full")


PRESETS = {"quick": quick, "full": full}


def parse_override(text: str) -> dict[str, Any]:
    """``monitor.coverage=0.3:0.6`` → ``{"monitor": {"coverage": "0.3:0.6"}}``.

    Values stay strings: :class:`ShieldSettings` validates and converts them.
    """
    path, eq, value = text.partition("=")
    if not eq or not path.strip():
        raise ValueError(f"{text!r}: expected 'group.field=value', e.g. 'policy.degrade=0.6'")
    result: dict[str, Any] = {}
    node = result
    parts = [p.strip() for p in path.split(".")]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value.strip()
    return result


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
