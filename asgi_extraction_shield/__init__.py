"""asgi_extraction_shield: drop-in ASGI middleware against model extraction.

``app.add_middleware(ExtractionShield)`` and configure with ``EXTRACTION_SHIELD_*``
environment variables (see :class:`ShieldSettings`).
"""

from .errors import ConfigurationError, ShieldError, StorageError
from .events import ShieldEvent
from .identity import Identity
from .introspection import IdentityState, ShieldHandle
from .limiter import Decision, Rate
from .middleware import ExtractionShield
from .settings import ShieldSettings

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "Decision",
    "ExtractionShield",
    "Identity",
    "IdentityState",
    "Rate",
    "ShieldError",
    "ShieldEvent",
    "ShieldHandle",
    "ShieldSettings",
    "StorageError",
    "__version__",
]
