"""A tiny model server behind ``ExtractionShield``: the shield in one line.

The model is a softmax-regression classifier (10 classes, 64 features) trained with
numpy at import time, in well under a second, on a deterministic synthetic dataset
(Gaussian blobs drawn from ``numpy.random.default_rng(0)``). Nothing is downloaded.
It is served in the KServe v1 protocol:

* ``POST /v1/models/blobs:predict`` with ``{"instances": [[64 numbers], ...]}`` answers
  ``{"predictions": [[10 class probabilities], ...]}``;
* ``GET /v1/models/blobs`` answers ``{"name": "blobs", "ready": true}``;
* ``GET /health`` answers ``{"status": "ok"}`` (exempt from the shield by default).

The shield is added with ``app.add_middleware(ExtractionShield)`` and configured only
through ``EXTRACTION_SHIELD_*`` environment variables (without a secret key it warns
and uses a random one for this process).

Run it (``pip install -e '.[examples]'`` first; ``PORT`` defaults to 8000)::

    EXTRACTION_SHIELD_RATE_LIMIT=5/minute python examples/model_server.py

and try it (the ``python3 -c`` prints one instance of 64 zeros)::

    curl -si http://127.0.0.1:8000/v1/models/blobs:predict \\
        -H 'content-type: application/json' \\
        -d "{\\"instances\\": [$(python3 -c 'print([0.0] * 64)')]}"

The response carries ``RateLimit-Policy`` and ``RateLimit`` headers; past the limit
the shield answers ``429`` with ``application/problem+json`` and ``Retry-After``.
"""

from __future__ import annotations

import json
import os
import reprlib
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Request

from asgi_extraction_shield import ExtractionShield

MODEL_NAME = "blobs"
N_CLASSES = 10
N_FEATURES = 64
MAX_INSTANCES = 1000


def make_blobs(
    n_per_class: int = 120, noise: float = 2.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` points around each of ``N_CLASSES`` random centres, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (N_CLASSES, N_FEATURES))
    y = np.repeat(np.arange(N_CLASSES), n_per_class)
    x = centres[y] + rng.normal(0.0, noise, (y.size, N_FEATURES))
    order = rng.permutation(y.size)
    return x[order], y[order]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: np.ndarray = z / z.sum(axis=1, keepdims=True)
    return probabilities


class SoftmaxRegression:
    """Multinomial logistic regression fitted by full-batch gradient descent."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        self.weights = np.zeros((n_features, n_classes))
        self.bias = np.zeros(n_classes)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        steps: int = 300,
        learning_rate: float = 0.5,
        l2: float = 1e-3,
    ) -> SoftmaxRegression:
        targets = np.eye(self.bias.size)[y]
        for _ in range(steps):
            grad = (self.predict_proba(x) - targets) / len(x)
            self.weights -= learning_rate * (x.T @ grad + l2 * self.weights)
            self.bias -= learning_rate * grad.sum(axis=0)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, shape ``(n, n_classes)``, for ``x`` of shape ``(n, n_features)``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.weights.shape[0]:
            raise ValueError(f"expected shape (n, {self.weights.shape[0]}), got {x.shape}")
        return _softmax(x @ self.weights + self.bias)


X, Y = make_blobs()
X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = X[:1000], Y[:1000], X[1000:], Y[1000:]
model = SoftmaxRegression(N_FEATURES, N_CLASSES).fit(X_TRAIN, Y_TRAIN)


def parse_instances(body: bytes) -> np.ndarray:
    """The ``instances`` of a KServe v1 request body as an ``(n, N_FEATURES)`` array.

    Raises ``HTTPException`` with a message saying what is wrong: 400 for a body that
    is not JSON (NaN and Infinity included: they are not JSON, though Python accepts
    them), 422 for JSON of the wrong shape or with values that are not finite numbers.
    """

    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not a valid JSON value")

    try:
        payload = json.loads(body, parse_constant=reject_constant)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
        raise HTTPException(400, f"request body is not valid JSON: {exc}") from None
    expected = f'expected {{"instances": [[{N_FEATURES} numbers], ...]}}'
    if not isinstance(payload, dict) or "instances" not in payload:
        raise HTTPException(422, f"missing 'instances': {expected}")
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise HTTPException(422, f"'instances' must be a non-empty list: {expected}")
    if len(instances) > MAX_INSTANCES:
        raise HTTPException(422, f"{len(instances)} instances, at most {MAX_INSTANCES} at once")
    for i, row in enumerate(instances):
        if not isinstance(row, list) or len(row) != N_FEATURES:
            size = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise HTTPException(422, f"instances[{i}] is {size}: expected {N_FEATURES} numbers")
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HTTPException(
                    422, f"instances[{i}][{j}] is not a number: {reprlib.repr(value)}"
                )
    try:
        x = np.array(instances, dtype=np.float64)
    except OverflowError:  # an integer too large for a float
        raise HTTPException(422, "instances hold a number too large for a float") from None
    if not np.isfinite(x).all():  # e.g. 1e999, which JSON parses as infinity
        i, j = np.argwhere(~np.isfinite(x))[0]
        raise HTTPException(422, f"instances[{i}][{j}] is not a finite number")
    return x


router = APIRouter()


def _known(name: str) -> None:
    if name != MODEL_NAME:
        raise HTTPException(404, f"model {name!r} not found; this server serves {MODEL_NAME!r}")


@router.post("/v1/models/{name}:predict")
async def predict(name: str, request: Request) -> dict[str, Any]:
    _known(name)
    x = parse_instances(await request.body())
    return {"predictions": model.predict_proba(x).tolist()}


@router.get("/v1/models/{name}")
def metadata(name: str) -> dict[str, Any]:
    _known(name)
    return {"name": MODEL_NAME, "ready": True}


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


def create_app() -> FastAPI:
    """The model server without the shield (tests wrap it with their own settings)."""
    unshielded = FastAPI(title="Blobs classifier (KServe v1)")
    unshielded.include_router(router)
    return unshielded


app = create_app()
app.add_middleware(ExtractionShield)  # every setting comes from EXTRACTION_SHIELD_* env vars


if __name__ == "__main__":
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    print(
        f"Try: curl -si http://127.0.0.1:{port}/v1/models/{MODEL_NAME}:predict "
        "-H 'content-type: application/json' "
        f"""-d "{{\\"instances\\": [$(python3 -c 'print([0.0] * {N_FEATURES})')]}}\"""",
        flush=True,
    )
    uvicorn.run(app, host="127.0.0.1", port=port)
