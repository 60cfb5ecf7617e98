"""The attacks: query strategies of a thief who wants a copy of the victim.

Each strategy is a generator: it yields one query (64 pixels in [0, 16]) at a time and
is sent back the answer, the probability row the API returned, or ``None`` when the
request was refused (a refused query teaches nothing). Adaptive strategies (JBDA,
boundary probing) choose their next queries from the answers so far. The lab drives a
strategy from one identity or from many (sybils), always in the same order, so a split
changes who asks, not what is asked.

- ``uniform``: queries drawn uniformly in the feature box (Tramèr et al. 2016's
  synthetic queries; what PRADA was built to catch).
- ``jbda``: Jacobian-based dataset augmentation (Papernot et al. 2017): seeds from the
  attacker's pool, then each round trains a substitute on the labels so far and adds
  x + λ·sign(∇ₓ logit_{label(x)}) for every point x, λ = 0.1 · the feature range.
- ``knockoff``: natural queries from a related distribution (Orekondy et al. 2019): the
  attacker's pool of real digits the victim never saw, then lightly augmented copies
  (shifts of a pixel, contrast, noise).
- ``boundary``: line search between pairs of real digits the victim labels differently
  (bisection towards the decision boundary), then tiny perturbations of the boundary
  point (near-duplicates); in the manner of the probing SEAT detects (Zhang et al. 2021).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from .victim import PIXEL_MAX, Array, scaled

Answer = Array | None
Strategy = Generator[Array, Answer, None]
StrategyFactory = Callable[[Array, np.random.Generator, int], Strategy]
"""``(attacker's pool, rng, seed for models) → strategy``."""


def uniform(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
    while True:
        yield np.asarray(rng.uniform(0.0, PIXEL_MAX, pool.shape[1]), dtype=np.float64)


def knockoff(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
    """The pool once, in a random order, then augmented copies of it, pass after pass."""
    for i in rng.permutation(len(pool)):
        yield pool[i]
    while True:
        for i in rng.permutation(len(pool)):
            yield augment(pool[i], rng)


def augment(x: Array, rng: np.random.Generator) -> Array:
    """A light augmentation of an 8×8 digit: shift by up to a pixel, contrast, noise."""
    image = x.reshape(8, 8)
    dy, dx = rng.integers(-1, 2, size=2)
    shifted = np.zeros_like(image)
    shifted[max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)] = image[
        max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)
    ]
    out = shifted * rng.uniform(0.85, 1.15) + rng.normal(0.0, 0.5, image.shape)
    return np.clip(out, 0.0, PIXEL_MAX).ravel()


def make_jbda(
    seeds: int = 150, rounds: int = 6, step: float = 0.1
) -> Callable[[Array, np.random.Generator, int], Strategy]:
    """JBDA with ``seeds`` real digits and up to ``rounds`` doublings of the set."""

    def jbda(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
        lam = step * PIXEL_MAX
        points: list[Array] = []
        labels: list[int] = []
        frontier = [pool[i] for i in rng.choice(len(pool), size=seeds, replace=False)]
        for round_ in range(rounds + 1):
            answered: list[tuple[Array, int]] = []
            for x in frontier:
                answer = yield x
                if answer is not None:
                    answered.append((x, int(np.argmax(answer))))
            for x, label in answered:
                points.append(x)
                labels.append(label)
            if round_ == rounds or len(set(labels)) < 2 or not answered:
                return
            substitute = _fit_substitute(np.asarray(points), np.asarray(labels), seed + round_)
            # Every labelled point so far is pushed along the substitute's gradient
            # (the set doubles each round), as in Papernot et al.'s Algorithm 1.
            x_all = np.asarray(points)
            gradient = logit_gradient(substitute, scaled(x_all), np.asarray(labels))
            frontier = list(np.clip(x_all + lam * np.sign(gradient), 0.0, PIXEL_MAX))

    return jbda


def _fit_substitute(x: Array, y: Array, seed: int) -> MLPClassifier:
    model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaled(x), y)
    return model


def logit_gradient(model: MLPClassifier, x: Array, classes: Array) -> Array:
    """∂ logit_c / ∂x of a ReLU ``MLPClassifier``, row by row, for each row's class c."""
    hidden = x
    masks = []
    for weights, bias in zip(model.coefs_[:-1], model.intercepts_[:-1], strict=True):
        z = hidden @ weights + bias
        masks.append(z > 0)
        hidden = np.maximum(z, 0.0)
    out = model.coefs_[-1]
    if out.shape[1] == 1:  # two classes: one logit, for classes_[1]
        sign = np.where(classes == model.classes_[1], 1.0, -1.0)
        grad = sign[:, None] * out[:, 0][None, :]
    else:
        grad = out[:, np.searchsorted(model.classes_, classes)].T
    for weights, mask in zip(reversed(model.coefs_[:-1]), reversed(masks), strict=True):
        grad = (grad * mask) @ weights.T
    return np.asarray(grad, dtype=np.float64)


def boundary(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
    """Bisect between two real digits of different labels, then probe around the crossing."""
    bisections, probes, noise = 7, 4, 0.01 * PIXEL_MAX
    known: dict[int, int] = {}

    def label_of(i: int) -> Generator[Array, Answer, int | None]:
        if i not in known:
            answer = yield pool[i]
            if answer is None:
                return None
            known[i] = int(np.argmax(answer))
        return known[i]

    while True:
        i, j = (int(k) for k in rng.choice(len(pool), size=2, replace=False))
        a = yield from label_of(i)
        b = yield from label_of(j)
        if a is None or b is None or a == b:
            continue
        low, high = pool[i], pool[j]
        for _ in range(bisections):
            middle = (low + high) / 2
            answer = yield middle
            if answer is None:
                break
            if int(np.argmax(answer)) == a:
                low = middle
            else:
                high = middle
        crossing = (low + high) / 2
        for _ in range(probes):
            yield np.clip(crossing + rng.normal(0.0, noise, crossing.shape), 0.0, PIXEL_MAX)


def strategies(jbda_seeds: int, jbda_rounds: int) -> dict[str, StrategyFactory]:
    return {
        "uniform": uniform,
        "jbda": make_jbda(jbda_seeds, jbda_rounds),
        "knockoff": knockoff,
        "boundary": boundary,
    }
