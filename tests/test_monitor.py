"""Features, tracker signals, risk, pooled views and the monitor in the middleware."""

from __future__ import annotations

import ipaddress
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_extraction_shield import ConfigurationError, ShieldEvent
from asgi_extraction_shield.formats.base import Outputs, ParsedRequest
from asgi_extraction_shield.identity import Identity
from asgi_extraction_shield.monitor import ExtractionMonitor, NullMonitor, SignalRule, risk_of
from asgi_extraction_shield.monitor.detector import Members
from asgi_extraction_shield.monitor.features import Featurizer
from asgi_extraction_shield.monitor.tracker import Tracker, TrackerConfig, answer_summary
from asgi_extraction_shield.settings import ShieldSettings

from .conftest import FakeClock, client, shield

KEY = b"monitor-test-key".ljust(32, b".")
RNG = np.random.default_rng(3)
CENTERS = RNG.normal(size=(10, 64)) * 3


def benign_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """A user with two topics who often repeats a query exactly."""
    topics = rng.choice(10, size=2, replace=False)
    own = np.vstack([CENTERS[rng.choice(topics)] + rng.normal(size=64) for _ in range(40)])
    return own[rng.integers(0, 40, size=n)]


def uniform_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-6, 6, size=(n, 64))


def probing_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """JBDA-like: each query a small signed step from an earlier one."""
    points = list(CENTERS[rng.integers(0, 10, size=10)] + rng.normal(size=(10, 64)))
    while len(points) < n + 10:
        points.append(points[rng.integers(len(points))] + 0.1 * np.sign(rng.normal(size=64)))
    return np.asarray(points[10:])


def tracker_after(
    rows: np.ndarray, config: TrackerConfig | None = None, *, flush_every: int = 0
) -> Tracker:
    """A tracker that observed ``rows`` one request each (folded in after every
    ``flush_every`` requests, or in the tracker's own batches)."""
    monitor = ExtractionMonitor(KEY, {}, dim=32)
    tracker = Tracker(config or TrackerConfig(), 32, 0.0)
    features = monitor.featurizer.numeric(rows)
    for i in range(len(rows)):
        row = features[i : i + 1]
        digest = hash(rows[i].tobytes())  # the canonical form: the raw query
        tracker.observe_queries(row, monitor.buckets(row), [digest], float(i))
        if flush_every and (i + 1) % flush_every == 0:
            tracker.flush()
    tracker.flush()
    return tracker


# -- features -------------------------------------------------------------------------------


def test_numeric_projection_preserves_distances_and_is_keyed() -> None:
    x = RNG.normal(size=(200, 784))
    f = Featurizer(KEY, 64)
    y = f.numeric(x)
    ratio = np.linalg.norm(y[:100] - y[100:], axis=1) / np.linalg.norm(x[:100] - x[100:], axis=1)
    assert 0.85 < np.median(ratio) < 1.15 and y.shape == (200, 64)
    np.testing.assert_allclose(Featurizer(KEY, 64).numeric(x[:3]), y[:3], rtol=1e-12)
    assert not np.allclose(Featurizer(b"another".ljust(32, b"."), 64).numeric(x[:3]), y[:3])


def test_texts_are_hashed_alike_alone_and_together() -> None:
    # A batch hashes all texts' 3-grams in one pass over their bytes: none may straddle two
    # texts, whatever their lengths (empty, one or two bytes, multi-byte characters).
    featurizer = Featurizer(KEY, dim=32)
    texts = ["", "a", "ab", "abc", "Ünïcödé text", "日本語の文", "the cat", "", "x y z", "q" * 5000]
    together = featurizer.texts(texts)
    alone = np.vstack([featurizer.texts([t]) for t in texts])
    assert np.array_equal(together, alone)
    assert not together[0].any() and np.linalg.norm(together[3]) == pytest.approx(1.0)


def test_text_features_measure_overlap() -> None:
    f = Featurizer(KEY, 128)
    t = f.texts(
        ["the cat sat on the mat", "the cat sat on a mat", "lattice quantum chromodynamics", ""]
    )
    assert t[0] @ t[1] > 0.7 > 0.3 > t[0] @ t[2]
    np.testing.assert_allclose(np.linalg.norm(t[:3], axis=1), 1.0)
    assert not t[3].any()  # empty text: the zero vector, not NaN
    e = f.embeddings(RNG.normal(size=(4, 384)))
    assert e.shape == (4, 128)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0)


# -- tracker signals ------------------------------------------------------------------------


def test_uniform_synthetic_queries_cover_the_space() -> None:
    benign = tracker_after(benign_rows(400, np.random.default_rng(1))).signals()
    uniform = tracker_after(uniform_rows(400, np.random.default_rng(2))).signals()
    assert uniform["coverage"] > 0.6 > 0.25 > benign["coverage"]
    assert uniform["entropy"] > 0.9 > 0.6 > benign["entropy"]
    assert uniform["novelty"] > 0.3 > benign["novelty"]


def test_boundary_probing_shows_as_near_duplicates_and_prada() -> None:
    probing = tracker_after(probing_rows(400, np.random.default_rng(4))).signals()
    benign = tracker_after(benign_rows(400, np.random.default_rng(5))).signals()
    assert probing["near_duplicates"] > 0.4
    assert benign["near_duplicates"] < 0.1  # exact repeats are not probing
    assert probing["prada_w"] < 0.85 < benign["prada_w"]


def test_prada_waits_for_enough_distances() -> None:
    tracker = tracker_after(probing_rows(90, np.random.default_rng(6)))
    assert tracker.signals()["prada_w"] == 1.0  # fewer than 100 distances: no test yet


def test_request_and_answer_signals() -> None:
    tracker = Tracker(TrackerConfig(), 32, 0.0)
    for i in range(10):
        tracker.observe_requests([i % 2 == 0], [(str(i), str(i + 1))], float(i))
    tracker.observe_answers(np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]]))
    signals = tracker.signals()
    assert signals["distribution_requests"] == 0.5
    assert signals["logit_bias_tokens"] == 11.0
    assert signals["low_margin"] == pytest.approx(2 / 3)
    assert signals["class_entropy"] == 0.0  # every answer's top-1 is class 0


def test_class_entropy_separates_a_thief_from_a_focused_user() -> None:
    eye = np.eye(10)
    focused = Tracker(TrackerConfig(), 32, 0.0)
    focused.observe_answers(0.05 + 0.5 * eye[np.random.default_rng(17).choice([3, 7], size=150)])
    thief = Tracker(TrackerConfig(), 32, 0.0)
    thief.observe_answers(0.05 + 0.5 * eye[np.arange(150) % 10])
    assert focused.signals()["class_entropy"] < 0.35
    assert thief.signals()["class_entropy"] == pytest.approx(1.0)


def test_exact_repeats_do_not_feed_prada() -> None:
    rows = benign_rows(300, np.random.default_rng(18))  # 40 distinct queries, repeated
    tracker = tracker_after(rows)
    assert tracker._prada_distances.filled < 40  # at most one distance per distinct query
    assert tracker.signals()["prada_w"] == 1.0 and tracker.signals()["near_duplicates"] == 0.0


SMALL = TrackerConfig(history=32, prada_points=16, prada_distances=100, window=50)


@pytest.mark.parametrize("config", [TrackerConfig(), SMALL], ids=["default", "small"])
@pytest.mark.parametrize("make_rows", [benign_rows, uniform_rows, probing_rows])
def test_batched_observation_matches_one_query_at_a_time(
    make_rows: Any, config: TrackerConfig
) -> None:
    rows = make_rows(600, np.random.default_rng(21))
    one = tracker_after(rows, config, flush_every=1).signals()
    for flush_every in (8, 0):  # the monitor's assessments, the tracker's own batches
        batched = tracker_after(rows, config, flush_every=flush_every).signals()
        for name in ("coverage", "entropy", "novelty", "near_duplicates"):
            assert batched[name] == pytest.approx(one[name], abs=1e-6), name
        # PRADA's test runs at the end of a batch rather than exactly every 10 queries.
        assert batched["prada_w"] == pytest.approx(one["prada_w"], abs=0.005)


def test_queued_answers_are_summarised_as_observed_one_by_one() -> None:
    """Answers are queued as rows (or as another process's summaries) and summarised when
    folded in: widths may differ from one response to the next."""
    rng = np.random.default_rng(22)
    responses = [rng.dirichlet(np.ones(3 + i % 2), size=1 + i % 3) for i in range(40)]
    queued, direct = Tracker(TrackerConfig(), 32, 0.0), Tracker(TrackerConfig(), 32, 0.0)
    for i, p in enumerate(responses):
        if i % 5 == 0:  # what another process shares
            queued.observe_answer_summary(*answer_summary(p))
        else:
            queued.observe_answers(p)
        direct.observe_answer_summary(*answer_summary(p))
        direct.flush()
    for name in ("low_margin", "class_entropy"):
        assert queued.signals()[name] == pytest.approx(direct.signals()[name], abs=1e-12)
    assert queued._classes_seen == direct._classes_seen == 4


def test_assessment_cadence() -> None:
    """An identity is re-assessed every ``assess_every`` requests, 4 × less often once it
    has made 256; a pool after ``pool_assess_every`` more requests, when one of its
    members is next assessed."""
    monitor = ExtractionMonitor(KEY, {}, dim=16, pools=("net",))
    who = identity("cadence", "198.51.100.9")
    rng = np.random.default_rng(23)
    own_at, pool_at = set(), set()
    for _ in range(400):
        monitor.observe(who, ParsedRequest(parsed=True, features=rng.normal(size=(1, 8))))
        tracker = monitor.identities[who.key]
        pool = monitor.pools[tracker.pools[0]][0]
        assert tracker.assessment is not None and pool.assessment is not None
        own_at.add(tracker.assessment[0])
        pool_at.add(pool.assessment[0])
    young = [r for r in sorted(own_at) if r <= 256]
    assert young == list(range(1, 257, monitor.assess_every))
    settled = [r for r in sorted(own_at) if r > 256]
    assert np.diff([young[-1], *settled]).tolist() == [4 * monitor.assess_every] * len(settled)
    pool_steps = np.diff(sorted(pool_at))
    assert min(pool_at) == 1 and len(pool_steps) == 5
    assert all(monitor.pool_assess_every <= d < monitor.pool_assess_every + 32 for d in pool_steps)


def test_tracker_state_is_bounded() -> None:
    tracker = tracker_after(uniform_rows(3000, np.random.default_rng(7)), SMALL)
    assert tracker.queries == 3000 and tracker._history.filled == 32
    assert tracker._history.points.shape[0] == 32 and tracker._prada.points.shape[0] == 16
    assert tracker._prada_distances.filled == 100 and tracker._buckets.filled == 50


# -- risk -----------------------------------------------------------------------------------


def test_risk_is_a_weighted_noisy_or() -> None:
    rules = {
        "coverage": SignalRule(0.2, 0.6),
        "prada_w": SignalRule(0.94, 0.84),  # reversed: low W is suspicious
        "distribution_requests": SignalRule(0.5, 1.0, 0.5, needs_sample=False),
    }
    signals = {"queries": 100.0, "coverage": 0.4, "prada_w": 0.89, "distribution_requests": 1.0}
    risk, scores = risk_of(signals, rules, min_queries=50)
    assert scores == pytest.approx({"coverage": 0.5, "prada_w": 0.5, "distribution_requests": 0.5})
    assert risk == pytest.approx(1 - 0.5**3)
    early, early_scores = risk_of({**signals, "queries": 10.0}, rules, min_queries=50)
    assert set(early_scores) == {"distribution_requests"} and early == pytest.approx(0.5)
    assert risk_of({"queries": 100.0, "coverage": 0.1}, rules, 50) == (0.0, {})
    # A step rule keeps its weight: 'x:x:0' switches a signal off, it does not flag everyone.
    assert SignalRule(0.0, 0.0, 0.0).score(0.0) == 0.0
    assert SignalRule(0.5, 0.5, 0.4).score(0.7) == 0.4 and SignalRule(0.5, 0.5).score(0.4) == 0.0


# -- pools ----------------------------------------------------------------------------------


def identity(key: str, ip: str) -> Identity:
    return Identity(key, "header", ipaddress.ip_network(f"{ip}/32"))


def test_sybils_are_caught_by_their_pool() -> None:
    rules = ShieldSettings().monitor.rules()
    monitor = ExtractionMonitor(KEY, rules, dim=32, min_queries=50)
    rows = probing_rows(1000, np.random.default_rng(8))  # one JBDA-like run, split 25 ways
    sybils = [identity(f"sybil-{i}", f"198.51.100.{i + 1}") for i in range(25)]
    own_risks = []
    for step in range(40):  # 25 × 40 = 1,000 pooled queries, 40 per identity
        for n, sybil in enumerate(sybils):
            request = ParsedRequest(parsed=True, features=rows[step * 25 + n : step * 25 + n + 1])
            assessment = monitor.observe(sybil, request)
            own_risks.append(risk_of(monitor.identities[sybil.key].signals(), rules, 50)[0])
    assert max(own_risks) == 0.0  # each alone is below min_queries
    # Nothing in any identity, a risk from the pool: PRADA sees the run's synthetic steps.
    assert assessment.risk > 0.1 and "pool_risk" in assessment.signals
    assert assessment.signals["score.pool.prada_w"] == pytest.approx(assessment.risk)


def test_pools_ignore_what_they_cover() -> None:
    # Many users asking about different things cover the space together: not a signal.
    rules = ShieldSettings().monitor.rules()
    monitor = ExtractionMonitor(KEY, rules, dim=32, min_queries=50, pools=("net",))
    rng = np.random.default_rng(19)
    users = [identity(f"user-{i}", f"203.0.113.{i + 1}") for i in range(20)]
    for _ in range(30):
        for user in users:
            assessment = monitor.observe(
                user, ParsedRequest(parsed=True, features=uniform_rows(1, rng))
            )
            assert assessment.risk == 0.0
    ((tracker, _),) = monitor.pools.values()
    assert tracker.signals()["coverage"] > 0.5  # high, and rightly ignored


def test_pool_risk_is_attributed_by_share() -> None:
    clock = FakeClock()
    monitor = ExtractionMonitor(
        KEY,
        {"prada_w": SignalRule(0.94, 0.85)},
        dim=32,
        min_queries=50,
        pools=("net",),
        clock=clock,
    )
    rng = np.random.default_rng(9)
    heavy, light = identity("heavy", "203.0.113.5"), identity("light", "203.0.113.6")
    for row in probing_rows(200, rng):
        monitor.observe(heavy, ParsedRequest(parsed=True, features=row[None, :]))
    assessment = monitor.observe(light, ParsedRequest(parsed=True, features=benign_rows(1, rng)))
    pool_risk = assessment.signals["pool_risk"]
    # "light" sent 1 of 201 pooled queries, against an even share of 1/2: it gets that
    # fraction of the pool's risk, while "heavy" gets it all.
    assert pool_risk > 0.1
    assert assessment.risk == pytest.approx(pool_risk * (1 / 201) * 2)
    heavy_again = monitor.observe(heavy, ParsedRequest(parsed=True, features=probing_rows(1, rng)))
    assert heavy_again.risk >= pool_risk * 0.99
    # Lifted by an operator ("forget"): for a grace period the pool is not held against it
    # (its own queries still are); the other members are unaffected.
    assert monitor.forget(heavy.key)
    fresh = monitor.observe(heavy, ParsedRequest(parsed=True, features=benign_rows(1, rng)))
    assert fresh.risk == 0.0 and "pool_risk" not in fresh.signals
    again = monitor.observe(light, ParsedRequest(parsed=True, features=benign_rows(1, rng)))
    assert again.risk > 0.0 and "pool_risk" in again.signals
    clock.advance(monitor.lift_grace)  # the grace is over: the pool counts again
    for _ in range(monitor.assess_every):
        later = monitor.observe(heavy, ParsedRequest(parsed=True, features=benign_rows(1, rng)))
    assert "pool_risk" in later.signals


def test_an_identity_that_moves_network_feeds_its_new_pool() -> None:
    monitor = ExtractionMonitor(KEY, {}, dim=16, pools=("net", "cohort"))
    rng = np.random.default_rng(24)
    for ip in ("203.0.113.5", "203.0.113.6", "198.51.100.5"):
        monitor.observe(
            identity("mover", ip), ParsedRequest(parsed=True, features=rng.normal(size=(1, 8)))
        )
    monitor.flush()  # the requests queued since the identity was last assessed
    pools = monitor.identities[identity("mover", "198.51.100.5").key].pools
    assert "net:198.51.100.0/24" in pools and len(pools) == 2
    assert monitor.pools["net:203.0.113.0/24"][0].requests == 2
    assert monitor.pools["net:198.51.100.0/24"][0].requests == 1
    assert sum(1 for p in monitor.pools if p.startswith("cohort:")) == 1


def test_all_traffic_pool_is_not_attributed() -> None:
    monitor = ExtractionMonitor(
        KEY, {"coverage": SignalRule(0.2, 0.6)}, dim=32, min_queries=10, pools=("all",)
    )
    rng = np.random.default_rng(10)
    for i in range(100):
        assessment = monitor.observe(
            identity(f"u{i}", f"192.0.2.{i % 250}"),
            ParsedRequest(parsed=True, features=uniform_rows(1, rng)),
        )
    assert assessment.risk == 0.0 and "all:" in monitor.pools


def test_monitor_tables_are_bounded() -> None:
    monitor = ExtractionMonitor(KEY, {}, dim=8, max_identities=50, max_pools=20)
    rng = np.random.default_rng(11)
    for i in range(500):
        monitor.observe(
            identity(f"k{i}", f"10.{i // 250}.{i % 250}.1"),
            ParsedRequest(parsed=True, features=rng.normal(size=(1, 4))),
        )
    assert len(monitor.identities) <= 50 and len(monitor.pools) <= 20


# -- through the middleware -----------------------------------------------------------------

W = np.random.default_rng(12).normal(size=(64, 10))


async def _predict(request: Request) -> JSONResponse:
    rows = np.asarray((await request.json())["instances"], dtype=float)
    z = rows @ W
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return JSONResponse({"predictions": (p / p.sum(axis=1, keepdims=True)).tolist()})


APP = Starlette(routes=[Route("/v1/models/m:predict", _predict, methods=["POST"])])


@pytest.mark.anyio
async def test_an_obvious_extraction_is_blocked(clock: FakeClock) -> None:
    events: list[ShieldEvent] = []
    app = shield(APP, clock, rate_limit="100000/minute", on_event=events.append)
    rng = np.random.default_rng(13)
    statuses, answers = [], []
    async with client(app) as c:
        for _ in range(150):
            r = await c.post(
                "/v1/models/m:predict",
                json={"instances": uniform_rows(1, rng).tolist()},
                headers={"x-api-key": "thief"},
            )
            statuses.append(r.status_code)
            answers.append(r.json())
            clock.advance(0.5)
    first_block = statuses.index(429)
    assert 50 <= first_block <= 70  # MIN_QUERIES, then at most one assessment interval
    assert set(statuses[first_block:]) == {429}
    assert answers[-1]["type"].endswith("#abnormal-usage-detected")
    assert [e.kind for e in events] == ["level_changed", "blocked"]  # one event per change
    change = events[0]
    assert change.level == "block" and change.signals["previous"] == "normal"
    assert change.risk > 0.9
    assert max(v for k, v in change.signals.items() if k.startswith("score.")) == 1.0


@pytest.mark.anyio
async def test_moderate_risk_is_answered_with_the_degrade_chain(clock: FakeClock) -> None:
    # Only coverage counts, and at most 0.55: risk lands at 'degrade', never higher.
    quiet = {name: "1e9:2e9" for name in ShieldSettings().monitor.rules()}
    monitor = {**quiet, "coverage": "0.25:0.6:0.55"}
    app = shield(APP, clock, rate_limit="100000/minute", monitor=monitor)
    rng = np.random.default_rng(15)
    rows = uniform_rows(120, rng)
    async with client(APP) as bare, client(app) as c:
        for row in rows:
            r = await c.post(
                "/v1/models/m:predict",
                json={"instances": [row.tolist()]},
                headers={"x-api-key": "k"},
            )
            assert r.status_code == 200
            clock.advance(1.0)
        shielded = r.json()["predictions"][0]
        original = (
            await bare.post("/v1/models/m:predict", json={"instances": [rows[-1].tolist()]})
        ).json()["predictions"][0]
    state = await app.policy.inspect(next(iter(app.policy._states)))
    assert state is not None and state.level == "degrade"
    assert shielded != original and np.argmax(shielded) == np.argmax(original)
    assert abs(sum(shielded) - 1) < 1e-6 and all(v == round(v, 2) for v in shielded)  # round:2


@pytest.mark.anyio
async def test_shadow_mode_reports_but_never_blocks(clock: FakeClock) -> None:
    events: list[ShieldEvent] = []
    app = shield(APP, clock, rate_limit="100000/minute", mode="shadow", on_event=events.append)
    rng = np.random.default_rng(14)
    async with client(app) as c:
        statuses = []
        for _ in range(300):
            r = await c.post(
                "/v1/models/m:predict",
                json={"instances": uniform_rows(1, rng).tolist()},
                headers={"x-api-key": "thief"},
            )
            statuses.append(r.status_code)
            clock.advance(0.5)
    assert set(statuses) == {200} and "blocked" in [e.kind for e in events]
    assert all(e.shadow for e in events)


def test_monitor_can_be_switched_off_and_policy_is_validated(clock: FakeClock) -> None:
    off: Any = shield(APP, clock, monitor={"enabled": False})
    assert isinstance(off.monitor, NullMonitor) and not off._graded
    with pytest.raises(ConfigurationError, match="WATCH <= DEGRADE"):
        shield(APP, clock, policy={"watch": 0.8, "degrade": 0.5})
    with pytest.raises(ConfigurationError, match="MONITOR__COVERAGE"):
        shield(APP, clock, monitor={"coverage": "high"})


@pytest.mark.anyio
async def test_answers_feed_the_low_margin_signal(clock: FakeClock) -> None:
    async def flat(request: Request) -> JSONResponse:
        n = len((await request.json())["instances"])
        return JSONResponse({"predictions": [[0.26, 0.25, 0.25, 0.24]] * n})

    inner = Starlette(routes=[Route("/v1/models/m:predict", flat, methods=["POST"])])
    app: Any = shield(inner, clock, rate_limit="100000/minute")
    async with client(app) as c:
        for i in range(5):
            r = await c.post(
                "/v1/models/m:predict",
                json={"instances": [[float(i)] * 4] * 2},
                headers={"x-api-key": "k"},
            )
            assert r.json()["predictions"][0] == [0.26, 0.25, 0.25, 0.24]  # observed, untouched
    (key,) = app.monitor.identities.keys()
    assert app.monitor.signals_of(key)["low_margin"] == 1.0


@pytest.mark.anyio
async def test_embedding_answers_feed_output_coverage(clock: FakeClock) -> None:
    """An embedding endpoint's answers: their coverage of the output space is measured and
    reported per identity; at its default weight (0) it adds nothing to the risk."""
    rng = np.random.default_rng(25)
    focused_space = rng.normal(size=(1, 48)) + 0.05 * rng.normal(size=(40, 48))  # one topic
    spread_space = rng.normal(size=(400, 48))

    async def embed(request: Request) -> JSONResponse:
        doc = await request.json()
        space = spread_space if doc["model"] == "spread" else focused_space
        index = int(doc["input"].split()[-1]) % len(space)
        vector = space[index].tolist()
        return JSONResponse(
            {
                "object": "list",
                "model": doc["model"],
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            }
        )

    inner = Starlette(routes=[Route("/v1/embeddings", embed, methods=["POST"])])
    # Shadow mode: these made-up inputs look like an extraction to the input signals.
    app: Any = shield(inner, clock, rate_limit="100000/minute", mode="shadow")
    async with client(app) as c:
        for i in range(120):
            for who in ("spread", "focused"):  # one running mean of the answers, as in production
                r = await c.post(
                    "/v1/embeddings",
                    json={"model": who, "input": f"document number {i}"},
                    headers={"x-api-key": who},
                )
                assert r.status_code == 200
    signals = {}
    for who in ("spread", "focused"):
        state = await app.inspect(who)
        signals[who] = app.monitor.signals_of(state.identity)
    assert signals["spread"]["output_coverage"] > 0.25
    assert signals["focused"]["output_coverage"] < 0.1
    assert signals["spread"]["output_entropy"] > signals["focused"]["output_entropy"] + 0.3
    rules = ShieldSettings().monitor.rules()
    assert risk_of(signals["spread"], {"output_coverage": rules["output_coverage"]}, 50)[0] == 0.0
    scored = ShieldSettings(monitor={"output_coverage": "0.1:0.25"}).monitor.rules()
    assert risk_of(signals["spread"], {"output_coverage": scored["output_coverage"]}, 50)[0] == 1.0


def test_output_signals_appear_only_once_embeddings_were_seen() -> None:
    tracker = Tracker(TrackerConfig(simhash_bits=6), 32, 0.0)
    assert "output_coverage" not in tracker.signals()
    tracker.observe_output_buckets([1, 1, 2, 3])
    signals = tracker.signals()
    assert signals["output_coverage"] == pytest.approx(3 / 4)
    p = np.array([2, 1, 1]) / 4
    assert signals["output_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))


def test_memory_per_tracked_identity_is_small() -> None:
    import tracemalloc

    monitor = ExtractionMonitor(KEY, ShieldSettings().monitor.rules(), dim=32, pools=())
    rows = np.random.default_rng(16).normal(size=(600, 64))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for u in range(40):
            who = Identity(f"u{u}", "header")
            for i in range(0, 600, 3):
                monitor.observe(who, ParsedRequest(parsed=True, features=rows[i : i + 3]))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_identity = sum(s.size_diff for s in after.compare_to(before, "filename")) / 40
    assert per_identity < 40_000  # README and MONITOR__MAX_IDENTITIES say about 25 KB


@pytest.mark.anyio
async def test_a_client_repeating_one_query_is_never_flagged(clock: FakeClock) -> None:
    # The only client of an API dominates the running mean its queries are centred on;
    # asking the same thing again and again must not look novel (a regression: it did).
    events: list[ShieldEvent] = []
    app = shield(APP, clock, rate_limit="100000/minute", on_event=events.append)
    row = np.random.default_rng(20).normal(size=(1, 64)).round(3).tolist()
    async with client(app) as c:
        for _ in range(300):
            r = await c.post(
                "/v1/models/m:predict", json={"instances": row}, headers={"x-api-key": "k"}
            )
            assert r.status_code == 200
            clock.advance(1.0)
    assert events == []


def test_pools_count_only_how_queries_are_made() -> None:
    from asgi_extraction_shield.monitor.detector import POOL_SIGNALS

    settings = ShieldSettings()
    monitor: Any = shield(APP, FakeClock()).monitor
    assert set(monitor.pool_rules) == POOL_SIGNALS & set(settings.monitor.rules())
    assert "coverage" not in monitor.pool_rules and "class_entropy" not in monitor.pool_rules
    # pools have their own, stricter PRADA threshold
    assert monitor.pool_rules["prada_w"].low == 0.88 and monitor.rules["prada_w"].low == 0.94


def test_pool_members_keep_their_total_and_evict_the_smallest() -> None:
    members = Members(limit=3)
    for key, queries in [("a", 5), ("b", 1), ("c", 2), ("a", 3)]:
        members.count(key, queries)
    assert members.total == 11 and members.share_ratio("a") == 1.0  # 8/11 · 3 > 1: capped
    assert members.share_ratio("b") == pytest.approx(1 / 11 * 3)
    members.count("d", 4)  # full: "b", the smallest, goes
    assert members.counts == {"a": 8, "c": 2, "d": 4} and members.total == 14
    assert members.share_ratio("b") == 0.0 and Members(2).share_ratio("x") == 0.0


# -- the monitor's queue --------------------------------------------------------------------


def test_distances_do_not_depend_on_the_centre() -> None:
    # PRADA's distances and near-duplicates are measured between the rows as projected: the
    # running mean the cosines are taken about moves, and must not move the distances.
    rows = ExtractionMonitor(KEY, {}, dim=32).featurizer.numeric(
        probing_rows(300, np.random.default_rng(30))
    )
    signals = []
    for centre in (np.zeros(32), np.full(32, 5.0), rows.mean(axis=0)):
        tracker = Tracker(TrackerConfig(), 32, 0.0)
        for i in range(len(rows)):
            tracker.observe_queries(rows[i : i + 1], [0], [i], float(i), centre)
        signals.append(tracker.signals())
    for other in signals[1:]:
        for name in ("prada_w", "near_duplicates"):
            assert other[name] == pytest.approx(signals[0][name], abs=1e-6)
    assert signals[0]["prada_w"] < 0.9  # probing steps: far from normal distances
    # Cosines are taken about the centre: far from the data, every row points one way.
    assert signals[1]["novelty"] < signals[2]["novelty"]


def test_running_mean_is_the_stepwise_one() -> None:
    monitor = ExtractionMonitor(KEY, {}, dim=4)
    rng = np.random.default_rng(31)
    mean, count = np.zeros(4), 0
    for n in (1, 7, 9_990, 5, 40):  # exact for the first 10,000 rows, then a moving average
        rows = rng.normal(loc=3.0, size=(n, 4))
        for row in rows:
            count += 1
            mean += (row - mean) / min(count, 10_000)
        assert monitor._centre(rows, 0) == pytest.approx(mean, rel=1e-9, abs=1e-12)


def test_queued_requests_are_observed_as_one_by_one() -> None:
    # The monitor queues requests and folds them in together when an identity is due to be
    # assessed: every tracker ends up with what it would have observed request by request.
    rng = np.random.default_rng(32)
    queued = ExtractionMonitor(KEY, ShieldSettings().monitor.rules(), dim=32)
    direct = ExtractionMonitor(KEY, ShieldSettings().monitor.rules(), dim=32)
    users = [identity(f"q{i}", f"203.0.113.{i % 3 + 1}") for i in range(6)]
    for step in range(400):
        who = users[step % len(users)]
        rows = probing_rows(2, rng) if step % 2 else benign_rows(2, rng)
        request = ParsedRequest(parsed=True, features=rows, keys=[r.tobytes() for r in rows])
        queued.observe(who, request)
        direct.observe(who, request)
        direct.flush()
        assert len(queued._inbox) < 64
    queued.flush()
    for n, who in enumerate(users):
        a, b = queued.signals_of(who.key), direct.signals_of(who.key)
        assert a is not None and b is not None
        assert a["queries"] == b["queries"] == 2 * len(range(n, 400, len(users)))
        for name in ("prada_w", "near_duplicates", "novelty", "distribution_requests"):
            assert a[name] == pytest.approx(b[name], abs=1e-6), name
        assert a["coverage"] == pytest.approx(b["coverage"], abs=0.05)  # buckets: the mean
    for key, (tracker, members) in direct.pools.items():
        other, other_members = queued.pools[key]
        assert other.requests == tracker.requests and other_members.counts == members.counts
        assert other.signals()["prada_w"] == pytest.approx(tracker.signals()["prada_w"], abs=1e-6)


def test_an_identity_gets_its_latest_assessment_until_it_is_due() -> None:
    monitor = ExtractionMonitor(KEY, ShieldSettings().monitor.rules(), dim=32)
    who = identity("due", "198.51.100.20")
    rng = np.random.default_rng(33)
    seen = []
    for _ in range(3 * monitor.assess_every):
        seen.append(monitor.observe(who, ParsedRequest(parsed=True, features=uniform_rows(1, rng))))
        assert len(monitor._inbox) == monitor.identities[who.key].queued
    changes = [i for i in range(1, len(seen)) if seen[i] is not seen[i - 1]]
    assert changes == [monitor.assess_every, 2 * monitor.assess_every]
    assert monitor.identities[who.key].requests == 2 * monitor.assess_every + 1


def test_a_batch_that_adds_more_than_prada_keeps() -> None:
    # A batch of 64 spread-out queries against a set of 16 points: every stored point is
    # replaced within the batch (this used to index past the stored ones and raise).
    config = TrackerConfig(prada_points=16)
    rows = uniform_rows(64, np.random.default_rng(34))
    first = tracker_after(rows[:20], config)
    tracker = tracker_after(np.vstack([rows[:20], rows * 50]), config)
    assert tracker._prada.filled == 16 and tracker.queries == 84
    assert tracker._prada_distances.filled > first._prada_distances.filled


def test_the_queue_is_bounded_by_queries_too() -> None:
    monitor = ExtractionMonitor(KEY, {}, dim=16)
    rng = np.random.default_rng(35)
    # Two identities sending 100 queries a request: the queue is folded in at 1,024 queries,
    # before either identity is due again (every 8 of its requests, 16 of the queue's).
    for i in range(40):
        who = identity(f"b{i % 2}", "192.0.2.1")
        monitor.observe(who, ParsedRequest(parsed=True, features=rng.normal(size=(100, 8))))
        assert monitor._inbox_queries < 1_024 and len(monitor._inbox) <= 10
    assert monitor.identities[identity("b0", "192.0.2.1").key].queries >= 1_000


def test_a_request_that_cannot_be_observed_costs_no_one_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = ExtractionMonitor(KEY, {}, dim=16, pools=("net",))
    rng = np.random.default_rng(36)
    good, odd = identity("good", "192.0.2.1"), identity("odd", "192.0.2.2")
    monitor.observe(good, ParsedRequest(parsed=True, features=rng.normal(size=(1, 8))))
    monitor.observe(odd, ParsedRequest(parsed=True, features=rng.normal(size=(1, 8))))
    # A request whose features are not numbers (no adapter makes one; a custom one might),
    # queued with others, then folded in by another identity's request.
    broken = np.array([["x"] * 8], dtype=object)
    monitor.observe(odd, ParsedRequest(parsed=True, features=broken))
    for _ in range(2 * monitor.assess_every):
        monitor.observe(good, ParsedRequest(parsed=True, features=rng.normal(size=(1, 8))))
    monitor.flush()
    assert monitor.identities[good.key].queries == 1 + 2 * monitor.assess_every
    assert monitor.identities[odd.key].queries == 1 and monitor.identities[odd.key].queued == 0
    assert monitor.pools["net:192.0.2.0/24"][0].queries == 2 + 2 * monitor.assess_every
    assert "could not observe" in caplog.text


def stepping_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """Boundary probing: each query a tiny step from the one before (a line search)."""
    start = CENTERS[rng.integers(10)] + rng.normal(size=64)
    direction = rng.normal(size=64)
    return start + 0.01 * np.arange(n)[:, None] * direction


def test_pooled_near_duplicates_fall_on_those_who_asked_them() -> None:
    # Eight probers share a /24 with a busy benign user: each prober's line search is
    # spread over the pool, and the pool sees the near-duplicates; the user asked none.
    monitor = ExtractionMonitor(
        KEY, {"near_duplicates": SignalRule(0.2, 0.6)}, dim=32, min_queries=50, pools=("net",)
    )
    rng = np.random.default_rng(37)
    probers = [identity(f"p{i}", f"203.0.113.{i + 10}") for i in range(8)]
    user = identity("user", "203.0.113.200")
    lines = [stepping_rows(40, rng) for _ in probers]
    busy = benign_rows(400, rng)
    for step in range(40):
        for prober, line in zip(probers, lines, strict=True):
            monitor.observe(prober, ParsedRequest(parsed=True, features=line[step : step + 1]))
        for row in busy[step * 10 : step * 10 + 10]:
            last = monitor.observe(user, ParsedRequest(parsed=True, features=row[None, :]))
    monitor.flush()
    ((tracker, members),) = monitor.pools.values()
    assert tracker.signals()["near_duplicates"] > 0.3
    assert members.near_total > 200 and set(members.near) <= {p.key for p in probers}
    assert members.near_ratio(user.key) == 0.0 and members.share_ratio(user.key) == 1.0
    # The busiest member of a probing pool is not a prober: it gets nothing of that score.
    assert last.risk == 0.0
    prober = monitor.observe(probers[0], ParsedRequest(parsed=True, features=lines[0][:1]))
    assert prober.risk > 0.3 and "pool_risk" in prober.signals


def test_attribution_of_a_pools_scores() -> None:
    members = Members(10)
    members.count("a", 30)
    members.count("b", 10)
    for _ in range(5):
        members.count_near("b")
    members.count_near("stranger")  # not a member: not counted
    assert members.near == {"b": 5} and members.near_ratio("b") == 1.0
    assert members.near_ratio("a") == 0.0 and members.share_ratio("b") == pytest.approx(0.5)
    from asgi_extraction_shield.monitor.detector import _attributed

    # Without near-duplicates: the pool's risk times the share, as before.
    assert _attributed(0.6, {"prada_w": 0.6}, members, "b") == pytest.approx(0.3)
    # Near-duplicates go by the share of near-duplicates, the rest by the share of queries.
    scores = {"prada_w": 0.5, "near_duplicates": 0.6}
    assert _attributed(0.8, scores, members, "a") == pytest.approx(0.5)
    assert _attributed(0.8, scores, members, "b") == pytest.approx(1 - (1 - 0.25) * (1 - 0.6))
    small = Members(1)
    small.count("b", 1)
    small.count_near("b")
    small.count("c", 5)  # "b" leaves, with its near-duplicates
    assert small.near == {} and small.near_total == 0


@pytest.mark.parametrize("start", [0.0, 0.7])
def test_moving_average_is_the_stepwise_one(start: float) -> None:
    from asgi_extraction_shield.monitor.tracker import _moving_average

    values = np.random.default_rng(38).uniform(0, 3, size=64)
    values[:3] = 0.0  # a zero average is set by the first non-zero value, not moved
    for zero_starts in (False, True):
        s, expected = start, []
        for v in values:
            s = v if zero_starts and s == 0 else s + 0.05 * (v - s)
            expected.append(s)
        got = _moving_average(start, values, 0.05, zero_starts=zero_starts)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["observe", "answer", "forget", "flush", "big", "text"]),
        st.integers(0, 5),  # which identity
        st.integers(0, 3),  # which network
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_STEPS)
def test_the_queue_loses_and_duplicates_nothing(steps: list[tuple[str, int, int]]) -> None:
    # Any interleaving of requests (numeric, texts, large batches), answers, operators'
    # lifts and folds: every observed query reaches its identity's tracker exactly once
    # (unless lifted since) and its pools', and the queue stays bounded.
    monitor = ExtractionMonitor(KEY, ShieldSettings().monitor.rules(), dim=16)
    rng = np.random.default_rng(39)
    sent: dict[str, int] = {}
    pooled: dict[str, int] = {}
    for action, who_n, net in steps:
        who = identity(f"h{who_n}", f"198.51.{net}.{who_n + 1}")
        if action == "forget":
            monitor.forget(who.key)
            sent.pop(who.key, None)
        elif action == "flush":
            monitor.flush()
        elif action == "answer":
            probabilities = rng.dirichlet(np.ones(4), size=2)
            monitor.observe_outputs(who, Outputs([b"a", b"b"], probabilities=probabilities))
        else:
            if action == "text":
                request = ParsedRequest(parsed=True, texts=["a query", "another one"])
                queries = 2
            else:
                queries = 300 if action == "big" else 1
                request = ParsedRequest(parsed=True, features=rng.normal(size=(queries, 8)))
            assessment = monitor.observe(who, request)
            assert 0.0 <= assessment.risk <= 1.0
            sent[who.key] = sent.get(who.key, 0) + queries
            net_pool = f"net:198.51.{net}.0/24"
            pooled[net_pool] = pooled.get(net_pool, 0) + queries
        assert len(monitor._inbox) <= 64 and monitor._inbox_queries < 1_024
    monitor.flush()
    for key, queries in sent.items():
        assert monitor.identities[key].queries == queries
    for key, queries in pooled.items():
        assert monitor.pools[key][0].queries == queries
