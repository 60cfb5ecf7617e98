"""Tests of keyed randomness (``postprocess/keyed.py``) and the post-processor chain
(``postprocess/chain.py``): parsing, description, and each processor on hand-built
:class:`Outputs`."""

from __future__ import annotations

import copy
import hashlib
import re

import numpy as np
import pytest

from asgi_extraction_shield.formats.base import Outputs, TokenLogprobs
from asgi_extraction_shield.postprocess import keyed, perturb
from asgi_extraction_shield.postprocess.chain import (
    PROCESSORS,
    Context,
    EmbeddingNoise,
    LabelOnly,
    LogprobHygiene,
    Misinformation,
    Poison,
    Processor,
    ReverseSigmoid,
    Round,
    TopK,
    describe_chain,
    parse_chain,
)

KEY = b"chain-test-key-0123456789abcdef!"
OTHER_KEY = b"another-key-0123456789abcdef!!!!"

# -- keyed randomness ----------------------------------------------------------------------


def blake_seed(key: bytes, data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, key=key, digest_size=8).digest(), "little")


def many_seeds(n: int, key: bytes = KEY) -> np.ndarray:
    return keyed.row_seeds(key, [b"row-%d" % i for i in range(n)])


def test_row_seeds_are_keyed_blake2b_of_the_row() -> None:
    rows = [b"", b"a", b'{"x":[1.0,2.0]}']
    seeds = keyed.row_seeds(KEY, rows)
    assert seeds.dtype == np.uint64
    assert seeds.tolist() == [blake_seed(KEY, r) for r in rows]
    salted = keyed.row_seeds(KEY, rows, salt=b"poison")
    assert salted.tolist() == [blake_seed(KEY, b"poison\x00" + r) for r in rows]


def test_row_seeds_deterministic_key_and_salt_separated() -> None:
    rows = [b"q%d" % i for i in range(200)] + [b"q0", b"q1"]
    a = keyed.row_seeds(KEY, rows)
    np.testing.assert_array_equal(a, keyed.row_seeds(KEY, list(rows)))
    # same row bytes, same seed (even within one batch); distinct rows, distinct seeds
    assert a[200] == a[0] and a[201] == a[1]
    assert len(set(a[:200].tolist())) == 200
    # a different key changes every seed
    b = keyed.row_seeds(OTHER_KEY, rows)
    assert (a != b).all()
    # salts separate streams, and the empty salt differs from any salt
    s1 = keyed.row_seeds(KEY, rows, salt=b"one")
    s2 = keyed.row_seeds(KEY, rows, salt=b"two")
    assert (s1 != s2).all() and (s1 != a).all() and (s2 != a).all()
    assert keyed.row_seeds(KEY, []).shape == (0,)


def test_uniform_range_mean_and_chi_square() -> None:
    n_rows, size = 20_000, 5
    u = keyed.uniform(many_seeds(n_rows), size)
    assert u.shape == (n_rows, size) and u.dtype == np.float64
    assert (u >= 0).all() and (u < 1).all()
    n = u.size  # 100,000 samples
    # mean: sd = √(1/12/n) ≈ 0.00091; allow 5 sd
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    # chi-square over 100 equal bins: 99 degrees of freedom, mean 99, sd √198 ≈ 14.1.
    # 43 < χ² < 183 (±4..6 sd) is loose, yet a constant, a stratified grid or a
    # generator using few bits fails it.
    counts = np.bincount((u.ravel() * 100).astype(int), minlength=100)
    expected = n / 100
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert 43 < chi2 < 183, chi2
    # every column alone is uniform too
    for c in range(size):
        col = np.bincount((u[:, c] * 20).astype(int), minlength=20)
        chi2_col = ((col - n_rows / 20) ** 2 / (n_rows / 20)).sum()
        assert chi2_col < 19 + 6 * np.sqrt(38), (c, chi2_col)
    # 53 bits of resolution: practically all values are distinct
    assert len(np.unique(u)) == n


def test_uniform_over_consecutive_raw_seeds_is_still_uniform() -> None:
    """SplitMix64 must mix: raw seeds 0, 1, 2, … give no visible structure."""
    u = keyed.uniform(np.arange(100_000, dtype=np.uint64), 1)[:, 0]
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    counts = np.bincount((u * 100).astype(int), minlength=100)
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert 43 < chi2 < 183, chi2
    # neighbouring seeds are uncorrelated
    r = np.corrcoef(u[:-1], u[1:])[0, 1]
    assert abs(r) < 5 / np.sqrt(u.size)


def test_uniform_columns_rows_and_streams() -> None:
    seeds = many_seeds(5000)
    u = keyed.uniform(seeds, 4)
    # columns of one row differ, and are uncorrelated
    assert (u[:, 0] != u[:, 1]).all()
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 5 / np.sqrt(5000)
    # streams differ and are uncorrelated
    v = keyed.uniform(seeds, 4, stream=1)
    assert (u != v).all()
    assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < 5 / np.sqrt(u.size)
    # a pure function of (seed, stream, column): prefixes and row subsets agree
    np.testing.assert_array_equal(keyed.uniform(seeds, 2), u[:, :2])
    np.testing.assert_array_equal(keyed.uniform(seeds[[7, 3]], 4), u[[7, 3]])
    np.testing.assert_array_equal(keyed.uniform(seeds, 4), u)
    # equal seeds give equal rows
    same = keyed.uniform(np.array([seeds[0], seeds[0]], dtype=np.uint64), 3)
    np.testing.assert_array_equal(same[0], same[1])


def test_normal_moments() -> None:
    z = keyed.normal(many_seeds(20_000), 5)
    n = z.size
    assert z.shape == (20_000, 5)
    assert np.isfinite(z).all()
    # sample mean sd = 1/√n, sample sd sd ≈ 1/√(2n); 5 sd tolerances
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n)
    # tails like a Gaussian's: P(|z| > 1.96) = 0.05
    tail = (np.abs(z) > 1.959964).mean()
    assert abs(tail - 0.05) < 5 * np.sqrt(0.05 * 0.95 / n)
    # third and fourth moments: skew 0 (sd √(6/n)), kurtosis 3 (sd √(24/n))
    assert abs((z**3).mean()) < 5 * np.sqrt(6 / n)
    assert abs((z**4).mean() - 3) < 5 * np.sqrt(96 / n)
    other = keyed.normal(many_seeds(20_000), 5, stream=1)
    assert abs(np.corrcoef(z.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 1000])
def test_choice_range_and_coverage(n: int) -> None:
    draws = keyed.choice(many_seeds(20_000), n)
    assert draws.shape == (20_000,)
    assert draws.dtype == np.int64
    assert (draws >= 0).all() and (draws < n).all()
    counts = np.bincount(draws, minlength=n)
    assert (counts > 0).all()  # every value occurs
    if n <= 10:
        expected = 20_000 / n
        sd = np.sqrt(20_000 * (1 / n) * (1 - 1 / n))
        assert (np.abs(counts - expected) <= 6 * sd + 1e-9).all()
    # choice is keyed: a different stream picks differently
    if n > 1:
        assert (keyed.choice(many_seeds(20_000), n, stream=1) != draws).any()


# -- parse_chain ---------------------------------------------------------------------------


def test_parse_issue_examples() -> None:
    chain = parse_chain("top_k:5,round:3")
    assert [type(p) for p in chain] == [TopK, Round]
    assert chain[0].k == 5 and chain[0].renormalize is True
    assert chain[1].decimals == 3

    (rs,) = parse_chain("reverse_sigmoid:beta=1,gamma=0.2")
    assert isinstance(rs, ReverseSigmoid)
    assert rs.beta == 1.0 and isinstance(rs.beta, float)
    assert rs.gamma == 0.2 and rs.guard_top1 is False


def test_parse_positional_and_colon_separated_arguments() -> None:
    (rs,) = parse_chain("reverse_sigmoid:2:0.3:true")
    assert (rs.beta, rs.gamma, rs.guard_top1) == (2.0, 0.3, True)
    (p,) = parse_chain("poison:alpha=0.3:epsilon=0.2")
    assert (p.alpha, p.epsilon) == (0.3, 0.2)
    (m,) = parse_chain("misinformation:0.7:nu=3")
    assert (m.tau, m.nu) == (0.7, 3.0)
    (t,) = parse_chain("top_k:5,renormalize=false")  # comma continuation
    assert (t.k, t.renormalize) == (5, False)
    (h,) = parse_chain("logprob_hygiene:max_top=3,decimals=1")
    assert (h.max_top, h.decimals) == (3, 1)
    (e,) = parse_chain("embedding_noise:0.1:per_identity=yes")
    assert (e.epsilon, e.per_identity) == (0.1, True)


def test_parse_defaults_whitespace_and_case() -> None:
    chain = parse_chain(" TOP_K : 5 , Round , label_only ,")
    assert [type(p) for p in chain] == [TopK, Round, LabelOnly]
    assert chain[0].k == 5 and chain[1].decimals == 3
    (rs,) = parse_chain("reverse_sigmoid")
    assert (rs.beta, rs.gamma, rs.guard_top1) == (1.0, 0.1, False)
    (p,) = parse_chain("poison")
    assert (p.alpha, p.epsilon) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True)],
        *[("false", False), ("False", False), ("0", False), ("no", False), ("NO", False)],
    ],
)
def test_parse_booleans(text: str, expected: bool) -> None:
    (rs,) = parse_chain(f"reverse_sigmoid:guard_top1={text}")
    assert rs.guard_top1 is expected
    (t,) = parse_chain(f"top_k:2:{text}")
    assert t.renormalize is expected


@pytest.mark.parametrize("text", ["", "   ", "none", "NONE", " none ", "none,", ",,"])
def test_parse_empty_chain(text: str) -> None:
    assert parse_chain(text) == ()
    assert describe_chain(parse_chain(text)) == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # unknown processor: the message lists what exists
        ("blur:3", r"'blur' is not a post-processor: expected one of .*top_k"),
        ("top_k:5,shuffle", r"'shuffle' is not a post-processor"),
        ("none,top_k:5", r"'none' is not a post-processor"),
        ("none:3", r"'none' is not a post-processor"),
        ("top_k=5", r"'top_k=5' is not a post-processor"),
        # unknown parameter: the message lists the valid ones
        ("round:digits=3", r"round: unknown parameter 'digits'; expected decimals"),
        ("top_k:K=5", r"top_k: unknown parameter 'K'; expected k, renormalize"),
        ("label_only:k=1", r"label_only: unknown parameter 'k'; expected none"),
        ("reverse_sigmoid:beta=1,delta=2", r"reverse_sigmoid: unknown parameter 'delta'"),
        # bad value types
        ("round:three", r"round: decimals='three' is not a valid int"),
        ("round:2.5", r"round: decimals='2.5' is not a valid int"),
        ("top_k:k=", r"top_k: k='' is not a valid int"),
        ("top_k:2:maybe", r"top_k: renormalize='maybe' is not a valid bool"),
        ("poison:alpha=half", r"poison: alpha='half' is not a valid float"),
        # non-finite floats
        ("reverse_sigmoid:beta=nan", r"reverse_sigmoid: beta='nan' must be finite"),
        ("reverse_sigmoid:gamma=inf", r"reverse_sigmoid: gamma='inf' must be finite"),
        ("misinformation:nu=-Infinity", r"misinformation: nu='-Infinity' must be finite"),
        ("poison:epsilon=1e999", r"poison: epsilon='1e999' must be finite"),
        # out-of-range values
        ("round:-1", r"round: decimals must be between 0 and 12"),
        ("round:13", r"round: decimals must be between 0 and 12"),
        ("top_k:0", r"top_k: k must be at least 1"),
        ("reverse_sigmoid:beta=-0.1", r"reverse_sigmoid: beta must be >= 0 and gamma > 0"),
        ("reverse_sigmoid:gamma=0", r"reverse_sigmoid: beta must be >= 0 and gamma > 0"),
        ("round:3,decimals=4", "round: decimals is given twice"),
        ("reverse_sigmoid:gamma=0.2:1", "reverse_sigmoid: gamma is given twice"),
        ("poison:alpha=1.5", r"poison: alpha must be in \[0, 1\) and epsilon in \[0, 2\]"),
        ("poison:epsilon=2.5", r"poison: alpha must be in \[0, 1\)"),
        ("poison:alpha=-0.1", r"poison: alpha must be in \[0, 1\)"),
        ("misinformation:tau=1.5", r"misinformation: tau must be in \[0, 1\] and nu > 0"),
        ("misinformation:nu=0", r"misinformation: tau must be in \[0, 1\] and nu > 0"),
        ("embedding_noise:1.5", r"embedding_noise: epsilon must be in \[0, 1\]"),
        ("embedding_noise:-0.1", r"embedding_noise: epsilon must be in \[0, 1\]"),
        ("logprob_hygiene:max_top=-1", r"logprob_hygiene: max_top >= 0 and decimals in"),
        ("logprob_hygiene:decimals=13", r"logprob_hygiene: max_top >= 0 and decimals in"),
        # too many positional values
        ("round:3:4", r"round: too many values; parameters are decimals"),
        ("label_only:1", r"label_only: too many values; parameters are none"),
        ("top_k:1:true:3", r"top_k: too many values; parameters are k, renormalize"),
        # a parameter with no processor before it
        ("beta=1", r"'beta=1' is a parameter without a processor before it"),
        ("beta=1,top_k:5", r"'beta=1' is a parameter without a processor"),
        (",gamma=0.2,round", r"'gamma=0.2' is a parameter without a processor"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_chain(text)


def test_parse_error_is_plain_value_error_without_chained_cause() -> None:
    with pytest.raises(ValueError) as info:
        parse_chain("round:99")
    assert info.type is ValueError
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    "text",
    [
        "top_k:5,round:3",
        "reverse_sigmoid:beta=1,gamma=0.2",
        "reverse_sigmoid:0.5:1e-05:true,label_only",
        "poison:alpha=0.25:epsilon=1.5,misinformation:tau=0.9:nu=0.5",
        "embedding_noise:0.01:per_identity=true,logprob_hygiene:0:12",
        "round:0,top_k:1:no,round:12",
        "none",
    ],
)
def test_describe_round_trip(text: str) -> None:
    chain = parse_chain(text)
    description = describe_chain(chain)
    again = parse_chain(description)
    assert describe_chain(again) == description
    assert [type(p) for p in again] == [type(p) for p in chain]
    for a, b in zip(chain, again, strict=True):
        for name in type(a).params:
            assert getattr(a, name) == getattr(b, name)
            assert type(getattr(a, name)) is type(getattr(b, name))


def test_describe_chain_format() -> None:
    assert describe_chain(()) == "none"
    assert describe_chain(parse_chain("label_only")) == "label_only"
    assert describe_chain(parse_chain("top_k:5,round:3")) == (
        "top_k:k=5:renormalize=True,round:decimals=3"
    )


def test_every_processor_is_registered_under_its_name() -> None:
    assert set(PROCESSORS) == {
        "round",
        "top_k",
        "label_only",
        "reverse_sigmoid",
        "poison",
        "misinformation",
        "embedding_noise",
        "logprob_hygiene",
    }
    for name, cls in PROCESSORS.items():
        assert cls.name == name
        (built,) = parse_chain(name)
        assert isinstance(built, cls)


# -- processors on Outputs -----------------------------------------------------------------

KINDS = ("probabilities", "scores", "embeddings", "labels", "tokens")


def make_outputs(n: int = 6, k: int = 5, d: int = 8, seed: int = 0) -> Outputs:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d))
    return Outputs(
        keys=[b'{"x":[%d]}' % i for i in range(n)],
        probabilities=rng.dirichlet(np.ones(k), size=n),
        scores=rng.normal(size=(n, 3)),
        embeddings=emb / np.linalg.norm(emb, axis=1, keepdims=True),
        labels=np.arange(n, dtype=np.int64),
        tokens=[
            TokenLogprobs(
                logprobs=[-0.123456, -2.5, -0.3333333],
                top=[
                    [
                        *[("a", -0.123456), ("b", -1.987654), ("c", -3.3), ("d", -4.0)],
                        *[("e", -5.0), ("f", -6.111), ("g", -7.0)],
                    ],
                    [("x", -2.5)],
                    [],
                ],
            )
        ],
    )


def snapshot(outputs: Outputs) -> dict[str, object]:
    return {kind: copy.deepcopy(getattr(outputs, kind)) for kind in KINDS}


def same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


def changed_kinds(before: dict[str, object], outputs: Outputs) -> set[str]:
    return {kind for kind in KINDS if not same(before[kind], getattr(outputs, kind))}


@pytest.mark.parametrize(
    ("processor", "touched"),
    [
        (Round(3), {"probabilities", "scores", "embeddings"}),
        (TopK(2), {"probabilities"}),
        (TopK(2, renormalize=False), {"probabilities"}),
        (LabelOnly(), {"probabilities"}),
        (ReverseSigmoid(), {"probabilities"}),
        (ReverseSigmoid(guard_top1=True), {"probabilities"}),
        (Poison(), {"probabilities"}),
        (Misinformation(), {"probabilities"}),
        (EmbeddingNoise(), {"embeddings"}),
        (EmbeddingNoise(per_identity=True), {"embeddings"}),
        (LogprobHygiene(max_top=5, decimals=2), {"tokens"}),
    ],
    ids=repr,
)
def test_processor_touches_only_its_kinds(processor: Processor, touched: set[str]) -> None:
    outputs = make_outputs()
    keys = list(outputs.keys)
    before = snapshot(outputs)
    assert processor.apply(outputs, Context(KEY, identity="id-1")) is True
    assert changed_kinds(before, outputs) == touched
    assert outputs.keys == keys
    for kind in ("probabilities", "scores", "embeddings"):
        new = getattr(outputs, kind)
        assert new.shape == before[kind].shape  # type: ignore[attr-defined]
        assert np.isfinite(new).all()
    assert outputs.labels.dtype == np.int64


@pytest.mark.parametrize(
    "processor",
    [TopK(2), LabelOnly(), ReverseSigmoid(), Poison(), Misinformation(), Round(2)],
    ids=repr,
)
def test_probability_processors_keep_the_simplex(processor: Processor) -> None:
    outputs = make_outputs(n=50, k=7)
    processor.apply(outputs, Context(KEY))
    p = outputs.probabilities
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_processors_match_the_perturbation_functions() -> None:
    base = make_outputs(n=20, k=6)
    p, e = base.probabilities, base.embeddings
    cases = [
        (Round(2), "probabilities", perturb.round_simplex(p, 2)),
        (TopK(3, renormalize=False), "probabilities", perturb.top_k(p, 3, False)),
        (LabelOnly(), "probabilities", perturb.label_only(p)),
        (
            ReverseSigmoid(0.7, 0.3, True),
            "probabilities",
            perturb.reverse_sigmoid(p, 0.7, 0.3, True),
        ),
    ]
    for processor, kind, expected in cases:
        outputs = copy.deepcopy(base)
        assert processor.apply(outputs, Context(KEY))
        np.testing.assert_array_equal(getattr(outputs, kind), expected)
    # keyed ones: the functions called with the context's seeds for those rows
    for processor, salt, kind, fn in [
        (Poison(0.3, 0.4), b"poison", "probabilities", lambda s: perturb.poison(p, s, 0.3, 0.4)),
        (
            Misinformation(0.6, 5.0),
            b"misinformation",
            "probabilities",
            lambda s: perturb.misinformation(p, s, 0.6, 5.0),
        ),
        (
            EmbeddingNoise(0.2),
            b"embedding_noise",
            "embeddings",
            lambda s: perturb.embedding_noise(e, s, 0.2),
        ),
    ]:
        outputs = copy.deepcopy(base)
        ctx = Context(KEY)
        assert processor.apply(outputs, ctx)
        np.testing.assert_array_equal(getattr(outputs, kind), fn(ctx.seeds(base, salt)))


def test_round_returns_false_on_already_rounded_values() -> None:
    outputs = Outputs(
        keys=[b"a", b"b"],
        probabilities=np.array([[0.25, 0.75, 0.0], [0.1, 0.2, 0.7]]),
        scores=np.array([[1.5, -2.125], [0.001, 3.0]]),
        embeddings=np.array([[0.6, 0.8], [1.0, 0.0]]),
    )
    before = snapshot(outputs)
    assert Round(3).apply(outputs, Context(KEY)) is False
    assert changed_kinds(before, outputs) == set()
    assert Round(2).apply(outputs, Context(KEY)) is True  # -2.125 and 0.001 change
    np.testing.assert_array_equal(outputs.scores, [[1.5, -2.12], [0.0, 3.0]])
    np.testing.assert_array_equal(outputs.probabilities, before["probabilities"])


def test_round_only_probabilities_changing_is_reported() -> None:
    outputs = Outputs(keys=[b"a"], probabilities=np.array([[1 / 3, 1 / 3, 1 / 3]]))
    assert Round(2).apply(outputs, Context(KEY)) is True
    np.testing.assert_allclose(outputs.probabilities, [[0.34, 0.33, 0.33]], rtol=0, atol=1e-12)
    assert Round(2).apply(outputs, Context(KEY)) is False  # idempotent


def test_round_leaves_token_logprobs_to_hygiene() -> None:
    outputs = Outputs(keys=[b"a"], tokens=[TokenLogprobs([-0.123456], [[("x", -0.123456)]])])
    assert Round(2).apply(outputs, Context(KEY)) is False
    assert outputs.tokens is not None and outputs.tokens[0].logprobs == [-0.123456]
    assert LogprobHygiene(5, 2).apply(outputs, Context(KEY)) is True
    assert outputs.tokens[0].logprobs == [-0.12]


def test_top_k_returns_false_when_nothing_changes() -> None:
    outputs = make_outputs(k=5)
    before = snapshot(outputs)
    assert TopK(5).apply(outputs, Context(KEY)) is False
    assert TopK(50).apply(outputs, Context(KEY)) is False
    assert changed_kinds(before, outputs) == set()
    # already top-2 rows: keeping 2 changes nothing
    two = Outputs(keys=[b"a"], probabilities=np.array([[0.0, 0.25, 0.0, 0.75]]))
    assert TopK(2).apply(two, Context(KEY)) is False
    assert TopK(1).apply(two, Context(KEY)) is True
    np.testing.assert_array_equal(two.probabilities, [[0.0, 0.0, 0.0, 1.0]])


def test_processors_without_their_kind_return_false() -> None:
    embeddings_only = Outputs(keys=[b"a", b"b"], embeddings=np.array([[0.6, 0.8], [0.0, 1.0]]))
    probabilities_only = Outputs(keys=[b"a"], probabilities=np.array([[0.2, 0.8]]))
    nothing = Outputs(keys=[b"a"], labels=np.array([1]))
    for processor in (TopK(1), LabelOnly(), ReverseSigmoid(), Poison(), Misinformation()):
        before = snapshot(embeddings_only)
        assert processor.apply(embeddings_only, Context(KEY)) is False, processor
        assert changed_kinds(before, embeddings_only) == set()
    for processor in (EmbeddingNoise(0.5), LogprobHygiene()):
        before = snapshot(probabilities_only)
        assert processor.apply(probabilities_only, Context(KEY)) is False, processor
        assert changed_kinds(before, probabilities_only) == set()
    for processor in (cls() for cls in PROCESSORS.values()):
        before = snapshot(nothing)
        assert processor.apply(nothing, Context(KEY)) is False, processor
        assert changed_kinds(before, nothing) == set()
    empty_tokens = Outputs(keys=[b"a"], tokens=[])
    assert LogprobHygiene().apply(empty_tokens, Context(KEY)) is False


def test_processors_return_false_on_fixed_points() -> None:
    ctx = Context(KEY)
    one_hot = Outputs(keys=[b"a", b"b"], probabilities=np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert LabelOnly().apply(one_hot, ctx) is False
    half = Outputs(keys=[b"a"], probabilities=np.array([[0.25, 0.75]]))
    assert ReverseSigmoid(beta=0.0).apply(half, ctx) is False
    np.testing.assert_array_equal(half.probabilities, [[0.25, 0.75]])
    assert ReverseSigmoid(beta=1.0).apply(half, ctx) is True
    probs = make_outputs()
    before = snapshot(probs)
    assert Poison(epsilon=0.0).apply(probs, ctx) is False
    assert Poison(alpha=0.0).apply(probs, ctx) is False
    assert EmbeddingNoise(0.0).apply(probs, ctx) is False
    assert changed_kinds(before, probs) == set()
    single = Outputs(keys=[b"a"], probabilities=np.array([[1.0]]))
    assert Poison().apply(single, ctx) is False
    np.testing.assert_array_equal(single.probabilities, [[1.0]])


def test_logprob_hygiene_caps_alternatives_and_rounds() -> None:
    outputs = make_outputs()
    assert LogprobHygiene(max_top=3, decimals=2).apply(outputs, Context(KEY)) is True
    (seq,) = outputs.tokens
    assert seq.logprobs == [-0.12, -2.5, -0.33]
    assert seq.top == [
        [("a", -0.12), ("b", -1.99), ("c", -3.3)],
        [("x", -2.5)],
        [],
    ]
    # applying again changes nothing
    assert LogprobHygiene(max_top=3, decimals=2).apply(outputs, Context(KEY)) is False
    # a coarser setting changes again; max_top=0 drops every alternative
    assert LogprobHygiene(max_top=0, decimals=0).apply(outputs, Context(KEY)) is True
    assert seq.logprobs == [-0.0, -2.0, -0.0]
    assert seq.top == [[], [], []]


def test_logprob_hygiene_false_when_already_clean() -> None:
    tokens = [TokenLogprobs([-0.5, -1.25], [[("a", -0.5), ("b", -1.0)], [("c", -1.25)]])]
    outputs = Outputs(keys=[b"a"], tokens=copy.deepcopy(tokens))
    assert LogprobHygiene(max_top=2, decimals=2).apply(outputs, Context(KEY)) is False
    assert outputs.tokens == tokens
    assert LogprobHygiene(max_top=1, decimals=2).apply(outputs, Context(KEY)) is True
    assert outputs.tokens[0].top == [[("a", -0.5)], [("c", -1.25)]]
    assert outputs.tokens[0].logprobs == [-0.5, -1.25]


KEYED = [Poison(), Misinformation(), EmbeddingNoise(0.1), EmbeddingNoise(0.1, per_identity=True)]


@pytest.mark.parametrize("processor", KEYED, ids=repr)
def test_keyed_processors_deterministic_and_key_separated(processor: Processor) -> None:
    base = make_outputs(n=40, k=10, d=16)
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    assert processor.apply(a, Context(KEY, identity="alice"))
    assert processor.apply(b, Context(KEY, identity="alice"))
    assert processor.apply(c, Context(OTHER_KEY, identity="alice"))
    kind = "embeddings" if isinstance(processor, EmbeddingNoise) else "probabilities"
    np.testing.assert_array_equal(getattr(a, kind), getattr(b, kind))
    differs = (getattr(a, kind) != getattr(c, kind)).any(axis=1)
    assert differs.mean() > 0.5


@pytest.mark.parametrize("processor", KEYED, ids=repr)
def test_keyed_processors_key_rows_by_query_not_by_position(processor: Processor) -> None:
    """The same query gets the same answer wherever it sits in a batch."""
    base = make_outputs(n=30, k=10, d=16)
    kind = "embeddings" if isinstance(processor, EmbeddingNoise) else "probabilities"
    order = np.random.default_rng(1).permutation(30)
    shuffled = Outputs(
        keys=[base.keys[i] for i in order],
        probabilities=base.probabilities[order],
        embeddings=base.embeddings[order],
    )
    straight = copy.deepcopy(base)
    processor.apply(straight, Context(KEY))
    processor.apply(shuffled, Context(KEY))
    np.testing.assert_array_equal(getattr(shuffled, kind), getattr(straight, kind)[order])
    # the same values under other query keys get other noise
    renamed = copy.deepcopy(base)
    renamed.keys = [k + b" " for k in base.keys]
    processor.apply(renamed, Context(KEY))
    assert (getattr(renamed, kind) != getattr(straight, kind)).any(axis=1).mean() > 0.5


def test_embedding_noise_per_identity() -> None:
    base = make_outputs(n=20, d=32)

    def run(processor: EmbeddingNoise, identity: str) -> np.ndarray:
        outputs = copy.deepcopy(base)
        assert processor.apply(outputs, Context(KEY, identity=identity))
        return outputs.embeddings

    per = EmbeddingNoise(0.1, per_identity=True)
    alice, alice2, bob = run(per, "alice"), run(per, "alice"), run(per, "bob")
    np.testing.assert_array_equal(alice, alice2)
    assert (alice != bob).any(axis=1).all()  # every row gets different noise
    # the noise of two identities is not correlated (B4B: no pooling across accounts)
    na, nb = alice - base.embeddings, bob - base.embeddings
    cos = (na * nb).sum(axis=1) / np.linalg.norm(na, axis=1) / np.linalg.norm(nb, axis=1)
    assert abs(cos.mean()) < 0.3
    # without per_identity the identity does not matter
    shared = EmbeddingNoise(0.1)
    np.testing.assert_array_equal(run(shared, "alice"), run(shared, "bob"))
    # and the unit norm is kept
    np.testing.assert_allclose(np.linalg.norm(alice, axis=1), 1.0, rtol=1e-12)


# -- Context -------------------------------------------------------------------------------


def test_context_seeds_are_the_rows_salted_seeds() -> None:
    outputs = make_outputs(n=5)
    ctx = Context(KEY)
    a = ctx.seeds(outputs, b"one")
    np.testing.assert_array_equal(a, keyed.row_seeds(KEY, outputs.keys, b"one"))
    b = ctx.seeds(outputs, b"two")
    assert (a != b).all()  # salts separate processors
    bigger = make_outputs(n=7)
    np.testing.assert_array_equal(
        ctx.seeds(bigger, b"one"), keyed.row_seeds(KEY, bigger.keys, b"one")
    )


def test_context_seeds_follow_the_rows_keys() -> None:
    rows = np.array([[0.4, 0.35, 0.25]])
    first = Outputs(keys=[b"query-1"], probabilities=rows.copy())
    second = Outputs(keys=[b"query-2"], probabilities=rows.copy())
    fresh = copy.deepcopy(second)
    shared = Context(KEY)
    Misinformation().apply(first, shared)
    Misinformation().apply(second, shared)
    Misinformation().apply(fresh, Context(KEY))
    # query-2's answer must not depend on what the context answered before
    np.testing.assert_array_equal(second.probabilities, fresh.probabilities)
    np.testing.assert_array_equal(
        shared.seeds(second, b"misinformation"),
        keyed.row_seeds(KEY, [b"query-2"], b"misinformation"),
    )


def test_processor_repr() -> None:
    assert repr(LabelOnly()) == "label_only"
    assert repr(TopK(4, False)) == "top_k:k=4:renormalize=False"
    assert re.fullmatch(
        r"reverse_sigmoid:beta=1\.0:gamma=0\.1:guard_top1=False", repr(ReverseSigmoid())
    )
