"""Storage backends, chosen by the scheme of ``STORAGE_URL``."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import ConfigurationError
from ..limiter import Clock
from .base import Storage
from .memory import MemoryStorage

__all__ = ["MemoryStorage", "Storage", "storage_from_url"]

_PLANNED = {"redis", "rediss", "redis+sentinel", "redis+cluster"}


def storage_from_url(url: str, *, max_identities: int, clock: Clock) -> Storage:
    """Build the storage named by ``url`` (``memory://`` today)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in MemoryStorage.schemes:
        return MemoryStorage(max_identities=max_identities, clock=clock)
    if scheme in _PLANNED:
        raise ConfigurationError(
            f"EXTRACTION_SHIELD_STORAGE_URL={url.split('@')[-1]!r}: the Redis backend is not "
            "available in this version; use 'memory://'"
        )
    raise ConfigurationError(
        f"EXTRACTION_SHIELD_STORAGE_URL={url.split('@')[-1]!r} has an unknown scheme "
        f"{scheme!r}; expected 'memory://'"
    )
