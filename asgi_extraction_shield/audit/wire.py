"""The audited endpoint's wire format: request bodies for one input, answers read back.

Bodies are built here (one input per request, as a client of the API sends it); they
are read back, and the answers read, by the shield's own format adapters
(:mod:`asgi_extraction_shield.formats`), so the audit understands exactly what the
shield understands. An answer becomes an :class:`Answer`: a numeric row (probabilities,
scores, an embedding, a label) or a text (OpenAI chat and completions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..formats import decode_json
from ..formats.base import FormatAdapter, ParsedRequest
from ..formats.hf import HuggingFace
from ..formats.kserve_v1 import KServeV1
from ..formats.oip_v2 import OpenInferenceV2
from ..formats.openai_api import CHAT, COMPLETIONS, OpenAIAdapter, endpoint_of
from .attacks import Array

FORMATS = ("kserve_v1", "oip_v2", "openai", "hf")
NUMERIC_FORMATS = ("kserve_v1", "oip_v2")

PROBABILITIES = "probabilities"
SCORES = "scores"
LABELS = "labels"
EMBEDDINGS = "embeddings"
TEXT = "text"


@dataclass(frozen=True)
class Answer:
    """What one request was answered: ``kind`` and either ``row`` or ``text``."""

    kind: str
    row: Array | None = None
    text: str | None = None

    def top1(self) -> int | str:
        """The answer's decision: the argmax of a row, the class of a label, or the text."""
        if self.row is None:
            return self.text or ""
        if self.kind == LABELS:
            return int(self.row[0])
        return int(np.argmax(self.row))

    def distance(self, other: Answer) -> float:
        """L∞ distance of two rows (0 or 1 for texts and for rows of other widths)."""
        if self.row is None or other.row is None or self.row.shape != other.row.shape:
            return 0.0 if self.text == other.text and self.row is None else 1.0
        return float(np.max(np.abs(self.row - other.row)))


@dataclass(frozen=True)
class TensorSpec:
    """The one input tensor of an OIP v2 request: its name, datatype and row shape."""

    name: str = "input-0"
    datatype: str = "FP32"
    shape: tuple[int, ...] = ()


class Wire:
    """Bodies and answers of one format at one path. ``extra`` fields (a model name,
    ``max_tokens``, HF ``parameters``, …) are merged into every body."""

    def __init__(
        self,
        format: str,
        path: str,
        extra: dict[str, Any] | None = None,
        tensor: TensorSpec | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ConfigurationError(
                f"--format {format!r} is not supported; expected one of {', '.join(FORMATS)}"
            )
        self.format = format
        self.path = path
        self.extra = dict(extra or {})
        self.tensor = tensor or TensorSpec()
        self.scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path}
        self.adapter: FormatAdapter = _ADAPTERS[format]()
        self.endpoint = endpoint_of(path, {}) if format == "openai" else None
        if format == "openai" and self.endpoint is None:
            raise ConfigurationError(
                f"--target path {path!r}: an OpenAI-compatible target ends with "
                "/chat/completions, /completions or /embeddings"
            )

    @property
    def numeric(self) -> bool:
        return self.format in NUMERIC_FORMATS

    def body(self, item: Any) -> bytes:
        """The request body that sends ``item`` (one input) alone."""
        doc: dict[str, Any] = dict(self.extra)
        if self.format == "kserve_v1":
            doc["instances"] = [_plain(item)]
        elif self.format == "oip_v2":
            flat = np.asarray(item, dtype=np.float64).ravel()
            shape = self.tensor.shape or (flat.size,)
            integral = not self.tensor.datatype.startswith(("FP", "BF"))
            data = [round(v) for v in flat.tolist()] if integral else flat.tolist()
            doc["inputs"] = [
                {
                    "name": self.tensor.name,
                    "shape": [1, *shape],
                    "datatype": self.tensor.datatype,
                    "data": data,
                }
            ]
        elif self.format == "hf":
            doc["inputs"] = item
        elif self.endpoint == CHAT:
            doc["messages"] = [{"role": "user", "content": item}]
        elif self.endpoint == COMPLETIONS:
            doc["prompt"] = item
        else:
            doc["input"] = item
        return json.dumps(doc, separators=(",", ":")).encode()

    def parse(self, body: bytes) -> ParsedRequest:
        """The body as the shield's adapter reads it."""
        return self.adapter.parse_request(self.scope, decode_json(body), body)

    def inputs_of(self, doc: Any) -> list[Any] | None:
        """The inputs of a request body of this format, or ``None`` if it is not one."""
        body = json.dumps(doc).encode()
        request = self.adapter.parse_request(self.scope, doc, body)
        if not request.parsed:
            return None
        if self.format == "oip_v2":  # rows hold one list per tensor: the first tensor's
            return [row[0] for row in request.inputs]
        return list(request.inputs)

    def answer(self, request_body: bytes, response_body: bytes) -> Answer | None:
        """The answer to a one-input request, or ``None`` when it holds none we can read."""
        doc = decode_json(response_body)
        if doc is None:
            return None
        if self.endpoint in (CHAT, COMPLETIONS):
            return _completion_text(doc)
        outputs = self.adapter.read_response(doc, self.parse(request_body))
        if outputs is None:
            return None
        for kind in (PROBABILITIES, SCORES, EMBEDDINGS):
            rows = getattr(outputs, kind)
            if rows is not None and len(rows):
                return Answer(kind, row=np.asarray(rows[0], dtype=np.float64))
        if outputs.labels is not None and len(outputs.labels):
            return Answer(LABELS, row=np.asarray([float(outputs.labels[0])]))
        return None


_ADAPTERS: dict[str, Any] = {
    "kserve_v1": KServeV1,
    "oip_v2": OpenInferenceV2,
    "hf": HuggingFace,
    "openai": OpenAIAdapter,
}


def _plain(item: Any) -> Any:
    if isinstance(item, np.ndarray):
        return item.tolist()
    return item


def _completion_text(doc: Any) -> Answer | None:
    """The first choice's text of an OpenAI chat or completion response."""
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return Answer(TEXT, text=text) if isinstance(text, str) else None


def one_hot(labels: Array, width: int) -> Array:
    """Label answers (one value each) as one-hot rows of ``width`` columns."""
    index = np.clip(labels.astype(np.int64), 0, width - 1)
    return np.asarray(np.eye(width)[index], dtype=np.float64)
