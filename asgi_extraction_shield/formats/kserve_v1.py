"""KServe v1 / TensorFlow Serving REST: ``{"instances": [...]}`` → ``{"predictions": [...]}``.

Requests carry a batch as ``instances`` (row format) or ``inputs`` (TF Serving's columnar
format: a list, or a dict of named tensors whose first dimension is the batch). Responses
carry ``predictions`` (or ``outputs``): per instance a probability row, a label id, a
score row, or a dict of named outputs, where ``probabilities`` / ``probs`` / ``scores``
name probability rows, ``embedding(s)`` embeddings, and ``class_ids`` / ``classes`` /
``labels`` labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.types import Scope

from .base import (
    Outputs,
    ParsedRequest,
    batch_request,
    canonical,
    is_number,
    numeric_matrix,
    probability_rows,
    write_like,
)

PROBABILITY_KEYS = ("probabilities", "probs", "probability", "scores", "logistic")
EMBEDDING_KEYS = ("embedding", "embeddings")


def _batch(doc: Any) -> list[Any] | None:
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("instances"), list):
        return list(doc["instances"])
    inputs = doc.get("inputs")
    if isinstance(inputs, list):
        return list(inputs)
    if isinstance(inputs, dict) and inputs:
        columns = list(inputs.values())
        if all(isinstance(c, list) for c in columns) and len({len(c) for c in columns}) == 1:
            names = list(inputs)
            return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
    return None


class KServeV1:
    name = "kserve_v1"

    def parse_request(self, scope: Scope, doc: Any, body: bytes) -> ParsedRequest:
        items = _batch(doc)
        if items is None:
            return ParsedRequest(problem="expected a JSON object with an 'instances' list")
        if not items:
            return ParsedRequest(problem="'instances' is empty")
        return batch_request(self, items)

    def read_response(self, doc: Any, request: ParsedRequest) -> Outputs | None:
        predictions = _predictions(doc)
        if predictions is None:
            return None
        keys = _row_keys(request, predictions)
        if all(isinstance(row, dict) for row in predictions):
            return _read_named(predictions, keys)
        probabilities = probability_rows(predictions)
        if probabilities is not None:
            return Outputs(keys, probabilities=probabilities)
        scores = numeric_matrix(predictions)
        if scores is not None:
            return Outputs(keys, scores=scores)
        if all(
            isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
            for v in predictions
        ):
            return Outputs(keys, labels=np.asarray(predictions, dtype=np.int64))
        return None

    def write_response(self, doc: Any, outputs: Outputs, request: ParsedRequest) -> Any:
        field = "predictions" if "predictions" in doc else "outputs"
        predictions = doc[field]
        if all(isinstance(row, dict) for row in predictions):
            _write_named(predictions, outputs)
        elif outputs.probabilities is not None:
            doc[field] = write_like(predictions, outputs.probabilities)
        elif outputs.scores is not None:
            doc[field] = write_like(predictions, outputs.scores)
        elif outputs.labels is not None and len(outputs.labels) == len(predictions):
            doc[field] = [int(v) for v in outputs.labels.tolist()]
        return doc


def _predictions(doc: Any) -> list[Any] | None:
    if not isinstance(doc, dict):
        return None
    for field in ("predictions", "outputs"):
        value = doc.get(field)
        if isinstance(value, list) and value:
            return value
    return None


def _row_keys(request: ParsedRequest, rows: list[Any]) -> list[bytes]:
    if len(request.keys) == len(rows):
        return request.keys
    # The app answered a different number of rows: key each by its own content.
    return [canonical(row) for row in rows]


def _named_key(rows: list[dict[str, Any]], candidates: tuple[str, ...]) -> str | None:
    for key in candidates:
        if all(key in row for row in rows):
            return key
    return None


def _read_named(rows: list[dict[str, Any]], keys: list[bytes]) -> Outputs | None:
    outputs = Outputs(keys)
    prob_key = _named_key(rows, PROBABILITY_KEYS)
    if prob_key is not None:
        outputs.probabilities = probability_rows([row[prob_key] for row in rows])
    emb_key = _named_key(rows, EMBEDDING_KEYS)
    if emb_key is not None:
        outputs.embeddings = numeric_matrix([row[emb_key] for row in rows])
    if outputs.probabilities is None and outputs.embeddings is None:
        return None
    return outputs


def _write_named(rows: list[dict[str, Any]], outputs: Outputs) -> None:
    for candidates, values in (
        (PROBABILITY_KEYS, outputs.probabilities),
        (EMBEDDING_KEYS, outputs.embeddings),
    ):
        key = _named_key(rows, candidates)
        if key is None or values is None:
            continue
        original = [row[key] for row in rows]
        if candidates is PROBABILITY_KEYS:
            _relabel(rows, np.argmax(np.asarray(original), axis=1), np.argmax(values, axis=1))
        for row, new in zip(rows, write_like(original, values), strict=True):
            row[key] = new


def _relabel(rows: list[dict[str, Any]], before: Any, after: Any) -> None:
    """Keep a ``class_ids`` field that was the argmax consistent with the new argmax."""
    for row, old, new in zip(rows, before.tolist(), after.tolist(), strict=True):
        ids = row.get("class_ids")
        if isinstance(ids, list) and len(ids) == 1 and is_number(ids[0]) and ids[0] == old:
            row["class_ids"] = [int(new)]
