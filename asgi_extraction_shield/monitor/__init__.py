"""Query monitoring."""

from .base import NO_RISK, Assessment, Monitor, NullMonitor

__all__ = ["NO_RISK", "Assessment", "Monitor", "NullMonitor"]
