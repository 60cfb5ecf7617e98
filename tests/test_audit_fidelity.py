"""The embedding and text thieves of the audit, on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from asgi_extraction_shield.audit.bigram import (
    BigramCopy,
    next_word_agreement,
    text_copy_curve,
    words,
)
from asgi_extraction_shield.audit.substitutes import (
    embedding_fidelity_curve,
    retrieval_agreement,
    thieves_for,
    word_features,
)

WORDS = tuple(f"w{i}" for i in range(20))


def test_retrieval_agreement_against_its_definition() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(12, 5))
    assert retrieval_agreement(reference, reference) == pytest.approx((1.0, 1.0))
    # Scaled copies point the same way: cosine ignores length.
    assert retrieval_agreement(3.0 * reference, reference) == pytest.approx((1.0, 1.0))
    # Each prediction is exactly the next sample's reference: none retrieves its own.
    agreement, cosine = retrieval_agreement(np.roll(reference, 1, axis=0), reference)
    assert agreement == 0.0 and cosine < 0.9
    # A copy that predicts nothing retrieves nothing.
    assert retrieval_agreement(np.zeros_like(reference), reference) == (0.0, 0.0)
    half = reference.copy()
    half[:6] = -reference[:6]  # opposite: the farthest of all, cosine -1
    agreement, cosine = retrieval_agreement(half, reference)
    assert agreement == 0.5 and cosine == pytest.approx(0.0)


def test_a_ridge_copy_of_a_linear_embedding_model_retrieves_every_sample() -> None:
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(8, 16))
    x, x_eval = rng.uniform(-1, 1, (200, 8)), rng.uniform(-1, 1, (60, 8))
    answers: list[np.ndarray | None] = list(x @ weights)
    answers[:20] = [None] * 20  # refused: nothing learned from the first 20 queries
    curve, cosine = embedding_fidelity_curve(x, answers, [20, 200], x_eval, x_eval @ weights)
    assert curve == {"embedding": {20: 0.0, 200: pytest.approx(1.0)}}
    assert cosine[20] == 0.0 and cosine[200] > 0.99
    # Answers unrelated to the inputs: the copy retrieves at chance (1 / 60).
    noise: list[np.ndarray | None] = list(rng.normal(size=(200, 16)))
    curve, cosine = embedding_fidelity_curve(x, noise, [200], x_eval, x_eval @ weights)
    assert curve["embedding"][200] < 0.1 and abs(cosine[200]) < 0.3


def test_the_embedding_copy_of_a_text_endpoint_learns_from_hashed_words() -> None:
    rng = np.random.default_rng(2)
    vectors = dict(zip(WORDS, rng.normal(size=(len(WORDS), 12)), strict=True))

    def texts(n: int) -> list[str]:
        return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(n)]

    def embed(text: str) -> np.ndarray:  # a bag-of-words model: linear in word counts
        return np.asarray(sum(vectors[w] for w in text.split()), dtype=np.float64)

    sent, held = texts(150), texts(40)
    answers: list[np.ndarray | None] = [embed(t) for t in sent]
    answers[5] = np.zeros(3)  # another dimension: not learned from
    reference = np.stack([embed(t) for t in held])
    curve, cosine = embedding_fidelity_curve(
        word_features(sent), answers, [150], word_features(held), reference
    )
    assert curve["embedding"][150] > 0.95 and cosine[150] > 0.95


def _chain(prompt_last: str, length: int) -> str:
    """A deterministic generator: each word is followed by the next one of ``WORDS``."""
    out, word = [], prompt_last
    for _ in range(length):
        word = WORDS[(WORDS.index(word) + 1) % len(WORDS)]
        out.append(word)
    return " ".join(out)


def _prompts(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=3)) for _ in range(n)]


def test_the_bigram_copy_of_a_deterministic_generator_agrees_on_every_word() -> None:
    rng = np.random.default_rng(3)
    prompts = _prompts(rng, 120)
    completions: list[str | None] = [
        _chain(p.split()[-1], int(rng.integers(2, 9))) for p in prompts
    ]
    completions[0] = None  # refused
    held = [(p, _chain(p.split()[-1], 6)) for p in _prompts(rng, 30)]
    curve = text_copy_curve(prompts, completions, [1, 120], held)
    assert curve is not None
    assert curve["text"][1] == 0.0  # the only query was refused: the copy knows nothing
    assert curve["text"][120] == 1.0


def test_the_bigram_copy_of_random_words_agrees_at_chance() -> None:
    rng = np.random.default_rng(4)

    def random_completion() -> str:
        return " ".join(rng.choice(WORDS, size=8))

    prompts = _prompts(rng, 400)
    completions: list[str | None] = [random_completion() for _ in prompts]
    held = [(p, random_completion()) for p in _prompts(rng, 100)]
    curve = text_copy_curve(prompts, completions, [400], held)
    assert curve is not None and curve["text"][400] < 0.12  # chance: 1 / 20


def test_bigram_probabilities_are_add_one_smoothed_and_back_off() -> None:
    copy = BigramCopy()
    for completion in ("a b c", "a b d", "a c d"):
        copy.learn("x y", completion)
    vocabulary = ["a", "b", "c", "d"]
    size = len(vocabulary) + 1  # and the slot of every unseen word
    # After "a": b twice, c once (3 in all).
    assert copy.probability("b", "y", "a") == pytest.approx(3 / (3 + size))
    assert copy.probability("zzz", "y", "a") == pytest.approx(1 / (3 + size))
    assert copy.next_word("y", "a") == "b"
    # The first word after a prompt ending in "y": always "a".
    assert copy.probability("a", "y", None) == pytest.approx(4 / (3 + size))
    assert copy.next_word("y", None) == "a"
    # An unseen prompt ending backs off to the starts of all completions (still "a"); an
    # unseen previous word backs off to the unigram (9 words: b, c and d twice each, a 3).
    assert copy.probability("a", "unseen", None) == pytest.approx(4 / (3 + size))
    assert copy.probability("a", "y", "unseen") == pytest.approx(4 / (9 + size))
    assert copy.next_word("y", "unseen") == "a"
    for prompt_last, previous in (("y", "a"), ("y", None), ("q", "unseen")):
        total = sum(copy.probability(w, prompt_last, previous) for w in vocabulary)
        assert total + copy.probability("zzz", prompt_last, previous) == pytest.approx(1.0)
    assert next_word_agreement(BigramCopy(), [("x y", "a b")]) == 0.0
    assert next_word_agreement(copy, [("x y", "")]) is None  # no word to agree on
    assert words("The cat, naïve!") == ["The", "cat", ",", "naïve", "!"]


def test_each_answer_kind_has_its_thieves() -> None:
    assert thieves_for("probabilities") == thieves_for("labels") == ("soft", "label")
    assert thieves_for("embeddings") == ("embedding",)
    assert thieves_for("text") == ("text",)
