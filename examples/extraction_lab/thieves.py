"""The thieves: substitutes trained on the answers an attack actually got.

Fidelity is the agreement of a substitute's top-1 with the victim's top-1 on the
held-out digits (what the thief wants: a copy that answers like the victim). At a budget
of B queries the thief has the first B queries it sent and whatever came back; refused
queries taught it nothing.

- ``soft``: an MLP regressor on the probability rows it received (perturbed ones
  included), its prediction the argmax of its output; averaged over a few training seeds.
- ``label``: a multinomial logistic regression on the top-1 labels it received (on
  these digits as faithful as an MLP classifier, and ten times cheaper to train).

A thief with no answer at all guesses one class; with answers of a single class it
always predicts that class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPRegressor

from .victim import N_CLASSES, N_FEATURES, Array, Labels, scaled

THIEVES = ("soft", "label")


def predict_with(thief: str, x: Array, answers: Array, x_eval: Array, seed: int) -> Labels:
    """Top-1 predictions on ``x_eval`` of a ``thief`` trained on ``(x, answers)``."""
    if len(x) == 0:
        return np.zeros(len(x_eval), dtype=np.int64)
    labels = answers.argmax(axis=1)
    if len(np.unique(labels)) < 2:
        return np.full(len(x_eval), labels[0], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if thief == "soft":
            regressor = MLPRegressor(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
            regressor.fit(scaled(x), answers)
            return np.asarray(regressor.predict(scaled(x_eval)).argmax(axis=1), dtype=np.int64)
        classifier = LogisticRegression(max_iter=500)
        classifier.fit(scaled(x), labels)
        return np.asarray(classifier.predict(scaled(x_eval)), dtype=np.int64)


def fidelity_curve(
    queries: Sequence[Array],
    answers: Sequence[Array | None],
    budgets: Sequence[int],
    x_eval: Array,
    victim_labels: Labels,
    seeds: Sequence[int],
) -> dict[str, dict[int, float]]:
    """``{thief: {budget: fidelity}}`` for the prefixes of a campaign's log.

    The soft-label thief's fidelity is the mean over its training ``seeds``: one MLP's
    initialisation moves it by a few points at small budgets (standard deviation 0.02–0.04
    at 100–500 queries here), more than the differences being measured. The label-only
    thief (a convex fit) does not depend on a seed.
    """
    curve: dict[str, dict[int, float]] = {thief: {} for thief in THIEVES}
    for budget in sorted(set(budgets)):
        kept = [i for i in range(min(budget, len(queries))) if answers[i] is not None]
        x = np.zeros((len(kept), N_FEATURES))
        p = np.zeros((len(kept), N_CLASSES))
        for row, i in enumerate(kept):
            x[row], p[row] = queries[i], answers[i]
        soft = [predict_with("soft", x, p, x_eval, seed) == victim_labels for seed in seeds]
        curve["soft"][budget] = float(np.mean(soft))
        label = predict_with("label", x, p, x_eval, seeds[0]) == victim_labels
        curve["label"][budget] = float(label.mean())
    return curve
