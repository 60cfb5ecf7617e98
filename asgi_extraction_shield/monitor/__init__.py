"""Query monitoring: features, trackers, signals and risk."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..keys import derive_key
from ..limiter import Clock
from .base import NO_RISK, Assessment, Monitor, NullMonitor
from .detector import ExtractionMonitor
from .risk import SignalRule, risk_of
from .shapiro import shapiro_wilk

if TYPE_CHECKING:
    from ..settings import ShieldSettings
    from ..storage.base import Storage

__all__ = [
    "NO_RISK",
    "Assessment",
    "ExtractionMonitor",
    "Monitor",
    "NullMonitor",
    "SignalRule",
    "build_monitor",
    "risk_of",
    "shapiro_wilk",
]


def build_monitor(
    settings: ShieldSettings, secret: bytes, clock: Clock, storage: Storage | None = None
) -> ExtractionMonitor | None:
    """The monitor ``MONITOR__*`` describes, or ``None`` when it is disabled; on a Redis
    ``storage`` it shares its observations with the other processes."""
    config = settings.monitor
    if not config.enabled:
        return None
    from ..settings import parse_rule
    from .tracker import TrackerConfig

    rules = config.rules()
    pool_rules = {**rules, "prada_w": parse_rule(config.pool_prada_w)}
    monitor = ExtractionMonitor(
        derive_key(secret, "monitor"),
        rules,
        pool_rules=pool_rules,
        dim=config.dim,
        config=TrackerConfig(history=config.history, simhash_bits=config.simhash_bits),
        min_queries=config.min_queries,
        max_identities=config.max_identities,
        pools=tuple(config.pools),
        ipv4_pool_prefix=config.ipv4_pool_prefix,
        ipv6_pool_prefix=config.ipv6_pool_prefix,
        cohort_seconds=config.cohort_seconds,
        clock=clock,
    )
    from ..storage.redis import RedisStorage

    if isinstance(storage, RedisStorage):
        from ..storage.redis_observations import RedisObservations

        monitor.shared = RedisObservations(storage, every=monitor.assess_every)
    return monitor
