"""Payload formats understood by the shield, and the choice among them (``FORMAT``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Scope

from ..errors import ConfigurationError
from .base import (
    DISTRIBUTION_FLAGS,
    FlatCost,
    FormatAdapter,
    Outputs,
    ParsedRequest,
    RequestAdapter,
    TokenLogprobs,
)
from .generic import GenericJSON
from .hf import HuggingFace
from .kserve_v1 import KServeV1
from .oip_v2 import OpenInferenceV2
from .openai_api import OpenAIAdapter

if TYPE_CHECKING:
    from ..settings import ShieldSettings

__all__ = [
    "FlatCost",
    "FormatAdapter",
    "Outputs",
    "ParsedRequest",
    "PayloadAdapter",
    "RequestAdapter",
    "TokenLogprobs",
    "build_adapter",
]


def decode_json(body: bytes) -> Any:
    """The JSON document of a body, or ``None`` when it is not JSON."""
    stripped = body.lstrip()
    if not stripped or stripped[:1] not in (b"{", b"["):
        return None
    try:
        return orjson.loads(body)  # strict JSON: NaN, Infinity and 65-bit integers are not
    except orjson.JSONDecodeError:
        return None


class PayloadAdapter:
    """Decodes the body once, picks the format adapter and applies the cost rules."""

    def __init__(
        self,
        adapters: dict[str, FormatAdapter],
        forced: str | None = None,
        distribution_cost: float = 1.0,
    ) -> None:
        self.adapters = adapters
        self.forced = forced
        self.distribution_cost = distribution_cost

    def choose(self, scope: Scope, doc: Any) -> FormatAdapter | None:
        if self.forced is not None:
            return self.adapters[self.forced]
        path: str = scope.get("path", "")
        if path.endswith(("/chat/completions", "/completions", "/embeddings")):
            return self.adapters.get("openai")
        if isinstance(doc, dict):
            inputs = doc.get("inputs")
            if "/v2/models/" in path or (
                isinstance(inputs, list)
                and inputs
                and all(isinstance(t, dict) and "datatype" in t for t in inputs)
            ):
                return self.adapters.get("oip_v2")
            if "instances" in doc or path.endswith(":predict"):
                return self.adapters.get("kserve_v1")
            if isinstance(inputs, str) or (
                isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs)
            ):
                return self.adapters.get("hf")
        return self.adapters.get("generic")

    def parse_request(self, scope: Scope, body: bytes) -> ParsedRequest:
        if not body.strip():
            return ParsedRequest()  # no payload (a GET, say): nothing to parse, nothing wrong
        doc = decode_json(body)
        if doc is None:
            return ParsedRequest(problem="the body is not valid JSON")
        adapter = self.choose(scope, doc)
        if adapter is None:
            return ParsedRequest(problem="the body is not a payload of a known model format")
        request = adapter.parse_request(scope, doc, body)
        if request.flags & DISTRIBUTION_FLAGS and self.distribution_cost != 1.0:
            request.cost = math.ceil(request.cost * self.distribution_cost)
        return request


def build_adapter(settings: ShieldSettings) -> RequestAdapter:
    """The request adapter that ``FORMAT`` names."""
    if settings.format == "none":
        return FlatCost()
    adapters: dict[str, FormatAdapter] = {
        "kserve_v1": KServeV1(),
        "oip_v2": OpenInferenceV2(),
        "hf": HuggingFace(),
        "openai": OpenAIAdapter(settings.openai),
    }
    if settings.generic.inputs or settings.format == "generic":
        adapters["generic"] = GenericJSON(settings.generic)
    if settings.format != "auto" and settings.format not in adapters:
        raise ConfigurationError(
            f"EXTRACTION_SHIELD_FORMAT={settings.format!r} is not available yet"
        )
    forced = None if settings.format == "auto" else settings.format
    return PayloadAdapter(adapters, forced, settings.distribution_cost)
