"""Prometheus metrics, scraped through the shield's own ``/metrics`` route."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from asgi_extraction_shield import ConfigurationError, ExtractionShield, StorageError
from asgi_extraction_shield.limiter import Decision
from asgi_extraction_shield.metrics import LEVELS_REFRESH_SECONDS, RouteLabels
from asgi_extraction_shield.policy import GradedPolicy
from asgi_extraction_shield.storage import MemoryStorage

from .conftest import SECRET, FakeClock, client, scripted_shield, starlette_app

pytestmark = pytest.mark.anyio
BODY = {"instances": [[1.0, 2.0]]}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class FlakyStorage(MemoryStorage):
    """Memory storage that fails while ``down`` is set."""

    down = False

    async def acquire(
        self, key: str, cost: int, interval: float, burst: int, now: float
    ) -> Decision:
        if self.down:
            raise StorageError("storage down")
        return await super().acquire(key, cost, interval, burst, now)


async def test_metrics_count_what_the_shield_did(clock: FakeClock) -> None:
    storage = FlakyStorage(clock=clock)
    app, monitor = scripted_shield(
        clock,
        rate_limit="3/hour",
        protected_paths="/predict,/echo*",
        perturbation="round:1",
        identity="header:x-api-key",
        anonymous="reject",
        storage=storage,
        metrics_registry=CollectorRegistry(),
    )
    thief = app.identities.keys_for("thief")[0]
    monitor.risk[thief] = 0.95
    async with client(app) as c:
        for _ in range(4):  # 3 allowed, then rate limited
            await c.post("/predict", json=BODY, headers={"x-api-key": "user"})
        await c.post("/predict", content=b"not json", headers={"x-api-key": "other"})
        await c.post("/echo", json=BODY, headers={"x-api-key": "other"})
        assert (await c.post("/predict", json=BODY)).status_code == 401  # no identity
        for _ in range(2):  # blocked at once, then refused while blocked
            await c.post("/predict", json=BODY, headers={"x-api-key": "thief"})
        storage.down = True
        assert (await c.post("/predict", json=BODY, headers={"x-api-key": "u3"})).status_code == 200
        scrape = await c.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    s = _samples(scrape.text)
    requests = "extraction_shield_requests_total"
    # user 4, thief 2, and u3, examined before the storage failed
    assert _value(s, requests, route="/predict", format="kserve_v1") == 4 + 2 + 1
    assert _value(s, requests, route="/predict", format="unparsed") == 1
    assert _value(s, requests, route="/echo*", format="kserve_v1") == 1
    assert _value(s, "extraction_shield_unparsed_total", route="/predict") == 1
    decisions = "extraction_shield_decisions_total"
    assert _value(s, decisions, outcome="allowed") == 3 + 2  # user's 3, other's 2
    assert _value(s, decisions, outcome="rate_limited") == 1
    assert _value(s, decisions, outcome="blocked") == 2
    assert _value(s, decisions, outcome="refused") == 1
    assert _value(s, "extraction_shield_identities", level="block") == 1
    assert _value(s, "extraction_shield_identities", level="watch") == 0
    # risk: every request that reached the monitor (5 allowed and the thief's first)
    assert _value(s, "extraction_shield_risk_count") == 6
    assert _value(s, "extraction_shield_risk_bucket", le="0.9") == 5
    # rewritten: user's 3 KServe answers (the unparsed request gets no transform; /echo
    # answers octet-stream, which a transform declines before any work)
    assert _value(s, "extraction_shield_postprocess_seconds_count") == 3
    assert _value(s, "extraction_shield_postprocess_seconds_sum") > 0
    assert _value(s, "extraction_shield_storage_errors_total") == 1
    assert _value(s, "extraction_shield_internal_errors_total") == 0


async def test_metrics_route_is_never_limited_and_can_move_or_go(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    app = ExtractionShield(
        starlette_app(),
        secret_key=SECRET,
        rate_limit="1/hour",
        exempt_paths="/health",
        clock=clock,
        metrics=True,
        metrics_path="/internal/metrics",
        metrics_registry=registry,
    )
    async with client(app) as c:
        for _ in range(5):
            r = await c.get("/internal/metrics")
            assert r.status_code == 200 and "extraction_shield_decisions_total" in r.text
            assert "ratelimit" not in r.headers
        assert (await c.get("/metrics")).status_code == 404  # the app's, protected as usual
    silent = ExtractionShield(
        starlette_app(), secret_key=SECRET, metrics_path="", metrics_registry=CollectorRegistry()
    )
    async with client(silent) as c:
        assert "extraction_shield" not in (await c.get("/metrics")).text  # the app's 404


def test_metrics_off_cost_nothing_and_missing_client_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ExtractionShield(starlette_app(), secret_key=SECRET).metrics is None
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"asgi-extraction-shield\[metrics\]"):
        ExtractionShield(starlette_app(), secret_key=SECRET, metrics=True)


def test_one_registry_cannot_hold_two_shields() -> None:
    registry = CollectorRegistry()
    ExtractionShield(starlette_app(), secret_key=SECRET, metrics_registry=registry)
    with pytest.raises(ConfigurationError, match="its own registry"):
        ExtractionShield(starlette_app(), secret_key=SECRET, metrics_registry=registry)


def test_route_labels_are_patterns_never_raw_paths() -> None:
    labels = RouteLabels(["/v1/models/*", "/predict", "/v2/*"], max_cached=8)
    assert labels("/predict") == "/predict"
    assert labels("/v1/models/abc:predict") == "/v1/models/*"
    assert labels("/v2/models/x/infer") == "/v2/*"
    assert labels("/elsewhere") == "other"
    values = {labels(f"/v1/models/m{i}:predict") for i in range(100)}
    assert values == {"/v1/models/*"} and len(labels._cache) <= 8


class SharedCountsPolicy(GradedPolicy):
    """A policy whose counts come from elsewhere, through a refresh that hangs or fails."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.refreshes = 0
        self.mode = "hang"
        self.counts = {"watch": 0, "degrade": 0, "throttle": 0, "block": 0}

    def level_counts(self) -> dict[str, int]:  # type: ignore[override]
        return dict(self.counts)

    async def refresh_level_counts(self) -> None:
        self.refreshes += 1
        if self.mode == "hang":
            await asyncio.Event().wait()
        elif self.mode == "fail":
            raise StorageError("storage down")
        else:
            self.counts["watch"] = self.refreshes


async def test_level_refreshes_never_delay_or_fail_a_request(clock: FakeClock) -> None:
    policy = SharedCountsPolicy(clock)
    registry = CollectorRegistry()
    app, _ = scripted_shield(clock, policy, metrics_registry=registry, metrics_path="")
    assert app.metrics is not None and app.metrics.levels is not None
    app.metrics.levels.clock = clock
    async with client(app) as c:
        # The first request starts a refresh that never ends: requests go on regardless,
        # and none starts another while it runs.
        for _ in range(3):
            assert (await c.post("/predict", json=BODY)).status_code == 200
            await asyncio.sleep(0.01)  # the refresh task's turn
            clock.advance(LEVELS_REFRESH_SECONDS)
        assert policy.refreshes == 1
        task = app.metrics.levels._task
        assert task is not None
        task.cancel()
        await asyncio.sleep(0.01)
        policy.mode = "fail"  # a failing refresh: counted, the request unharmed
        assert (await c.post("/predict", json=BODY)).status_code == 200
        await asyncio.sleep(0.01)
        assert registry.get_sample_value("extraction_shield_storage_errors_total") == 1
        policy.mode = "count"
        assert (await c.post("/predict", json=BODY)).status_code == 200  # within the interval
        await asyncio.sleep(0.01)
        clock.advance(LEVELS_REFRESH_SECONDS)
        assert (await c.post("/predict", json=BODY)).status_code == 200
        await asyncio.sleep(0.01)
    assert policy.refreshes == 3
    assert registry.get_sample_value("extraction_shield_identities", {"level": "watch"}) == 3
