"""A Hugging Face-style text classifier behind ``ExtractionShield``, for the audit's tests.

``POST /models/sentiment`` with ``{"inputs": "text"}`` answers ``[{"label", "score"}, …]``
(POS and NEG, scores summing to 1, from counts of a few words); ``GET /health``.
Run as a script with ``PORT`` set.
"""

from __future__ import annotations

import json
import math
import os

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_extraction_shield import ExtractionShield

POSITIVE = {"good", "great", "fine", "happy", "nice"}
NEGATIVE = {"bad", "awful", "sad", "poor", "ugly"}


async def classify(request: Request) -> Response:
    text = json.loads(await request.body())["inputs"]
    words = text.split()
    z = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    p = 1 / (1 + math.exp(-1.5 * z))
    return JSONResponse([{"label": "POS", "score": p}, {"label": "NEG", "score": 1 - p}])


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/models/sentiment", classify, methods=["POST"]), Route("/health", health)]
)
app.add_middleware(ExtractionShield)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
