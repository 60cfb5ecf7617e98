"""Substitutes ("thieves"): models trained on the answers an attack actually got.

Fidelity is the agreement of a substitute's top-1 with the target's top-1 on held-out
inputs (what a thief wants: a copy that answers like the target). At a budget of B
queries the thief has the first B queries it sent and whatever came back; refused
queries taught it nothing.

- ``soft``: an MLP regressor (64 ReLUs) on the answer rows it received (perturbed ones
  included), its prediction the argmax of its output; averaged over training seeds.
- ``label``: a multinomial logistic regression on the top-1 labels it received.
- ``embedding`` (endpoints answering embeddings): a ridge regression from the inputs'
  features (hashed word counts of texts, scaled numeric features) to the embeddings it
  received. Its fidelity is *retrieval agreement*, the embedding analogue of top-1
  agreement: the share of held-out samples whose copied embedding is nearest (cosine)
  to the sample's own reference embedding among all held-out reference embeddings
  (chance: one over the number of held-out samples).
- ``text`` (chat and completions): a word-bigram model, see :mod:`.bigram`.

A classifier thief with no answer at all guesses class 0; with answers of a single class
it always predicts that class. An embedding thief with no answer retrieves nothing.
scikit-learn is imported when a substitute is trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .attacks import Array
from .bigram import THIEF as TEXT_THIEF
from .wire import EMBEDDINGS, TEXT

Labels = NDArray[np.int64]
THIEVES = ("soft", "label")
"""The thieves of classifier answers (probabilities, scores, labels)."""
EMBEDDING_THIEF = "embedding"
_THIEVES_OF = {EMBEDDINGS: (EMBEDDING_THIEF,), TEXT: (TEXT_THIEF,)}
_AGREEMENT_OF = {EMBEDDINGS: "retrieval agreement", TEXT: "next-word agreement"}


def thieves_for(kind: str) -> tuple[str, ...]:
    """The thieves that copy an endpoint answering ``kind`` (an :class:`Answer` kind)."""
    return _THIEVES_OF.get(kind, THIEVES)


def agreement_for(kind: str) -> str:
    """What a fidelity figure of an endpoint answering ``kind`` measures."""
    return _AGREEMENT_OF.get(kind, "top-1 agreement")


def word_features(texts: Sequence[str]) -> Any:
    """Hashed word counts of ``texts`` (scikit-learn's ``HashingVectorizer``), a sparse
    matrix of one row a text."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(n_features=2**14, alternate_sign=False, norm=None)
    return vectorizer.transform(list(texts))


def predict_with(thief: str, x: Array, answers: Array, x_eval: Array, seed: int) -> Labels:
    """Top-1 predictions on ``x_eval`` of a ``thief`` trained on ``(x, answers)``; the
    inputs are features already scaled for learning."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPRegressor

    if len(x) == 0:
        return np.zeros(len(x_eval), dtype=np.int64)
    labels = answers.argmax(axis=1)
    if len(np.unique(labels)) < 2:
        return np.full(len(x_eval), labels[0], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if thief == "soft":
            regressor = MLPRegressor(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
            regressor.fit(x, answers)
            return np.asarray(regressor.predict(x_eval).argmax(axis=1), dtype=np.int64)
        classifier = LogisticRegression(max_iter=500)
        classifier.fit(x, labels)
        return np.asarray(classifier.predict(x_eval), dtype=np.int64)


def fidelity_curve(
    queries: Sequence[Array],
    answers: Sequence[Array | None],
    budgets: Sequence[int],
    x_eval: Array,
    target_labels: Labels,
    seeds: Sequence[int],
    scale: Callable[[Array], Array],
) -> dict[str, dict[int, float]]:
    """``{thief: {budget: fidelity}}`` for the prefixes of a campaign's log.

    ``scale`` maps raw features to what the substitutes learn on. The soft thief's
    fidelity is the mean over its training ``seeds`` (one MLP's initialisation moves it
    by a few points at small budgets); the label thief (a convex fit) needs no seed.
    """
    width = next((len(a) for a in answers if a is not None), 1)
    dim = x_eval.shape[1]
    scaled_eval = scale(x_eval)
    curve: dict[str, dict[int, float]] = {thief: {} for thief in THIEVES}
    for budget in sorted(set(budgets)):
        kept = [i for i in range(min(budget, len(queries))) if answers[i] is not None]
        x = np.zeros((len(kept), dim))
        p = np.zeros((len(kept), width))
        for row, i in enumerate(kept):
            x[row], p[row] = queries[i], answers[i]
        x = scale(x) if len(x) else x
        soft = [predict_with("soft", x, p, scaled_eval, seed) == target_labels for seed in seeds]
        curve["soft"][budget] = float(np.mean(soft))
        label = predict_with("label", x, p, scaled_eval, seeds[0]) == target_labels
        curve["label"][budget] = float(label.mean())
    return curve


def text_fidelity_curve(
    queries: Sequence[str],
    labels: Sequence[int | None],
    budgets: Sequence[int],
    texts_eval: Sequence[str],
    target_labels: Labels,
) -> dict[str, dict[int, float]]:
    """``{"label": {budget: fidelity}}`` of a label thief on texts: a logistic regression
    (C = 10: a few hundred answers call for little regularisation) on hashed word counts
    (scikit-learn's ``HashingVectorizer``)."""
    from sklearn.linear_model import LogisticRegression

    x_eval = word_features(texts_eval)
    x = word_features(list(queries[: max(budgets, default=0)]))  # hashed once, row by row
    curve: dict[int, float] = {}
    for budget in sorted(set(budgets)):
        kept = [i for i in range(min(budget, len(queries))) if labels[i] is not None]
        y = np.asarray([labels[i] for i in kept], dtype=np.int64)
        if len(np.unique(y)) < 2:
            guess = np.full(len(target_labels), y[0] if len(y) else 0, dtype=np.int64)
        else:
            model = LogisticRegression(C=10.0, max_iter=1000)
            model.fit(x[kept], y)
            guess = np.asarray(model.predict(x_eval), dtype=np.int64)
        curve[budget] = float((guess == target_labels).mean())
    return {"label": curve}


def retrieval_agreement(predicted: Array, reference: Array) -> tuple[float, float]:
    """``(agreement, mean cosine)`` of ``predicted`` embeddings with the ``reference``
    ones, row i of each belonging to held-out sample i: agreement is the share of rows
    whose prediction is nearer (cosine) to its own reference than to any other; a zero
    prediction is near nothing (cosine 0, never retrieved)."""
    norms = np.linalg.norm(predicted, axis=1, keepdims=True)
    unit = np.divide(predicted, norms, out=np.zeros_like(predicted), where=norms > 0)
    ref_norms = np.linalg.norm(reference, axis=1, keepdims=True)
    ref_unit = np.divide(reference, ref_norms, out=np.zeros_like(reference), where=ref_norms > 0)
    cosine = unit @ ref_unit.T
    own = np.diag(cosine)
    hits = (cosine.argmax(axis=1) == np.arange(len(cosine))) & (norms[:, 0] > 0)
    return float(hits.mean()), float(own.mean())


def embedding_fidelity_curve(
    x: Any,
    answers: Sequence[Array | None],
    budgets: Sequence[int],
    x_eval: Any,
    reference: Array,
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    """``({"embedding": {budget: retrieval agreement}}, {budget: mean cosine})`` of ridge
    regressions (alpha 1) trained on the first ``budget`` rows of ``x`` (one a query,
    dense or sparse) and the embeddings they were answered; answers of another
    dimension than the reference are not learned from."""
    from sklearn.linear_model import Ridge

    dim = reference.shape[1]
    agreement: dict[int, float] = {}
    cosine: dict[int, float] = {}
    for budget in sorted(set(budgets)):
        kept = [
            (i, a) for i, a in enumerate(answers[:budget]) if a is not None and a.shape == (dim,)
        ]
        if kept:
            model = Ridge(alpha=1.0)
            model.fit(x[[i for i, _ in kept]], np.stack([a for _, a in kept]))
            predicted = np.asarray(model.predict(x_eval), dtype=np.float64).reshape(-1, dim)
        else:
            predicted = np.zeros_like(reference)
        agreement[budget], cosine[budget] = retrieval_agreement(predicted, reference)
    return {EMBEDDING_THIEF: agreement}, cosine
