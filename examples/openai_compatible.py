"""A toy OpenAI-compatible server behind ``ExtractionShield``.

The language model is a bigram softmax model over a fixed vocabulary of 48 tokens, its
logits drawn once from ``numpy.random.default_rng(0)``: the next token's logits depend
on the previous token only. Its log-probabilities are real (the log-softmax of its own
logits, after ``logit_bias``), which is exactly what a logprob-and-logit-bias extraction
attack (Carlini et al., 2024) reads. The embedding model hashes character 3-grams into
4,096 buckets, projects them with a fixed random matrix to 64 dimensions and normalises
to unit length. Nothing is downloaded. Endpoints:

* ``POST /v1/chat/completions``: ``messages``, ``n``, ``max_tokens`` (or
  ``max_completion_tokens``), ``temperature`` (0 is greedy), ``seed``, ``logprobs``,
  ``top_logprobs``, ``logit_bias`` (token id → bias added to its logit), ``stream``
  (server-sent events ending with ``data: [DONE]``, ``stream_options.include_usage``);
* ``POST /v1/completions``: the same with ``prompt`` (string, strings, token arrays)
  and ``logprobs`` as the number of alternatives per token;
* ``POST /v1/embeddings``: ``input`` (string, strings, token arrays),
  ``encoding_format`` ``float`` or ``base64`` (little-endian float32), ``dimensions``;
* ``GET /v1/models`` and ``GET /health`` (exempt from the shield by default).

The shield is added with ``app.add_middleware(ExtractionShield)`` and configured through
``EXTRACTION_SHIELD_*`` environment variables; ``create_app()`` gives the server without
it (the tests wrap it with their own settings).

Run it (``pip install -e '.[examples]'`` first; ``PORT`` defaults to 8001)::

    EXTRACTION_SHIELD_PERTURBATION=logprob_hygiene:max_top=2:decimals=2 \\
        python examples/openai_compatible.py

and call it with the official client (``pip install openai``)::

    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="sk-anything")
    answer = client.chat.completions.create(
        model="toy-bigram",
        messages=[{"role": "user", "content": "the cat"}],
        logprobs=True,
        top_logprobs=5,
        max_tokens=8,
    )
    print(answer.choices[0].message.content)
    for item in answer.choices[0].logprobs.content:
        print(item.token, item.logprob, [(t.token, t.logprob) for t in item.top_logprobs])
    vectors = client.embeddings.create(model="toy-embed", input=["a cat", "a dog"])
    print(len(vectors.data[0].embedding))

The logprobs come back rounded to 2 decimals with 2 alternatives (the hygiene set
above), and a request with both ``logit_bias`` and ``logprobs`` gets no logprobs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from asgi_extraction_shield import ExtractionShield

CHAT_MODEL = "toy-bigram"
EMBEDDING_MODEL = "toy-embed"
VOCAB = (
    " the", " a", " cat", " dog", " bird", " sat", " ran", " flew", " on", " under",
    " over", " mat", " tree", " roof", " and", " then", " quickly", " slowly", " very",
    " small", " big", " red", " green", " happy", " café", " naïve", " ✓", " is",
    " was", " it", " she", " he", " they", " saw", " heard", " loved", " near", " far",
    " away", " home", " today", " again", ",", ";", "!", "?", " —", ".",
)  # fmt: skip
STOP = VOCAB.index(".")
V = len(VOCAB)
BOS = V  # the row of the logits table that starts a sequence
MAX_TOKENS = 256
MAX_N = 8
MAX_TOP_LOGPROBS = 20

_rng = np.random.default_rng(0)
LOGITS = 2.0 * _rng.normal(size=(V + 1, V))  # LOGITS[previous token] = next token's logits
EMBEDDING_DIM = 64
BUCKETS = 4096
PROJECTION = _rng.normal(size=(BUCKETS, EMBEDDING_DIM)) / np.sqrt(EMBEDDING_DIM)
_PIECE = re.compile(r"\s?\w+|\s?[^\w\s]")


_INDEX = {token.strip(): i for i, token in enumerate(VOCAB)}


def tokenize(text: str) -> list[int]:
    """Words and punctuation; a piece outside the vocabulary maps to a hashed token id."""
    ids = []
    for piece in _PIECE.findall(text.lower()):
        word = piece.strip()
        ids.append(_INDEX[word] if word in _INDEX else zlib.crc32(word.encode()) % V)
    return ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum())
    return out


@dataclass
class Step:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def text(self) -> str:
        return "".join(VOCAB[s.token] for s in self.steps)


def generate(
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    bias: np.ndarray,
    seed: int,
    top_n: int,
) -> Sequence:
    """One sampled continuation; ``logprob`` is the log-softmax of the biased logits."""
    rng = np.random.default_rng(seed)
    previous = prompt[-1] if prompt else BOS
    sequence = Sequence()
    for _ in range(max_tokens):
        logprobs = log_softmax(LOGITS[previous] + bias)
        if temperature == 0:
            token = int(np.argmax(logprobs))
        else:
            p = np.exp((logprobs - logprobs.max()) / temperature)
            token = int(rng.choice(V, p=p / p.sum()))
        best = np.argsort(-logprobs, kind="stable")[:top_n]
        sequence.steps.append(
            Step(token, float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best])
        )
        if token == STOP:
            sequence.finish_reason = "stop"
            break
        previous = token
    return sequence


def embed(text: str, dimensions: int = EMBEDDING_DIM) -> np.ndarray:
    """Hashed character 3-grams → fixed random projection → unit norm."""
    padded = f"  {text.lower()} "
    counts = np.zeros(BUCKETS)
    for i in range(len(padded) - 2):
        counts[zlib.crc32(padded[i : i + 3].encode()) % BUCKETS] += 1.0
    vector = (counts @ PROJECTION)[:dimensions]
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


# -- the API ---------------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = CHAT_MODEL
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = EMBEDDING_MODEL
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=EMBEDDING_DIM)


def _bias(logit_bias: dict[str, float] | None) -> np.ndarray:
    bias = np.zeros(V)
    for key, value in (logit_bias or {}).items():
        if not key.isdigit() or int(key) >= V:
            raise OpenAIError(f"logit_bias: {key!r} is not a token id below {V}", "logit_bias")
        bias[int(key)] = float(np.clip(value, -100.0, 100.0))
    return bias


def _texts(value: str | list[str] | list[int] | list[list[int]], param: str) -> list[str]:
    """The texts of a prompt or input field (token arrays decoded with ``VOCAB``)."""
    items: list[Any] = [value] if isinstance(value, str) else list(value)
    if items and all(isinstance(v, int) for v in items):
        items = [items]
    texts = []
    for item in items:
        if isinstance(item, list):
            if not item or not all(0 <= t < V for t in item):
                raise OpenAIError(f"{param}: token ids must be between 0 and {V - 1}", param)
            item = "".join(VOCAB[t] for t in item)
        texts.append(item)
    if not texts or not all(texts):
        raise OpenAIError(f"{param} must not be empty", param)
    return texts


def _message_text(messages: list[Message]) -> str:
    parts: list[str] = []
    for message in messages:
        if isinstance(message.content, str):
            parts.append(message.content)
        elif message.content:
            parts.extend(p["text"] for p in message.content if p.get("type") == "text")
    return "\n".join(parts)


def _seed(request: Sampling, prompt: str, choice: int) -> int:
    base = request.seed if request.seed is not None else zlib.crc32(prompt.encode())
    return (base * 1_000_003 + choice) % 2**63


def _token_bytes(token: int) -> list[int]:
    return list(VOCAB[token].encode())


def _chat_logprob(step: Step, top: int) -> dict[str, Any]:
    return {
        "token": VOCAB[step.token],
        "logprob": step.logprob,
        "bytes": _token_bytes(step.token),
        "top_logprobs": [
            {"token": VOCAB[t], "logprob": lp, "bytes": _token_bytes(t)} for t, lp in step.top[:top]
        ],
    }


def _completion_logprobs(steps: list[Step], top: int, offset: int) -> dict[str, Any]:
    offsets = []
    for step in steps:
        offsets.append(offset)
        offset += len(VOCAB[step.token])
    return {
        "tokens": [VOCAB[s.token] for s in steps],
        "token_logprobs": [s.logprob for s in steps],
        "top_logprobs": [{VOCAB[t]: lp for t, lp in s.top[:top]} for s in steps],
        "text_offset": offsets,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(events: Iterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _sequences(request: Sampling, prompts: list[str], max_tokens: int, top_n: int) -> Any:
    bias = _bias(request.logit_bias)
    return [
        [
            generate(
                tokenize(prompt),
                max_tokens,
                request.temperature,
                bias,
                _seed(request, prompt, choice),
                top_n,
            )
            for choice in range(request.n)
        ]
        for prompt in prompts
    ]


async def chat_completions(request: ChatRequest) -> Any:
    prompt = _message_text(request.messages)
    max_tokens = request.max_completion_tokens or request.max_tokens or 16
    top = (request.top_logprobs or 0) if request.logprobs else 0
    sequences: list[Sequence] = _sequences(request, [prompt], max_tokens, top)[0]
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
    }
    prompt_tokens = len(tokenize(prompt))
    usage = _usage(prompt_tokens, sum(len(s.steps) for s in sequences))
    if not request.stream:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": seq.text},
                "logprobs": {"content": [_chat_logprob(s, top) for s in seq.steps], "refusal": None}
                if request.logprobs
                else None,
                "finish_reason": seq.finish_reason,
            }
            for i, seq in enumerate(sequences)
        ]
        return {**head, "choices": choices, "usage": usage}

    include_usage = request.stream_options is not None and request.stream_options.include_usage

    def events() -> Iterator[dict[str, Any]]:
        chunk = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        for i, seq in enumerate(sequences):
            start = {"role": "assistant", "content": ""}
            choice = {"index": i, "delta": start, "logprobs": None, "finish_reason": None}
            yield {**chunk, "choices": [choice], **extra}
            for step in seq.steps:
                logprobs = (
                    {"content": [_chat_logprob(step, top)], "refusal": None}
                    if request.logprobs
                    else None
                )
                delta = {"content": VOCAB[step.token]}
                choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": None}
                yield {**chunk, "choices": [choice], **extra}
            end = {"index": i, "delta": {}, "logprobs": None, "finish_reason": seq.finish_reason}
            yield {**chunk, "choices": [end], **extra}
        if include_usage:
            yield {**chunk, "choices": [], "usage": usage}

    return _sse(events())


async def completions(request: CompletionRequest) -> Any:
    prompts = _texts(request.prompt, "prompt")
    top = request.logprobs or 0
    per_prompt: list[list[Sequence]] = _sequences(request, prompts, request.max_tokens or 16, top)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
    }
    flat = [(p, seq) for p, seqs in enumerate(per_prompt) for seq in seqs]
    prompt_tokens = sum(len(tokenize(p)) for p in prompts)
    usage = _usage(prompt_tokens, sum(len(seq.steps) for _, seq in flat))

    def logprobs(p: int, steps: list[Step], offset: int = 0) -> dict[str, Any] | None:
        if request.logprobs is None:
            return None
        return _completion_logprobs(steps, top, len(prompts[p]) + offset)

    if not request.stream:
        choices = [
            {
                "text": seq.text,
                "index": i,
                "logprobs": logprobs(p, seq.steps),
                "finish_reason": seq.finish_reason,
            }
            for i, (p, seq) in enumerate(flat)
        ]
        return {**head, "choices": choices, "usage": usage}

    include_usage = request.stream_options is not None and request.stream_options.include_usage

    def events() -> Iterator[dict[str, Any]]:
        extra = {"usage": None} if include_usage else {}
        for i, (p, seq) in enumerate(flat):
            offset = 0
            for step in seq.steps:
                text = VOCAB[step.token]
                choice = {
                    "text": text,
                    "index": i,
                    "logprobs": logprobs(p, [step], offset),
                    "finish_reason": None,
                }
                offset += len(text)
                yield {**head, "choices": [choice], **extra}
            end = {"text": "", "index": i, "logprobs": None, "finish_reason": seq.finish_reason}
            yield {**head, "choices": [end], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": usage}

    return _sse(events())


async def embeddings(request: EmbeddingRequest) -> dict[str, Any]:
    texts = _texts(request.input, "input")
    vectors = [embed(t, request.dimensions or EMBEDDING_DIM) for t in texts]
    data = []
    for i, vector in enumerate(vectors):
        encoded: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            if request.encoding_format == "base64"
            else vector.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(len(tokenize(t)) for t in texts)
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "example"}
            for name in (CHAT_MODEL, EMBEDDING_MODEL)
        ],
    }


async def health() -> dict[str, str]:
    return {"status": "ok"}


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param}}
    return JSONResponse(body, status_code=status)


async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return _error(exc.status, exc.message, exc.param)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return _error(400, f"{param or 'body'}: {first['msg']}", param)


def create_app() -> FastAPI:
    """The server without the shield (tests wrap it with their own settings)."""
    app = FastAPI(title="Toy OpenAI-compatible server")
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


app = create_app()
app.add_middleware(ExtractionShield)  # every setting comes from EXTRACTION_SHIELD_* env vars


if __name__ == "__main__":
    import uvicorn

    port = int(os.environ.get("PORT", "8001"))
    print(
        f"Try: curl -s http://127.0.0.1:{port}/v1/chat/completions "
        "-H 'content-type: application/json' -d "
        f"""'{{"model": "{CHAT_MODEL}", "messages": [{{"role": "user", "content": "the cat"}}], """
        """"logprobs": true, "top_logprobs": 3, "max_tokens": 5}'""",
        flush=True,
    )
    uvicorn.run(app, host="127.0.0.1", port=port)
