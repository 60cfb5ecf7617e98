"""Shadow-mode tuning: the threshold rule, the event log reader, ``assessed`` events, and
``extraction-shield tune`` end to end on a log of the extraction lab run in shadow mode."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asgi_extraction_shield import ShieldEvent
from asgi_extraction_shield.cli import main
from asgi_extraction_shield.events import AssessedSampler
from asgi_extraction_shield.monitor import Assessment
from asgi_extraction_shield.monitor.risk import SignalRule
from asgi_extraction_shield.tune import parse_events, profiles, reached, threshold_for, tune

from .conftest import FakeClock, client, scripted_shield

LEVELS = {"watch": 0.3, "degrade": 0.5, "throttle": 0.7, "block": 0.9}


@pytest.mark.parametrize("budget", [0.001, 0.01, 0.05, 0.2])
def test_threshold_is_the_lowest_that_at_most_the_budget_reaches(budget: float) -> None:
    peaks = np.random.default_rng(7).beta(2, 8, size=2000).tolist()
    allowed = int(budget * len(peaks))
    t = threshold_for(peaks, budget, margin=0.02)
    edge = sorted(peaks, reverse=True)[allowed]  # the (k+1)-th highest peak
    assert reached(peaks, t) <= allowed < reached(peaks, edge)
    assert edge < t <= edge + 0.02


def test_threshold_on_a_grid_splits_the_gap_and_covers_small_logs() -> None:
    grid = [i / 1000 for i in range(1000)]
    # k = 10 may reach it: above 0.989, half-way to 0.990 (closer than the margin)
    assert threshold_for(grid, 0.01, 0.02) == pytest.approx(0.9895)
    # 50 identities cannot measure 1%: above the highest peak, by the margin
    assert threshold_for([0.1] * 49 + [0.4], 0.01, 0.02) == pytest.approx(0.42)


def test_parse_events_reads_prefixed_and_wrapped_lines() -> None:
    event = {"kind": "assessed", "identity": "header:" + "a" * 24, "risk": 0.2}
    lines = [
        json.dumps(event),
        "2026-11-29 13:00:00 INFO " + json.dumps(event),
        json.dumps({"level": "INFO", "message": json.dumps(event)}),
        "a plain line",
        "{broken json",
        json.dumps({"no": "kind"}),
    ]
    assert list(parse_events(lines)) == [event] * 3


def test_profiles_keep_peaks_and_count_signals_once_they_count() -> None:
    def ev(risk: float, queries: float, **signals: float) -> dict[str, Any]:
        return {
            "kind": "assessed",
            "identity": "ip:x",
            "risk": risk,
            "signals": {"queries": queries, **signals},
        }

    events = [
        ev(0.1, 10, coverage=1.0, prada_w=0.5),  # before MIN_QUERIES: does not count
        ev(0.4, 60, coverage=0.4, prada_w=0.97),
        ev(0.2, 80, coverage=0.6, prada_w=0.93),
        {"kind": "lifted", "identity": "ip:x", "risk": 0.99},  # not an observation
    ]
    (profile,) = profiles(events, ["coverage", "prada_w"], min_queries=50).values()
    assert profile.peak_risk == 0.4
    assert profile.signals == {"coverage": 0.6, "prada_w": 0.93}  # prada_w: the lowest


def test_assessed_sampler_reports_first_then_the_peak_once_per_interval() -> None:
    clock = FakeClock()
    sampler = AssessedSampler(60.0, clock, max_identities=2)
    first = Assessment(0.1)
    assert sampler.offer("a", first) is first  # first sight: reported at once
    reports = []
    for risk in (0.3, 0.7, 0.2):
        clock.advance(20.0)
        reports.append(sampler.offer("a", Assessment(risk)))
    assert reports[:2] == [None, None] and reports[2] is not None
    assert reports[2].risk == 0.7  # the peak of the interval, not the latest
    sampler.offer("b", first)
    sampler.offer("c", first)  # bounded: the longest unreported ("a") is dropped
    assert set(sampler._due) == {"b", "c"}


@pytest.mark.anyio
@pytest.mark.parametrize("interval", [0.0, 60.0])
async def test_the_middleware_emits_assessed_events_only_when_asked(
    clock: FakeClock, interval: float
) -> None:
    events: list[ShieldEvent] = []
    app, monitor = scripted_shield(
        clock, mode="shadow", on_event=events.append, assessed_interval=interval
    )
    key = app.identities.keys_for("k")[0]
    async with client(app) as c:
        for risk in (0.1, 0.25, 0.2, 0.05):  # 20 s apart
            monitor.risk[key] = risk
            await c.post("/predict", json={"instances": [[1.0]]}, headers={"x-api-key": "k"})
            clock.advance(20.0)
    assessed = [e for e in events if e.kind == "assessed"]
    if not interval:
        assert assessed == []
        return
    # at once, then 60 s later with the peak of that minute (0.25, not the latest 0.05)
    assert [(e.identity, e.risk) for e in assessed] == [(key, 0.1), (key, 0.25)]
    assert assessed[1].signals["coverage"] == 0.25 and assessed[1].shadow


def test_tune_reports_fprs_and_known_bad_at_each_level() -> None:
    benign = [
        {"kind": "assessed", "identity": f"header:{i:024x}", "risk": i / 100} for i in range(100)
    ]
    bad = {"kind": "blocked", "identity": "header:" + "f" * 24, "risk": 1.0}
    result = tune(
        [*benign, bad],
        target_fpr=0.02,
        current_levels=LEVELS,
        current_rules={},
        min_queries=50,
        known_bad=[bad["identity"], "header:" + "e" * 24],
        hysteresis=0.0,  # the budget rule alone
    )
    assert (result.identities, result.benign, result.known_bad) == (101, 100, 1)
    by_level = {a.level: a for a in result.levels}
    assert by_level["degrade"].current_fpr == pytest.approx(0.5)  # 0.50 … 0.99 reach 0.5
    # 2 of 100 may reach it: above the third highest (0.97), half-way to the next (0.98)
    assert by_level["degrade"].suggested == pytest.approx(0.975)
    assert by_level["degrade"].suggested_fpr == pytest.approx(0.02)
    assert by_level["watch"].suggested == pytest.approx(0.895)  # 10 of 100
    # FPR/5 of 100 is no identity at all: above the highest benign peak, 0.99 + 0.02, capped
    assert by_level["block"].suggested == 1.0 and by_level["block"].suggested_fpr == 0.0
    assert all(a.known_bad_caught == 1 for a in result.levels)
    assert "EXTRACTION_SHIELD_POLICY__DEGRADE=0.975" in result.env
    assert any("known-bad identities are not in the log" in w for w in result.warnings)
    assert any(w.startswith("'block': 100 benign identities") for w in result.warnings)


def test_levels_stay_a_hysteresis_apart_and_flat_signals_get_no_advice() -> None:
    quiet = [
        {
            "kind": "assessed",
            "identity": f"ip:{i}",
            "risk": 0.0,
            "signals": {"queries": 80.0, "prada_w": 1.0, "coverage": 0.2 + i / 1000},
        }
        for i in range(200)
    ]
    rules = {"prada_w": SignalRule(0.94, 0.85), "coverage": SignalRule(0.5, 0.7, 0.5)}
    result = tune(
        quiet,
        target_fpr=0.01,
        current_levels=LEVELS,
        current_rules=rules,
        min_queries=50,
        hysteresis=0.1,
    )
    # nobody had any risk: each level starts a hysteresis above the last (watch above 0 by
    # as much, or an identity could never leave it)
    assert [a.suggested for a in result.levels] == [0.1, 0.2, 0.3, 0.4]
    assert not any("assessed" in w for w in result.warnings)
    # prada_w is 1.0 for everyone (never measured): no advice; coverage's low goes above
    # the 2 highest of 200 (1%): 0.397 + min(0.02 * 0.2 * 5, half-way to 0.398)
    (coverage,) = result.signals
    assert coverage.signal == "coverage" and coverage.current == "0.5:0.7:0.5"
    assert coverage.suggested == "0.3975:0.5975:0.5" and coverage.suggested_fpr == 0.01


# -- end to end: the lab's traffic through the middleware in shadow mode ------------------


@pytest.fixture(scope="module")
def shadow_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    if not os.environ.get("CI"):
        pytest.importorskip("sklearn")
    from examples.extraction_lab.config import quick
    from examples.extraction_lab.lab import WorldSpec, _actors
    from examples.extraction_lab.victim import Victim, load_data
    from examples.extraction_lab.world import FakeClock as LabClock
    from examples.extraction_lab.world import aligned_start, simulate

    config = quick()
    data = load_data(config.seed_of("data"))
    victim = Victim(data, config.seed_of("victim"))
    start = aligned_start(600.0)
    attack = WorldSpec("uniform/single", "uniform", "single")
    actors = _actors(WorldSpec("benign"), config, data, start) + _actors(
        attack, config, data, start
    )
    path = tmp_path_factory.mktemp("tune") / "shield.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("asgi_extraction_shield")
    before = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        world = asyncio.run(
            simulate(
                "tune",
                victim,
                data.x_held,
                victim.labels(data.x_held),
                actors,
                LabClock(start),
                shield_on=True,
                overrides={"mode": "shadow", "assessed_interval": 60.0},
                rng=config.rng("pace", "tune"),
                attack="uniform",
                split="single",
            )
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)
        handler.close()
    return path, world


def test_tune_end_to_end_on_a_shadow_log(
    shadow_log: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, world = shadow_log
    traces = world.traces
    attacker = traces["attacker"]
    benign = [t for t in traces.values() if t.role == "benign"]
    assert max(attacker.level) == 4 and attacker.count("blocked") == 0  # shadow: never refused
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# the lab's thief\n{attacker.key}\n", encoding="utf-8")
    fpr = 0.1
    code = main(
        ["tune", "--events", str(path), "--target-fpr", str(fpr), "--known-bad", str(bad), "--json"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["identities"], result["benign"], result["known_bad"]) == (
        len(benign) + 1,
        len(benign),
        1,
    )
    assert not any("assessed" in w for w in result["warnings"])
    # Checked against the lab's own record of each identity's policy risk after each request.
    peaks = [max(t.risk) for t in benign]
    levels = {a["level"]: a for a in result["levels"]}
    for level, advice in levels.items():
        allowed = int(advice["budget"] * len(benign) + 1e-9)
        assert reached(peaks, advice["suggested"]) <= allowed, level
        assert advice["known_bad_caught"] == 1, level  # the thief still reaches every level
    assert max(attacker.risk) >= levels["block"]["suggested"]
    signals = {s["signal"]: s for s in result["signals"]}
    assert {"coverage", "class_entropy"} <= set(signals)
    assert any(line.startswith("EXTRACTION_SHIELD_MONITOR__COVERAGE=") for line in result["env"])
    # the log says what the lab recorded: each identity's peak policy risk
    with path.open(encoding="utf-8") as lines:
        seen = profiles(parse_events(lines), [], min_queries=50)
    assert {t.key: pytest.approx(max(t.risk)) for t in traces.values()} == {
        key: p.peak_risk for key, p in seen.items()
    }
    # unlisted, the thief counts as benign: its peak of 1.0 is a false positive the strict
    # levels may not afford, which pushes them to the cap (fewer false positives, not more)
    assert main(["tune", "--events", str(path), "--target-fpr", str(fpr)]) == 0
    text = capsys.readouterr().out
    assert "Assumption:" in text and "EXTRACTION_SHIELD_POLICY__BLOCK=1\n" in text


def test_tune_refuses_what_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n", encoding="utf-8")
    assert main(["tune", "--events", str(empty)]) == 2
    assert "no benign identity" in capsys.readouterr().err
    assert main(["tune", "--events", str(tmp_path / "missing.log")]) == 2
    line = json.dumps({"kind": "assessed", "identity": "ip:x", "risk": 0.1})
    empty.write_text(line + "\n", encoding="utf-8")
    assert main(["tune", "--events", str(empty), "--target-fpr", "1.5"]) == 2
    assert "target FPR" in capsys.readouterr().err
