"""Storage backends, chosen by the scheme of ``STORAGE_URL`` (a registry, as in ``limits``)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from ..limiter import Clock
from .base import Storage
from .memory import MemoryStorage
from .redis import RedisStorage

__all__ = ["MemoryStorage", "RedisStorage", "Storage", "storage_from_url"]

_PLANNED = {"redis+sentinel", "redis+cluster"}


def storage_from_url(
    url: str,
    *,
    max_identities: int,
    clock: Clock,
    failure_mode: Literal["open", "closed"] = "open",
    redis_timeout: float = 0.1,
    redis_prefix: str = "shield",
) -> Storage:
    """Build the storage named by ``url``: ``memory://``, ``redis://`` or ``rediss://``.

    A Redis storage gets an in-process fallback (bounded by ``max_identities``) when
    ``failure_mode`` is ``open``, and none when it is ``closed`` (a Redis failure then
    raises :class:`~asgi_extraction_shield.errors.StorageError`: 503).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in MemoryStorage.schemes:
        return MemoryStorage(max_identities=max_identities, clock=clock)
    if scheme in RedisStorage.schemes:
        fallback = (
            MemoryStorage(max_identities=max_identities, clock=clock)
            if failure_mode == "open"
            else None
        )
        return RedisStorage(url, prefix=redis_prefix, timeout=redis_timeout, fallback=fallback)
    if scheme in _PLANNED:
        raise ConfigurationError(
            f"EXTRACTION_SHIELD_STORAGE_URL={url.split('@')[-1]!r}: Redis Sentinel and Redis "
            "Cluster are not supported in this version; use 'redis://' or 'rediss://' "
            "(a primary, or a proxy in front of the cluster)"
        )
    raise ConfigurationError(
        f"EXTRACTION_SHIELD_STORAGE_URL={url.split('@')[-1]!r} has an unknown scheme "
        f"{scheme!r}; expected 'memory://', 'redis://' or 'rediss://'"
    )
