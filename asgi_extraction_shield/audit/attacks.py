"""Extraction attacks as query strategies, for numeric inputs of any dimension.

Each strategy is a generator: it yields one query (a float64 vector) at a time and is
sent back the answer, a probability (or score) row, or ``None`` when the request was
refused (a refused query teaches nothing). Adaptive strategies (JBDA, boundary probing)
choose their next queries from the answers so far. A :class:`Campaign` drives a strategy
from one identity or from many (sybils) in the same order, so a split changes who asks,
not what is asked.

Every strategy works in a :class:`Box`, the feature range of the attacker's pool (the
samples it holds), and takes that pool, a random generator and a seed for its models:

- ``uniform``: queries drawn uniformly in the box (Tramèr et al., USENIX Security 2016's
  synthetic queries; what PRADA was built to catch).
- ``jbda``: Jacobian-based dataset augmentation (Papernot et al., AsiaCCS 2017): seeds
  from the pool, then each round trains a substitute on the labels so far and adds
  x + λ·sign(∇ₓ logit_{label(x)}) for every point x, λ = ``step`` · the box's width.
- ``knockoff``: natural queries (Orekondy et al., CVPR 2019): the pool once, then
  augmented copies of it, pass after pass.
- ``boundary``: bisection between two pool points the target labels differently, then
  tiny perturbations of the crossing (near-duplicates), the probing SEAT detects (Zhang
  et al. 2021).

numpy only; JBDA's substitute is scikit-learn's ``MLPClassifier``, imported when used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
Answer = Array | None
Strategy = Generator[Array, Answer, None]
StrategyFactory = Callable[[Array, np.random.Generator, int], Strategy]
"""``(attacker's pool, rng, seed for models) → strategy``."""
Augment = Callable[[Array, np.random.Generator], Array]
"""A light, label-preserving change of one pool point."""


@dataclass(frozen=True)
class Box:
    """The feature range the attacker works in: ``low ≤ x ≤ high``, feature by feature."""

    low: Array
    high: Array

    @classmethod
    def uniform(cls, low: float, high: float, dim: int) -> Box:
        return cls(np.full(dim, float(low)), np.full(dim, float(high)))

    @classmethod
    def around(cls, pool: Array, margin: float = 0.1) -> Box:
        """The pool's range per feature, widened by ``margin`` of its width on each side
        (a feature constant in the pool gets a width of 1 around its value)."""
        low, high = pool.min(axis=0), pool.max(axis=0)
        pad = np.where(high > low, margin * (high - low), 0.5)
        return cls(low - pad, high + pad)

    @property
    def width(self) -> Array:
        return np.asarray(self.high - self.low, dtype=np.float64)

    def clip(self, x: Array) -> Array:
        return np.asarray(np.clip(x, self.low, self.high), dtype=np.float64)

    def scaled(self, x: Array) -> Array:
        """Features to [0, 1] (what the substitutes are trained on)."""
        return np.asarray((np.asarray(x, dtype=np.float64) - self.low) / self.width)


def uniform(box: Box) -> StrategyFactory:
    def strategy(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
        while True:
            yield np.asarray(rng.uniform(box.low, box.high), dtype=np.float64)

    return strategy


def knockoff(augment: Augment) -> StrategyFactory:
    """The pool once, in a random order, then augmented copies of it, pass after pass."""

    def strategy(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
        for i in rng.permutation(len(pool)):
            yield pool[i]
        while True:
            for i in rng.permutation(len(pool)):
                yield augment(pool[i], rng)

    return strategy


def jitter(box: Box, noise: float = 0.03, contrast: float = 0.1) -> Augment:
    """A generic augmentation: scale by 1 ± ``contrast`` around the box's centre, add
    Gaussian noise of ``noise`` · the box's width, clip to the box."""
    centre = (box.low + box.high) / 2

    def augment(x: Array, rng: np.random.Generator) -> Array:
        factor = rng.uniform(1.0 - contrast, 1.0 + contrast)
        out = centre + (x - centre) * factor + rng.normal(0.0, noise * box.width)
        return box.clip(out)

    return augment


def make_jbda(box: Box, seeds: int = 150, rounds: int = 6, step: float = 0.1) -> StrategyFactory:
    """JBDA with ``seeds`` pool points (at most the pool) and up to ``rounds`` doublings."""

    def jbda(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
        lam = step * box.width
        points: list[Array] = []
        labels: list[int] = []
        chosen = rng.choice(len(pool), size=min(seeds, len(pool)), replace=False)
        frontier = [pool[i] for i in chosen]
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
            x_all = np.asarray(points)
            substitute = fit_classifier(box.scaled(x_all), np.asarray(labels), seed + round_)
            # Every labelled point so far is pushed along the substitute's gradient
            # (the set doubles each round), as in Papernot et al.'s Algorithm 1.
            gradient = logit_gradient(substitute, box.scaled(x_all), np.asarray(labels))
            frontier = list(box.clip(x_all + lam * np.sign(gradient)))

    return jbda


def fit_classifier(x: Array, y: NDArray[np.int64], seed: int) -> Any:
    """A one-hidden-layer ReLU ``MLPClassifier`` (64 units) fitted on ``(x, y)``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def logit_gradient(model: Any, x: Array, classes: NDArray[np.int64]) -> Array:
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


def boundary(
    box: Box, bisections: int = 7, probes: int = 4, noise: float = 0.01
) -> StrategyFactory:
    """Bisect between two pool points of different labels, then probe around the crossing
    with ``probes`` points of Gaussian noise ``noise`` · the box's width."""

    def strategy(pool: Array, rng: np.random.Generator, seed: int) -> Strategy:
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
                yield box.clip(crossing + rng.normal(0.0, noise * box.width))

    return strategy


def strategies(
    box: Box, augment: Augment, jbda_seeds: int = 150, jbda_rounds: int = 6
) -> dict[str, StrategyFactory]:
    """The four attacks, by name, for a feature ``box``."""
    return {
        "uniform": uniform(box),
        "jbda": make_jbda(box, jbda_seeds, jbda_rounds),
        "knockoff": knockoff(augment),
        "boundary": boundary(box),
    }


@dataclass
class Campaign:
    """One attack, driven from one identity or many; its log is what the thief learned."""

    strategy: Strategy
    budget: int
    queries: list[Array] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    done: bool = False
    _pending: Array | None = None

    def next_query(self) -> Array | None:
        """The next query to send, or ``None`` when the budget is spent or the attack ends."""
        if self.done or len(self.queries) >= self.budget:
            return None
        if self._pending is None:
            try:
                self._pending = next(self.strategy)
            except StopIteration:
                self.done = True
                return None
        return self._pending

    def deliver(self, answer: Answer) -> None:
        """The answer to the query :meth:`next_query` gave (``None``: refused)."""
        if self._pending is None:
            raise RuntimeError("deliver() without a pending query")
        self.queries.append(self._pending)
        self.answers.append(answer)
        try:
            self._pending = self.strategy.send(answer)
        except StopIteration:
            self.done, self._pending = True, None
