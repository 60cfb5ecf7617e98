"""Response post-processing (perturbations and watermarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..keys import derive_key
from .base import PostProcessor, ResponseTransform
from .chain import Chain, Context, Processor, parse_chain
from .transform import ChainPostProcessor, OutputTransform

if TYPE_CHECKING:
    from ..settings import ShieldSettings

__all__ = [
    "Chain",
    "ChainPostProcessor",
    "Context",
    "OutputTransform",
    "PostProcessor",
    "Processor",
    "ResponseTransform",
    "build_postprocessor",
    "parse_chain",
]


def build_postprocessor(settings: ShieldSettings, secret: bytes) -> ChainPostProcessor | None:
    """The post-processor ``PERTURBATION`` describes (``None`` when it is ``none``)."""
    chain = parse_chain(settings.perturbation)
    if not chain:
        return None
    return ChainPostProcessor(
        derive_key(secret, "postprocess"), chain, max_bytes=settings.max_response_bytes
    )
