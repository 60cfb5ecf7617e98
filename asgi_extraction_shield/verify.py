"""Verification: does a suspect model carry one of our watermarks?

``verify(scheme, suspect, key=SECRET_KEY, records=...)`` chooses probes (the scheme's:
recorded marked queries for ``dawn``, any inputs for the others), asks the suspect, reads
its answers with the shield's own format adapters and runs the scheme's test. A suspect is

- a Python callable mapping a list of inputs to the list of its answers, each as the API
  returns it for one input (a probability row, a label, a KServe/OIP/OpenAI/HF document);
- the ``http(s)`` URL of a compatible API (KServe v1 ``…:predict``, Open Inference
  Protocol v2 ``/v2/models/<name>/infer``, OpenAI ``…/embeddings`` or ``…/completions``,
  Hugging Face), asked in batches with the standard library's HTTP client;
- the path of a JSONL file of ``{"input": …, "output": …}`` objects (answers collected
  earlier): its inputs are the probes.

The result is a :class:`~asgi_extraction_shield.watermark.VerifyResult`; the verdict is
data, not an error. :class:`VerificationError` means the verification could not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard, Union

import numpy as np

from .errors import ShieldError
from .formats.base import FormatAdapter, GeneratedText, Outputs, ParsedRequest, canonical
from .formats.hf import HuggingFace
from .formats.kserve_v1 import KServeV1
from .formats.oip_v2 import OpenInferenceV2
from .formats.openai_api import OpenAIAdapter
from .settings import OpenAISettings
from .watermark import ReferenceScheme, Scheme, VerifyResult, parse_scheme, watermark_key

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_PROBES",
    "HttpSuspect",
    "VerificationError",
    "load_pairs",
    "load_records",
    "read_answers",
    "verify",
]

DEFAULT_ALPHA = 1e-3
DEFAULT_PROBES = 1_000

Suspect = Union[Callable[[list[Any]], Sequence[Any]], str, "os.PathLike[str]"]


class VerificationError(ShieldError):
    """The verification could not run (unreadable file, unreachable suspect, bad scheme)."""


_ADAPTERS: dict[str, FormatAdapter] = {
    "kserve_v1": KServeV1(),
    "oip_v2": OpenInferenceV2(),
    "openai": OpenAIAdapter(OpenAISettings(max_top_logprobs=20, max_logit_bias=10**6)),
    "hf": HuggingFace(),
}
FORMATS = tuple(_ADAPTERS)


def format_of(url_path: str) -> str:
    """The format a URL path speaks, by the same path rules as ``FORMAT=auto``."""
    if url_path.endswith(("/chat/completions", "/completions", "/embeddings")):
        return "openai"
    if "/v2/models/" in url_path:
        return "oip_v2"
    if url_path.endswith(":predict") or "/v1/models/" in url_path:
        return "kserve_v1"
    return "hf"


def request_document(fmt: str, path: str, inputs: list[Any], model: str = "") -> dict[str, Any]:
    """The request body asking the model at ``path`` (format ``fmt``) about ``inputs``."""
    if fmt == "kserve_v1":
        return {"instances": inputs}
    if fmt == "oip_v2":
        if all(isinstance(item, str) for item in inputs):
            return {
                "inputs": [
                    {"name": "input-0", "shape": [len(inputs)], "datatype": "BYTES", "data": inputs}
                ]
            }
        rows = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1)
        return {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "data": rows.ravel().tolist(),
                }
            ]
        }
    if fmt == "openai":
        if path.endswith("/chat/completions"):
            # One conversation per request: chat endpoints take no batch. A text input
            # (a prompt) is the user's message.
            first = inputs[0] if len(inputs) == 1 else inputs
            if isinstance(first, str):
                first = [{"role": "user", "content": first}]
            return {"model": model, "messages": first}
        key = "input" if path.endswith("/embeddings") else "prompt"
        return {"model": model, key: inputs}
    return {"inputs": inputs}


def _parsed(fmt: str, path: str, doc: Any) -> ParsedRequest:
    adapter = _ADAPTERS[fmt]
    return adapter.parse_request({"type": "http", "path": path}, doc, b"")


def split_outputs(outputs: Outputs | None, n: int) -> list[Outputs]:
    """Per-input outputs of a batch of ``n`` answers (empty ones when rows do not match)."""
    empty = [Outputs(keys=[]) for _ in range(n)]
    if outputs is None:
        return empty
    parts: list[Outputs] = []
    for i in range(n):
        part = Outputs(keys=outputs.keys[i : i + 1])
        for name in ("probabilities", "scores", "embeddings", "labels"):
            values = getattr(outputs, name)
            if values is not None and len(values) == n:
                setattr(part, name, values[i : i + 1])
        if outputs.tokens is not None and len(outputs.tokens) == n:
            part.tokens = outputs.tokens[i : i + 1]
        if outputs.texts is not None and len(outputs.texts) == n:
            part.texts = outputs.texts[i : i + 1]
        parts.append(part)
    return parts


_DOCUMENT_PATHS = {
    "kserve_v1": "/v1/models/suspect:predict",
    "oip_v2": "/v2/models/suspect/infer",
    "hf": "/",
}


def read_answer(item: Any, answer: Any) -> Outputs:
    """One answer, as an API returns it for ``item``, read by the shield's adapters: a
    whole response document (KServe v1, OIP v2, OpenAI, HF) or one KServe v1 prediction
    (a probability row, a label, a dict of named outputs). Unreadable: empty outputs."""
    if isinstance(answer, str):  # a generated text, as a callable suspect may return it
        return Outputs(keys=[], texts=[GeneratedText(answer)])
    candidates: list[tuple[str, str, Any]] = []
    if isinstance(answer, dict):
        for fmt in ("kserve_v1", "oip_v2", "hf"):
            candidates.append((fmt, _DOCUMENT_PATHS[fmt], answer))
        if isinstance(answer.get("data"), list):
            candidates.append(("openai", "/v1/embeddings", answer))
        elif isinstance(answer.get("choices"), list):
            chat = any(isinstance(c, dict) and "message" in c for c in answer["choices"])
            candidates.append(
                ("openai", "/v1/chat/completions" if chat else "/v1/completions", answer)
            )
    elif isinstance(answer, list) and answer and all(isinstance(e, dict) for e in answer):
        candidates.append(("hf", "/", answer))
    candidates.append(("kserve_v1", _DOCUMENT_PATHS["kserve_v1"], {"predictions": [answer]}))
    for fmt, path, doc in candidates:
        try:
            request = _parsed(fmt, path, request_document(fmt, path, [item]))
            outputs = _ADAPTERS[fmt].read_response(doc, request)
        except Exception:  # hostile answers: whatever an adapter chokes on is unreadable
            continue
        if outputs is not None:
            return split_outputs(outputs, 1)[0]
    return Outputs(keys=[])


def read_answers(inputs: Sequence[Any], answers: Sequence[Any]) -> list[Outputs]:
    """:func:`read_answer` for each pair (answers missing at the end count as unreadable)."""
    out = [read_answer(item, answer) for item, answer in zip(inputs, answers, strict=False)]
    return out + [Outputs(keys=[]) for _ in range(len(inputs) - len(out))]


class HttpSuspect:
    """A compatible API asked over HTTP(S) in batches (``urllib``, no extra dependency).

    ``format`` is one of :data:`FORMATS` or ``auto`` (by the URL path); ``headers`` are
    sent with every request (e.g. ``Authorization``); ``model`` names the model in OpenAI
    requests. A batch the server refuses or answers unreadably counts as unreadable
    answers; a server that cannot be reached at all raises :class:`VerificationError`.
    """

    def __init__(
        self,
        url: str,
        format: str = "auto",
        headers: Mapping[str, str] | None = None,
        batch: int = 64,
        timeout: float = 30.0,
        model: str = "",
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise VerificationError(f"{url!r} is not an http(s) URL")
        self.url, self.path = url, parts.path
        self.format = format_of(parts.path) if format == "auto" else format
        if self.format not in _ADAPTERS:
            raise VerificationError(f"format {format!r} is not one of auto, {', '.join(FORMATS)}")
        self.headers = {"content-type": "application/json", **(headers or {})}
        self.batch = 1 if self.path.endswith("/chat/completions") else max(1, batch)
        self.timeout = timeout
        self.model = model
        self.failed_batches = 0

    def ask(self, inputs: Sequence[Any]) -> list[Outputs]:
        out: list[Outputs] = []
        reached = False
        for start in range(0, len(inputs), self.batch):
            chunk = list(inputs[start : start + self.batch])
            doc = request_document(self.format, self.path, chunk, self.model)
            answer, ok = self._post(doc)
            reached |= ok
            outputs = None
            if answer is not None:
                try:
                    outputs = _ADAPTERS[self.format].read_response(
                        answer, _parsed(self.format, self.path, doc)
                    )
                except Exception:
                    outputs = None
            if outputs is None:
                self.failed_batches += 1
            out += split_outputs(outputs, len(chunk))
        if inputs and not reached:
            raise VerificationError(f"the suspect at {self.url} could not be reached")
        return out

    def _post(self, doc: dict[str, Any]) -> tuple[Any, bool]:
        """The decoded answer (``None`` if refused or not JSON) and whether the server
        answered at all."""
        data = json.dumps(doc).encode()
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError:
            return None, True
        except (urllib.error.URLError, OSError):
            return None, False
        try:
            return json.loads(body), True
        except ValueError:
            return None, True


def _jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file; blank, malformed and non-object lines skipped."""
    try:
        with Path(path).open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    yield value
    except OSError as exc:
        raise VerificationError(f"cannot read {os.fspath(path)!r}: {exc.strerror}") from None


def load_pairs(path: str | os.PathLike[str]) -> tuple[list[Any], list[Any]]:
    """Inputs and answers of a JSONL file of ``{"input": …, "output": …}`` objects."""
    inputs: list[Any] = []
    answers: list[Any] = []
    for obj in _jsonl(path):
        if "input" in obj and "output" in obj:
            inputs.append(obj["input"])
            answers.append(obj["output"])
    return inputs, answers


def load_records(
    records: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None,
) -> list[dict[str, Any]]:
    """Records of marked queries (objects with at least ``input``) from a JSONL path or a
    sequence of mappings; ``None`` is none."""
    if records is None:
        return []
    if isinstance(records, str | os.PathLike):
        return [obj for obj in _jsonl(records) if "input" in obj]
    return [dict(r) for r in records if isinstance(r, Mapping) and "input" in r]


def _scheme(scheme: str | Scheme) -> Scheme:
    if not isinstance(scheme, str):
        return scheme
    try:
        return parse_scheme(scheme)
    except ValueError as exc:
        raise VerificationError(str(exc)) from None


def verify(
    scheme: str | Scheme,
    suspect: Suspect,
    *,
    key: bytes | str,
    records: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
    alpha: float = DEFAULT_ALPHA,
    probes: int = DEFAULT_PROBES,
    format: str = "auto",
    headers: Mapping[str, str] | None = None,
    model: str = "",
    reference: Suspect | None = None,
) -> VerifyResult:
    """Test ``suspect`` for the watermark ``scheme`` (a name, ``name:param=value``, or a
    :class:`~asgi_extraction_shield.watermark.Scheme`), keyed by the shield's
    ``SECRET_KEY`` ``key``. ``probes`` bounds the questions asked; a JSONL suspect's
    inputs are the probes. ``format``, ``headers`` and ``model`` apply to URL suspects.

    ``reference`` is the owner's own model *without* the watermark (a callable, a URL, or
    a JSONL file of its answers to the same inputs), for schemes that use one (``drw``):
    its answers are asked for the same probes, so that what any copy shares with the model
    cancels out. It must not be the watermarked API: that would cancel the mark too."""
    if not 0 < alpha < 1:
        raise VerificationError(f"alpha={alpha!r}: expected a significance in (0, 1)")
    if probes < 1:
        raise VerificationError(f"probes={probes!r}: expected at least 1")
    chosen = _scheme(scheme)
    if reference is not None and not isinstance(chosen, ReferenceScheme):
        raise VerificationError(f"{chosen.name} uses no reference model (drw does)")
    wkey = watermark_key(key, chosen.name)
    if _is_file(suspect):
        inputs, answers = load_pairs(suspect)
        inputs, answers = inputs[:probes], answers[:probes]
        if records is not None:
            with contextlib.suppress(ValueError):  # what a scheme learns from its records
                chosen.probes(wkey, probes, load_records(records))
        outputs = read_answers(inputs, answers)
    else:
        try:
            inputs = chosen.probes(wkey, probes, load_records(records))
        except ValueError as exc:
            raise VerificationError(str(exc)) from None
        outputs = _ask(suspect, inputs, format, headers, model)
    if reference is None:
        return chosen.test(wkey, inputs, outputs, alpha)
    assert isinstance(chosen, ReferenceScheme)
    referred = _ask(reference, inputs, format, headers, model)
    return chosen.test_against(wkey, inputs, outputs, referred, alpha)


def _is_file(model: Suspect) -> TypeGuard[str | os.PathLike[str]]:
    """Whether ``model`` names a JSONL file of answers (not a URL, not a callable)."""
    return isinstance(model, os.PathLike) or (isinstance(model, str) and "://" not in model)


def _ask(
    model: Suspect,
    inputs: Sequence[Any],
    format: str,
    headers: Mapping[str, str] | None,
    name: str,
) -> list[Outputs]:
    """A model's answers to ``inputs``: a URL is asked, a callable called, and a JSONL
    file of ``{"input", "output"}`` lines looked up (it must answer every input)."""
    if _is_file(model):
        known, answers = load_pairs(model)
        by_input = {canonical(item): answer for item, answer in zip(known, answers, strict=True)}
        missing = sum(1 for item in inputs if canonical(item) not in by_input)
        if missing:
            raise VerificationError(
                f"{model}: no answer to {missing} of the {len(inputs)} probes "
                "(a reference file must answer every input the suspect was asked)"
            )
        return read_answers(inputs, [by_input[canonical(item)] for item in inputs])
    if isinstance(model, str):
        return HttpSuspect(model, format, headers, model=name).ask(inputs)
    if not callable(model):
        raise VerificationError(f"{model!r} is not a callable, URL or JSONL path")
    return read_answers(inputs, list(model(list(inputs))))
