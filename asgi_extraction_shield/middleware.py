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
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from typing_extensions import Unpack

from .admin import AdminRoute
from .body import BufferedBody, read_body, with_body_length
from .errors import ConfigurationError, StorageError
from .events import AssessedSampler, EventEmitter, EventKind, OnEvent, ShieldEvent
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
from .introspection import IdentityState, Inspector, ShieldHandle
from .keys import resolve_secret
from .limiter import Clock, Decision, Limiter, rate_limit_header, retry_after_seconds
from .metrics import ShieldMetrics
from .monitor import build_monitor
from .monitor.base import Assessment, Monitor, NullMonitor
from .policy import NORMAL, Action, GradedPolicy, Policy, StaticPolicy, build_policy
from .postprocess import build_postprocessor
from .postprocess.base import PostProcessor, ResponseTransform
from .problem import ABNORMAL_USAGE, QUOTA_EXCEEDED, send_problem
from .responder import Responder, with_headers
from .settings import ShieldOverrides, ShieldSettings
from .storage import Storage, storage_from_url
from .storage.redis_policy import RedisPolicy
from .storage.redis_records import attach_record_sink
from .watermark import build_watermarks, rewrite_request

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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
    ``metrics_registry`` (a prometheus-client ``CollectorRegistry``) receives the metrics
    and turns them on (as ``METRICS=true`` does, with the default registry); ``handle``, a
    :class:`~.introspection.ShieldHandle`, is bound to this instance once it is built.
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
        metrics_registry: CollectorRegistry | None = None,
        handle: ShieldHandle | None = None,
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
        built = (
            build_monitor(settings, secret, clock, self.storage) if query_monitor is None else None
        )
        self.monitor: Monitor = query_monitor or built or NullMonitor()
        self.policy: Policy = risk_policy or (
            build_policy(settings.policy, clock, self.storage)
            if built is not None
            else StaticPolicy()
        )
        observe_outputs = getattr(self.monitor, "observe_outputs", None)
        watermarks = build_watermarks(settings, secret)
        self.watermarks = watermarks
        # The bound watermarks of WATERMARK (dawn keeps its records in its ``store``); on
        # Redis their records also go there, gathered from every worker and replica.
        self.record_sinks = [
            sink for sink in (attach_record_sink(w, self.storage) for w in watermarks) if sink
        ]
        self.postprocessor = postprocessor or build_postprocessor(
            settings,
            secret,
            observe_outputs,
            graded=isinstance(self.policy, (GradedPolicy, RedisPolicy)),
            watermarks=watermarks,
        )
        # Watermarks that change the request itself (a keyed logit_bias, say).
        self._request_marks = tuple(w for w in watermarks if w.rewrites_requests)
        # Fast path: with neither monitor nor policy, only the limiter runs.
        self._graded = not isinstance(self.monitor, NullMonitor) or risk_policy is not None
        self.identities.with_network = self._graded  # only the monitor's pools use it
        policy = self.policy
        self._charge = (
            policy.admit
            if self._graded and isinstance(policy, RedisPolicy) and policy.storage is self.storage
            else None
        )
        self.events = EventEmitter(on_event, log_interval=settings.event_log_interval, clock=clock)
        self.internal_errors = 0
        self.metrics: ShieldMetrics | None = None
        if settings.metrics or metrics_registry is not None:
            self.metrics = ShieldMetrics(
                metrics_registry,
                protected_paths=settings.protected_paths,
                level_counts=getattr(self.policy, "level_counts", None),
                refresh_levels=getattr(self.policy, "refresh_level_counts", None),
            )
        self._assessed = (
            AssessedSampler(settings.assessed_interval, clock, settings.max_identities)
            if settings.assessed_interval > 0 and self._graded
            else None
        )
        self.inspector = Inspector(
            self.identities, self.policy, self.monitor, self.limiter, self._lifted
        )
        self._endpoints = self._build_endpoints(settings)
        if handle is not None:
            handle.bind(self)

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

    def _build_endpoints(self, settings: ShieldSettings) -> dict[str, ASGIApp] | None:
        """The shield's own routes (metrics, admin), served before anything else."""
        endpoints: dict[str, ASGIApp] = {}
        if self.metrics is not None and settings.metrics_path:
            endpoints[settings.metrics_path] = self.metrics.app()
        self._admin = None
        if settings.admin_token is not None:
            self._admin = AdminRoute(
                settings.admin_path, settings.admin_token.get_secret_value(), self.inspector
            )
        return endpoints if endpoints or self._admin is not None else None

    def _endpoint(self, path: str) -> ASGIApp | None:
        assert self._endpoints is not None
        endpoint = self._endpoints.get(path)
        if endpoint is None and self._admin is not None and self._admin.serves(path):
            return self._admin
        return endpoint

    async def inspect(self, who: str) -> IdentityState:
        """What the shield knows of ``who``: an identity hash (as events show it) or a raw
        API key, token or address (hashed, never kept). See :mod:`.introspection`."""
        return await self.inspector.inspect(who)

    async def lift(self, who: str) -> list[str]:
        """Forget ``who``'s level, risk, block and monitor history; the keys lifted."""
        return await self.inspector.lift(who)

    async def _lifted(self, key: str) -> None:
        await self._report(ShieldEvent(kind="lifted", identity=key, shadow=not self.enforce))

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
                    for sink in self.record_sinks:  # records still on their way to Redis
                        await sink.flush()
                    await self.storage.close()
                except Exception:
                    logger.exception("closing the storage on shutdown failed")
            await send(message)

        return send_after_closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._endpoints is not None and scope["type"] == "http":
            endpoint = self._endpoint(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
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
            if self.metrics is not None:
                self.metrics.decided("refused")
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
            if self.metrics is not None:
                self.metrics.refused(outcome.type_)
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
        metrics = self.metrics
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
        if metrics is not None:
            metrics.examined(path, request)
        if self.enforce and (
            request.refusal is not None or (self._strict and not request.parsed and request.problem)
        ):
            detail = request.refusal or f"The request body could not be parsed: {request.problem}."
            return _Refusal(400, "about:blank", "Bad Request", detail)
        charged: Decision | None = None
        if self._charge is not None:  # policy and limiter on one Redis: one round-trip
            action, charged = await self._charge(identity, request.cost, self.limiter, self.enforce)
        else:
            action = await self.policy.current(identity) if self._graded else NORMAL
        if action.block_seconds > 0 and self.enforce:
            # Blocked already (the ``blocked`` event went out when the block began).
            return self._abnormal_refusal(action)
        cost = (
            request.cost
            if action.cost_multiplier == 1.0
            else math.ceil(request.cost * action.cost_multiplier)
        )
        decision = (
            charged if charged is not None else await self.limiter.acquire(identity.key, cost)
        )
        if decision.degraded or action.degraded:  # shared state unreachable: decided here
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
        # Shadow mode grades and reports but never degrades answers: the level's chain is
        # enforcement, so answers get what a client at the normal level gets.
        transform = (
            self.postprocessor.transform_for(identity, request, action if self.enforce else NORMAL)
            if self.postprocessor is not None
            else None
        )
        if metrics is not None:  # refusals are counted by __call__; in shadow mode, none is made
            metrics.decided(
                "blocked"
                if action.block_seconds > 0
                else "allowed"
                if decision.allowed
                else "rate_limited"
            )
            if transform is not None:
                transform = metrics.timed(transform)
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
        if self.metrics is not None:
            self.metrics.risk.observe(assessment.risk)
        if self._assessed is not None:
            peak = self._assessed.offer(identity.key, assessment)
            if peak is not None:
                await self._emit("assessed", identity, action, path, assessment=peak)
        # A shared policy says what the level was just before this update: another process
        # may have changed it since ``before``, and then that process reported the change.
        previous = before.level if action.previous is None else action.previous
        if action.level != previous:
            await self._emit("level_changed", identity, action, path, previous=previous)
        if action.block_seconds <= 0:
            return None, action
        if (
            before.block_seconds <= 0 if action.previous is None else action.previous != "block"
        ):  # the block begins (or, in shadow mode, would)
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
        self,
        kind: EventKind,
        identity: Identity,
        action: Action,
        path: str,
        assessment: Assessment | None = None,
        **signals: Any,
    ) -> None:
        if assessment is None:
            assessment = action.assessment
        await self._report(
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

    async def _report(self, event: ShieldEvent) -> None:
        if self.metrics is not None and event.kind in ("storage_error", "internal_error"):
            self.metrics.failed(event.kind)
        await self.events.emit(event)

    async def _failed(self, scope: Scope, exc: Exception) -> bool:
        """Report an internal failure; true when the request should proceed (fail open)."""
        self.internal_errors += 1
        kind: EventKind = "storage_error" if isinstance(exc, StorageError) else "internal_error"
        logger.error(
            "shield %s on %s: %r", kind, scope.get("path"), exc, exc_info=kind == "internal_error"
        )
        await self._report(
            ShieldEvent(
                kind=kind,
                identity="",
                signals={"error": type(exc).__name__},
                path=scope.get("path", ""),
                shadow=not self.enforce,
            )
        )
        return self.settings.failure_mode == "open" or not self.enforce
