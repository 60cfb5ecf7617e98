"""``ShieldSettings``: every option, read from ``EXTRACTION_SHIELD_*`` environment variables.

This is the only module that reads the environment. Values are validated here, when
the settings are built (that is, when the middleware is built); a bad value raises
:class:`~asgi_extraction_shield.errors.ConfigurationError` naming the variable, the
value and the accepted form.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import TypedDict

from .errors import ConfigurationError
from .identity import parse_networks, parse_sources
from .limiter import Rate
from .postprocess.chain import parse_chain

ENV_PREFIX = "EXTRACTION_SHIELD_"

logger = logging.getLogger("asgi_extraction_shield")

DEFAULT_EXEMPT_PATHS = ["/health", "/healthz", "/metrics", "/docs", "/redoc", "/openapi.json"]

CommaList = Annotated[list[str], NoDecode]


def _split(value: Any) -> Any:
    """Lists come from the environment as ``a,b,c`` (or a JSON array)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"not a valid JSON array ({exc.msg}): expected 'a,b,c' or '[\"a\",\"b\"]'"
                ) from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


FormatName = Literal["auto", "none", "kserve_v1", "oip_v2", "openai", "hf", "generic"]


class OpenAISettings(BaseModel):
    """Request hardening for OpenAI-compatible endpoints (``OPENAI__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_top_logprobs: int = Field(
        5,
        ge=0,
        le=20,
        description="Cap on top_logprobs asked of the upstream; larger requests are lowered to it.",
    )
    max_logit_bias: int = Field(
        50,
        ge=0,
        description="Most logit_bias entries a request may carry; more gets 400 problem+json.",
    )
    logit_bias_with_logprobs: Literal["drop_logprobs", "reject", "allow"] = Field(
        "drop_logprobs",
        description="A request with both logit_bias and logprobs: 'drop_logprobs' removes "
        "the logprobs request upstream, 'reject' answers 400, 'allow' passes it.",
    )


class GenericSettings(BaseModel):
    """``FORMAT=generic``: dotted paths to the batch lists in request and response (``GENERIC__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: str = Field(
        "", description="Dotted path of the list of inputs in the request, e.g. 'data.rows'."
    )
    outputs: str = Field(
        "", description="Dotted path of the list of outputs in the response, e.g. 'result'."
    )
    output_kind: Literal["auto", "probabilities", "embeddings", "scores"] = Field(
        "auto",
        description="What the output rows are; 'auto' takes rows on the simplex as "
        "probabilities and other numeric rows as scores.",
    )


class ShieldSettings(BaseSettings):
    """Configuration of :class:`~asgi_extraction_shield.ExtractionShield`.

    Every field is read from ``EXTRACTION_SHIELD_<FIELD>`` (upper case) unless passed
    to the constructor; nested groups (in later versions) use ``__``.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    mode: Literal["enforce", "shadow"] = Field(
        "enforce",
        description="'enforce' acts on decisions; 'shadow' computes and reports them "
        "(events, logs) but never refuses a request and adds no headers.",
    )
    rate_limit: str = Field(
        "600/minute",
        description="Sustained rate per identity, '<count>/<unit>' with unit second, "
        "minute, hour or day (e.g. '600/minute', '10/5 seconds').",
    )
    burst: int | None = Field(
        None,
        ge=1,
        description="Bucket capacity: the most tokens an identity can spend at once. "
        "Unset: the count of RATE_LIMIT.",
    )
    identity: CommaList = Field(
        ["header:x-api-key", "bearer", "ip"],
        description="Ordered identity sources, first match wins: 'header:<name>', "
        "'bearer' (Authorization: Bearer), 'ip'. Comma-separated.",
    )
    anonymous: Literal["shared", "reject"] = Field(
        "shared",
        description="A request no source identifies: 'shared' puts it in one shared "
        "'anonymous' identity; 'reject' answers 401 problem+json.",
    )
    trusted_proxies: CommaList = Field(
        [],
        description="Peers (CIDRs or addresses, comma-separated; '*' for any) whose "
        "PROXY_HEADER is believed. Empty: the ASGI peer is the client.",
    )
    proxy_header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for",
        description="The forwarding header your trusted proxies set: 'x-forwarded-for' or "
        "'forwarded' (RFC 7239). Only this one is read, so a client cannot smuggle the other.",
    )
    ipv4_prefix: int = Field(
        32, ge=0, le=32, description="IPv4 clients are aggregated to this prefix length."
    )
    ipv6_prefix: int = Field(
        64, ge=0, le=128, description="IPv6 clients are aggregated to this prefix length."
    )
    protected_paths: CommaList = Field(
        ["*"],
        description="Glob patterns of paths the shield examines ('*' matches '/' too). "
        "Comma-separated. Default: every path not exempt.",
    )
    exempt_paths: CommaList = Field(
        DEFAULT_EXEMPT_PATHS,
        description="Paths (exact or glob) passed through untouched, checked first. "
        "Comma-separated.",
    )
    max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=0,
        description="Largest request body read on a protected path; larger gets 413 problem+json.",
    )
    max_identities: int = Field(
        100_000,
        ge=1,
        description="Most identities held in memory at once (memory:// storage). When "
        "full, newcomers share one overflow bucket; nobody is evicted.",
    )
    storage_url: str = Field(
        "memory://",
        description="Where state lives: 'memory://' (this process). 'redis://' comes with "
        "the Redis backend.",
    )
    failure_mode: Literal["open", "closed"] = Field(
        "open",
        description="When the shield itself fails: 'open' logs it and lets the request "
        "through; 'closed' answers 503 problem+json.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Keys identity hashes and all keyed randomness (at least 16 "
        "characters). Unset: random per process, with a warning.",
    )
    expose_headers: bool = Field(
        True,
        description="Send RateLimit-Policy and RateLimit headers (they also tell an "
        "extractor your limits).",
    )
    format: FormatName = Field(
        "auto",
        description="Payload format: 'auto' (by path and body shape), 'kserve_v1', "
        "'oip_v2', 'openai', 'hf', 'generic' (GENERIC__* paths) or 'none' (cost 1, "
        "bodies not read for queries).",
    )
    strict: bool = Field(
        False,
        description="Answer 400 problem+json to a protected request whose body the format "
        "cannot parse, instead of passing it to the app unexamined.",
    )
    distribution_cost: float = Field(
        2.0,
        ge=1.0,
        le=1000.0,
        description="Cost multiplier for requests that ask for full distributions "
        "(logprobs, top_logprobs, probability vectors).",
    )
    perturbation: str = Field(
        "none",
        description="Post-processor chain applied to model outputs, e.g. 'top_k:5,round:3' "
        "or 'reverse_sigmoid:beta=1,gamma=0.2'; 'none' leaves outputs unchanged.",
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="Largest JSON response body buffered for post-processing; larger ones "
        "pass through unchanged.",
    )
    openai: OpenAISettings = Field(
        default_factory=lambda: OpenAISettings(),
        description="OpenAI-compatible endpoints (request hardening).",
    )
    generic: GenericSettings = Field(
        default_factory=lambda: GenericSettings(),
        description="FORMAT=generic: where inputs and outputs are in the JSON bodies.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None
        _warn_unknown_env()

    @field_validator(
        "identity", "trusted_proxies", "protected_paths", "exempt_paths", mode="before"
    )
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        Rate.parse(value)
        return value

    @field_validator("identity")
    @classmethod
    def _check_identity(cls, value: list[str]) -> list[str]:
        parse_sources(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @field_validator("protected_paths", "exempt_paths")
    @classmethod
    def _check_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith(("/", "*")):
                raise ValueError(f"{path!r} is not a path pattern: expected '/...' or a glob")
        return value

    @field_validator("perturbation")
    @classmethod
    def _check_chain(cls, value: str) -> str:
        parse_chain(value)
        return value

    @property
    def rate(self) -> Rate:
        return Rate.parse(self.rate_limit)

    def describe(self) -> list[tuple[str, str, str]]:
        """``(env var, effective value, description)`` per field, secrets masked."""
        rows: list[tuple[str, str, str]] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                for sub, subfield in type(value).model_fields.items():
                    var = f"{ENV_PREFIX}{name.upper()}__{sub.upper()}"
                    rows.append((var, _show(getattr(value, sub)), subfield.description or ""))
                continue
            rows.append((ENV_PREFIX + name.upper(), _show(value), field.description or ""))
        return rows


def _show(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "**********"
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class ShieldOverrides(TypedDict, total=False):
    """Keyword overrides of :class:`ShieldSettings` (typed, so that type checkers see typos)."""

    mode: Literal["enforce", "shadow"]
    rate_limit: str
    burst: int | None
    identity: list[str] | str
    anonymous: Literal["shared", "reject"]
    trusted_proxies: list[str] | str
    proxy_header: Literal["x-forwarded-for", "forwarded"]
    ipv4_prefix: int
    ipv6_prefix: int
    protected_paths: list[str] | str
    exempt_paths: list[str] | str
    max_body_bytes: int
    max_identities: int
    storage_url: str
    failure_mode: Literal["open", "closed"]
    secret_key: SecretStr | str | None
    expose_headers: bool
    format: FormatName
    strict: bool
    distribution_cost: float
    perturbation: str
    max_response_bytes: int
    openai: OpenAISettings | dict[str, Any]
    generic: GenericSettings | dict[str, Any]


def _warn_unknown_env() -> None:
    """A mistyped variable would silently keep a default: say so (a warning, not an error,
    so that an environment written for a newer version still starts)."""
    known = {name.upper() for name in ShieldSettings.model_fields}
    for var in os.environ:
        upper = var.upper()
        if upper.startswith(ENV_PREFIX):
            field = upper[len(ENV_PREFIX) :].split("__")[0]
            if field not in known:
                logger.warning("%s is not a setting of asgi_extraction_shield; ignored", var)


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        var = ENV_PREFIX + "__".join(loc).upper() if loc else ENV_PREFIX
        given = error.get("input")
        if loc and loc[0] == "secret_key":
            given = "**********"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a setting of asgi_extraction_shield"
        lines.append(f"{var}={given!r}: {message}")
    return "invalid settings:\n  " + "\n  ".join(lines)
