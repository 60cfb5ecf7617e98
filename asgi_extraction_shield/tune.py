"""Shadow-mode tuning: thresholds for a target false-positive rate, from the event log.

Run the shield with ``MODE=shadow`` and ``ASSESSED_INTERVAL`` set (say 60 s) on real
traffic, keep the JSON lines it logs on ``asgi_extraction_shield``, then::

    extraction-shield tune --events shield.log --target-fpr 0.01 [--known-bad FILE] [--json]

**Assumption.** Nearly every identity in a shadow log is benign (or the ones that are not
are listed with ``--known-bad``). The thresholds are then set from the *empirical
distribution of benign identities' peak risk*: an identity reaches a level when its risk
(the larger of its latest assessment and its decayed past) crosses the level's threshold
once, so what matters per identity is the highest risk it ever had. For a budget ``b``
(a share of benign identities allowed to reach a level) and ``n`` benign identities, at
most ``k = ⌊b·n⌋`` may reach it: the threshold goes just above the ``(k+1)``-th highest
peak (by ``margin``, or half-way to the next higher peak if that is closer), so that
exactly the ``k`` highest can cross it in this log. Budgets per level: ``watch`` 5·FPR
(it only logs), ``degrade`` FPR, ``throttle`` FPR/2, ``block`` FPR/5; a level that costs a
benign user more is allowed fewer of them. With ``n < 1/b`` the log cannot measure that
rate and the threshold goes above every benign peak (said in the warnings). Levels stay
at least ``POLICY__HYSTERESIS`` apart, and ``watch`` at least that high: a level is left
only that far below its threshold, so a lower one could never be left.

Signals get the same treatment: for each signal with a rule, ``low`` moves to where at
most FPR of benign identities ever score on it (values taken only once an identity has
``MONITOR__MIN_QUERIES`` queries, when the signal counts), keeping the rule's width and
weight; a signal that is the same for every benign identity (never measured, or never
seen) tells nothing and gets no suggestion. Known-bad identities, when given, are reported as caught or not at the suggested
thresholds; they never enter the benign distribution.

Attackers that were present but not listed push thresholds up (they count as benign
false positives): the suggestion errs towards fewer false positives, never more.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .monitor.risk import SignalRule
from .policy import LEVELS

LEVEL_BUDGETS = {"watch": 5.0, "degrade": 1.0, "throttle": 0.5, "block": 0.2}
"""Each level's share of benign identities allowed to reach it, in units of the target FPR."""
FALLING = frozenset({"prada_w"})
"""Signals whose low values are the suspicious ones."""
OBSERVED_KINDS = frozenset({"assessed", "level_changed", "blocked", "rate_limited"})


@dataclass(slots=True)
class Profile:
    """One identity's extremes over the log: its peak risk and each signal's most
    suspicious value once it counted."""

    identity: str
    peak_risk: float = 0.0
    signals: dict[str, float] = field(default_factory=dict)


def parse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Shield events from log lines: the JSON object itself, possibly after a prefix that
    a log format added (time, level), or inside a JSON formatter's ``message``. Other
    lines are skipped."""
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            doc = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(doc, dict) and "kind" not in doc:
            inner = doc.get("message", doc.get("msg"))
            if isinstance(inner, str) and inner.startswith("{"):
                try:
                    doc = json.loads(inner)
                except ValueError:
                    continue
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
            yield doc


def profiles(
    events: Iterable[Mapping[str, Any]], signals: Iterable[str], min_queries: int
) -> dict[str, Profile]:
    """Each identity's :class:`Profile` from its events."""
    names = frozenset(signals)
    out: dict[str, Profile] = {}
    for event in events:
        identity = event.get("identity")
        if event.get("kind") not in OBSERVED_KINDS or not identity:
            continue
        profile = out.get(identity)
        if profile is None:
            profile = out[identity] = Profile(identity)
        risk = _number(event.get("risk"))
        if risk is not None:
            profile.peak_risk = max(profile.peak_risk, risk)
        values = event.get("signals") or {}
        if not isinstance(values, dict) or (_number(values.get("queries")) or 0) < min_queries:
            continue
        for name in names.intersection(values):
            value = _number(values[name])
            if value is None:
                continue
            seen = profile.signals.get(name)
            falling = name in FALLING
            if seen is None or (value < seen if falling else value > seen):
                profile.signals[name] = value
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def threshold_for(peaks: Sequence[float], budget: float, margin: float) -> float:
    """The lowest sensible threshold that at most ``⌊budget·n⌋`` of ``peaks`` reach
    (``value >= threshold``): just above the ``(k+1)``-th highest peak, by ``margin`` or
    half-way to the next higher peak, whichever is closer."""
    ranked = sorted(peaks, reverse=True)
    k = math.floor(budget * len(ranked) + 1e-9)
    if k >= len(ranked):
        return 0.0
    edge = ranked[k]
    higher = [p for p in ranked[:k] if p > edge]
    step = margin if not higher else min(margin, (min(higher) - edge) / 2)
    return edge + step


def reached(peaks: Iterable[float], threshold: float) -> int:
    return sum(1 for p in peaks if p >= threshold)


@dataclass(frozen=True, slots=True)
class LevelAdvice:
    level: str
    budget: float
    current: float
    current_fpr: float
    suggested: float
    suggested_fpr: float
    known_bad_caught: int | None


@dataclass(frozen=True, slots=True)
class SignalAdvice:
    signal: str
    identities: int
    benign_median: float
    benign_p99: float
    current: str
    suggested: str
    suggested_fpr: float


@dataclass(frozen=True, slots=True)
class Tuning:
    target_fpr: float
    identities: int
    benign: int
    known_bad: int
    levels: list[LevelAdvice]
    signals: list[SignalAdvice]
    env: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune(
    events: Iterable[Mapping[str, Any]],
    *,
    target_fpr: float,
    current_levels: Mapping[str, float],
    current_rules: Mapping[str, SignalRule],
    min_queries: int,
    known_bad: Iterable[str] = (),
    margin: float = 0.02,
    hysteresis: float = 0.1,
) -> Tuning:
    """Suggested policy thresholds and signal rules (see the module docstring)."""
    if not 0 < target_fpr < 1:
        raise ValueError(f"target FPR {target_fpr!r}: expected a share in (0, 1)")
    events = list(events)
    shadow = [bool(e.get("shadow")) for e in events if e.get("kind") in OBSERVED_KINDS]
    assessed = any(e.get("kind") == "assessed" for e in events)
    people = profiles(events, current_rules, min_queries)
    bad_keys = frozenset(known_bad)
    benign = [p for key, p in people.items() if key not in bad_keys]
    bad = [p for key, p in people.items() if key in bad_keys]
    if not benign:
        raise ValueError("the log holds no benign identity: nothing to tune on")
    warnings = _warnings(assessed, shadow, len(bad_keys), len(bad))
    peaks = [p.peak_risk for p in benign]
    levels: list[LevelAdvice] = []
    env: list[str] = []
    floor = hysteresis
    for level in LEVELS[1:]:
        budget = min(1.0, LEVEL_BUDGETS[level] * target_fpr)
        # Levels stay ordered and apart (see the module docstring), and risk stays ≤ 1.
        suggested = round(min(1.0, max(floor, threshold_for(peaks, budget, margin))), 3)
        floor = suggested + hysteresis
        if len(peaks) * budget < 1:
            warnings.append(
                f"'{level}': {len(peaks)} benign identities cannot measure a share of "
                f"{budget:g} (one identity is {1 / len(peaks):.2g}); set above every benign peak"
            )
        current = current_levels[level]
        caught = sum(1 for p in bad if p.peak_risk >= suggested) if bad else None
        levels.append(
            LevelAdvice(
                level,
                budget,
                current,
                reached(peaks, current) / len(peaks),
                suggested,
                reached(peaks, suggested) / len(peaks),
                caught,
            )
        )
        env.append(f"EXTRACTION_SHIELD_POLICY__{level.upper()}={suggested:g}")
    signals = []
    for name, rule in current_rules.items():
        values = [p.signals[name] for p in benign if name in p.signals]
        if not values or min(values) == max(values):
            continue  # never measured, or the same for everyone: nothing to learn
        advice = _signal_advice(name, rule, values, target_fpr, margin)
        signals.append(advice)
        env.append(f"EXTRACTION_SHIELD_MONITOR__{name.upper()}={advice.suggested}")
    return Tuning(target_fpr, len(people), len(benign), len(bad), levels, signals, env, warnings)


def _signal_advice(
    name: str, rule: SignalRule, values: list[float], target_fpr: float, margin: float
) -> SignalAdvice:
    falling = name in FALLING
    scale = max(abs(rule.high - rule.low), 1e-9)
    step = margin * scale * 5  # a margin in proportion to the rule's own width
    signed = [-v for v in values] if falling else values
    low = threshold_for(signed, target_fpr, step)
    low = -low if falling else low
    width = rule.high - rule.low
    suggested = _rule_text(SignalRule(round(low, 4), round(low + width, 4), rule.weight))
    over = sum(1 for v in values if (v <= low if falling else v >= low))
    ordered = sorted(values)
    return SignalAdvice(
        name,
        len(values),
        round(ordered[len(ordered) // 2], 4),
        round(ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)], 4),
        _rule_text(rule),
        suggested,
        over / len(values),
    )


def _rule_text(rule: SignalRule) -> str:
    text = f"{rule.low:g}:{rule.high:g}"
    return text if rule.weight == 1.0 else f"{text}:{rule.weight:g}"


def _warnings(assessed: bool, shadow: list[bool], listed: int, found: int) -> list[str]:
    out = []
    if not assessed:
        out.append(
            "no 'assessed' events: only identities that changed level or were limited are "
            "in the log, so benign identities are undercounted and thresholds come out too "
            "low; run the shadow deployment with EXTRACTION_SHIELD_ASSESSED_INTERVAL=60"
        )
    if shadow and not all(shadow):
        out.append(
            "some events come from MODE=enforce: refused clients stop showing their risk, "
            "so their peaks are understated"
        )
    if listed > found:
        out.append(f"{listed - found} of the {listed} known-bad identities are not in the log")
    return out


def render(tuning: Tuning) -> str:
    """The human-readable report."""
    lines = [
        f"{tuning.identities} identities in the log: {tuning.benign} taken as benign, "
        f"{tuning.known_bad} known bad. Target false-positive rate: {tuning.target_fpr:g}.",
        "Assumption: the identities not listed as known bad are benign; thresholds are set "
        "from their peak risk (see `extraction-shield tune --help`).",
        "",
        "level     budget  current  benign reaching  suggested  benign reaching  known bad caught",
    ]
    for a in tuning.levels:
        caught = "" if a.known_bad_caught is None else f"{a.known_bad_caught}/{tuning.known_bad}"
        lines.append(
            f"{a.level:<9} {a.budget:<7.3g} {a.current:<8.3g} {a.current_fpr:<16.2%} "
            f"{a.suggested:<10.3g} {a.suggested_fpr:<16.2%} {caught}"
        )
    if tuning.signals:
        lines += [
            "",
            "signal                 identities  median   p99      current       suggested",
        ]
        for s in tuning.signals:
            lines.append(
                f"{s.signal:<22} {s.identities:<11} {s.benign_median:<8.3g} "
                f"{s.benign_p99:<8.3g} {s.current:<13} {s.suggested}"
            )
    lines += ["", "To apply:", *(f"  {line}" for line in tuning.env)]
    if tuning.warnings:
        lines += ["", "Warnings:", *(f"  - {w}" for w in tuning.warnings)]
    return "\n".join(lines)
