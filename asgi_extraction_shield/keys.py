"""The secret key and what is derived from it.

``SECRET_KEY`` keys every hash of an identity and (in later layers) every keyed random
choice. Each use gets its own sub-key, derived with BLAKE2b personalisation, so that
one derived value never reveals another.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from pydantic import SecretStr

from .errors import ConfigurationError

logger = logging.getLogger("asgi_extraction_shield")

MIN_SECRET_LENGTH = 16


def generate_secret() -> str:
    """A new random secret, 256 bits, URL-safe (what ``extraction-shield keygen`` prints)."""
    return secrets.token_urlsafe(32)


def resolve_secret(secret: SecretStr | None, *, shared_storage: bool) -> bytes:
    """The configured secret as bytes, or a random per-process one with a warning.

    With a shared storage every process must hash identities alike, so a missing
    secret is a configuration error there rather than a silent split of state.
    """
    if secret is not None:
        value = secret.get_secret_value()
        if len(value) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"EXTRACTION_SHIELD_SECRET_KEY is too short ({len(value)} characters): use at "
                f"least {MIN_SECRET_LENGTH}; `extraction-shield keygen` prints a good one"
            )
        return value.encode()
    if shared_storage:
        raise ConfigurationError(
            "EXTRACTION_SHIELD_SECRET_KEY is required with a shared storage: every process "
            "must hash identities with the same key; `extraction-shield keygen` prints one"
        )
    logger.warning(
        "EXTRACTION_SHIELD_SECRET_KEY is not set: using a random key for this process only. "
        "Identity hashes (and watermarks) change at every restart and differ between "
        "workers; set a key from `extraction-shield keygen` in production."
    )
    return secrets.token_bytes(32)


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte sub-key of ``secret`` for one ``purpose`` (at most 16 ASCII characters)."""
    return hashlib.blake2b(secret, digest_size=32, person=purpose.encode()[:16]).digest()
