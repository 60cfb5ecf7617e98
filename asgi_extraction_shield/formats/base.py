"""Payload formats: what a request asks of the model, and what the model answered.

A :class:`FormatAdapter` knows one wire format (KServe v1, Open Inference Protocol v2,
OpenAI, Hugging Face, generic JSON paths). On the request side it turns a body into a
:class:`ParsedRequest`: the queries (for the monitor), the cost (for the limiter), flags
(what kind of answer is asked for) and, when the request must be hardened, the body to
send upstream instead. On the response side it reads a decoded JSON document into
:class:`Outputs` (numpy arrays) and writes changed outputs back into the same document,
leaving every other field as it was. Adapters never raise on bad input: what they cannot
parse gives ``parsed=False`` (request) or ``None`` (response), and the bytes pass unchanged.
"""

from __future__ import annotations

import json
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from starlette.types import Scope

# Flags a request can carry.
PROBABILITIES = "probabilities"  # asks for a full probability distribution
LOGPROBS = "logprobs"  # asks for token log-probabilities
TOP_LOGPROBS = "top_logprobs"  # asks for alternatives per token
LOGIT_BIAS = "logit_bias"  # pushes tokens with logit_bias
STREAM = "stream"  # asks for a server-sent-event stream
EMBEDDINGS = "embeddings"  # asks for embedding vectors
HARDENED = "hardened"  # the shield rewrote the request before the app saw it

DISTRIBUTION_FLAGS = frozenset({PROBABILITIES, LOGPROBS, TOP_LOGPROBS})


@dataclass(slots=True)
class ParsedRequest:
    """What the shield understood of a request.

    ``cost`` tokens are charged to the limiter. ``parsed`` is false when no adapter
    understood the body (the monitor treats such requests as opaque). ``inputs`` holds
    one item per query as the API took it; ``keys`` its canonical bytes (what keyed
    randomness and watermarks are keyed by); ``features`` the numeric queries as a
    ``(n, d)`` array when they are rectangular; ``texts`` the text queries.
    ``upstream_body`` is the hardened body to send to the app instead of the original.
    """

    cost: int = 1
    parsed: bool = False
    adapter: FormatAdapter | None = None
    inputs: list[Any] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    features: NDArray[np.float64] | None = None
    texts: list[str] = field(default_factory=list)
    flags: frozenset[str] = frozenset()
    logit_bias_tokens: tuple[str, ...] = ()
    upstream_body: bytes | None = None
    problem: str | None = None
    """Why the body could not be parsed (for ``STRICT=true``'s 400 and for logs)."""
    refusal: str | None = None
    """Why the request must be refused with 400 whatever ``STRICT`` says (e.g. too many
    ``logit_bias`` entries)."""


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities of one generated sequence (an OpenAI choice).

    ``logprobs[i]`` is the chosen token's log-probability; ``top[i]`` the alternatives as
    ``(token, logprob)`` pairs. Hygiene rewrites these in place.
    """

    logprobs: list[float]
    top: list[list[tuple[str, float]]]


@dataclass(slots=True)
class GeneratedText:
    """A text the model generated (an OpenAI choice's ``message.content`` or ``text``), or
    one piece of it in a stream (``delta.content``). ``choice`` is the choice's index;
    ``final`` is false for a stream piece that its choice's ``finish_reason`` does not
    close, so that a processor may carry state from one piece to the next."""

    text: str
    choice: int = 0
    final: bool = True


@dataclass(slots=True)
class Outputs:
    """Model outputs found in a response, as arrays a post-processor can change.

    ``probabilities`` are rows on the simplex (non-negative, summing to 1), ``scores``
    other numeric rows (only rounding applies), ``embeddings`` vectors, ``labels`` class
    ids, ``tokens`` token log-probabilities, ``texts`` generated texts. ``keys`` gives
    each row its canonical input, so that keyed randomness is the same for the same query.
    """

    keys: list[bytes]
    probabilities: NDArray[np.float64] | None = None
    scores: NDArray[np.float64] | None = None
    embeddings: NDArray[np.float64] | None = None
    labels: NDArray[np.int64] | None = None
    tokens: list[TokenLogprobs] | None = None
    texts: list[GeneratedText] | None = None


class FormatAdapter(Protocol):
    """One wire format. Implementations are stateless and built once at start-up."""

    name: str

    def parse_request(self, scope: Scope, doc: Any, body: bytes) -> ParsedRequest:
        """``doc`` is the decoded JSON body (``None`` when it was not JSON)."""
        ...

    def read_response(self, doc: Any, request: ParsedRequest) -> Outputs | None:
        """Outputs of a decoded JSON response, or ``None`` if it is not one of ours."""
        ...

    def write_response(self, doc: Any, outputs: Outputs, request: ParsedRequest) -> Any:
        """``doc`` with the outputs written back (in place or a new object)."""
        ...


class RequestAdapter(Protocol):
    def parse_request(self, scope: Scope, body: bytes) -> ParsedRequest:
        """Never raises on bad input: an unparseable body gives ``parsed=False``."""
        ...


class FlatCost:
    """Every request costs ``cost`` tokens, whatever its body (``FORMAT=none``)."""

    def __init__(self, cost: int = 1) -> None:
        if cost < 0:
            raise ValueError("cost must be non-negative")
        self._request = ParsedRequest(cost=cost)  # shared: nothing downstream changes it

    def parse_request(self, scope: Scope, body: bytes) -> ParsedRequest:
        return self._request


# -- helpers shared by the adapters --------------------------------------------------------


def canonical(item: Any) -> bytes:
    """Canonical bytes of one input: what "the same query" means for keyed randomness.

    JSON with sorted keys and no whitespace; floats written with 9 significant digits so
    that float32/float64 round trips of one value map alike.
    """
    return json.dumps(_canonical_value(item), sort_keys=True, separators=(",", ":")).encode()


def canonical_keys(items: list[Any], features: NDArray[np.float64] | None) -> list[bytes]:
    """Canonical bytes of each input; numeric rows are keyed by their float32 values.

    Numeric queries are what model APIs mostly receive, and float32 is what the model
    sees: keying by it is fast (no per-number formatting) and maps a value sent as
    float64, float32 or integer alike. Shapes are flattened, so a row sent nested or
    flat is the same query. ``features`` is :func:`numeric_rows` of ``items``.
    """
    if features is not None and len(features) == len(items):
        if len(items) <= FEW_ROWS:
            keys = _flat_float32_keys(items, features.shape[1])
            if keys is not None:
                return keys
        with np.errstate(over="ignore"):  # beyond float32's range: inf, the same key
            rows = features.astype(np.float32)
        return [b"f32:" + row.tobytes() for row in rows]
    return [canonical(item) for item in items]


FEW_ROWS = 4
"""Up to this many flat rows, keys are packed by :mod:`array` rather than numpy."""


def _flat_float32_keys(items: list[Any], width: int) -> list[bytes] | None:
    """The keys of flat rows of numbers, without numpy: ``array("f")`` casts each value
    to float32 as numpy's ``astype`` does (to nearest, inf beyond float32's range) and
    needs no ``errstate``, which is most of numpy's cost for one online query. ``None``
    for nested rows."""
    keys = []
    for item in items:
        if type(item) is not list or len(item) != width:
            return None
        try:
            keys.append(b"f32:" + array("f", item).tobytes())
        except (TypeError, OverflowError):  # a nested row (or an int no float holds)
            return None
    return keys


def _canonical_value(item: Any) -> Any:
    if isinstance(item, float):
        if not math.isfinite(item):
            return repr(item)
        return float(f"{item:.9g}")
    if isinstance(item, list | tuple):
        return [_canonical_value(v) for v in item]
    if isinstance(item, dict):
        return {str(k): _canonical_value(v) for k, v in item.items()}
    return item


def batch_request(adapter: FormatAdapter, items: list[Any]) -> ParsedRequest:
    """The request of a batch of ``items``, one token each (row-format payloads)."""
    features = numeric_rows(items)
    return ParsedRequest(
        cost=len(items),
        parsed=True,
        adapter=adapter,
        inputs=items,
        keys=canonical_keys(items, features),
        features=features,
        texts=[item for item in items if isinstance(item, str)],
    )


def numeric_rows(items: list[Any]) -> NDArray[np.float64] | None:
    """``(n, d)`` float64 of rectangular, finite numeric inputs (flattened), else ``None``."""
    if not items:
        return None
    try:
        matrix = np.asarray(items, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        return None
    if matrix.ndim == 0 or matrix.shape[0] != len(items) or not np.isfinite(matrix).all():
        return None
    return matrix.reshape(len(items), -1)


_FLOATS = {float}


def is_number(value: Any) -> bool:
    """A JSON number a float64 can hold (booleans and integers beyond ±1e308 are not)."""
    if isinstance(value, float):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -1e308 < value < 1e308


def probability_rows(value: Any, tolerance: float = 1e-3) -> NDArray[np.float64] | None:
    """``value`` as an ``(n, k)`` array if it is a list of probability rows (k >= 2)."""
    if isinstance(value, list) and 0 < len(value) <= 8:
        return _few_probability_rows(value, tolerance)
    rows = numeric_matrix(value)
    if rows is None or rows.shape[1] < 2:
        return None
    # Non-negative rows summing to 1 are also at most 1: two checks suffice.
    if rows.min() < 0 or np.abs(rows.sum(axis=1) - 1.0).max() > tolerance:
        return None
    return rows


def _few_probability_rows(value: list[Any], tolerance: float) -> NDArray[np.float64] | None:
    """The same checks in plain Python: for a few rows (the usual online request) they
    cost a fraction of numpy's per-call overhead. NaN and infinities fail the sum check."""
    width = None
    for row in value:
        if not isinstance(row, list) or len(row) < 2 or (width is not None and len(row) != width):
            return None
        width = len(row)
        # A row of floats, what JSON answers hold, needs no check value by value.
        if set(map(type, row)) != _FLOATS and not all(is_number(v) for v in row):
            return None
        if min(row) < 0 or not abs(sum(row) - 1.0) <= tolerance:
            return None
    return np.asarray(value, dtype=np.float64)


def numeric_matrix(value: Any) -> NDArray[np.float64] | None:
    """``value`` as an ``(n, k)`` float array if it is a non-empty list of equal-length
    lists of finite numbers (booleans excluded), else ``None``."""
    if not isinstance(value, list) or not value:
        return None
    width = None
    for row in value:
        if not isinstance(row, list) or not row or not all(is_number(v) for v in row):
            return None
        if width is None:
            width = len(row)
        elif len(row) != width:
            return None
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (OverflowError, ValueError):
        return None
    if not np.isfinite(matrix).all():
        return None
    return matrix


def write_like(original: list[Any], values: NDArray[np.float64]) -> list[Any]:
    """Rows of ``values`` as JSON lists, keeping ints where the original had ints and the
    value is still integral (JSON types unchanged)."""
    out: list[Any] = []
    for row_in, row_out in zip(original, values.tolist(), strict=True):
        if len(row_in) == len(row_out) and set(map(type, row_in)) == _FLOATS:
            out.append(row_out)  # floats stay floats: the common row needs no check per value
            continue
        out.append(
            [
                int(v) if isinstance(o, int) and float(v).is_integer() else float(v)
                for o, v in zip(row_in, row_out, strict=True)
            ]
        )
    return out
