"""Substitutes ("thieves"): models trained on the answers an attack actually got.

Fidelity is the agreement of a substitute's top-1 with the target's top-1 on held-out
inputs (what a thief wants: a copy that answers like the target). At a budget of B
queries the thief has the first B queries it sent and whatever came back; refused
queries taught it nothing.

- ``soft``: an MLP regressor (64 ReLUs) on the answer rows it received (perturbed ones
  included), its prediction the argmax of its output; averaged over training seeds.
- ``label``: a multinomial logistic regression on the top-1 labels it received.

A thief with no answer at all guesses class 0; with answers of a single class it always
predicts that class. scikit-learn is imported when a substitute is trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from .attacks import Array

Labels = NDArray[np.int64]
THIEVES = ("soft", "label")


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
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = HashingVectorizer(n_features=2**14, alternate_sign=False, norm=None)
    x_eval = vectorizer.transform(list(texts_eval))
    curve: dict[int, float] = {}
    for budget in sorted(set(budgets)):
        kept = [i for i in range(min(budget, len(queries))) if labels[i] is not None]
        y = np.asarray([labels[i] for i in kept], dtype=np.int64)
        if len(np.unique(y)) < 2:
            guess = np.full(len(target_labels), y[0] if len(y) else 0, dtype=np.int64)
        else:
            model = LogisticRegression(C=10.0, max_iter=1000)
            model.fit(vectorizer.transform([queries[i] for i in kept]), y)
            guess = np.asarray(model.predict(x_eval), dtype=np.int64)
        curve[budget] = float((guess == target_labels).mean())
    return {"label": curve}
