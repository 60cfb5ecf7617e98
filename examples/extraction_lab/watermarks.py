"""The watermark evaluation: do substitutes stolen through the shield carry its marks?

The digits victim is served behind ``ExtractionShield`` with ``WATERMARK=drw,dawn:…``
(monitor and limits out of the way: this measures the marks, not the detection). A
Knockoff-style thief (the attacker's pool of real digits, then augmented copies) asks up
to the largest budget, and substitutes are trained on the first 1,000 / 2,000 / 5,000 / 20,000
answers it got:

- ``soft``: an MLP regressor on the probability rows (the lab's soft-label thief),
  verified with ``drw`` (probes: the owner's held-out digits and augmented copies) and
  with ``dawn`` (probes: the queries the shield marked for this thief);
- ``label``: an MLP classifier on the top-1 labels only, verified with ``dawn``;
- ``label-linear``: the lab's logistic-regression label thief, verified with ``dawn``.

Independent models (trained on true labels, by other seeds and model families) are
verified the same way: their p-values give the false positives. Benign accuracy cost is
the victim's held-out accuracy with shielded answers against raw ones. Run from the
repository root::

    python -m examples.extraction_lab.watermarks            # full, a few minutes
    python -m examples.extraction_lab.watermarks --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.svm import SVC

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.audit.attacks import knockoff
from asgi_extraction_shield.verify import verify
from asgi_extraction_shield.watermark.dawn import DAWN
from asgi_extraction_shield.watermark.drw import DRW

from .attacks import augment
from .config import SECRET_KEY
from .victim import PREDICT_PATH, Array, Victim, load_data, make_app, scaled
from .world import quiet_shield_logs

DEFAULT_OUT = Path(__file__).resolve().parent / "WATERMARKS.md"
THIEF_KEY = "thief-api-key"
SIGNIFICANCE = 1e-3


@dataclass(frozen=True)
class WatermarkConfig:
    name: str
    budgets: tuple[int, ...] = (1_000, 2_000, 5_000, 20_000)
    watermark: str = "drw,dawn:rate=0.02"
    independent: int = 20
    drw_probes: int = 8_000
    drw_nulls: int = 200
    seed: int = 20261129
    batch: int = 250


def quick() -> WatermarkConfig:
    return WatermarkConfig(
        name="quick", budgets=(300, 2_000), independent=2, drw_probes=2_000, drw_nulls=20
    )


def full() -> WatermarkConfig:
    return WatermarkConfig(name="full")


@dataclass
class Row:
    suspect: str
    budget: int | None
    scheme: str
    p_value: float
    probes: int
    detail: str = ""


@dataclass
class WatermarkResult:
    config: WatermarkConfig
    rows: list[Row] = field(default_factory=list)
    victim_accuracy: float = 0.0
    shielded_accuracy: float = 0.0
    top1_changed: float = 0.0
    max_change: float = 0.0
    marked_share: float = 0.0
    seconds: float = 0.0


def probes_of_owner(data: Any, n: int, seed: int) -> list[Any]:
    """``drw``'s probes as the owner has them: the held-out digits, then augmented copies of
    them (seeded by ``seed + 1``) up to ``n``."""
    probes = [*data.x_held.tolist()]
    rng = np.random.default_rng(seed + 1)
    while len(probes) < n:
        probes.append(augment(data.x_held[len(probes) % len(data.x_held)], rng).tolist())
    return probes[:n]


def _fit(make: Callable[[], Any], x: Array, y: Array) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # SVC(probability=True), deprecated
        return make().fit(scaled(x), y)


def independent_models(count: int, seed: int) -> list[tuple[str, Callable[[], Any]]]:
    """``count`` classifiers of other families and seeds (cycled through the families)."""
    families: list[tuple[str, Callable[[int], Any]]] = [
        ("mlp-64", lambda s: MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=s)),
        (
            "mlp-128-64",
            lambda s: MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=300, random_state=s),
        ),
        ("logistic", lambda s: LogisticRegression(C=0.5 + s % 3, max_iter=1000)),
        ("forest", lambda s: RandomForestClassifier(n_estimators=200, random_state=s)),
        ("extra-trees", lambda s: ExtraTreesClassifier(n_estimators=200, random_state=s)),
        ("knn", lambda s: KNeighborsClassifier(n_neighbors=3 + 2 * (s % 3))),
        ("svc", lambda s: SVC(C=1.0 + s % 4, probability=True, random_state=s)),
        ("naive-bayes", lambda s: GaussianNB(var_smoothing=10.0 ** -(2 + s % 3))),
    ]
    out = []
    for i in range(count):
        name, make = families[i % len(families)]
        s = seed + i
        out.append((f"{name} #{i // len(families) + 1}", lambda make=make, s=s: make(s)))
    return out


def _probabilities(model: Any) -> Callable[[list[Any]], list[Any]]:
    def answer(inputs: list[Any]) -> list[Any]:
        out: list[Any] = model.predict_proba(scaled(np.asarray(inputs))).tolist()
        return out

    return answer


def _regressor(model: Any) -> Callable[[list[Any]], list[Any]]:
    def answer(inputs: list[Any]) -> list[Any]:
        raw = np.clip(model.predict(scaled(np.asarray(inputs))), 1e-6, None)
        rows: list[Any] = (raw / raw.sum(axis=1, keepdims=True)).tolist()
        return rows

    return answer


def _labels(model: Any) -> Callable[[list[Any]], list[Any]]:
    def answer(inputs: list[Any]) -> list[Any]:
        return [int(v) for v in model.predict(scaled(np.asarray(inputs)))]

    return answer


async def _ask(shield: ExtractionShield, queries: Array, batch: int, key: str) -> Array:
    transport = httpx.ASGITransport(app=shield)
    rows: list[Any] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://lab") as client:
        for start in range(0, len(queries), batch):
            chunk = queries[start : start + batch].tolist()
            reply = await client.post(
                PREDICT_PATH, json={"instances": chunk}, headers={"x-api-key": key}
            )
            reply.raise_for_status()
            rows += reply.json()["predictions"]
    return np.asarray(rows, dtype=np.float64)


def run(
    config: WatermarkConfig, progress: Callable[[str], None] = lambda _: None
) -> WatermarkResult:
    started = time.perf_counter()
    result = WatermarkResult(config)
    data = load_data(config.seed)
    victim = Victim(data, config.seed)
    shield = ExtractionShield(
        make_app(victim),
        secret_key=SECRET_KEY,
        watermark=config.watermark,
        rate_limit="1000000/minute",
        monitor={"enabled": False},
    )
    (dawn,) = [w for w in shield.watermarks if isinstance(w, DAWN)]
    (marked_by_drw,) = [w for w in shield.watermarks if isinstance(w, DRW)]
    rng = np.random.default_rng(config.seed)
    strategy = knockoff(augment)(data.x_pool, rng, config.seed)
    queries = np.asarray([next(strategy) for _ in range(max(config.budgets))])
    with quiet_shield_logs():
        answers = asyncio.run(_ask(shield, queries, config.batch, THIEF_KEY))
        held = asyncio.run(_ask(shield, data.x_held, config.batch, "benign-owner"))
    progress("answers collected")
    raw_held = victim.predict_proba(data.x_held)
    result.victim_accuracy = float((raw_held.argmax(axis=1) == data.y_held).mean())
    result.shielded_accuracy = float((held.argmax(axis=1) == data.y_held).mean())
    result.top1_changed = float((held.argmax(axis=1) != raw_held.argmax(axis=1)).mean())
    result.max_change = float(np.abs(held - raw_held).max())
    thief_records = [r for r in dawn.store.records() if r["identity"] != ""]
    marked = {tuple(r["input"]) for r in thief_records}
    result.marked_share = len(marked) / len(queries)

    owner_probes = probes_of_owner(data, config.drw_probes, config.seed)
    drw_records = [{"input": x} for x in owner_probes]
    # The verifiers look for the marks the shield made: the same parameters.
    drw_spec = DRW(marked_by_drw.k, marked_by_drw.eps, config.drw_nulls, marked_by_drw.features)
    dawn_spec = repr(dawn)

    def records_until(budget: int) -> list[dict[str, Any]]:
        asked = {tuple(x) for x in queries[:budget].tolist()}
        return [r for r in thief_records if tuple(r["input"]) in asked]

    def owner(inputs: list[Any]) -> list[Any]:
        """The owner's own model, without the shield: drw's reference."""
        rows: list[Any] = victim.predict_proba(np.asarray(inputs)).tolist()
        return rows

    def check(
        suspect: str,
        budget: int | None,
        scheme: str | DRW,
        answer: Any,
        records: Sequence[Any],
        reference: Any = None,
    ) -> None:
        verdict = verify(
            scheme,
            answer,
            key=SECRET_KEY,
            records=records,
            probes=100_000,
            alpha=SIGNIFICANCE,
            reference=reference,
        )
        detail = ""
        if verdict.scheme == "dawn":
            detail = (
                f"keyed label on top in {verdict.details.get('units_agreeing', 0)}"
                f"/{verdict.details.get('units', 0)} units of "
                f"{verdict.details.get('regions', 0)} regions"
            )
        name = f"{verdict.scheme} + reference" if reference is not None else verdict.scheme
        result.rows.append(Row(suspect, budget, name, verdict.p_value, verdict.probes, detail))

    for budget in config.budgets:
        x, p = queries[:budget], answers[:budget]
        records = records_until(budget)
        soft = _fit(
            lambda: MLPRegressor(hidden_layer_sizes=(64,), max_iter=300, random_state=config.seed),
            x,
            p,
        )
        check("soft", budget, drw_spec, _regressor(soft), drw_records)
        check("soft", budget, drw_spec, _regressor(soft), drw_records, reference=owner)
        check("soft", budget, dawn_spec, _regressor(soft), records)
        label = _fit(
            lambda: MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=config.seed),
            x,
            p.argmax(axis=1),
        )
        check("label", budget, dawn_spec, _labels(label), records)
        linear = _fit(lambda: LogisticRegression(max_iter=500), x, p.argmax(axis=1))
        check("label-linear", budget, dawn_spec, _labels(linear), records)
        progress(f"thieves at {budget}")

    x_true = np.concatenate([data.x_train, data.x_pool])
    y_true = np.concatenate([data.y_train, data.y_pool])
    all_records = records_until(max(config.budgets))
    for name, make in independent_models(config.independent, config.seed):
        model = _fit(make, x_true, y_true)
        check(name, None, drw_spec, _probabilities(model), drw_records)
        check(name, None, drw_spec, _probabilities(model), drw_records, reference=owner)
        check(name, None, dawn_spec, _labels(model), all_records)
    progress("independent models")
    result.seconds = time.perf_counter() - started
    return result


def _p(value: float) -> str:
    return "< 1e-300" if value <= 1e-300 else f"{value:.1e}"


def report(result: WatermarkResult) -> str:
    config = result.config
    thieves = [r for r in result.rows if r.budget is not None]
    independent = [r for r in result.rows if r.budget is None]
    lines = [
        "# Watermark evaluation",
        "",
        f"Configuration `{config.name}`, `WATERMARK={config.watermark}`, significance "
        f"{SIGNIFICANCE:g}; run in {result.seconds:.0f} s by "
        f"`python -m examples.extraction_lab.watermarks{' --quick' if config.name == 'quick' else ''}`.",
        "",
        "## Stolen substitutes",
        "",
        "| thief | answers | scheme | p-value | probes | |",
        "|---|---:|---|---:|---:|---|",
    ]
    lines += [
        f"| {r.suspect} | {r.budget:,} | {r.scheme} | {_p(r.p_value)} | {r.probes:,} | {r.detail} |"
        for r in thieves
    ]
    lines += ["", f"## Independent models ({config.independent}, true labels)", ""]
    for scheme in ("drw", "drw + reference", "dawn"):
        ps = sorted(r.p_value for r in independent if r.scheme == scheme)
        if ps:
            flagged = sum(p < SIGNIFICANCE for p in ps)
            lines.append(
                f"- {scheme}: {flagged} of {len(ps)} below {SIGNIFICANCE:g}; smallest p-value "
                f"{_p(ps[0])}, median {_p(float(np.median(ps)))}"
            )
    lines += [
        "",
        "## Cost to legitimate users (held-out digits through the shield)",
        "",
        f"- accuracy {result.victim_accuracy:.4f} raw, {result.shielded_accuracy:.4f} shielded "
        f"(cost {result.victim_accuracy - result.shielded_accuracy:+.4f})",
        f"- top-1 label changed on {result.top1_changed:.2%} of answers; largest change of "
        f"one probability {result.max_change:.3f}",
        f"- thief queries marked by dawn: {result.marked_share:.2%}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.extraction_lab.watermarks",
        description="Verify substitutes stolen through the shield, and independent models.",
    )
    parser.add_argument("--quick", action="store_true", help="small budgets (CI, seconds)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"report (default {DEFAULT_OUT})"
    )
    parser.add_argument("--watermark", default=None, help="WATERMARK spec to evaluate")
    args = parser.parse_args(argv)
    config = quick() if args.quick else full()
    if args.watermark:
        config = WatermarkConfig(**{**config.__dict__, "watermark": args.watermark})
    started = time.perf_counter()
    result = run(
        config,
        lambda what: print(f"  {time.perf_counter() - started:6.1f} s  {what}", file=sys.stderr),
    )
    args.out.write_text(report(result), encoding="utf-8")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
