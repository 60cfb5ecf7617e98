"""Response post-processing (perturbations and watermarks)."""

from .base import PostProcessor, ResponseTransform

__all__ = ["PostProcessor", "ResponseTransform"]
