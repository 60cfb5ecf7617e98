"""Response post-processing (perturbations and watermarks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..keys import derive_key
from .base import PostProcessor, ResponseTransform
from .chain import Chain, Context, Processor, parse_chain
from .transform import ChainPostProcessor, Observer, OutputTransform

if TYPE_CHECKING:
    from ..settings import ShieldSettings
    from ..watermark.base import Watermark

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


def build_postprocessor(
    settings: ShieldSettings,
    secret: bytes,
    observer: Observer | None = None,
    *,
    graded: bool = False,
    watermarks: Sequence[Watermark] | None = None,
) -> ChainPostProcessor | None:
    """The post-processor of ``PERTURBATION`` and, with a graded policy, of the degraded
    levels, each followed by the watermarks (built from ``WATERMARK`` unless given);
    ``observer`` sees every parsed answer (the monitor's margins). ``None`` when there is
    nothing to do."""
    if watermarks is None:
        from ..watermark import build_watermarks

        watermarks = build_watermarks(settings, secret)
    marks = tuple(watermarks)
    chain = parse_chain(settings.perturbation) + marks
    chains: dict[str, Chain] = {}
    if graded:
        stronger = parse_chain(settings.policy.throttle_perturbation) + marks
        chains = {
            "degrade": parse_chain(settings.policy.degrade_perturbation) + marks,
            "throttle": stronger,
            "block": stronger,
        }
    if not chain and not any(chains.values()) and observer is None:
        return None
    return ChainPostProcessor(
        derive_key(secret, "postprocess"),
        chain,
        chains,
        max_bytes=settings.max_response_bytes,
        observer=observer,
    )
