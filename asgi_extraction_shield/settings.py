"""``ShieldSettings``: every option, read from ``EXTRACTION_SHIELD_*`` environment variables.

This is the only module that reads the environment. Values are validated here, when
the settings are built (that is, when the middleware is built); a bad value raises
:class:`~asgi_extraction_shield.errors.ConfigurationError` naming the variable, the
value and the accepted form.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import TypedDict

from .errors import ConfigurationError
from .identity import parse_networks, parse_sources
from .limiter import Rate
from .monitor.risk import SignalRule
from .postprocess.chain import parse_chain
from .watermark import parse_watermarks

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


SIGNALS = (
    "prada_w",
    "coverage",
    "entropy",
    "novelty",
    "near_duplicates",
    "low_margin",
    "class_entropy",
    "distribution_requests",
    "logit_bias_tokens",
    "output_coverage",
    "output_entropy",
)
"""The monitor's signals that have a rule (see monitor/tracker.py)."""


def _rule(default: str, description: str) -> Any:
    return Field(default, description=description + " As 'low:high[:weight]'.")


class MonitorSettings(BaseModel):
    """The query monitor (``MONITOR__*``): what is tracked and when signals count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Track queries and grade identities by extraction risk; false: "
        "only the limiter runs.",
    )
    dim: int = Field(32, ge=4, le=512, description="Dimension of query feature vectors.")
    history: int = Field(
        64,
        ge=8,
        le=4096,
        description="Recent queries kept per identity (novelty, near-duplicates) and per pool (near-duplicates).",
    )
    simhash_bits: int = Field(
        6,
        ge=2,
        le=20,
        description="Hyperplanes of the keyed SimHash that coverage and "
        "entropy count buckets of (2^bits buckets).",
    )
    min_queries: int = Field(
        50, ge=1, description="Queries an identity needs before sample-based signals count."
    )
    max_identities: int = Field(
        4_000,
        ge=1,
        description="Identities tracked at once (about 25 KB each: 100 MB at the default); "
        "least recently seen are forgotten first (their penalties are kept by the policy).",
    )
    pools: CommaList = Field(
        ["net", "cohort"],
        description="Pooled views against sybils: 'net' (IP prefix), 'cohort' (first seen in "
        "the same window), 'all' (all traffic, reported but not attributed).",
    )
    ipv4_pool_prefix: int = Field(24, ge=0, le=32, description="IPv4 prefix of 'net' pools.")
    ipv6_pool_prefix: int = Field(48, ge=0, le=128, description="IPv6 prefix of 'net' pools.")
    cohort_seconds: float = Field(
        600.0, gt=0, description="Width of the first-seen windows that make 'cohort' pools."
    )
    prada_w: str = _rule(
        "0.94:0.85", "PRADA's Shapiro-Wilk W: risk from W below low, full at high."
    )
    pool_prada_w: str = _rule(
        "0.88:0.8",
        "PRADA's W for pools: stricter, as a pool's distances mix several users' queries.",
    )
    coverage: str = _rule("0.5:0.7", "Distinct SimHash buckets per query.")
    entropy: str = _rule("0.85:0.95", "Normalised entropy of the SimHash bucket histogram.")
    novelty: str = _rule("0.42:0.52", "Moving average of 1 - max cosine similarity to history.")
    near_duplicates: str = _rule("0.2:0.6", "Share of near-duplicate (probing) queries.")
    low_margin: str = _rule("0.3:0.7", "Share of answers with a small top-1/top-2 margin.")
    class_entropy: str = _rule(
        "0.8:0.95", "Normalised entropy of the answers' top-1 classes (a thief needs them all)."
    )
    distribution_requests: str = _rule(
        "0.5:1.0:0.3", "Share of requests asking for full distributions or logprobs."
    )
    logit_bias_tokens: str = _rule("20:200", "Distinct token ids pushed with logit_bias.")
    output_coverage: str = _rule(
        "0.5:0.7:0",
        "Distinct SimHash buckets per embedding an identity received (embedding endpoints: "
        "coverage of the output space). Weight 0 by default: reported in events and "
        "introspection, not scored, until you give it a weight (thresholds from your own "
        "traffic: 'extraction-shield tune').",
    )
    output_entropy: str = _rule(
        "0.85:0.95:0",
        "Normalised entropy of the SimHash bucket histogram of the embeddings an identity "
        "received. Weight 0 by default, as output_coverage.",
    )

    @field_validator("pools", mode="before")
    @classmethod
    def _split_pools(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("pools")
    @classmethod
    def _check_pools(cls, value: list[str]) -> list[str]:
        for pool in value:
            if pool not in ("net", "cohort", "all"):
                raise ValueError(f"{pool!r} is not a pool: expected 'net', 'cohort' or 'all'")
        return value

    @field_validator(*SIGNALS, "pool_prada_w")
    @classmethod
    def _check_rule(cls, value: str) -> str:
        parse_rule(value)
        return value

    def rules(self) -> dict[str, SignalRule]:
        rules = {name: parse_rule(getattr(self, name)) for name in SIGNALS}
        # Request-level signals count from the first request, not after a sample.
        for name in ("distribution_requests", "logit_bias_tokens"):
            rule = rules[name]
            rules[name] = SignalRule(rule.low, rule.high, rule.weight, needs_sample=False)
        return rules


def parse_rule(text: str) -> SignalRule:
    parts = text.split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"{text!r} is not a signal rule: expected 'low:high' or 'low:high:weight'")
    if len(numbers) == 3 and not 0 <= numbers[2] <= 1:
        raise ValueError(f"{text!r}: the weight must be between 0 and 1")
    return SignalRule(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 1.0)


class PolicySettings(BaseModel):
    """The graded response (``POLICY__*``): risk thresholds of each level and what each does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    watch: float = Field(0.3, ge=0, le=1, description="Risk at which 'watch' starts (events only).")
    degrade: float = Field(
        0.5, ge=0, le=1, description="Risk at which 'degrade' starts (DEGRADE_PERTURBATION)."
    )
    throttle: float = Field(
        0.7, ge=0, le=1, description="Risk at which 'throttle' starts (cost x THROTTLE_MULTIPLIER)."
    )
    block: float = Field(0.9, ge=0, le=1, description="Risk at which requests are refused (429).")
    hysteresis: float = Field(
        0.1, ge=0, le=1, description="A level is left only this far below its threshold."
    )
    half_life: float = Field(
        600.0, ge=0, description="Seconds for a remembered risk to halve (0: never decays)."
    )
    block_seconds: float = Field(900.0, gt=0, description="How long a block lasts.")
    throttle_multiplier: float = Field(
        4.0, ge=1, description="Limiter cost multiplier at 'throttle' and after a block."
    )
    degrade_perturbation: str = Field(
        "reverse_sigmoid:beta=1:gamma=0.2:guard_top1=true,round:2",
        description="Post-processor chain for identities at 'degrade'.",
    )
    throttle_perturbation: str = Field(
        "top_k:1", description="Post-processor chain for identities at 'throttle' and 'block'."
    )

    @field_validator("degrade_perturbation", "throttle_perturbation")
    @classmethod
    def _check_chain(cls, value: str) -> str:
        parse_chain(value)
        return value


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
        "(events, logs) but never refuses a request, never degrades an answer by level and "
        "adds no headers.",
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
        description="Where state lives (buckets, policy levels and blocks, the monitor's "
        "shared observations): 'memory://' (this process) or "
        "'redis://[user:password@]host:port/db' ('rediss://' for TLS), shared by every "
        "process (needs SECRET_KEY and the 'redis' extra).",
    )
    redis_timeout: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Redis storage: the most one decision waits on Redis, in seconds "
        "(connecting, the command and a script reload together); then FAILURE_MODE applies.",
    )
    redis_prefix: str = Field(
        "shield",
        description="Redis storage: prefix of every key ('{<prefix>:<identity>}:tat', "
        "':policy', ':obs'); give each protected API its own when several share one Redis.",
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
    watermark: str = Field(
        "none",
        description="Watermarks applied to every answer after the perturbation chain, e.g. "
        "'drw:eps=0.1' or 'dawn:rate=0.02'; 'none' marks nothing. "
        "Verify a suspect with `extraction-shield verify`.",
    )
    watermark_records_path: str = Field(
        "",
        description="JSONL file where record-keeping watermarks (dawn) append the queries "
        "they marked, one object per line with the 'input' and the model's own 'answer' "
        "(both needed by `verify --records`); empty: kept in memory only. On Redis "
        "(STORAGE_URL) they are also kept there, for `extraction-shield records`.",
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="Largest JSON response body buffered for post-processing; larger ones "
        "pass through unchanged.",
    )
    metrics: bool = Field(
        False,
        description="Export Prometheus metrics (needs the 'metrics' extra) and serve them at "
        "METRICS_PATH.",
    )
    metrics_path: str = Field(
        "/metrics",
        description="Where the shield serves its metrics when METRICS is on, exempt from "
        "limiting; empty: not served (scrape the registry your own way).",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the admin route (at least 16 characters); unset: no "
        "admin route.",
    )
    admin_path: str = Field(
        "/_shield",
        description="Prefix of the admin route (identity state as JSON, lifting penalties).",
    )
    event_log_interval: float = Field(
        10.0,
        ge=0,
        description="Seconds between two log lines of an event that can come once a request "
        "(rate_limited, storage_error, internal_error) for one identity; the next line "
        "counts the events not logged in 'suppressed'. on_event gets every event. "
        "0: log every event.",
    )
    assessed_interval: float = Field(
        0.0,
        ge=0,
        description="Log an 'assessed' event (risk, level, signals) for each active identity "
        "at most once per this many seconds, for `extraction-shield tune`; 0: off.",
    )
    openai: OpenAISettings = Field(
        default_factory=lambda: OpenAISettings(),
        description="OpenAI-compatible endpoints (request hardening).",
    )
    generic: GenericSettings = Field(
        default_factory=lambda: GenericSettings(),
        description="FORMAT=generic: where inputs and outputs are in the JSON bodies.",
    )
    monitor: MonitorSettings = Field(
        default_factory=lambda: MonitorSettings(),
        description="The query monitor: features, signals, pools and thresholds (MONITOR__*).",
    )
    policy: PolicySettings = Field(
        default_factory=lambda: PolicySettings(),
        description="The graded response: levels, decay, blocks, per-level chains (POLICY__*).",
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

    @field_validator("redis_prefix")
    @classmethod
    def _check_redis_prefix(cls, value: str) -> str:
        from .storage.redis import PREFIX_RE

        if not PREFIX_RE.match(value):
            raise ValueError("expected 1 to 64 letters, digits or '_.:-' (no braces or spaces)")
        return value

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

    @field_validator("metrics_path", "admin_path")
    @classmethod
    def _check_route(cls, value: str, info: ValidationInfo) -> str:
        if not value and info.field_name == "metrics_path":
            return value
        if not value.startswith("/") or value == "/" or any(c in value for c in "*?[ "):
            raise ValueError(f"{value!r}: expected a path such as '/_shield' (no glob)")
        return value.rstrip("/")

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("too short: use at least 16 characters (`extraction-shield keygen`)")
        return value

    @field_validator("perturbation")
    @classmethod
    def _check_chain(cls, value: str) -> str:
        parse_chain(value)
        return value

    @field_validator("watermark")
    @classmethod
    def _check_watermark(cls, value: str) -> str:
        parse_watermarks(value)
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
    redis_timeout: float
    redis_prefix: str
    failure_mode: Literal["open", "closed"]
    secret_key: SecretStr | str | None
    expose_headers: bool
    format: FormatName
    strict: bool
    distribution_cost: float
    perturbation: str
    watermark: str
    watermark_records_path: str
    max_response_bytes: int
    metrics: bool
    metrics_path: str
    admin_token: SecretStr | str | None
    admin_path: str
    event_log_interval: float
    assessed_interval: float
    openai: OpenAISettings | dict[str, Any]
    generic: GenericSettings | dict[str, Any]
    monitor: MonitorSettings | dict[str, Any]
    policy: PolicySettings | dict[str, Any]


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
        if loc and loc[0] in ("secret_key", "admin_token"):
            given = "**********"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a setting of asgi_extraction_shield"
        lines.append(f"{var}={given!r}: {message}")
    return "invalid settings:\n  " + "\n  ".join(lines)
