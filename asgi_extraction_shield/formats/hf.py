"""Hugging Face Inference style: ``{"inputs": "text"}`` → ``[{"label", "score"}, ...]``.

Requests carry ``inputs`` as one text or a list of texts (``parameters`` are passed
through). Classification responses are a list of ``{"label", "score"}`` for one input,
or one such list per input; when every list holds the same labels and its scores sum
to 1 they are probability rows (columns ordered by label), otherwise scores. They are
written back sorted by score, highest first, as the pipelines return them, each dict
keeping its other fields. A response that is one vector per input (feature extraction)
is read as embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.types import Scope

from .base import (
    PROBABILITIES,
    Outputs,
    ParsedRequest,
    canonical,
    is_number,
    numeric_matrix,
    probability_rows,
    write_like,
)


def _texts(doc: Any) -> list[Any] | None:
    if not isinstance(doc, dict) or "inputs" not in doc:
        return None
    inputs = doc["inputs"]
    if isinstance(inputs, list):
        return inputs or None
    return [inputs]


def _label_lists(doc: Any) -> list[list[dict[str, Any]]] | None:
    """The response as one list of ``{"label", "score"}`` per input, or ``None``."""
    if not isinstance(doc, list) or not doc:
        return None
    lists = doc if all(isinstance(item, list) for item in doc) else [doc]
    for entries in lists:
        if not entries or not all(
            isinstance(e, dict) and isinstance(e.get("label"), str) and is_number(e.get("score"))
            for e in entries
        ):
            return None
    return lists


class HuggingFace:
    name = "hf"

    def parse_request(self, scope: Scope, doc: Any, body: bytes) -> ParsedRequest:
        items = _texts(doc)
        if items is None:
            return ParsedRequest(problem="expected a JSON object with 'inputs'")
        parameters = doc.get("parameters") if isinstance(doc, dict) else None
        flags: frozenset[str] = frozenset()
        if isinstance(parameters, dict) and (
            (
                "top_k" in parameters
                and (parameters["top_k"] is None or _above_one(parameters["top_k"]))
            )
            or parameters.get("return_all_scores") is True
        ):
            flags = frozenset({PROBABILITIES})
        return ParsedRequest(
            cost=len(items),
            parsed=True,
            adapter=self,
            inputs=items,
            keys=[canonical(item) for item in items],
            texts=[item for item in items if isinstance(item, str)],
            flags=flags,
        )

    def read_response(self, doc: Any, request: ParsedRequest) -> Outputs | None:
        lists = _label_lists(doc)
        if lists is None:
            matrix = numeric_matrix(doc)
            if matrix is None or len(matrix) != len(request.keys):
                return None
            return Outputs(request.keys, embeddings=matrix)
        keys = request.keys if len(request.keys) == len(lists) else [canonical(e) for e in lists]
        labels = [e["label"] for e in lists[0]]
        if len(set(labels)) != len(labels) or any(
            sorted(e["label"] for e in entries) != sorted(labels) for entries in lists
        ):
            return None
        order = sorted(labels)
        rows = np.asarray(
            [
                [{e["label"]: e["score"] for e in entries}[label] for label in order]
                for entries in lists
            ],
            dtype=np.float64,
        )
        if not np.isfinite(rows).all():
            return None
        if probability_rows(rows.tolist()) is not None:
            return Outputs(keys, probabilities=rows)
        return Outputs(keys, scores=rows)

    def write_response(self, doc: Any, outputs: Outputs, request: ParsedRequest) -> Any:
        lists = _label_lists(doc)
        if lists is None:
            if outputs.embeddings is not None:
                return write_like(doc, outputs.embeddings)
            return doc
        values = outputs.probabilities if outputs.probabilities is not None else outputs.scores
        if values is None:
            return doc
        order = sorted(e["label"] for e in lists[0])
        rewritten = []
        for entries, row in zip(lists, values.tolist(), strict=True):
            by_label = {e["label"]: e for e in entries}
            new = [
                {**by_label[label], "score": float(score)}
                for label, score in zip(order, row, strict=True)
            ]
            new.sort(key=lambda e: -e["score"])
            rewritten.append(new)
        return rewritten if all(isinstance(item, list) for item in doc) else rewritten[0]


def _above_one(value: Any) -> bool:
    return is_number(value) and value > 1
