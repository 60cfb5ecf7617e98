"""Tests of the output perturbations (``postprocess/perturb.py``).

Formulas are written out independently here (from ALGORITHMS.md and the papers), not
copied from the implementation, so that a change to either side shows up.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_extraction_shield.postprocess import keyed, perturb
from asgi_extraction_shield.postprocess.chain import Poison

FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEY = b"perturb-test-key-0123456789abcdef"


def seeds_for(n: int, key: bytes = KEY, tag: bytes = b"row") -> np.ndarray:
    return keyed.row_seeds(key, [tag + b":%d" % i for i in range(n)])


def dirichlet(n: int, k: int, seed: int, concentration: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(k, concentration), size=n)


def assert_simplex(q: np.ndarray, shape: tuple[int, ...], atol: float = 1e-9) -> None:
    assert q.shape == shape
    assert np.isfinite(q).all()
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=atol)


def unique_max(p: np.ndarray) -> np.ndarray:
    """Rows whose maximum is attained once."""
    return (p == p.max(axis=1, keepdims=True)).sum(axis=1) == 1


# -- renormalise ---------------------------------------------------------------------------


def test_renormalise_scales_rows_and_keeps_zero_rows_zero_without_warnings() -> None:
    q = np.array([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [2.0, 2.0, 4.0]])
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        out = perturb.renormalise(q)
    np.testing.assert_array_equal(out[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(out[1], [0.25, 0.75, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(out[2], [0.25, 0.25, 0.5], rtol=0, atol=1e-15)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(q[1], [1.0, 3.0, 0.0])  # input untouched


def test_renormalise_all_zero_matrix() -> None:
    out = perturb.renormalise(np.zeros((4, 3)))
    np.testing.assert_array_equal(out, np.zeros((4, 3)))


# -- reverse sigmoid -----------------------------------------------------------------------


def reverse_sigmoid_reference(p: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Lee et al. 2019 / ALGORITHMS.md, written with tanh: σ(x) − ½ = ½·tanh(x/2)."""
    pc = np.clip(p, 1e-9, 1 - 1e-9)
    logit = np.log(pc / (1 - pc))
    r = beta * 0.5 * np.tanh(gamma * logit / 2)
    q = np.clip(p - r, 0, 1)
    return q / q.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("beta", "gamma"), [(1.0, 0.1), (1.0, 0.2), (0.5, 0.1), (2.0, 0.05), (0.3, 1.5), (0.0, 0.1)]
)
def test_reverse_sigmoid_matches_published_formula(beta: float, gamma: float) -> None:
    p = np.vstack(
        [
            dirichlet(200, 10, seed=1),
            dirichlet(50, 3, seed=2) @ np.eye(3, 10),  # rows with zeros
            np.eye(10)[:5],  # one-hot rows: logits clipped to ±logit(1e-9)
            np.full((1, 10), 0.1),
        ]
    )
    q = perturb.reverse_sigmoid(p, beta, gamma)
    np.testing.assert_allclose(q, reverse_sigmoid_reference(p, beta, gamma), rtol=1e-12, atol=1e-15)
    assert_simplex(q, p.shape)
    if beta == 0.0:
        np.testing.assert_allclose(q, p, rtol=0, atol=1e-15)


def test_reverse_sigmoid_default_parameters_are_art_defaults() -> None:
    p = dirichlet(20, 5, seed=3)
    np.testing.assert_array_equal(
        perturb.reverse_sigmoid(p), perturb.reverse_sigmoid(p, beta=1.0, gamma=0.1)
    )


def test_reverse_sigmoid_actually_perturbs() -> None:
    p = dirichlet(100, 10, seed=4)
    q = perturb.reverse_sigmoid(p, 1.0, 0.1)
    assert np.abs(q - p).sum(axis=1).min() > 1e-3


def test_reverse_sigmoid_handcrafted_flip_and_guard() -> None:
    # σ(γ·logit p) ≈ p^γ for small p: a tiny class is pushed up by ≈ β/2 − β·p^γ, more
    # than a 0.2 top class, so the top label flips without the guard.
    p = np.array([[0.001, 0.2, 0.2, 0.2, 0.2, 0.199]])
    q = perturb.reverse_sigmoid(p, 1.0, 0.2)
    assert p.argmax() == 1
    assert q.argmax() == 0  # flipped
    g = perturb.reverse_sigmoid(p, 1.0, 0.2, guard_top1=True)
    assert g.argmax() == 1
    # the guard swapped the two values: same multiset, simplex kept
    np.testing.assert_array_equal(np.sort(g[0]), np.sort(q[0]))
    assert g[0, 1] == q[0, 0] and g[0, 0] == q[0, 1]
    np.testing.assert_array_equal(np.delete(g[0], [0, 1]), np.delete(q[0], [0, 1]))


@pytest.mark.parametrize(("k", "gamma"), [(10, 0.1), (10, 0.2), (10, 0.5), (20, 0.1), (50, 0.05)])
def test_reverse_sigmoid_flips_without_guard_and_guard_restores(k: int, gamma: float) -> None:
    p = dirichlet(3000, k, seed=5)
    p = p[unique_max(p)]
    top = p.argmax(axis=1)
    plain = perturb.reverse_sigmoid(p, 1.0, gamma)
    flipped = plain.argmax(axis=1) != top
    assert flipped.any(), "expected some flipped rows at this gamma"
    assert not flipped.all()

    guarded = perturb.reverse_sigmoid(p, 1.0, gamma, guard_top1=True)
    np.testing.assert_array_equal(guarded.argmax(axis=1), top)
    assert_simplex(guarded, p.shape)
    # rows that did not flip are bit-for-bit the unguarded answer
    np.testing.assert_array_equal(guarded[~flipped], plain[~flipped])
    # flipped rows: only a swap of values (same multiset), top class now holds the max
    np.testing.assert_array_equal(np.sort(guarded[flipped]), np.sort(plain[flipped]))
    rows = np.nonzero(flipped)[0]
    np.testing.assert_array_equal(guarded[rows, top[rows]], plain[rows].max(axis=1))


@pytest.mark.parametrize(
    ("row", "beta", "gamma"),
    [
        # two equal tiny classes are both boosted above the top class (index 6)
        ([0.001, 0.001, 0.199, 0.199, 0.199, 0.199, 0.202], 1.0, 0.2),
        # β = γ = 1: p − (σ(logit p) − ½) = ½ for every class, the row becomes uniform
        ([0.2, 0.3, 0.5], 1.0, 1.0),
    ],
)
def test_reverse_sigmoid_guard_restores_top1_when_the_new_maximum_is_shared(
    row: list[float], beta: float, gamma: float
) -> None:
    p = np.array([row])
    top = int(p.argmax())
    g = perturb.reverse_sigmoid(p, beta, gamma, guard_top1=True)
    assert g[0, top] == g.max()  # holds
    assert g.argmax() == top
    assert abs(g.sum() - 1) < 1e-12 and (g >= 0).all()


# -- rounding ------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 6])
def test_round_simplex_properties(decimals: int) -> None:
    p = np.vstack([dirichlet(300, 7, seed=7), np.full((2, 7), 1 / 7), np.eye(7)[:2]])
    unit = 10.0**-decimals
    q = perturb.round_simplex(p, decimals)
    assert q.shape == p.shape
    # sums kept exactly
    np.testing.assert_allclose(q.sum(axis=1), p.sum(axis=1), rtol=0, atol=1e-12)
    # multiples of 10^-d
    scaled = q / unit
    np.testing.assert_allclose(scaled, np.rint(scaled), rtol=0, atol=1e-9)
    # each value within one unit of the input
    assert (np.abs(q - p) <= unit + 1e-12).all()
    assert (q >= 0).all()
    # argmax kept when the top gap exceeds one unit
    srt = np.sort(p, axis=1)
    clear = srt[:, -1] - srt[:, -2] > unit
    np.testing.assert_array_equal(q[clear].argmax(axis=1), p[clear].argmax(axis=1))


def test_round_simplex_fixes_the_three_thirds_problem() -> None:
    p = np.full((1, 3), 1 / 3)
    assert np.round(p, 3).sum() != pytest.approx(1.0, abs=1e-12)  # plain rounding breaks it
    q = perturb.round_simplex(p, 3)
    assert q.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(np.sort(q[0]), [0.333, 0.333, 0.334], rtol=0, atol=1e-12)


def test_round_simplex_largest_remainders_get_the_units() -> None:
    p = np.array([[0.126, 0.124, 0.75], [0.5, 0.25, 0.25]])
    q = perturb.round_simplex(p, 2)
    np.testing.assert_allclose(q[0], [0.13, 0.12, 0.75], rtol=0, atol=1e-12)
    np.testing.assert_allclose(q[1], [0.5, 0.25, 0.25], rtol=0, atol=1e-12)


def test_round_simplex_keeps_non_unit_totals() -> None:
    p = np.array([[0.3333, 0.3333, 0.3334], [0.2, 0.2, 0.2]])  # second row sums to 0.6
    q = perturb.round_simplex(p, 1)
    np.testing.assert_allclose(q.sum(axis=1), [1.0, 0.6], rtol=0, atol=1e-12)


def test_round_values_equals_np_round() -> None:
    x = np.random.default_rng(8).normal(scale=10, size=(50, 9))
    for d in (0, 1, 3, 7):
        np.testing.assert_array_equal(perturb.round_values(x, d), np.round(x, d))


# -- top_k ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_top_k_keeps_the_k_largest(k: int) -> None:
    p = dirichlet(200, 10, seed=9)
    q = perturb.top_k(p, k)
    assert ((q > 0).sum(axis=1) == k).all()
    kept = q > 0
    # every kept value is at least every dropped one
    low_kept = np.where(kept, p, np.inf).min(axis=1)
    high_dropped = np.where(kept, -np.inf, p).max(axis=1)
    assert (low_kept > high_dropped).all()
    expected_idx = np.sort(np.argsort(-p, axis=1)[:, :k], axis=1)
    np.testing.assert_array_equal(np.sort(np.nonzero(kept)[1].reshape(-1, k), axis=1), expected_idx)
    assert_simplex(q, p.shape, atol=1e-12)
    # renormalised: proportional to the raw kept values
    np.testing.assert_allclose(
        q, np.where(kept, p, 0) / np.where(kept, p, 0).sum(axis=1, keepdims=True), rtol=1e-14
    )
    np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))


def test_top_k_without_renormalisation_keeps_raw_values() -> None:
    p = dirichlet(100, 8, seed=10)
    q = perturb.top_k(p, 3, renormalize=False)
    kept = q > 0
    assert (kept.sum(axis=1) == 3).all()
    np.testing.assert_array_equal(q[kept], p[kept])
    assert (q.sum(axis=1) < 1).all()


def test_top_k_ties_prefer_lowest_index() -> None:
    p = np.array([[0.2, 0.3, 0.2, 0.3]])
    np.testing.assert_array_equal(perturb.top_k(p, 3, renormalize=False), [[0.2, 0.3, 0.0, 0.3]])


@pytest.mark.parametrize("k", [6, 7, 100])
def test_top_k_with_k_at_least_width_returns_input(k: int) -> None:
    p = dirichlet(10, 6, seed=11) * 0.9  # not renormalised either
    q = perturb.top_k(p, k)
    np.testing.assert_array_equal(q, p)
    assert q is not p
    q[0, 0] = 5.0
    assert p[0, 0] != 5.0


# -- label_only ----------------------------------------------------------------------------


def test_label_only_is_one_hot_per_row() -> None:
    p = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.05, 0.05, 0.9],
            [0.1, 0.6, 0.3],
            [0.4, 0.4, 0.2],  # tie: lowest index
        ]
    )
    q = perturb.label_only(p)
    expected = np.eye(3)[[0, 1, 2, 1, 0]]
    np.testing.assert_array_equal(q, expected)


def test_label_only_batch_gives_every_row_its_own_winner() -> None:
    """ART's ClassLabels wrote every row's winner into every row of the batch."""
    p = dirichlet(500, 10, seed=12, concentration=0.3)
    winners = p.argmax(axis=1)
    assert len(set(winners.tolist())) == 10  # the batch has many different winners
    q = perturb.label_only(p)
    assert (q.sum(axis=1) == 1.0).all()  # ART's bug gives rows with up to 10 ones
    assert ((q == 0) | (q == 1)).all()
    np.testing.assert_array_equal(q.argmax(axis=1), winners)
    np.testing.assert_array_equal(q, np.eye(10)[winners])


# -- poison --------------------------------------------------------------------------------


def poison_reference(p: np.ndarray, seeds: np.ndarray, alpha: float, epsilon: float):
    n, k = p.shape
    top = p.argmax(axis=1)
    draw = keyed.choice(seeds, k - 1)
    j = np.where(draw >= top, draw + 1, draw)
    target = np.zeros_like(p)
    target[np.arange(n), top] += 0.5
    target[np.arange(n), j] += 0.5
    dist = np.abs(target - p).sum(axis=1)
    a = np.array([min(alpha, epsilon / d) if d > 0 else alpha for d in dist])
    return (1 - a)[:, None] * p + a[:, None] * target, j, a


@pytest.mark.parametrize(("alpha", "epsilon"), [(0.5, 0.5), (1.0, 0.1), (0.2, 2.0), (0.9, 0.05)])
def test_poison_matches_the_move_toward_the_keyed_edge_midpoint(
    alpha: float, epsilon: float
) -> None:
    p = np.vstack([dirichlet(400, 10, seed=13), np.eye(10)[:3], np.full((1, 10), 0.1)])
    seeds = seeds_for(len(p))
    q = perturb.poison(p, seeds, alpha, epsilon)
    expected, j, a = poison_reference(p, seeds, alpha, epsilon)
    np.testing.assert_allclose(q, expected, rtol=0, atol=1e-14)
    top = p.argmax(axis=1)
    assert (j != top).all() and (j >= 0).all() and (j < 10).all()
    # bounded move, on the simplex, top-1 kept
    assert (np.abs(q - p).sum(axis=1) <= epsilon + 1e-12).all()
    assert_simplex(q, p.shape, atol=1e-12)
    np.testing.assert_array_equal(q.argmax(axis=1), top)
    # the move is along y* − y, by a step a ≤ alpha
    assert (a <= alpha + 1e-15).all()
    # only top and j gain; everything else shrinks by the factor (1 − a)
    others = np.ones_like(p, dtype=bool)
    others[np.arange(len(p)), top] = False
    others[np.arange(len(p)), j] = False
    np.testing.assert_allclose(q[others], ((1 - a)[:, None] * p)[others], rtol=0, atol=1e-15)


def test_poison_bound_is_active_and_inactive() -> None:
    p = np.array([[0.4, 0.3, 0.2, 0.1]])
    seeds = seeds_for(1)
    loose = perturb.poison(p, seeds, alpha=0.1, epsilon=2.0)
    tight = perturb.poison(p, seeds, alpha=1.0, epsilon=0.05)
    _, _, a_loose = poison_reference(p, seeds, 0.1, 2.0)
    assert a_loose[0] == 0.1  # alpha binds
    assert np.abs(tight - p).sum() == pytest.approx(0.05, abs=1e-12)  # epsilon binds
    assert np.abs(loose - p).sum() < 2.0


def test_poison_zero_alpha_or_epsilon_is_identity() -> None:
    p = dirichlet(20, 5, seed=14)
    seeds = seeds_for(20)
    np.testing.assert_array_equal(perturb.poison(p, seeds, alpha=0.0), p)
    np.testing.assert_array_equal(perturb.poison(p, seeds, epsilon=0.0), p)


def test_poison_keeps_argmax_with_ties_at_the_top() -> None:
    p = np.array([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45], [1 / 3, 1 / 3, 1 / 3]])
    for i in range(50):
        q = perturb.poison(p, seeds_for(len(p), tag=b"tie%d" % i), 0.5, 0.5)
        np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))


def test_poison_alpha_one_is_refused_because_it_ties() -> None:
    # At alpha = 1 a row lands on y* = (e_top + e_j)/2, an exact tie: the processor refuses it.
    p = np.array([[0.2, 0.8], [1e-300, 1.0]])  # top = 1, so j = 0 for every seed
    tie = perturb.poison(p, seeds_for(2), alpha=1.0, epsilon=2.0)
    np.testing.assert_allclose(tie, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        Poison(alpha=1.0)
    q = perturb.poison(p, seeds_for(2), alpha=0.99, epsilon=2.0)
    np.testing.assert_array_equal(q.argmax(axis=1), [1, 1])


def test_poison_is_deterministic_per_seed() -> None:
    p = dirichlet(100, 10, seed=15)
    a = perturb.poison(p, seeds_for(100), 0.5, 0.5)
    b = perturb.poison(p.copy(), seeds_for(100), 0.5, 0.5)
    np.testing.assert_array_equal(a, b)
    c = perturb.poison(p, seeds_for(100, key=b"another key"), 0.5, 0.5)
    assert not np.array_equal(a, c)


def test_poison_target_classes_cover_every_non_top_class() -> None:
    k, n, top = 10, 1000, 3
    row = np.full(k, 0.05)
    row[top] = 0.55
    p = np.tile(row, (n, 1))  # the same answer for 1,000 different queries
    q = perturb.poison(p, seeds_for(n), alpha=0.5, epsilon=0.5)
    # y* − y is positive only at j (and top), so j is where the row gained most besides top
    gain = q - p
    gain[:, top] = -np.inf
    j = gain.argmax(axis=1)
    assert (gain[np.arange(n), j] > 0).all()
    counts = np.bincount(j, minlength=k)
    assert counts[top] == 0
    assert (np.delete(counts, top) >= 1).all()
    # roughly uniform: each ~ Binomial(1000, 1/9), sd ≈ 9.9; 6 sd either side
    expected, sd = n / 9, np.sqrt(n * (1 / 9) * (8 / 9))
    assert (np.abs(np.delete(counts, top) - expected) < 6 * sd).all()
    # same query, same seed → same class; rows with equal seeds agree
    same = perturb.poison(p[:2], np.array([seeds_for(1)[0]] * 2, dtype=np.uint64))
    np.testing.assert_array_equal(same[0], same[1])


# -- misinformation ------------------------------------------------------------------------


def misinformation_reference(p: np.ndarray, seeds: np.ndarray, tau: float, nu: float):
    alpha = 0.5 * (1 + np.tanh(nu * (tau - p.max(axis=1)) / 2))  # σ(x) = ½(1 + tanh(x/2))
    u = keyed.uniform(seeds, p.shape[1])
    anti = (1 - p) * (0.5 + u)
    anti = anti / anti.sum(axis=1, keepdims=True)
    return (1 - alpha)[:, None] * p + alpha[:, None] * anti, alpha, anti


@pytest.mark.parametrize(("tau", "nu"), [(0.5, 10.0), (0.8, 3.0), (0.2, 50.0), (1.0, 1.0)])
def test_misinformation_matches_formula(tau: float, nu: float) -> None:
    p = np.vstack([dirichlet(300, 10, seed=16), np.eye(10)[:2]])
    seeds = seeds_for(len(p))
    q = perturb.misinformation(p, seeds, tau, nu)
    expected, alpha, anti = misinformation_reference(p, seeds, tau, nu)
    np.testing.assert_allclose(q, expected, rtol=1e-12, atol=1e-15)
    assert_simplex(q, p.shape, atol=1e-12)
    # ŷ, recovered from the output, is an anti-prediction: ŷ_i ∝ (1 − y_i)·u_i with
    # u_i ∈ [0.5, 1.5), so ŷ_i / (1 − y_i) varies by less than a factor of 3 in a row
    big = alpha > 1e-3
    implied = (q[big] - (1 - alpha[big])[:, None] * p[big]) / alpha[big][:, None]
    np.testing.assert_allclose(implied, anti[big], rtol=0, atol=1e-9)
    soft = (p < 1).all(axis=1)
    ratio = anti[soft] / (1 - p[soft])
    assert (ratio.max(axis=1) / ratio.min(axis=1) <= 3.0).all()


def test_misinformation_leaves_confident_rows_and_moves_unsure_ones() -> None:
    rng = np.random.default_rng(17)
    confident = np.full((200, 10), 0.0)
    top = rng.integers(0, 10, size=200)
    confident[np.arange(200), top] = rng.uniform(0.99, 1.0, size=200)
    rest = (1 - confident.max(axis=1))[:, None] * dirichlet(200, 10, seed=18)
    confident = np.where(confident > 0, confident, rest)
    confident /= confident.sum(axis=1, keepdims=True)
    assert (confident.max(axis=1) >= 0.99 - 1e-12).all()
    unsure = dirichlet(400, 10, seed=19, concentration=2.0)
    unsure = unsure[unsure.max(axis=1) < 0.3]
    assert len(unsure) > 100

    q_conf = perturb.misinformation(confident, seeds_for(200), tau=0.5, nu=50.0)
    q_unsure = perturb.misinformation(unsure, seeds_for(len(unsure)), tau=0.5, nu=50.0)
    assert (np.abs(q_conf - confident).sum(axis=1) < 1e-3).all()
    np.testing.assert_array_equal(q_conf.argmax(axis=1), confident.argmax(axis=1))
    assert (np.abs(q_unsure - unsure).sum(axis=1) > 0.1).all()
    assert_simplex(q_unsure, unsure.shape, atol=1e-12)


def test_misinformation_is_deterministic_per_seed() -> None:
    p = dirichlet(50, 6, seed=20)
    a = perturb.misinformation(p, seeds_for(50))
    np.testing.assert_array_equal(a, perturb.misinformation(p.copy(), seeds_for(50)))
    assert not np.array_equal(a, perturb.misinformation(p, seeds_for(50, key=b"other")))


# -- embedding noise -----------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("epsilon", [0.01, 0.05, 0.1, 0.3])
def test_embedding_noise_norms_and_cosine_bound(epsilon: float) -> None:
    """e′ ∥ e + ε‖e‖n with ‖n‖ = 1: the point lies in a ball of radius ε‖e‖ around e, so
    the angle to e is at most arcsin ε: cos(e, e′) ≥ √(1 − ε²) ≥ 1 − ε² ≥ 1 − ε."""
    rng = np.random.default_rng(21)
    d = 256
    raw = rng.normal(size=(1000, d))
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    scaled = raw * rng.uniform(0.1, 50, size=(1000, 1))
    for e in (unit, scaled):
        out = perturb.embedding_noise(e, seeds_for(len(e)), epsilon)
        assert out.shape == e.shape
        np.testing.assert_allclose(
            np.linalg.norm(out, axis=1), np.linalg.norm(e, axis=1), rtol=1e-12
        )
        cos = cosine(e, out)
        bound = np.sqrt(1 - epsilon**2)
        assert (cos >= bound - 1e-12).all()
        assert (cos >= 1 - epsilon).all()
        # and it really moved by a noise of norm ε‖e‖: in high dimension n ⊥ e almost, so
        # cos ≈ 1/√(1 + ε²) on average (a noise of norm 2ε would give ≈ 1/√(1 + 4ε²))
        assert abs(cos.mean() - 1 / np.sqrt(1 + epsilon**2)) < 0.05 * epsilon**2
        assert (cos < 1 - 1e-6 * epsilon**2).all()


def test_embedding_noise_zero_epsilon_and_zero_rows() -> None:
    e = np.random.default_rng(22).normal(size=(20, 16))
    e[3] = 0.0
    out = perturb.embedding_noise(e, seeds_for(20), 0.0)
    np.testing.assert_allclose(out, e, rtol=1e-15, atol=0)
    noisy = perturb.embedding_noise(e, seeds_for(20), 0.2)
    np.testing.assert_array_equal(noisy[3], np.zeros(16))
    assert np.isfinite(noisy).all()


def test_embedding_noise_determinism_and_independence() -> None:
    e = np.random.default_rng(23).normal(size=(100, 32))
    a = perturb.embedding_noise(e, seeds_for(100), 0.1)
    np.testing.assert_array_equal(a, perturb.embedding_noise(e.copy(), seeds_for(100), 0.1))
    b = perturb.embedding_noise(e, seeds_for(100, key=b"other key"), 0.1)
    assert (np.abs(a - b).max(axis=1) > 0).all()  # every row differs
    # noise directions of different seeds are (nearly) independent: the noise of the
    # same embedding under two keys is not correlated
    same = np.tile(e[:1], (500, 1))
    n1 = perturb.embedding_noise(same, seeds_for(500, tag=b"a"), 0.1) - same
    n2 = perturb.embedding_noise(same, seeds_for(500, tag=b"b"), 0.1) - same
    assert abs(cosine(n1, n2).mean()) < 0.05
    assert cosine(n1, n1[::-1]).mean() < 0.2  # different rows, different directions


# -- hypothesis properties -----------------------------------------------------------------

SPECIAL = (0.0, 1e-300, 5e-324, 1e-12, 0.5, 1.0)


@st.composite
def probability_matrices(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 20))
    k = draw(st.integers(2, 50))
    if draw(st.booleans()):  # small matrices: hypothesis chooses every entry
        n, k = min(n, 4), min(k, 6)
        element = st.one_of(st.sampled_from(SPECIAL), st.floats(0, 1), st.floats(1e-320, 1e-200))
        raw = np.array(
            draw(st.lists(st.lists(element, min_size=k, max_size=k), min_size=n, max_size=n)),
            dtype=np.float64,
        )
    else:  # larger ones: a mix of zeros, tiny values, ties and ordinary values
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        weights = np.array(draw(st.lists(st.floats(0, 1), min_size=4, max_size=4))) + 1e-3
        kind = rng.choice(4, size=(n, k), p=weights / weights.sum())
        pool = rng.uniform(size=(n, 3))
        raw = np.select(
            [kind == 0, kind == 1, kind == 2],
            [
                0.0,
                10.0 ** rng.uniform(-320, -250, size=(n, k)),
                pool[np.arange(n)[:, None], rng.integers(0, 3, size=(n, k))],
            ],
            default=rng.uniform(size=(n, k)),
        )
    empty = raw.sum(axis=1) == 0
    raw[empty, 0] = 1.0
    p = raw / raw.sum(axis=1, keepdims=True)
    p[~np.isfinite(p)] = 0.0
    return p


HAND = [
    np.array([[1.0, 0.0]]),
    np.array([[0.5, 0.5], [1e-300, 1 - 1e-300]]),
    np.array([[1 / 3, 1 / 3, 1 / 3]]),
    np.array([[0.001, 0.001, 0.199, 0.199, 0.199, 0.199, 0.202]]),
    np.eye(5),
]


def check_simplex(q: np.ndarray, p: np.ndarray) -> None:
    assert q.shape == p.shape
    assert np.isfinite(q).all()
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-6)


@FAST
@given(
    p=probability_matrices(),
    decimals=st.integers(0, 6),
    k=st.integers(1, 60),
    beta=st.floats(0, 3),
    gamma=st.floats(0.01, 2),
    alpha=st.floats(0, 0.99),  # alpha = 1 ties (the processor refuses it)
    epsilon=st.floats(0, 2),
    tau=st.floats(0, 1),
    nu=st.floats(0.1, 100),
    seed_key=st.binary(min_size=1, max_size=16),
)
@example(
    p=HAND[3],
    decimals=3,
    k=1,
    beta=1.0,
    gamma=0.2,
    alpha=0.5,
    epsilon=0.5,
    tau=0.5,
    nu=10.0,
    seed_key=b"k",
)
@example(
    p=HAND[1],
    decimals=0,
    k=1,
    beta=3.0,
    gamma=2.0,
    alpha=0.99,
    epsilon=2.0,
    tau=1.0,
    nu=100.0,
    seed_key=b"k",
)
def test_simplex_perturbations_stay_on_the_simplex(
    p: np.ndarray,
    decimals: int,
    k: int,
    beta: float,
    gamma: float,
    alpha: float,
    epsilon: float,
    tau: float,
    nu: float,
    seed_key: bytes,
) -> None:
    seeds = seeds_for(len(p), key=seed_key)
    top = p.argmax(axis=1)
    with np.errstate(all="ignore"):
        outputs = {
            "round_simplex": perturb.round_simplex(p, decimals),
            "top_k": perturb.top_k(p, k),
            "label_only": perturb.label_only(p),
            "reverse_sigmoid": perturb.reverse_sigmoid(p, beta, gamma),
            "reverse_sigmoid_guard": perturb.reverse_sigmoid(p, beta, gamma, guard_top1=True),
            "poison": perturb.poison(p, seeds, alpha, epsilon),
            "misinformation": perturb.misinformation(p, seeds, tau, nu),
        }
    for name, q in outputs.items():
        try:
            check_simplex(q, p)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None

    np.testing.assert_array_equal(outputs["top_k"].argmax(axis=1), top)
    np.testing.assert_array_equal(outputs["label_only"].argmax(axis=1), top)
    # rows whose top is not within rounding of the runner-up (a 1-ulp lead can be lost in
    # (1 − a)·y + a·y*, which is float arithmetic, not a flaw of the rule)
    srt = np.sort(p, axis=1)
    lead = srt[:, -1] - srt[:, -2] > 1e-12
    np.testing.assert_array_equal(outputs["poison"].argmax(axis=1)[lead], top[lead])
    assert (np.abs(outputs["poison"] - p).sum(axis=1) <= epsilon + 1e-12).all()
    guarded = outputs["reverse_sigmoid_guard"]
    rows = np.arange(len(p))
    # the original top class always holds the maximum and is the argmax
    np.testing.assert_array_equal(guarded[rows, top], guarded.max(axis=1))
    np.testing.assert_array_equal(guarded.argmax(axis=1), top)
    clear = srt[:, -1] - srt[:, -2] > 10.0**-decimals + 1e-9
    np.testing.assert_array_equal(outputs["round_simplex"].argmax(axis=1)[clear], top[clear])


@FAST
@given(p=probability_matrices(), k=st.integers(1, 49))
def test_top_k_property(p: np.ndarray, k: int) -> None:
    width = p.shape[1]
    raw = perturb.top_k(p, k, renormalize=False)
    if k >= width:
        np.testing.assert_array_equal(raw, p)
        return
    kept = raw > 0
    assert (kept.sum(axis=1) <= k).all()
    # exactly k kept positions (values may be zero): everything outside the k kept is 0 and
    # no dropped value exceeds a kept one
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(kept)
    np.put_along_axis(mask, order, True, axis=1)
    np.testing.assert_array_equal(raw[~mask], 0.0)
    np.testing.assert_array_equal(raw[mask], p[mask])
    positive_distinct = np.array([(r > 0).all() and len(np.unique(r)) == len(r) for r in p])
    assert (kept.sum(axis=1)[positive_distinct] == k).all()


@FAST
@given(p=probability_matrices(), decimals=st.integers(0, 8))
def test_round_simplex_property(p: np.ndarray, decimals: int) -> None:
    q = perturb.round_simplex(p, decimals)
    unit = 10.0**-decimals
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    scaled = q / unit
    np.testing.assert_allclose(scaled, np.rint(scaled), rtol=0, atol=1e-6)
    assert (np.abs(q - p) <= unit * (1 + 1e-9)).all()
    assert (q >= 0).all()


def largest_remainders(row: list[float], decimals: int) -> list[float]:
    """Hamilton's method from its definition: floor every share to a unit, then hand the
    units the row's rounded total still lacks to the largest remainders (ties: the lowest
    index first)."""
    scale = 10.0**decimals
    scaled = [v * scale for v in row]
    floors = [math.floor(v + 1e-9) for v in scaled]
    missing = round(sum(scaled)) - sum(floors)
    ranked = sorted(range(len(row)), key=lambda i: -(scaled[i] - floors[i]))
    for i in ranked[:missing]:
        floors[i] += 1
    return [f / scale for f in floors]


def assert_largest_remainders(row: list[float], rounded: list[float], decimals: int) -> None:
    """``rounded`` is a result of Hamilton's method on ``row``, whichever tied remainder got
    the unit: every share is its floor or one unit more, the row's rounded total is kept,
    and no share that got a unit has a smaller remainder than one that did not."""
    scale = 10.0**decimals
    scaled = [v * scale for v in row]
    floors = [math.floor(v + 1e-9) for v in scaled]
    units = [round(r * scale) - f for r, f in zip(rounded, floors, strict=True)]
    assert set(units) <= {0, 1}, units
    assert sum(units) == round(sum(scaled)) - sum(floors)
    remainders = [s - f for s, f in zip(scaled, floors, strict=True)]
    given = [r for r, u in zip(remainders, units, strict=True) if u]
    withheld = [r for r, u in zip(remainders, units, strict=True) if not u]
    if given and withheld:
        assert min(given) >= max(withheld) - 1e-9, (given, withheld)


@FAST
@given(p=probability_matrices(), decimals=st.integers(0, 6))
@example(p=np.array([[0.25, 0.75]]), decimals=1)  # a tie plain rounding settles to even
def test_round_simplex_is_the_largest_remainder_method(p: np.ndarray, decimals: int) -> None:
    q = perturb.round_simplex(p, decimals)
    for row, rounded in zip(p.tolist(), q.tolist(), strict=True):
        assert_largest_remainders(row, rounded, decimals)
        if len(set(np.round(np.asarray(row) * 10.0**decimals % 1.0, 9))) == len(row):
            # No two remainders tie: the method has one result.
            np.testing.assert_allclose(rounded, largest_remainders(row, decimals), atol=1e-12)


def test_round_simplex_ties_and_both_directions() -> None:
    # Plain rounding short of a unit (2.5, 2.5, 5 tenths → 2, 2, 5) and two units over
    # (four 1.6 and a 3.6 → 2, 2, 2, 2, 4), every remainder tied: either way the result
    # is one of Hamilton's (here the one that breaks ties by the lowest index first).
    for row, expected in (
        ([0.25, 0.25, 0.5], [0.3, 0.2, 0.5]),
        ([0.16, 0.16, 0.16, 0.16, 0.36], [0.2, 0.2, 0.2, 0.1, 0.3]),
    ):
        assert largest_remainders(row, 1) == pytest.approx(expected, abs=1e-12)
        q = perturb.round_simplex(np.array([row]), 1)
        np.testing.assert_allclose(q[0], expected, rtol=0, atol=1e-12)
    # A tie plain rounding already settles (2.5 and 7.5 tenths → 2 and 8, round half to
    # even): kept, a result of the method too.
    q = perturb.round_simplex(np.array([[0.25, 0.75]]), 1)
    np.testing.assert_allclose(q[0], [0.2, 0.8], rtol=0, atol=1e-12)
    assert_largest_remainders([0.25, 0.75], q[0].tolist(), 1)


@st.composite
def embedding_matrices(draw: st.DrawFn) -> np.ndarray:
    n, d = draw(st.integers(1, 20)), draw(st.integers(1, 64))
    if draw(st.booleans()):
        n, d = min(n, 4), min(d, 6)
        element = st.floats(-1e6, 1e6) | st.sampled_from([0.0, 1e-300, -1e-300])
        return np.array(
            draw(st.lists(st.lists(element, min_size=d, max_size=d), min_size=n, max_size=n)),
            dtype=np.float64,
        ).reshape(n, d)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # (below ~1e-154, Σx² underflows and norms lose precision: not tested)
    scale = 10.0 ** rng.uniform(-100, 6, size=(n, 1))
    x = rng.normal(size=(n, d)) * scale
    x[rng.uniform(size=(n, d)) < draw(st.floats(0, 1))] = 0.0
    return x


@FAST
# ε = 1 is left out: e + ‖e‖·n can then be exactly 0 (n = −ê: half the seeds when d = 1)
@given(x=embedding_matrices(), epsilon=st.floats(0, 1, exclude_max=True))
def test_embedding_noise_property(x: np.ndarray, epsilon: float) -> None:
    out = perturb.embedding_noise(x, seeds_for(len(x)), epsilon)
    assert out.shape == x.shape
    assert np.isfinite(out).all()
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), norms, rtol=1e-9, atol=1e-150)
    ok = norms > 1e-150
    if ok.any() and epsilon < 1:
        cos = cosine(x[ok], out[ok])
        assert (cos >= np.sqrt(1 - epsilon**2) - 1e-9).all()


def test_embedding_noise_never_zeroes_a_vector() -> None:
    # In one dimension the keyed direction is ±1: at epsilon = 1, half the seeds cancel
    # the vector exactly; such rows keep their value instead of becoming zero.
    e = np.ones((64, 1))
    q = perturb.embedding_noise(e, seeds_for(64), epsilon=1.0)
    np.testing.assert_allclose(np.abs(q), 1.0)
