"""KServe v1 models answering embeddings and class labels behind ``ExtractionShield``,
for the audit's tests.

``POST /v1/models/embed:predict`` answers ``{"predictions": [{"embedding": […]}]}``, eight
numbers ``tanh(x W / 2)`` of each 4-feature instance; ``POST /v1/models/classes:predict``
answers ``{"predictions": [class]}``, the argmax of ``x V`` over three classes. ``W`` and
``V`` are drawn once from ``numpy.random.default_rng(0)``. ``GET /health``. Run as a
script with ``PORT`` set.
"""

from __future__ import annotations

import json
import os

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_extraction_shield import ExtractionShield

_rng = np.random.default_rng(0)
W = _rng.normal(size=(4, 8))
V = _rng.normal(size=(4, 3))


async def _instances(request: Request) -> np.ndarray:
    return np.asarray(json.loads(await request.body())["instances"], dtype=np.float64)


async def embed(request: Request) -> Response:
    rows = np.tanh((await _instances(request)) @ W / 2)
    return JSONResponse({"predictions": [{"embedding": row.tolist()} for row in rows]})


async def classes(request: Request) -> Response:
    labels = ((await _instances(request)) @ V).argmax(axis=1)
    return JSONResponse({"predictions": labels.tolist()})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/v1/models/embed:predict", embed, methods=["POST"]),
        Route("/v1/models/classes:predict", classes, methods=["POST"]),
        Route("/health", health),
    ]
)
app.add_middleware(ExtractionShield)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
