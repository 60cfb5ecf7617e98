"""The owner's sample inputs: read from a file, checked, split into pool and held-out.

The file is JSON Lines (one JSON value a line) or one JSON document (a list). Each value
is one input as the API takes it (``[0.1, 2.0, …]`` for KServe v1 and OIP v2, a string
for Hugging Face and OpenAI), or ``{"input": <one input>}`` (the form ``verify`` reads),
or a whole request body of the format (``{"instances": […]}``, ``{"inputs": [tensors]}``,
…), which counts as its inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..formats.base import numeric_rows
from .attacks import Array
from .wire import TensorSpec, Wire

MIN_SAMPLES = 10
MAX_SAMPLES = 10_000
"""Samples beyond this are not read."""
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Samples:
    """The inputs as sent (``items``) and, for numeric formats, as a matrix."""

    items: list[Any]
    features: Array | None
    shape: tuple[int, ...]
    """One numeric input's shape (flattened in ``features``, nested again when sent)."""
    tensor: TensorSpec | None = None

    def __len__(self) -> int:
        return len(self.items)

    def split(self, holdout: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """Indices of the attacker's pool and of the held-out inputs (at least 3)."""
        order = [int(i) for i in rng.permutation(len(self.items))]
        held = max(3, round(holdout * len(order)))
        return sorted(order[held:]), sorted(order[:held])


def load_samples(path: Path, wire: Wire) -> Samples:
    """Read and check the samples file; :class:`ConfigurationError` says what is wrong."""
    values = _read_values(path)
    items: list[Any] = []
    tensor: TensorSpec | None = None
    for _, value in values:
        if isinstance(value, dict) and set(value) == {"input"}:
            items.append(value["input"])
            continue
        expanded = wire.inputs_of(value) if isinstance(value, dict) else None
        if expanded is None:
            items.append(value)
        else:
            items.extend(expanded)
            if wire.format == "oip_v2" and tensor is None:
                tensor = _tensor_of(value)
        if len(items) >= MAX_SAMPLES:
            items = items[:MAX_SAMPLES]
            break
    if len(items) < MIN_SAMPLES:
        raise ConfigurationError(
            f"--samples {path}: {len(items)} inputs; the audit needs at least {MIN_SAMPLES} "
            "(some are kept aside to measure what a thief's copy learned)"
        )
    if wire.numeric:
        return _numeric(path, items, tensor)
    bad = next((i for i, item in enumerate(items) if not isinstance(item, str)), None)
    if bad is not None:
        raise ConfigurationError(
            f"--samples {path}: input {bad + 1} is {type(items[bad]).__name__}; "
            f"--format {wire.format} takes texts (one string per input)"
        )
    return Samples(items, None, ())


def _read_values(path: Path) -> list[tuple[int, Any]]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigurationError(
                f"--samples {path}: larger than {MAX_FILE_BYTES // 2**20} MiB; "
                "a few hundred inputs are enough for an audit"
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"--samples {path}: cannot read it ({exc})") from None
    stripped = text.strip()
    if not stripped:
        raise ConfigurationError(f"--samples {path}: the file is empty")
    if stripped.startswith("["):
        try:
            document = json.loads(stripped)
        except json.JSONDecodeError:
            document = None  # JSON Lines whose first input is a list
        if isinstance(document, list):
            return list(enumerate(document, start=1))
    values: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"--samples {path}: line {number} is not JSON ({exc.msg}); expected JSON "
                "Lines, one input as the API takes it per line, or one JSON list"
            ) from None
    return values


def _numeric(path: Path, items: list[Any], tensor: TensorSpec | None) -> Samples:
    features = numeric_rows(items)
    if features is None:
        raise ConfigurationError(
            f"--samples {path}: the inputs are not numeric arrays of one shape with finite "
            "values; KServe v1 and OIP v2 audits take numeric inputs such as [0.5, 1.0, 3.0]"
        )
    shape = tuple(int(d) for d in np.asarray(items[0], dtype=np.float64).shape) or (1,)
    if tensor is not None and not tensor.shape:
        tensor = TensorSpec(tensor.name, tensor.datatype, shape)
    return Samples(items, features, shape, tensor)


def _tensor_of(body: dict[str, Any]) -> TensorSpec | None:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        return None
    first = inputs[0]
    shape = first.get("shape")
    row_shape = tuple(int(d) for d in shape[1:]) if isinstance(shape, list) else ()
    return TensorSpec(str(first.get("name")), str(first.get("datatype")).upper(), row_shape)
