"""The classifier watermarks: DRW (periodic signal in probabilities) and DAWN (keyed wrong
labels over keyed regions), their statistics against known formulas and distributions,
the cost they put on answers, their calibration under the null, key separation, and
their verifiers' robustness to hostile answers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal as scipy_signal
from scipy import stats
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_extraction_shield import ExtractionShield, ShieldSettings
from asgi_extraction_shield.formats.base import Outputs, batch_request, canonical_keys
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.postprocess.chain import Context
from asgi_extraction_shield.verify import VerificationError, verify
from asgi_extraction_shield.watermark import build_watermarks, parse_watermarks, watermark_key
from asgi_extraction_shield.watermark.dawn import DAWN
from asgi_extraction_shield.watermark.drw import DRW, signal
from asgi_extraction_shield.watermark.projection import (
    cells,
    directions,
    features,
    phase,
    phase_direction,
    scores,
)
from asgi_extraction_shield.watermark.pvalues import binomial_sf, keyed_choice_sf
from asgi_extraction_shield.watermark.records import RecordStore
from asgi_extraction_shield.watermark.stats import calibrated_tail, lomb_scargle

from .conftest import SECRET

RNG = np.random.default_rng(7)
CENTRES = RNG.normal(0.0, 1.0, (5, 16))
WEIGHTS = RNG.normal(0.0, 1.0, (16, 5))


def blobs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return CENTRES[rng.integers(0, 5, n)] + rng.normal(0.0, 0.6, (n, 16))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def model(x: np.ndarray, weights: np.ndarray = WEIGHTS) -> np.ndarray:
    """An "independent" classifier of the blobs."""
    return softmax(np.asarray(x) @ weights)


def shielded(watermark: Any, x: np.ndarray, identity: str = "id") -> Outputs:
    """What the watermark makes of ``model(x)``, through the chain's ``Context``."""
    items = x.tolist()
    request = batch_request(KServeV1(), items)
    outputs = Outputs(request.keys, probabilities=model(x))
    watermark.apply(outputs, Context(b"unused", identity, request))
    return outputs


def one_by_one(p: np.ndarray) -> list[Outputs]:
    return [Outputs([b""], probabilities=p[i : i + 1]) for i in range(len(p))]


def bound(*specs: str, secret: str = SECRET) -> Any:
    (watermark,) = build_watermarks(ShieldSettings(watermark=",".join(specs)), secret.encode())
    return watermark


# -- statistics against references -----------------------------------------------------------


def test_lomb_scargle_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    t = np.sort(rng.random(300))
    y = np.cos(16 * t + 0.3) + rng.normal(0, 0.5, 300)
    y -= y.mean()
    omegas = np.linspace(1.0, 60.0, 97)
    np.testing.assert_allclose(
        lomb_scargle(t, y, omegas), scipy_signal.lombscargle(t, y, omegas), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [(0, 10, 0.1), (3, 10, 0.1), (7, 40, 0.1), (25, 60, 0.5), (60, 60, 0.1), (5, 4, 0.3)],
)
def test_binomial_tail_matches_scipy(k: int, n: int, p: float) -> None:
    expected = float(stats.binom.sf(k - 1, n, p))
    assert math.isclose(binomial_sf(k, n, p), expected, rel_tol=1e-9, abs_tol=1e-300)


def test_keyed_choice_tail_is_exact() -> None:
    counts = [[3, 0, 1], [0, 2, 0], [1, 1, 1], [4, 0, 0]]
    totals = [
        a[i] + b[j] + c[k] + d[m]
        for a in [counts[0]]
        for b in [counts[1]]
        for c in [counts[2]]
        for d in [counts[3]]
        for i in range(3)
        for j in range(3)
        for k in range(3)
        for m in range(3)
    ]
    for observed in range(12):
        expected = sum(t >= observed for t in totals) / len(totals)
        assert math.isclose(keyed_choice_sf(observed, counts), expected, rel_tol=1e-12)
    # One answer per region: the binomial of the region-level test.
    one_hot = [[1 if c == r % 10 else 0 for c in range(10)] for r in range(40)]
    for observed in (0, 4, 9, 20):
        assert math.isclose(
            keyed_choice_sf(observed, one_hot), binomial_sf(observed, 40, 0.1), rel_tol=1e-9
        )


# -- DRW -------------------------------------------------------------------------------------


def test_drw_formula_simplex_and_cost_bound() -> None:
    rng = np.random.default_rng(2)
    p = softmax(rng.normal(0, 3, (2000, 7)))
    t = rng.random(2000)
    eps = 0.2
    q = signal(p, t, 3, 16.0, eps)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    assert q.min() >= 0
    expected_target = (p[:, 3] + eps * (1 + np.cos(16 * t))) / (1 + 2 * eps)
    np.testing.assert_allclose(q[:, 3], expected_target)
    other = (p[:, 0] + eps / 6 * (1 + np.cos(16 * t + np.pi))) / (1 + 2 * eps)
    np.testing.assert_allclose(q[:, 0], other)
    change = np.abs(q - p).max()
    assert change <= 2 * eps / (1 + 2 * eps) + 1e-12
    assert change > 0.9 * 2 * eps / (1 + 2 * eps)  # the documented bound is tight


def test_drw_marks_rows_deterministically_and_per_key() -> None:
    x = blobs(64, 3)
    drw = bound("drw:k=16")
    a = shielded(drw, x).probabilities
    assert a is not None
    np.testing.assert_array_equal(a, shielded(drw, x).probabilities)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    other = shielded(bound("drw:k=16", secret=SECRET + "2"), x).probabilities
    assert not np.allclose(a, other)
    # Each row depends on its own input only (batch composition does not matter).
    np.testing.assert_allclose(shielded(drw, x[:5]).probabilities, a[:5])


@pytest.mark.parametrize("width", [0, 1024])
def test_drw_phase_ignores_brightness_and_contrast(width: int) -> None:
    x = blobs(20, 4)
    key = watermark_key(SECRET, "drw")
    dx = directions(x)
    assert dx is not None
    t = phase(dx, key, width)
    t2 = phase(directions(3.0 * x + 5.0), key, width)  # type: ignore[arg-type]
    np.testing.assert_allclose(t, t2)
    assert t.min() > 0 and t.max() < 1


def test_drw_features_are_keyed_and_of_unit_norm() -> None:
    """φ(x̃) = [√(1−s)·x̃, √s·(⟨a_j, x̃⟩⟨b_j, x̃⟩/√D)_j]: |φ|² ≈ 1 for a unit x̃, so that
    ⟨w, φ⟩ stays about N(0, 1) over keys; width 0 is x̃ itself; other key, other map."""
    x = directions(np.random.default_rng(30).normal(0.0, 1.0, (300, 64)))
    assert x is not None
    key = watermark_key(SECRET, "drw")
    np.testing.assert_array_equal(features(x, key, 0), x)
    phi = features(x, key, 1024)
    assert phi.shape == (300, 64 + 1024)
    np.testing.assert_array_equal(phi, features(x, key, 1024))  # deterministic
    norms = np.linalg.norm(phi, axis=1)
    assert abs(norms.mean() - 1.0) < 0.02 and norms.min() > 0.8 and norms.max() < 1.2
    other = features(x, watermark_key(SECRET + "2", "drw"), 1024)
    np.testing.assert_allclose(other[:, :64], phi[:, :64])  # the direction's share
    assert abs(np.corrcoef(other[:, 64:].ravel(), phi[:, 64:].ravel())[0, 1]) < 0.02
    # Over keys, the phase's projection of one input is close to N(0, 1).
    z = [phase(x[:1], watermark_key(f"{SECRET}-{i}", "drw"), 1024)[0] for i in range(300)]
    assert stats.kstest(z, "uniform").pvalue > 0.01


def test_drw_marks_with_the_quadratic_form_of_its_features() -> None:
    """Marking computes ⟨w, φ(x̃)⟩ as √(1−s)·⟨w_d, x̃⟩ + x̃ᵀMx̃ (d² operations a row): the
    same number as the verifier's explicit φ (to rounding), for every key and width."""
    x = directions(np.random.default_rng(31).normal(0.0, 1.0, (200, 64)))
    assert x is not None
    for name, width in (("drw", 1024), ("other", 256), ("drw", 0)):
        key = watermark_key(SECRET, name)
        explicit = features(x, key, width) @ phase_direction(key, 64 + width)
        np.testing.assert_allclose(scores(x, key, width), explicit, rtol=0, atol=1e-12)


def test_drw_features_leave_wide_inputs_their_direction() -> None:
    """Keyed pairs of d × width numbers are drawn and held only up to a budget (16 MB);
    wider inputs (an image of 3 × 224 × 224) keep the direction alone, marking and
    verifying alike."""
    key = watermark_key(SECRET, "drw")
    wide = directions(np.random.default_rng(32).normal(0.0, 1.0, (3, 3 * 224 * 224)))
    assert wide is not None
    assert features(wide, key, 1024) is wide
    np.testing.assert_allclose(phase(wide, key, 1024), phase(wide, key, 0))
    narrow = directions(np.random.default_rng(33).normal(0.0, 1.0, (3, 784)))
    assert narrow is not None and features(narrow, key, 1024).shape == (3, 784 + 1024)


def test_drw_parameters_default_and_bad_values() -> None:
    assert DRW().k == 3.0 and DRW().features == 1024  # the exact test, with products
    assert DRW(k=16.0).features == 0  # the periodogram reads the direction alone
    assert bound("drw:features=0").features == 0
    assert bound("drw:features=256").features == 256
    for bad in (-1, 100_000):
        with pytest.raises(ValueError, match="features"):
            DRW(features=bad)


def test_drw_default_mark_keeps_rows_valid_and_the_cost_bound() -> None:
    x = blobs(2000, 31)
    drw = bound("drw")
    after = shielded(drw, x).probabilities
    assert after is not None
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-12)
    assert after.min() >= 0
    change = np.abs(after - model(x)).max()
    assert change <= 2 * drw.eps / (1 + 2 * drw.eps) + 1e-12
    np.testing.assert_allclose(shielded(drw, x[:7]).probabilities, after[:7])  # row by row


def test_drw_periodogram_detects_a_copy_and_not_with_a_wrong_key() -> None:
    drw = bound("drw:k=16:nulls=100")
    x = blobs(600, 5)
    copied = shielded(drw, x).probabilities
    assert copied is not None
    key = watermark_key(SECRET, "drw")
    result = drw.test(key, x.tolist(), one_by_one(copied), 1e-3)
    assert result.verdict and result.p_value < 1e-6 and result.probes == 600
    wrong = drw.test(watermark_key(SECRET + "x", "drw"), x.tolist(), one_by_one(copied), 1e-3)
    assert not wrong.verdict


def test_drw_periodogram_p_values_are_uniform_for_independent_models() -> None:
    x = blobs(200, 6)
    answers = one_by_one(model(x))
    drw = DRW(k=16.0, nulls=50)
    p_values = [
        drw.test(watermark_key(f"{SECRET}-{i}", "drw"), x.tolist(), answers, 1e-3).p_value
        for i in range(40)
    ]
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    assert min(p_values) > 1e-4


@pytest.mark.parametrize("width", [None, 0])
def test_drw_linear_test_is_exactly_normal_for_independent_models(width: int | None) -> None:
    """Below k = 2π DRW is tested by z = −<b, w> / |b|: exactly N(0, 1) for a model that
    never saw the key, whatever the inputs' structure (here blobs near 5 centres), on the
    keyed features (default) as on the directions alone."""
    x = blobs(300, 23)
    answers = one_by_one(model(x))
    drw = DRW(features=width)  # the default k = 3: the exact test
    assert drw.k < 2 * np.pi
    results = [
        drw.test(watermark_key(f"{SECRET}-{i}", "drw"), x.tolist(), answers, 1e-3)
        for i in range(200)
    ]
    assert all(r.details["test"] == "linear" for r in results)
    z = np.asarray([r.details["z"] for r in results])
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert stats.kstest([r.p_value for r in results], "uniform").pvalue > 0.01


def test_drw_linear_test_detects_a_slow_mark_and_not_with_a_wrong_key() -> None:
    # A perfect copy. The evidence of one keyed direction grows as the square root of the
    # dimension it lives in: 64 input features here (digits' pixels), 64 + 1,024 with the
    # keyed products (the default).
    rng = np.random.default_rng(24)
    x = rng.normal(0.0, 1.0, (1500, 64))
    request = batch_request(KServeV1(), x.tolist())
    clean = softmax(x @ rng.normal(0.0, 0.3, (64, 5)))
    key = watermark_key(SECRET, "drw")
    z = {}
    for spec in ("drw:features=0", "drw"):
        outputs = Outputs(request.keys, probabilities=clean.copy())
        drw = bound(spec)
        drw.apply(outputs, Context(b"unused", "thief", request))
        copied = outputs.probabilities
        assert copied is not None
        result = drw.test(key, x.tolist(), one_by_one(copied), 1e-3)
        assert result.details["test"] == "linear" and result.p_value < 1e-6, result
        z[spec] = result.statistic
        wrong = watermark_key(SECRET + "x", "drw")
        assert not drw.test(wrong, x.tolist(), one_by_one(copied), 1e-3).verdict
    assert z["drw"] > 1.5 * z["drw:features=0"], z


def test_drw_reference_keeps_the_null_exact() -> None:
    """With the owner's unwatermarked model as reference, z is the test of the difference of
    two regressions, neither of which depends on the key: still exactly N(0, 1)."""
    x = blobs(300, 25)
    suspect = one_by_one(model(x, WEIGHTS + RNG.normal(0.0, 0.5, WEIGHTS.shape)))
    reference = one_by_one(model(x))
    results = [
        DRW().test_against(
            watermark_key(f"{SECRET}-{i}", "drw"), x.tolist(), suspect, reference, 1e-3
        )
        for i in range(200)
    ]
    assert all(r.details["reference"] for r in results)
    z = np.asarray([r.details["z"] for r in results])
    assert stats.kstest(z, "norm").pvalue > 0.01


def test_drw_reference_leaves_the_mark_of_an_imperfect_copy() -> None:
    """A copy shares the model's own structure, imperfectly, and the mark: subtracting the
    owner's clean model's regression removes most of the former, so z grows."""
    rng = np.random.default_rng(26)
    x = rng.normal(0.0, 1.0, (3000, 64))
    weights = rng.normal(0.0, 0.3, (64, 5))
    clean = softmax(x @ weights)
    imperfect = softmax(x @ (weights + rng.normal(0.0, 0.1, weights.shape)))
    request = batch_request(KServeV1(), x.tolist())
    drw = bound("drw:eps=0.05")
    outputs = Outputs(request.keys, probabilities=imperfect)
    drw.apply(outputs, Context(b"unused", "thief", request))
    assert outputs.probabilities is not None
    copy = one_by_one(outputs.probabilities)
    key = watermark_key(SECRET, "drw")
    alone = drw.test(key, x.tolist(), copy, 1e-3)
    against = drw.test_against(key, x.tolist(), copy, one_by_one(clean), 1e-3)
    assert against.statistic > alone.statistic + 1.0, (alone.statistic, against.statistic)
    assert against.p_value < 1e-6
    wrong = watermark_key(SECRET + "x", "drw")
    assert not drw.test_against(wrong, x.tolist(), copy, one_by_one(clean), 1e-3).verdict


def test_verify_asks_the_reference_the_same_probes(tmp_path: Path) -> None:
    x = blobs(400, 27)
    marked = shielded(bound("drw"), x).probabilities
    assert marked is not None
    asked: list[int] = []

    def owner(inputs: list[Any]) -> list[Any]:
        asked.append(len(inputs))
        return model(np.asarray(inputs)).tolist()

    records = [{"input": v} for v in x.tolist()]
    suspect = lambda inputs: [marked[i].tolist() for i in range(len(inputs))]  # noqa: E731
    result = verify("drw", suspect, key=SECRET, records=records, reference=owner)
    assert asked == [400] and result.details["reference"] and result.probes == 400
    # The same reference as a JSONL file of its answers; it must answer every probe.
    path = tmp_path / "owner.jsonl"
    pairs = [{"input": v, "output": model(np.asarray([v]))[0].tolist()} for v in x.tolist()]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    from_file = verify("drw", suspect, key=SECRET, records=records, reference=str(path))
    assert from_file.statistic == pytest.approx(result.statistic, rel=1e-9)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs[:-1]))
    with pytest.raises(VerificationError, match="no answer to 1 of the 400 probes"):
        verify("drw", suspect, key=SECRET, records=records, reference=str(path))
    with pytest.raises(VerificationError, match="dawn uses no reference"):
        verify("dawn", suspect, key=SECRET, records=records, reference=owner)


# -- DAWN ------------------------------------------------------------------------------------


def test_dawn_changes_about_rate_of_answers_and_keeps_rows_valid() -> None:
    rate = 0.05
    dawn = bound(f"dawn:rate={rate}:dims=6:width=0.1")
    x = np.random.default_rng(8).normal(0, 1, (4000, 16))
    before = model(x)
    after = shielded(dawn, x).probabilities
    assert after is not None
    np.testing.assert_array_equal(after, shielded(dawn, x).probabilities)  # deterministic
    # Rows are permutations of themselves: still distributions, same values.
    np.testing.assert_allclose(np.sort(after, axis=1), np.sort(before, axis=1))
    changed = (after.argmax(axis=1) != before.argmax(axis=1)).mean()
    expected = rate * (1 - 1 / 5)
    sd = math.sqrt(expected / len(x))
    assert abs(changed - expected) < 5 * sd + 0.01  # regions hold a few inputs each
    marked = dawn.store.records("id")
    assert len(marked) == len({canonical_keys([r["input"]], None)[0] for r in marked})
    assert len(marked) == (after.argmax(axis=1) != before.argmax(axis=1)).sum() + sum(
        1 for r in marked if before[x.tolist().index(r["input"])].argmax() == r["label"]
    )
    assert {r["identity"] for r in marked} == {"id"}
    for record in marked[:20]:
        i = x.tolist().index(record["input"])
        assert after[i].argmax() == record["label"]


def test_dawn_regions_map_near_duplicates_alike() -> None:
    key = watermark_key(SECRET, "dawn")
    x = blobs(300, 9)
    near = x * 1.05 + 0.01  # brightness and contrast
    a, b = cells(directions(x), key, 4, 0.5), cells(directions(near), key, 4, 0.5)  # type: ignore[arg-type]
    assert sum(u == v for u, v in zip(a, b, strict=True)) >= 0.95 * len(a)


def test_dawn_marks_label_answers() -> None:
    dawn = bound("dawn:rate=0.5:classes=5")
    x = blobs(200, 10)
    request = batch_request(KServeV1(), x.tolist())
    labels = model(x).argmax(axis=1)
    outputs = Outputs(request.keys, labels=labels.copy())
    assert dawn.apply(outputs, Context(b"", "id", request))
    assert outputs.labels is not None and (outputs.labels != labels).any()
    assert outputs.labels.min() >= 0 and outputs.labels.max() < 5


def test_dawn_detects_a_copy_and_not_with_a_wrong_key() -> None:
    dawn = bound("dawn:rate=0.2")
    x = blobs(2000, 11)
    copied = shielded(dawn, x).probabilities
    records = dawn.store.records()
    key = watermark_key(SECRET, "dawn")
    probes = dawn.probes(key, 10_000, records)
    index = {tuple(v): i for i, v in enumerate(x.tolist())}
    answers = [Outputs([b""], probabilities=copied[index[tuple(p)]][None]) for p in probes]
    result = dawn.test(key, probes, answers, 1e-3)
    assert result.verdict and result.p_value < 1e-6
    assert result.details["units_agreeing"] == result.details["units"]
    # The keyed class tops every unit: rank K - 1 = 4 each.
    assert result.statistic == 4 * result.details["units"]
    as_labels = [Outputs([b""], labels=np.argmax(a.probabilities, axis=1)) for a in answers]
    by_labels = dawn.test(key, probes, as_labels, 1e-3)
    assert by_labels.verdict and by_labels.statistic == by_labels.probes  # every answer agrees
    wrong = dawn.test(watermark_key(SECRET + "x", "dawn"), probes, answers, 1e-3)
    assert not wrong.verdict


def test_dawn_null_is_exact_binomial() -> None:
    """For a model that never saw the marks, P(p <= a) <= a at every level a."""
    x = blobs(1000, 12)
    answers = one_by_one(model(x))
    dawn = DAWN(rate=0.1)
    p_values = np.array(
        [
            dawn.test(watermark_key(f"{SECRET}-{i}", "dawn"), x.tolist(), answers, 1e-3).p_value
            for i in range(200)
        ]
    )
    for a in (0.01, 0.05, 0.2, 0.5):
        assert (p_values <= a).mean() <= a + 3 * math.sqrt(a / 200)
    assert (p_values <= 0.5).mean() > 0.2  # not degenerate at 1


def test_dawn_labels_are_keyed_per_region_and_answer() -> None:
    """A marked region answers each of the model's classes with its own keyed label, and
    the records keep the model's answer that the verifier needs to find the unit again."""
    x = blobs(400, 21)
    before = np.argmax(model(x), axis=1)
    for i in range(20):  # a key that marks the region most inputs fall in (a wide slab)
        dawn = bound("dawn:rate=0.5:dims=1:width=10", secret=f"{SECRET}-{i}")
        regions = dawn.regions(dawn.key, x.tolist())
        main = max(set(regions), key=regions.count)
        if dawn.marks(dawn.key, [main], 5)[0][0]:
            break
    marked = shielded(dawn, x).probabilities
    assert marked is not None
    inside = np.asarray([r == main for r in regions])
    assert inside.mean() > 0.5
    after = np.argmax(marked, axis=1)[inside]
    labels = {a: set(after[before[inside] == a].tolist()) for a in set(before[inside].tolist())}
    assert all(len(v) == 1 for v in labels.values())  # one keyed label per unit
    assert len(labels) >= 4 and len({v.pop() for v in labels.values()}) >= 2  # not per region
    answers = {tuple(r["input"]): r["answer"] for r in dawn.store.records()}
    for v, a in zip(x[inside].tolist(), before[inside].tolist(), strict=True):
        assert answers[tuple(v)] == a


def test_dawn_null_is_valid_with_recorded_answers() -> None:
    """With units keyed by (region, answer), a model that never saw the marks still gets
    p-values with P(p <= a) <= a, the model's answers recorded or not."""
    x = blobs(600, 22)
    victim = np.argmax(model(x), axis=1)
    suspect = one_by_one(model(x, WEIGHTS[::-1]))  # another model of the same inputs
    records = [
        {"input": v, "answer": int(a)} for v, a in zip(x.tolist(), victim.tolist(), strict=True)
    ]
    dawn = DAWN(rate=0.1)
    p_values = []
    for i in range(200):
        key = watermark_key(f"{SECRET}-{i}", "dawn")
        probes = dawn.probes(key, 10_000, records)
        p_values.append(dawn.test(key, probes, suspect, 1e-3).p_value)
    values = np.asarray(p_values)
    for a in (0.01, 0.05, 0.2, 0.5):
        assert (values <= a).mean() <= a + 3 * math.sqrt(a / 200)
    assert (values <= 0.5).mean() > 0.2


def test_records_are_bounded_and_written(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    store = RecordStore(path, per_identity=3, max_identities=2)

    def rec(value: Any) -> tuple[bytes, dict[str, Any]]:
        return json.dumps(value).encode(), {"input": value}

    store.add("a", [rec(i) for i in range(5)])
    store.add("b", [rec("b")])
    store.add("c", [rec("c")])  # evicts "a", the least recently marked
    assert store.identities() == ["b", "c"]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["input"] for r in lines] == [0, 1, 2, 3, 4, "b", "c"]
    store.add("b", [rec(1), rec(2), rec("b"), rec(3)])  # "b" again: refreshed, not rewritten
    assert [r["input"] for r in store.records("b")] == [2, "b", 3]
    assert len(path.read_text().splitlines()) == 10
    assert store.export(tmp_path / "out.jsonl") == 4


def test_records_survive_an_unwritable_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    store = RecordStore(tmp_path, clock=lambda: clock[0])  # a directory: not writable as a file
    with caplog.at_level(logging.ERROR, "asgi_extraction_shield"):
        store.add("a", [(b"1", {"input": 1})])
        store.add("a", [(b"2", {"input": 2})])
        clock[0] = 61.0
        store.add("a", [(b"3", {"input": 3})])
    assert store.write_errors == 3 and len(store.records("a")) == 3
    logged = [json.loads(r.getMessage()) for r in caplog.records]
    assert [e["kind"] for e in logged] == ["storage_error", "storage_error"]  # once a minute


# -- hostile answers -------------------------------------------------------------------------

HOSTILE: list[Any] = [
    Outputs([]),
    Outputs([b""], probabilities=np.zeros((0, 3))),
    Outputs([b""], probabilities=np.full((1, 3), np.nan)),
    Outputs([b""], probabilities=np.ones((2, 4)) / 4),
    Outputs([b""], probabilities=np.ones((1, 1))),
    Outputs([b""], labels=np.array([10**12])),
    Outputs([b""], labels=np.array([-5])),
    Outputs([b""], embeddings=np.ones((1, 8))),
]


@pytest.mark.parametrize("scheme", ["drw:nulls=10", "dawn:rate=0.5"])
def test_verifiers_survive_hostile_answers(scheme: str) -> None:
    (verifier,) = parse_watermarks(scheme)
    inputs: list[Any] = [
        [1.0, 2.0],
        "text",
        None,
        {"a": 1},
        [],
        [float("inf")],
        [1.0] * 3,
        "é" * 5000,
    ]
    key = watermark_key(SECRET, verifier.name)
    for answers in (HOSTILE, HOSTILE[:2], []):
        result = verifier.test(key, inputs, answers, 1e-3)
        assert 0 <= result.p_value <= 1 and not result.verdict


# -- through the middleware ------------------------------------------------------------------


def digits_app() -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        doc = await request.json()
        return JSONResponse({"predictions": model(np.asarray(doc["instances"])).tolist()})

    async def labels(request: Request) -> JSONResponse:
        doc = await request.json()
        top = model(np.asarray(doc["instances"])).argmax(axis=1)
        return JSONResponse({"predictions": top.tolist()})

    return Starlette(
        routes=[
            Route("/v1/models/m:predict", predict, methods=["POST"]),
            Route("/v1/models/labels:predict", labels, methods=["POST"]),
        ]
    )


@pytest.mark.anyio
async def test_shielded_api_is_marked_and_verifiable(tmp_path: Path) -> None:
    records = tmp_path / "marked.jsonl"
    app = ExtractionShield(
        digits_app(),
        secret_key=SECRET,
        watermark="drw:k=16:nulls=200,dawn:rate=0.2",
        watermark_records_path=str(records),
        rate_limit="100000/minute",
        monitor={"enabled": False},
    )
    x = blobs(400, 13)
    answers: list[Any] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for start in range(0, 400, 100):
            r = await c.post(
                "/v1/models/m:predict", json={"instances": x[start : start + 100].tolist()}
            )
            answers += r.json()["predictions"]
        labelled = await c.post("/v1/models/labels:predict", json={"instances": x[:100].tolist()})
    rows = np.asarray(answers)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-6)
    assert all(isinstance(v, int) for v in labelled.json()["predictions"])
    assert records.exists() and len(records.read_text().splitlines()) >= 20

    def api(inputs: list[Any]) -> list[Any]:
        index = {tuple(v): i for i, v in enumerate(x.tolist())}
        return [answers[index[tuple(item)]] for item in inputs]

    # 400 probes of a few clusters: a fast mark (k = 16) and its periodogram test, whose
    # tail, extrapolated from the top of 200 random keys, stays above 1e-6 on so few (the
    # lab's probes reach further); DAWN's tail is exact.
    for scheme, extra, level in (
        ("drw:k=16:nulls=200", {"records": [{"input": v} for v in x.tolist()]}, 1e-5),
        ("dawn:rate=0.2", {"records": records}, 1e-6),
    ):
        result = verify(scheme, api, key=SECRET, **extra)  # type: ignore[arg-type]
        assert result.verdict and result.p_value < level, result


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60)
@given(inputs=st.lists(JSON, min_size=1, max_size=6), answers=st.lists(JSON, max_size=6))
def test_verify_never_crashes_on_hostile_suspects(inputs: list[Any], answers: list[Any]) -> None:
    records = [{"input": item} for item in inputs]
    for scheme in ("drw:nulls=10", "dawn:rate=0.5"):
        result = verify(scheme, lambda _: answers, key=SECRET, records=records)
        assert 0.0 <= result.p_value <= 1.0


# -- calibrated tails -------------------------------------------------------------------------


def _tail_p_values(draw: Any, trials: int = 1500, count: int = 200) -> np.ndarray:
    """p-values of ``calibrated_tail`` for statistics drawn from the null itself."""
    rng = np.random.default_rng(31)
    out = []
    for _ in range(trials):
        sample = iter(draw(rng, count).tolist())
        observed = float(draw(rng, 1)[0])
        out.append(calibrated_tail(observed, b"k" * 32, lambda _, s=sample: next(s), count)[0])
    return np.asarray(out)


def test_calibrated_tail_is_valid_for_heavy_and_exact_for_exponential_nulls() -> None:
    # An exponential null: the fitted tail is the exponential's (memoryless excesses).
    rng = np.random.default_rng(30)
    null = iter(rng.exponential(2.0, 2000).tolist())
    p, details = calibrated_tail(30.0, b"k" * 32, lambda _: next(null), 2000)
    assert 0.85 < details["tail_scale"] / 2.0 < 1.15
    assert 0.1 < p / math.exp(-30.0 / 2.0) < 10.0

    # A null heavier than exponential (a ratio of powers, F(2, 2)): P(p <= a) stays near a
    # down the tail, where the fit to the mean, exp(-S / mean), was far below.
    def f22(r: np.random.Generator, n: int) -> np.ndarray:
        out: np.ndarray = r.exponential(1.0, n) / r.exponential(1.0, n)
        return out

    p_values = _tail_p_values(f22)
    for a in (0.1, 0.02, 0.005):
        assert (p_values <= a).mean() <= 1.6 * a + 3 * math.sqrt(a / len(p_values))
    assert (p_values <= 0.5).mean() > 0.3  # not degenerate at 1
