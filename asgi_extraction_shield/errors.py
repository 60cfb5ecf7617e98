"""The shield's exception types."""

from __future__ import annotations


class ShieldError(Exception):
    """Base class of every error the shield raises on purpose."""


class ConfigurationError(ShieldError, ValueError):
    """A setting or constructor argument is invalid; raised when the middleware is built."""


class StorageError(ShieldError):
    """A storage backend failed; the middleware applies ``FAILURE_MODE``."""
