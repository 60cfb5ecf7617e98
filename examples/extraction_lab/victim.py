"""The victim: an MLP on scikit-learn's digits, served in the KServe v1 protocol.

``sklearn.datasets.load_digits`` ships with scikit-learn (nothing is downloaded): 1,797
images of 8×8 pixels with values 0–16, ten classes. It is shuffled once (seeded) and
split three ways: the victim's training set, the attacker's pool (real digits the victim
never saw, the natural data of Knockoff-style attacks and JBDA's seeds) and a held-out set
(the benign users' queries, and where fidelity is measured).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import orjson
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Array = NDArray[np.float64]
Labels = NDArray[np.int64]

PIXEL_MAX = 16.0
"""Every feature is in [0, PIXEL_MAX]: the feature box."""
N_FEATURES = 64
N_CLASSES = 10
PREDICT_PATH = "/v1/models/digits:predict"


@dataclass(frozen=True)
class Digits:
    x_train: Array
    y_train: Labels
    x_pool: Array
    y_pool: Labels
    x_held: Array
    y_held: Labels


def load_data(seed: int, train: int = 800, pool: int = 500) -> Digits:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float64), y[order].astype(np.int64)
    a, b = train, train + pool
    return Digits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def scaled(x: Array) -> Array:
    """Pixels to [0, 1], as every model of the lab (victim and thieves) sees them."""
    return np.asarray(x, dtype=np.float64) / PIXEL_MAX


class Victim:
    """The owner's model: one hidden layer of 64 ReLUs, trained on ``x_train``."""

    def __init__(self, data: Digits, seed: int) -> None:
        self.model = MLPClassifier(
            hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600, random_state=seed
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(scaled(data.x_train), data.y_train)
        self.accuracy = float((self.labels(data.x_held) == data.y_held).mean())

    def predict_proba(self, x: Array) -> Array:
        """The model's forward pass (what ``predict_proba`` computes, without its
        per-call input validation, which would dominate the cost of one request)."""
        hidden = scaled(x)
        weights, biases = self.model.coefs_, self.model.intercepts_
        for w, b in zip(weights[:-1], biases[:-1], strict=True):
            hidden = np.maximum(hidden @ w + b, 0.0)
        logits = hidden @ weights[-1] + biases[-1]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        p: Array = z / z.sum(axis=1, keepdims=True)
        return p

    def labels(self, x: Array) -> Labels:
        return np.asarray(self.predict_proba(x).argmax(axis=1), dtype=np.int64)


def make_app(victim: Victim) -> Starlette:
    """``POST /v1/models/digits:predict`` ``{"instances": [[64 numbers], ...]}`` →
    ``{"predictions": [[10 probabilities], ...]}``."""

    async def predict(request: Request) -> Response:
        try:
            x = np.asarray(orjson.loads(await request.body())["instances"], dtype=np.float64)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return Response(b'{"error":"expected {\\"instances\\": [[64 numbers]]}"}', 400)
        if x.ndim != 2 or x.shape[1] != N_FEATURES or not np.isfinite(x).all():
            return Response(b'{"error":"expected 64 finite numbers per instance"}', 422)
        body = orjson.dumps({"predictions": victim.predict_proba(x).tolist()})
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route(PREDICT_PATH, predict, methods=["POST"])])
