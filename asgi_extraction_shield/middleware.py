"""``ExtractionShield``: the pure ASGI middleware. It orchestrates; it holds no algorithm.

Per protected HTTP request: identity → body (bounded) → request adapter (cost) →
policy's current action → limiter → monitor → policy update → app, whose response
gets the rate-limit headers and, when a post-processor asks for it, a body transform.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import Unpack

from .body import BufferedBody, read_body, with_body_length
from .errors import ConfigurationError, StorageError
from .events import EventEmitter, OnEvent, ShieldEvent
from .formats import build_adapter
from .formats.base import ParsedRequest, RequestAdapter
from .identity import (
    ANONYMOUS_KEY,
    Identify,
    Identity,
    IdentityResolver,
    ProxyResolver,
    parse_networks,
    parse_sources,
)
from .keys import resolve_secret
from .limiter import Clock, Decision, Limiter, rate_limit_header, retry_after_seconds
from .monitor import build_monitor
from .monitor.base import Monitor, NullMonitor
from .policy import NORMAL, Action, GradedPolicy, Policy, StaticPolicy, build_policy
from .postprocess import build_postprocessor
from .postprocess.base import PostProcessor, ResponseTransform
from .problem import ABNORMAL_USAGE, QUOTA_EXCEEDED, send_problem
from .responder import Responder, with_headers
from .settings import ShieldOverrides, ShieldSettings
from .storage import Storage, storage_from_url
from .watermark import build_watermarks, rewrite_request

logger = logging.getLogger("asgi_extraction_shield")


def _glob(patterns: Sequence[str]) -> re.Pattern[str] | None:
    globs = [p for p in patterns if any(c in p for c in "*?[")]
    return re.compile("|".join(translate(p) for p in globs)) if globs else None


_Admission = tuple[list[tuple[bytes, bytes]], "ResponseTransform | None", "bytes | None"]
"""Headers to add to the response, the body transform, the hardened request body."""


@dataclass(slots=True)
class _Refusal:
    status: int
    type_: str
    title: str
    detail: str
    retry_after: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class ExtractionShield:
    """Protects the wrapped ASGI app against model extraction.

    ``ExtractionShield(app)`` reads every setting from ``EXTRACTION_SHIELD_*``;
    ``settings`` and keyword ``overrides`` (field names of :class:`ShieldSettings`)
    configure it in code. ``on_event`` (sync or async) receives every
    :class:`ShieldEvent`; ``identify(scope)`` (sync or async) returns an identity
    value (hashed before use) or ``None`` to fall through to the configured sources.
    ``clock``, ``storage``, ``adapter``, ``query_monitor``, ``risk_policy`` and ``postprocessor``
    replace the components that settings would build (for tests and extensions).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: ShieldSettings | None = None,
        on_event: OnEvent | None = None,
        *,
        identify: Identify | None = None,
        clock: Clock = time.monotonic,
        storage: Storage | None = None,
        adapter: RequestAdapter | None = None,
        query_monitor: Monitor | None = None,
        risk_policy: Policy | None = None,
        postprocessor: PostProcessor | None = None,
        **overrides: Unpack[ShieldOverrides],
    ) -> None:
        self.app = app
        if settings is None:
            settings = ShieldSettings(**overrides)
        elif overrides:
            unknown = set(overrides) - set(ShieldSettings.model_fields)
            if unknown:
                raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
            settings = type(settings)(**{**dict(settings), **overrides})
        self.settings = settings
        self.enforce = settings.mode == "enforce"
        if storage is None:  # not ``storage or``: an empty MemoryStorage is falsy (len 0)
            storage = storage_from_url(
                settings.storage_url,
                max_identities=settings.max_identities,
                clock=clock,
                failure_mode=settings.failure_mode,
                redis_timeout=settings.redis_timeout,
                redis_prefix=settings.redis_prefix,
            )
        self.storage = storage
        secret = resolve_secret(settings.secret_key, shared_storage=self.storage.shared)
        self.identities = IdentityResolver(
            parse_sources(settings.identity),
            secret,
            ProxyResolver(parse_networks(settings.trusted_proxies), settings.proxy_header),
            settings.ipv4_prefix,
            settings.ipv6_prefix,
            identify,
        )
        self._identify = identify
        self.limiter = Limiter(self.storage, settings.rate, settings.burst, clock)
        self.adapter: RequestAdapter = adapter or build_adapter(settings)
        built = build_monitor(settings, secret, clock) if query_monitor is None else None
        self.monitor: Monitor = query_monitor or built or NullMonitor()
        self.policy: Policy = risk_policy or (
            build_policy(settings.policy, clock) if built is not None else StaticPolicy()
        )
        observe_outputs = getattr(self.monitor, "observe_outputs", None)
        watermarks = build_watermarks(settings, secret)
        self.watermarks = watermarks
        # The bound watermarks of WATERMARK (dawn keeps its records in its ``store``).
        self.postprocessor = postprocessor or build_postprocessor(
            settings,
            secret,
            observe_outputs,
            graded=isinstance(self.policy, GradedPolicy),
            watermarks=watermarks,
        )
        # Watermarks that change the request itself (a keyed logit_bias, say).
        self._request_marks = tuple(w for w in watermarks if w.rewrites_requests)
        # Fast path: with neither monitor nor policy, only the limiter runs.
        self._graded = not isinstance(self.monitor, NullMonitor) or risk_policy is not None
        self.identities.with_network = self._graded  # only the monitor's pools use it
        self.events = EventEmitter(on_event)
        self.internal_errors = 0

        self._exempt_exact = frozenset(settings.exempt_paths)
        self._exempt_glob = _glob(settings.exempt_paths)
        self._protected_all = "*" in settings.protected_paths
        self._protected_exact = frozenset(settings.protected_paths)
        self._protected_glob = None if self._protected_all else _glob(settings.protected_paths)
        # Every path not exactly exempt is protected: no pattern to match per request.
        self._simple_paths = self._protected_all and self._exempt_glob is None
        self._max_body = settings.max_body_bytes
        self._reject_anonymous = settings.anonymous == "reject" and self.enforce
        self._strict = settings.strict
        self._headers = self.enforce and settings.expose_headers
        self._policy_header = (b"ratelimit-policy", self.limiter.policy_header().encode())

    def is_protected(self, path: str) -> bool:
        if path in self._exempt_exact:
            return False
        if self._exempt_glob is not None and self._exempt_glob.match(path):
            return False
        if self._protected_all or path in self._protected_exact:
            return True
        return self._protected_glob is not None and self._protected_glob.match(path) is not None

    def _close_storage_on_shutdown(self, send: Send) -> Send:
        """Lifespan passes through unchanged; once the app has shut down, the storage
        releases its connections, before the server hears of it (so it waits for that)."""

        async def send_after_closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    await self.storage.close()
                except Exception:
                    logger.exception("closing the storage on shutdown failed")
            await send(message)

        return send_after_closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self._exempt_exact  # the fast path: one set lookup
            or not (self._simple_paths or self.is_protected(scope["path"]))
        ):
            if scope["type"] == "lifespan":
                send = self._close_storage_on_shutdown(send)
            await self.app(scope, receive, send)
            return

        buffered = await read_body(scope, receive, self._max_body)
        if buffered.too_large and self.enforce:
            await send_problem(
                send,
                413,
                "about:blank",
                "Content Too Large",
                f"The request body exceeds {self.settings.max_body_bytes} bytes.",
            )
            return
        replay = buffered.replay(receive)
        try:
            outcome = await self._admit(scope, buffered)
        except Exception as exc:  # the shield must never become the application's 500
            if await self._failed(scope, exc):
                await self.app(scope, replay, send)
            else:
                await send_problem(
                    send,
                    503,
                    "about:blank",
                    "Service Unavailable",
                    "The request could not be checked; try again later.",
                    [(b"retry-after", b"1")],
                )
            return
        if isinstance(outcome, _Refusal):
            headers = outcome.headers
            if outcome.retry_after:
                headers.append((b"retry-after", str(outcome.retry_after).encode()))
            extra = {"retry_after": outcome.retry_after} if outcome.retry_after else {}
            await send_problem(
                send, outcome.status, outcome.type_, outcome.title, outcome.detail, headers, **extra
            )
            return
        headers, transform, upstream_body = outcome
        if upstream_body is not None:  # hardened by the format adapter
            scope = with_body_length(scope, len(upstream_body))
            replay = BufferedBody(upstream_body, complete=True).replay(receive)
        if transform is not None:
            send = Responder(send, headers, transform)
        elif headers:
            send = with_headers(send, headers)
        await self.app(scope, replay, send)

    async def _admit(self, scope: Scope, buffered: BufferedBody) -> _Refusal | _Admission:
        """Decide on one request: a refusal, or how to answer it."""
        path = scope["path"]
        identity = (
            self.identities.from_sources(scope)
            if self._identify is None
            else await self.identities.resolve(scope)
        )
        if identity is None:
            if self._reject_anonymous:
                return _Refusal(
                    401,
                    "about:blank",
                    "Unauthorized",
                    "The request carries no identity this API accepts.",
                )
            identity = Identity(ANONYMOUS_KEY, "anonymous", self.identities.network(scope))
        request: ParsedRequest = (
            self.adapter.parse_request(scope, buffered.body)
            if buffered.complete
            else ParsedRequest(problem="the body was not read whole")
        )
        if self.enforce and (
            request.refusal is not None or (self._strict and not request.parsed and request.problem)
        ):
            detail = request.refusal or f"The request body could not be parsed: {request.problem}."
            return _Refusal(400, "about:blank", "Bad Request", detail)
        action = await self.policy.current(identity) if self._graded else NORMAL
        if action.block_seconds > 0 and self.enforce:
            # Blocked already (the ``blocked`` event went out when the block began).
            return self._abnormal_refusal(action)
        cost = (
            request.cost
            if action.cost_multiplier == 1.0
            else math.ceil(request.cost * action.cost_multiplier)
        )
        decision = await self.limiter.acquire(identity.key, cost)
        if decision.degraded:  # a shared storage was unreachable: decided in this process
            await self._emit("storage_error", identity, action, path, fallback="memory")
        if not decision.allowed:
            await self._emit(
                "rate_limited", identity, action, path, cost=cost, retry_after=decision.retry_after
            )
            if self.enforce:
                return self._quota_refusal(decision, cost)
        if self._graded:
            refusal, action = await self._grade(identity, request, action, path)
            if refusal is not None:
                return refusal
        transform = (
            self.postprocessor.transform_for(identity, request, action)
            if self.postprocessor is not None
            else None
        )
        upstream = request.upstream_body
        if self._request_marks and request.parsed:
            upstream = (
                rewrite_request(self._request_marks, request, upstream or buffered.body) or upstream
            )
        return self._rate_headers(decision), transform, upstream

    async def _grade(
        self, identity: Identity, request: ParsedRequest, before: Action, path: str
    ) -> tuple[_Refusal | None, Action]:
        """Monitor and policy: the identity's new action, and a refusal if it is blocked."""
        assessment = await self.monitor.observe_request(identity, request)
        action = await self.policy.update(identity, assessment)
        if action.level != before.level:
            await self._emit("level_changed", identity, action, path, previous=before.level)
        if action.block_seconds <= 0:
            return None, action
        if before.block_seconds <= 0:  # the block begins (or, in shadow mode, would)
            await self._emit("blocked", identity, action, path)
        if not self.enforce:
            return None, action
        return self._abnormal_refusal(action), action

    @staticmethod
    def _abnormal_refusal(action: Action) -> _Refusal:
        return _Refusal(
            429,
            ABNORMAL_USAGE,
            "Abnormal Usage Detected",
            "This client's requests look like automated model extraction.",
            max(1, math.ceil(action.block_seconds)),
        )

    def _quota_refusal(self, decision: Decision, cost: int) -> _Refusal:
        if decision.over_capacity:
            detail = f"This request costs {cost} tokens, more than the limit of {decision.limit} at once."
        else:
            detail = "Too many requests for this client; retry after the indicated delay."
        headers = self._rate_headers(decision)
        return _Refusal(
            429, QUOTA_EXCEEDED, "Quota Exceeded", detail, retry_after_seconds(decision), headers
        )

    def _rate_headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        if not self._headers:
            return []
        return [self._policy_header, (b"ratelimit", rate_limit_header(decision))]

    async def _emit(
        self, kind: Any, identity: Identity, action: Action, path: str, **signals: Any
    ) -> None:
        assessment = action.assessment
        await self.events.emit(
            ShieldEvent(
                kind=kind,
                identity=identity.key,
                level=action.level,
                risk=assessment.risk,
                signals={**assessment.signals, **signals},
                path=path,
                shadow=not self.enforce,
            )
        )

    async def _failed(self, scope: Scope, exc: Exception) -> bool:
        """Report an internal failure; true when the request should proceed (fail open)."""
        self.internal_errors += 1
        kind = "storage_error" if isinstance(exc, StorageError) else "internal_error"
        logger.error(
            "shield %s on %s: %r", kind, scope.get("path"), exc, exc_info=kind == "internal_error"
        )
        await self.events.emit(
            ShieldEvent(
                kind=kind,  # type: ignore[arg-type]
                identity="",
                signals={"error": type(exc).__name__},
                path=scope.get("path", ""),
                shadow=not self.enforce,
            )
        )
        return self.settings.failure_mode == "open" or not self.enforce
