"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``.

The endpoint is the request path's suffix (with ``FORMAT=openai`` on another path, the
body's ``messages`` / ``prompt`` / ``input`` decides).

Requests. A chat request is one query, its conversation (``messages``; the text of string
contents and of ``{"type": "text"}`` parts); a completion request has one query per prompt
(a string, a list of strings, a token array or a list of token arrays); an embedding
request one per ``input`` (same shapes). The cost is the number of queries times ``n``
(``best_of`` when larger), so ``n=8`` costs what eight requests cost; ``PayloadAdapter``
multiplies it by ``DISTRIBUTION_COST`` when logprobs are asked for.

Hardening (:class:`~asgi_extraction_shield.settings.OpenAISettings`), the request the app
receives being rewritten only when something changes, every other field kept:

* ``top_logprobs`` (chat) and the ``logprobs`` count (completions) are lowered to
  ``max_top_logprobs``;
* more than ``max_logit_bias`` ``logit_bias`` entries are refused (400);
* ``logit_bias`` together with logprobs is the logprob-and-bias extraction attack of
  Carlini et al., "Stealing Part of a Production Language Model" (ICML 2024): biasing a
  token into the top-k and reading its logprob recovers the full logit vector, whose
  SVD reveals the hidden dimension and the final projection. ``drop_logprobs`` (the
  default, the fix providers shipped) removes the logprobs request, so a bias can never
  change a returned logprob; ``reject`` refuses the request; ``allow`` passes it.
* A hardening field of a type the shield cannot interpret (``"top_logprobs": "20"``,
  ``"n": 5.0``) is refused as well: a lenient upstream would coerce and honour it,
  past the caps.

Responses. ``choices[].logprobs`` of chat (``content`` and ``refusal`` items with
``top_logprobs``) and of completions (``tokens``, ``token_logprobs``, ``top_logprobs``
dicts) become one :class:`TokenLogprobs` per choice, for non-streaming documents and
streaming chunks alike; ``data[].embedding`` (float lists, or base64 of little-endian
float32) become ``Outputs.embeddings``, keyed by ``data[].index`` to the request's inputs;
generated texts (chat ``message.content``, completion ``text``, streamed ``delta.content``,
a stream's closing chunk counting as an empty final piece) become ``Outputs.texts``.
Written back, every other field stays as it was: alternatives keep their ``bytes`` (a
repeated token string is matched in order), base64 embeddings stay base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
from numpy.typing import NDArray
from starlette.types import Scope

from ..settings import OpenAISettings
from .base import (
    EMBEDDINGS,
    HARDENED,
    LOGIT_BIAS,
    LOGPROBS,
    STREAM,
    TOP_LOGPROBS,
    GeneratedText,
    Outputs,
    ParsedRequest,
    TokenLogprobs,
    canonical,
    numeric_matrix,
)

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDING = "embeddings"

MAX_DEPTH = 64
"""Deeper request documents are not parsed (and not canonicalised, which recurses)."""
MAX_COST = 1_000_000
"""The most one request is charged: far above any burst, and safe to multiply as a float."""


@dataclass(slots=True)
class OpenAIRequest(ParsedRequest):
    """A parsed OpenAI request: which endpoint, and the ``n`` (choices per prompt) that maps
    a completion choice's ``index`` to its prompt."""

    endpoint: str = ""
    n: int = 1


def endpoint_of(path: str, doc: dict[str, Any]) -> str | None:
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return CHAT
    if path.endswith("/completions"):
        return COMPLETIONS
    if path.endswith("/embeddings"):
        return EMBEDDING
    for field, endpoint in (("messages", CHAT), ("prompt", COMPLETIONS), ("input", EMBEDDING)):
        if field in doc:
            return endpoint
    return None


class OpenAIAdapter:
    name = "openai"

    def __init__(self, settings: OpenAISettings | None = None) -> None:
        self.settings = settings or OpenAISettings()

    # -- requests ------------------------------------------------------------------------

    def parse_request(self, scope: Scope, doc: Any, body: bytes) -> ParsedRequest:
        if not isinstance(doc, dict):
            return OpenAIRequest(problem="expected a JSON object")
        endpoint = endpoint_of(str(scope.get("path", "")), doc)
        if endpoint is None:
            return OpenAIRequest(problem="expected 'messages', 'prompt' or 'input'")
        request = OpenAIRequest(endpoint=endpoint)
        problems: list[str] = []
        _check_tree(doc, problems)
        shallow = not problems
        _read_queries(doc, endpoint, request, problems)
        if shallow:  # canonical() recurses: only on documents known to be shallow
            request.keys = [_canonical(item) for item in request.inputs]
        draws = 1  # completions generated per query
        if endpoint != EMBEDDING:
            draws = self._harden(doc, endpoint, request, problems)
        elif "encoding_format" in doc and doc["encoding_format"] not in (None, "float", "base64"):
            problems.append("'encoding_format' must be 'float' or 'base64'")
        flags = set(request.flags)
        if endpoint == EMBEDDING:
            flags.add(EMBEDDINGS)
        if not _is_flag(doc.get("stream")):
            problems.append("'stream' must be true or false")
        elif doc.get("stream") is True:
            flags.add(STREAM)
        request.flags = frozenset(flags)
        request.cost = min(MAX_COST, max(1, len(request.inputs)) * draws)
        if problems:
            request.problem = problems[0]
            return request
        request.parsed = True
        request.adapter = self
        return request

    def _harden(
        self, doc: dict[str, Any], endpoint: str, request: OpenAIRequest, problems: list[str]
    ) -> int:
        """Flags, ``n``, and the hardened body or the refusal (see the module docstring).

        Returns the number of completions generated per query (``best_of`` if larger)."""
        settings = self.settings
        refusals: list[str] = []
        request.n = n = _count(doc, "n", refusals, problems)
        draws = max(n, _count(doc, "best_of", refusals, problems)) if endpoint == COMPLETIONS else n
        flags: set[str] = set()
        changes: dict[str, Any] = {}

        bias = doc.get("logit_bias")
        if bias is not None and not isinstance(bias, dict):
            refusals.append("'logit_bias' must be an object mapping token ids to biases")
            bias = None
        if bias:
            flags.add(LOGIT_BIAS)
            request.logit_bias_tokens = tuple(bias)
            if not all(_logprob(v) is not None for v in bias.values()):
                problems.append("'logit_bias' values must be numbers")
            if len(bias) > settings.max_logit_bias:
                refusals.append(
                    f"'logit_bias' has {len(bias)} entries; this API accepts at most "
                    f"{settings.max_logit_bias}."
                )

        if endpoint == CHAT:
            wants = doc.get("logprobs")
            if not _is_flag(wants):
                refusals.append("'logprobs' must be true or false")
            top = doc.get("top_logprobs")
            if top is not None and not _is_int(top):
                refusals.append("'top_logprobs' must be an integer")
                top = None
            if wants is True:
                flags.add(LOGPROBS)
                if top:
                    flags.add(TOP_LOGPROBS)
            if top is not None and top > settings.max_top_logprobs:
                changes["top_logprobs"] = settings.max_top_logprobs
            asks = wants is True or bool(top)
            logprob_fields: tuple[str, ...] = ("logprobs", "top_logprobs")
        else:
            count = doc.get("logprobs")
            if count is not None and not _is_int(count):
                refusals.append("'logprobs' must be an integer (alternatives per token)")
                count = None
            if count is not None:
                flags.add(LOGPROBS)
                if count > 0:
                    flags.add(TOP_LOGPROBS)
                if count > settings.max_top_logprobs:
                    changes["logprobs"] = settings.max_top_logprobs
            asks = count is not None
            logprob_fields = ("logprobs",)

        if bias and asks:
            mode = settings.logit_bias_with_logprobs
            if mode == "reject":
                refusals.append(
                    "'logit_bias' cannot be combined with logprobs on this API: together they "
                    "reveal the model's full output distribution."
                )
            elif mode == "drop_logprobs":
                for field in logprob_fields:
                    changes[field] = _DROP
        request.flags = frozenset(flags)
        if refusals:
            request.refusal = refusals[0]
            return draws
        changes = {k: v for k, v in changes.items() if k in doc}
        if changes:
            request.upstream_body = _rewrite(doc, changes)
            if request.upstream_body is None:
                request.refusal = "the request could not be rewritten safely"
            else:
                request.flags |= {HARDENED}
        return draws

    # -- responses -----------------------------------------------------------------------

    def read_response(self, doc: Any, request: ParsedRequest) -> Outputs | None:
        if not isinstance(doc, dict):
            return None
        if _endpoint(request, doc) == EMBEDDING:
            return _read_embeddings(doc, request)
        sites = _token_sites(doc) or []
        texts = _text_sites(doc, STREAM in request.flags)
        if not sites and not texts:
            return None
        tokens = [site.read() for site in sites] if sites else None
        keys = [_choice_key(request, site.index) for site in sites]
        generated = [site.read() for site in texts] if texts else None
        return Outputs(keys, tokens=tokens, texts=generated)

    def write_response(self, doc: Any, outputs: Outputs, request: ParsedRequest) -> Any:
        if not isinstance(doc, dict):
            return doc
        if _endpoint(request, doc) == EMBEDDING:
            if outputs.embeddings is not None:
                _write_embeddings(doc, outputs.embeddings)
            return doc
        sites = _token_sites(doc)
        if outputs.tokens is not None and sites and len(sites) == len(outputs.tokens):
            for site, seq in zip(sites, outputs.tokens, strict=True):
                site.write(seq)
        texts = _text_sites(doc, STREAM in request.flags)
        if outputs.texts is not None and len(texts) == len(outputs.texts):
            for text_site, generated in zip(texts, outputs.texts, strict=True):
                text_site.write(generated.text)
        return doc


# -- request helpers -------------------------------------------------------------------------

_DROP = object()


def _is_flag(value: Any) -> bool:
    # by type, not ==: 1 == True, and a lenient upstream would take 1 for true
    return value is None or isinstance(value, bool)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(doc: dict[str, Any], field: str, refusals: list[str], problems: list[str]) -> int:
    """A positive count such as ``n``: 1 when absent or null."""
    value = doc.get(field)
    if value is None:
        return 1
    if not _is_int(value):
        refusals.append(f"'{field}' must be an integer")
        return 1
    if value < 1:
        problems.append(f"'{field}' must be at least 1")
        return 1
    return min(int(value), MAX_COST)


def _check_tree(doc: Any, problems: list[str]) -> None:
    """Depth and non-finite numbers, without recursion (a hostile body may nest deeply).

    Each container's children are classified by type in C (``set(map(type, ...))``), so
    a long token array costs little more than its parsing did.
    """
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(f"the body nests deeper than {MAX_DEPTH} levels")
            return
        children = list(value.values()) if isinstance(value, dict) else value
        types = set(map(type, children))
        if float in types and not all(
            map(math.isfinite, [c for c in children if type(c) is float])
        ):
            problems.append("the body holds NaN or Infinity, which JSON does not allow")
            return
        if dict in types or list in types:
            stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))


def _read_queries(
    doc: dict[str, Any], endpoint: str, request: OpenAIRequest, problems: list[str]
) -> None:
    if endpoint == CHAT:
        messages = doc.get("messages")
        text = _conversation(messages)
        if text is None:
            problems.append(
                "'messages' must be a non-empty list of objects whose 'content' is a string, "
                "null, or a list of content parts"
            )
            return
        request.inputs = [messages]
        request.texts = [text]
    else:
        field = "prompt" if endpoint == COMPLETIONS else "input"
        items = _prompts(doc.get(field))
        if items is None:
            problems.append(
                f"'{field}' must be a string, a list of strings, a token array or a list of "
                "token arrays"
            )
            return
        request.inputs = items
        request.texts = [item for item in items if isinstance(item, str)]


def _conversation(messages: Any) -> str | None:
    """The text of a chat conversation, one line per text, or ``None`` if malformed."""
    if not isinstance(messages, list) or not messages:
        return None
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    return None
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        return None
                    texts.append(part["text"])
        elif content is not None:
            return None
    return "\n".join(texts)


def _prompts(value: Any) -> list[Any] | None:
    """A prompt or input field as a list of queries (strings or token arrays)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return list(value)
    if _token_array(value):
        return [value]
    if all(isinstance(v, list) and _token_array(v) for v in value):
        return list(value)
    return None


def _token_array(value: list[Any]) -> bool:
    return bool(value) and set(map(type, value)) == {int}


def _canonical(item: Any) -> bytes:
    """``canonical(item)``, computed at C speed for strings and token arrays."""
    if isinstance(item, str) or (isinstance(item, list) and _token_array(item)):
        return json.dumps(item, separators=(",", ":")).encode()
    return canonical(item)


def _rewrite(doc: dict[str, Any], changes: dict[str, Any]) -> bytes | None:
    new = {k: v for k, v in doc.items() if changes.get(k) is not _DROP}
    new.update({k: v for k, v in changes.items() if v is not _DROP})
    try:
        return json.dumps(new, ensure_ascii=False, separators=(",", ":")).encode()
    except (ValueError, RecursionError):
        return None


# -- response helpers ------------------------------------------------------------------------


def _endpoint(request: ParsedRequest, doc: dict[str, Any]) -> str:
    if isinstance(request, OpenAIRequest) and request.endpoint:
        return request.endpoint
    return EMBEDDING if isinstance(doc.get("data"), list) and "choices" not in doc else CHAT


def _choice_key(request: ParsedRequest, index: int) -> bytes:
    """The canonical prompt a choice answers (completions list ``n`` choices per prompt)."""
    keys = request.keys
    n = request.n if isinstance(request, OpenAIRequest) else 1
    if len(keys) == 1:
        return keys[0]
    prompt = index // max(n, 1)
    if 0 <= prompt < len(keys):
        return keys[prompt]
    return b"openai-choice:%d" % index


def _logprob(value: Any) -> float | None:
    """A finite JSON number as a float (NaN, Infinity, booleans and huge integers are not)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _is_int(value) and -1e308 < value < 1e308:
        return float(value)
    return None


class _ChatSite:
    """The logprobs of one chat choice: ``content`` then ``refusal`` items."""

    __slots__ = ("index", "lists")

    def __init__(self, index: int, lists: list[list[dict[str, Any]]]) -> None:
        self.index = index
        self.lists = lists

    @classmethod
    def parse(cls, index: int, logprobs: dict[str, Any]) -> _ChatSite | None:
        lists: list[list[dict[str, Any]]] = []
        for field in ("content", "refusal"):
            items = logprobs.get(field)
            if items is None:
                continue
            if not isinstance(items, list):
                return None
            for item in items:
                if not isinstance(item, dict) or _logprob(item.get("logprob")) is None:
                    return None
                top = item.get("top_logprobs")
                if top is not None and not (
                    isinstance(top, list)
                    and all(
                        isinstance(alt, dict)
                        and isinstance(alt.get("token"), str)
                        and _logprob(alt.get("logprob")) is not None
                        for alt in top
                    )
                ):
                    return None
            lists.append(items)
        return cls(index, lists)

    def items(self) -> list[dict[str, Any]]:
        return [item for items in self.lists for item in items]

    def read(self) -> TokenLogprobs:
        items = self.items()
        return TokenLogprobs(
            [float(item["logprob"]) for item in items],
            [
                [(alt["token"], float(alt["logprob"])) for alt in item.get("top_logprobs") or ()]
                for item in items
            ],
        )

    def write(self, seq: TokenLogprobs) -> None:
        items = self.items()
        if len(seq.logprobs) != len(items) or len(seq.top) != len(items):
            return
        for item, value, top in zip(items, seq.logprobs, seq.top, strict=True):
            item["logprob"] = float(value)
            if isinstance(item.get("top_logprobs"), list):
                item["top_logprobs"] = _match(item["top_logprobs"], top)


def _match(original: list[dict[str, Any]], new: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """New alternatives as entries, each keeping its original's other fields (``bytes``).

    Entries are matched by token in order, so two alternatives that decode to the same
    string (byte-fallback tokens) keep their own ``bytes``.
    """
    used = [False] * len(original)
    out: list[dict[str, Any]] = []
    for token, value in new:
        for i, entry in enumerate(original):
            if not used[i] and entry["token"] == token:
                used[i] = True
                out.append({**entry, "logprob": float(value)})
                break
        else:
            out.append({"token": token, "logprob": float(value), "bytes": list(token.encode())})
    return out


class _CompletionSite:
    """The logprobs of one completion choice: parallel ``tokens`` / ``token_logprobs`` /
    ``top_logprobs`` lists. Positions whose logprob is null (the first token of an echoed
    prompt) are not read, and are written back as they were."""

    __slots__ = ("index", "logprobs", "positions")

    def __init__(self, index: int, logprobs: dict[str, Any]) -> None:
        self.index = index
        self.logprobs = logprobs
        values = logprobs["token_logprobs"]
        self.positions = [i for i, v in enumerate(values) if v is not None]

    @classmethod
    def parse(cls, index: int, logprobs: dict[str, Any]) -> _CompletionSite | None:
        values = logprobs.get("token_logprobs")
        if not isinstance(values, list) or not all(
            v is None or _logprob(v) is not None for v in values
        ):
            return None
        top = logprobs.get("top_logprobs")
        if top is not None and not (
            isinstance(top, list)
            and len(top) == len(values)
            and all(
                alt is None
                or (isinstance(alt, dict) and all(_logprob(v) is not None for v in alt.values()))
                for alt in top
            )
        ):
            return None
        return cls(index, logprobs)

    def read(self) -> TokenLogprobs:
        values = self.logprobs["token_logprobs"]
        top = self.logprobs.get("top_logprobs") or [None] * len(values)
        return TokenLogprobs(
            [float(values[i]) for i in self.positions],
            [[(t, float(v)) for t, v in (top[i] or {}).items()] for i in self.positions],
        )

    def write(self, seq: TokenLogprobs) -> None:
        if len(seq.logprobs) != len(self.positions) or len(seq.top) != len(self.positions):
            return
        values = list(self.logprobs["token_logprobs"])
        top = self.logprobs.get("top_logprobs")
        alternatives = list(top) if isinstance(top, list) else None
        for i, value, new in zip(self.positions, seq.logprobs, seq.top, strict=True):
            values[i] = float(value)
            if alternatives is not None and not (alternatives[i] is None and not new):
                alternatives[i] = {token: float(v) for token, v in new}
        self.logprobs["token_logprobs"] = values
        if alternatives is not None:
            self.logprobs["top_logprobs"] = alternatives


_Site = _ChatSite | _CompletionSite


def _token_sites(doc: dict[str, Any]) -> list[_Site] | None:
    """The choices that carry logprobs, in order; ``None`` if any is malformed."""
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return None
    sites: list[_Site] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            return None
        logprobs = choice.get("logprobs")
        if logprobs is None:
            continue
        if not isinstance(logprobs, dict):
            return None
        given = choice.get("index")
        index = given if _is_int(given) else position
        site: _Site | None
        if "token_logprobs" in logprobs:
            site = _CompletionSite.parse(index, logprobs)
        elif "content" in logprobs or "refusal" in logprobs:
            site = _ChatSite.parse(index, logprobs)
        else:
            continue  # e.g. an empty logprobs object: nothing to read
        if site is None:
            return None
        sites.append(site)
    return sites


class _TextSite:
    """Where one choice's generated text is: ``message.content`` (chat), ``text``
    (completions) or, in a stream, ``delta.content``. A closing chunk without content
    is still a site (an empty final piece), so that text held back can be written there."""

    __slots__ = ("choice", "container", "field", "final")

    def __init__(self, container: dict[str, Any], field: str, choice: int, final: bool) -> None:
        self.container, self.field, self.choice, self.final = container, field, choice, final

    def read(self) -> GeneratedText:
        value = self.container.get(self.field)
        return GeneratedText(value if isinstance(value, str) else "", self.choice, self.final)

    def write(self, text: str) -> None:
        if text != self.read().text:
            self.container[self.field] = text


def _text_sites(doc: dict[str, Any], stream: bool) -> list[_TextSite]:
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return []
    sites: list[_TextSite] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            return []
        given = choice.get("index")
        index = given if _is_int(given) else position
        final = not stream or choice.get("finish_reason") is not None
        for holder, field in (("message", "content"), ("delta", "content"), (None, "text")):
            container = choice.get(holder) if holder else choice
            if not isinstance(container, dict) or (field not in container and holder != "delta"):
                continue
            value = container.get(field)
            if isinstance(value, str) or (value is None and stream and holder == "delta"):
                sites.append(_TextSite(container, field, index, final))
                break
    return sites


def _decode_float32(value: str) -> NDArray[np.float64] | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw or len(raw) % 4:
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)


def _decode_rows(values: list[str]) -> NDArray[np.float64] | None:
    rows: list[NDArray[np.float64]] = []
    for value in values:
        row = _decode_float32(value)
        if row is None or (rows and len(row) != len(rows[0])):
            return None
        rows.append(row)
    array = np.stack(rows)
    return array if np.isfinite(array).all() else None


def _embedding_items(doc: dict[str, Any]) -> list[dict[str, Any]] | None:
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        return None
    if not all(isinstance(item, dict) and "embedding" in item for item in data):
        return None
    return data


def _read_embeddings(doc: dict[str, Any], request: ParsedRequest) -> Outputs | None:
    items = _embedding_items(doc)
    if items is None:
        return None
    vectors = [item["embedding"] for item in items]
    rows: NDArray[np.float64] | None
    if all(isinstance(v, str) for v in vectors):
        rows = _decode_rows(vectors)
    else:
        rows = numeric_matrix(vectors)
    if rows is None:
        return None
    keys = request.keys
    indices = [item.get("index") for item in items]
    aligned = [keys[i] for i in indices if _is_int(i) and 0 <= i < len(keys)]
    if len(aligned) == len(items):
        row_keys = aligned
    elif len(keys) == len(items):
        row_keys = list(keys)
    else:  # the app answered other rows than were asked: key each by its own content
        row_keys = [canonical(v) for v in vectors]
    return Outputs(row_keys, embeddings=rows)


def _write_embeddings(doc: dict[str, Any], embeddings: NDArray[np.float64]) -> None:
    items = _embedding_items(doc)
    if items is None or embeddings.ndim != 2 or len(embeddings) != len(items):
        return
    for item, row in zip(items, embeddings, strict=True):
        if isinstance(item["embedding"], str):
            item["embedding"] = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        else:
            item["embedding"] = [float(v) for v in row]
