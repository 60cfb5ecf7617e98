"""Generic JSON: the batch lists located by configured dotted paths (``GENERIC__*``).

``GENERIC__INPUTS=data.rows`` reads ``body["data"]["rows"]`` as the list of inputs;
``GENERIC__OUTPUTS=result.scores`` reads the response's list of output rows there. A
path segment that is a number indexes a list. ``GENERIC__OUTPUT_KIND`` says what the
rows are, or ``auto``: rows on the simplex are probabilities, other numeric rows scores.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from ..settings import GenericSettings
from .base import (
    Outputs,
    ParsedRequest,
    batch_request,
    canonical,
    numeric_matrix,
    probability_rows,
    write_like,
)

_MISSING = object()


def resolve(doc: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in ``doc``, or a sentinel when any step is missing."""
    node = doc
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def assign(doc: Any, path: tuple[str, ...], value: Any) -> Any:
    """``doc`` with the value at ``path`` replaced (``path`` must resolve)."""
    if not path:
        return value
    parent = resolve(doc, path[:-1])
    last = path[-1]
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        parent[last] = value
    return doc


def parse_path(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.strip().removeprefix("$").strip(".").split(".") if part)


class GenericJSON:
    name = "generic"

    def __init__(self, settings: GenericSettings) -> None:
        self.inputs = parse_path(settings.inputs)
        self.outputs = parse_path(settings.outputs)
        self.kind = settings.output_kind

    def parse_request(self, scope: Scope, doc: Any, body: bytes) -> ParsedRequest:
        items = resolve(doc, self.inputs)
        if not isinstance(items, list) or not items:
            where = ".".join(self.inputs) or "the top level"
            return ParsedRequest(problem=f"expected a non-empty list of inputs at {where}")
        return batch_request(self, items)

    def read_response(self, doc: Any, request: ParsedRequest) -> Outputs | None:
        rows = resolve(doc, self.outputs)
        matrix = numeric_matrix(rows)
        if matrix is None:
            return None
        keys = request.keys if len(request.keys) == len(matrix) else [canonical(r) for r in rows]
        kind = self.kind
        if kind == "auto":
            kind = "probabilities" if probability_rows(rows) is not None else "scores"
        elif kind == "probabilities" and probability_rows(rows) is None:
            return None  # not on the simplex after all: never perturb it as if it were
        outputs = Outputs(keys)
        setattr(outputs, kind, matrix)
        return outputs

    def write_response(self, doc: Any, outputs: Outputs, request: ParsedRequest) -> Any:
        rows = resolve(doc, self.outputs)
        for kind in ("probabilities", "embeddings", "scores"):
            values = getattr(outputs, kind)
            if values is not None:
                return assign(doc, self.outputs, write_like(rows, values))
        return doc
