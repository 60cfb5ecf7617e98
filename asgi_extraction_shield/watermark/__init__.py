"""Watermarks: keyed marks in the answers, and their verification against a suspect.

``WATERMARK`` (a chain spec, as ``PERTURBATION``) names the watermark processors, which
the response chain runs after the perturbation of every policy level; ``SCHEMES`` holds
their verifiers, which :func:`asgi_extraction_shield.verify.verify` and
``extraction-shield verify`` use. Register a new watermark in both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from ..formats.base import ParsedRequest
from ..postprocess.chain import parse_chain
from .base import ReferenceScheme, Scheme, VerifyResult, Watermark, watermark_key
from .dawn import DAWN
from .drw import DRW
from .embmarker import EmbMarker, EmbMarkerScheme
from .text import TextMark, TextScheme

if TYPE_CHECKING:
    from ..settings import ShieldSettings

__all__ = [
    "SCHEMES",
    "WATERMARKS",
    "ReferenceScheme",
    "Scheme",
    "VerifyResult",
    "Watermark",
    "build_watermarks",
    "parse_scheme",
    "parse_watermarks",
    "rewrite_request",
    "watermark_key",
]

logger = logging.getLogger("asgi_extraction_shield")

WATERMARKS: dict[str, type[Watermark]] = {
    DAWN.name: DAWN,
    DRW.name: DRW,
    EmbMarker.name: EmbMarker,
    TextMark.name: TextMark,
}
"""Watermark processors by name (the names ``WATERMARK`` accepts)."""

SCHEMES: dict[str, type[Scheme]] = {
    DAWN.name: DAWN,
    DRW.name: DRW,
    EmbMarkerScheme.name: EmbMarkerScheme,
    TextScheme.name: TextScheme,
}
"""Verifiers by name (the names ``verify --scheme`` accepts), built with the same
parameters as the processor of that name."""


def parse_watermarks(spec: str) -> tuple[Watermark, ...]:
    """The (unbound) watermarks of a ``WATERMARK`` spec, e.g. ``drw:eps=0.1,dawn``;
    ``none`` or ``""`` is none. Raises ``ValueError``."""
    return parse_chain(spec, WATERMARKS)


def parse_scheme(spec: str) -> Scheme:
    """One verifier from ``name`` or ``name:param=value,...``. Raises ``ValueError``."""
    schemes = parse_chain(spec, SCHEMES)
    if len(schemes) != 1:
        raise ValueError(f"{spec!r}: expected one scheme of {', '.join(sorted(SCHEMES))}")
    return schemes[0]


def build_watermarks(settings: ShieldSettings, secret: bytes) -> tuple[Watermark, ...]:
    """The watermarks ``WATERMARK`` names, keyed by ``secret``."""
    watermarks = parse_watermarks(settings.watermark)
    for watermark in watermarks:
        watermark.bind(secret, settings)
    return watermarks


def rewrite_request(
    watermarks: Sequence[Watermark], request: ParsedRequest, body: bytes
) -> bytes | None:
    """The body to send upstream after the watermarks that rewrite requests had their
    say, or ``None`` when none changed it. A failing watermark is logged and skipped:
    the request goes on as it was."""
    if not request.parsed:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    changed = False
    for watermark in watermarks:
        try:
            new = watermark.rewrite_request(request, doc)
        except Exception:
            logger.exception(
                "watermark %s failed to rewrite a request; left as it was", watermark.name
            )
            continue
        if new is not None:
            doc, changed = new, True
    return orjson.dumps(doc) if changed else None
