"""Open Inference Protocol v2 (KServe v2, Triton, MLServer): tensors in, tensors out.

Request: ``{"inputs": [{"name", "shape", "datatype", "data"}, ...]}``; the first dimension
of each input is the batch. ``data`` is row-major, flat or nested. Response:
``{"outputs": [{"name", "shape", "datatype", "data"}, ...]}``. A 2-D floating-point output
is read as probability rows when its rows lie on the simplex, as embeddings when its
name says so (``embed…``), else as scores; it is written back with the same shape,
datatype and nesting.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from starlette.types import Scope

from .base import Outputs, ParsedRequest, canonical, is_number, probability_rows

FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
NUMERIC_TYPES = (
    FLOAT_TYPES | {f"{s}{b}" for s in ("INT", "UINT") for b in (8, 16, 32, 64)} | {"BOOL"}
)
MAX_DEPTH = 32


def _flatten(data: Any, depth: int = 0) -> list[Any] | None:
    if depth > MAX_DEPTH:
        return None
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        inner = _flatten(item, depth + 1) if isinstance(item, list) else [item]
        if inner is None:
            return None
        flat.extend(inner)
    return flat


def _tensor(t: Any) -> tuple[str, list[int], str, list[Any]] | None:
    """``(name, shape, datatype, flat data)`` of a valid tensor, else ``None``."""
    if not isinstance(t, dict):
        return None
    name, shape, datatype, data = t.get("name"), t.get("shape"), t.get("datatype"), t.get("data")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        return None
    flat = _flatten(data)
    if flat is None or len(flat) != math.prod(shape):
        return None
    return name, shape, datatype.upper(), flat


class OpenInferenceV2:
    name = "oip_v2"

    def parse_request(self, scope: Scope, doc: Any, body: bytes) -> ParsedRequest:
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        if not isinstance(inputs, list) or not inputs:
            return ParsedRequest(problem="expected a JSON object with an 'inputs' list of tensors")
        tensors = [_tensor(t) for t in inputs]
        if any(t is None for t in tensors):
            return ParsedRequest(
                problem="an input tensor lacks name, shape, datatype or matching data"
            )
        valid = [t for t in tensors if t is not None]
        batches = {shape[0] if shape else 1 for _, shape, _, _ in valid}
        if len(batches) != 1:
            return ParsedRequest(problem="input tensors disagree on the batch size")
        batch = batches.pop()
        if batch == 0:
            return ParsedRequest(problem="the batch is empty")
        rows: list[list[Any]] = [[] for _ in range(batch)]
        features: list[NDArray[np.float64]] = []
        texts: list[str] = []
        for _, _, datatype, flat in valid:
            per_row = len(flat) // batch
            for i in range(batch):
                rows[i].append(flat[i * per_row : (i + 1) * per_row])
            if datatype in NUMERIC_TYPES and all(is_number(v) for v in flat):
                try:
                    array = np.asarray(flat, dtype=np.float64).reshape(batch, per_row)
                except OverflowError:
                    continue
                if np.isfinite(array).all():
                    features.append(array)
            elif datatype == "BYTES":
                texts.extend(v for v in flat if isinstance(v, str))
        return ParsedRequest(
            cost=batch,
            parsed=True,
            adapter=self,
            inputs=rows,
            keys=[canonical(row) for row in rows],
            features=np.concatenate(features, axis=1) if features else None,
            texts=texts,
        )

    def read_response(self, doc: Any, request: ParsedRequest) -> Outputs | None:
        chosen = _select(doc, len(request.keys))
        if not chosen:
            return None
        n = next(iter(chosen.values()))[1].shape[0]
        keys = request.keys if len(request.keys) == n else [b"row:%d" % i for i in range(n)]
        outputs = Outputs(keys)
        for kind, (_, rows) in chosen.items():
            setattr(outputs, kind, rows)
        return outputs

    def write_response(self, doc: Any, outputs: Outputs, request: ParsedRequest) -> Any:
        for kind, (index, _) in _select(doc, len(request.keys)).items():
            values = getattr(outputs, kind)
            tensor = doc["outputs"][index]
            if values is None:
                continue
            nested = any(isinstance(v, list) for v in tensor["data"])
            data: list[Any] = values.tolist()
            tensor["data"] = data if nested else [v for row in data for v in row]
        return doc


def _select(doc: Any, batch: int) -> dict[str, tuple[int, NDArray[np.float64]]]:
    """The output tensors read as each kind: ``{kind: (index in outputs, rows)}``."""
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list):
        return {}
    chosen: dict[str, tuple[int, NDArray[np.float64]]] = {}
    for index, raw in enumerate(outputs):
        tensor = _tensor(raw)
        if tensor is None:
            continue
        name, shape, datatype, flat = tensor
        if datatype not in FLOAT_TYPES or not all(is_number(v) for v in flat):
            continue
        if len(shape) == 1 and batch == 1:
            shape = [1, shape[0]]
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            continue
        try:
            rows = np.asarray(flat, dtype=np.float64).reshape(shape)
        except OverflowError:
            continue
        if not np.isfinite(rows).all():
            continue
        if "embed" in name.lower():
            chosen.setdefault("embeddings", (index, rows))
        elif probability_rows(rows.tolist()) is not None:
            chosen.setdefault("probabilities", (index, rows))
        else:
            chosen.setdefault("scores", (index, rows))
    return chosen
