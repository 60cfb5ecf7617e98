"""Text watermarks for OpenAI-compatible completions: keyed synonyms and a green list.

**Keyed synonym choice** (lexical watermark; He et al., "Protecting Intellectual Property
of Language Generation APIs with Lexical Watermark", AAAI 2022, and CATER, NeurIPS 2022).
Each word of a group of :data:`~.words.SYNONYMS` is replaced by the member that the key
chooses for the word's *context*, the token before it (a word, lowercased, or a
punctuation mark): ``member = H(key, context, group) mod |group|``. Keying by context
makes it no global substitution (``big`` stays ``big`` after one word and becomes
``large`` after another), which a thief cannot undo by mapping words back, while an
imitation model that learns which word follows which learns the keyed choices.
Never touched: fenced code blocks (```` ``` ````), inline ``code``, URLs (and ``www.``),
double-quoted strings (``"…"``, ``“…”``), JSON and other bracketed spans (``{…}``,
``[…]``, to their matching bracket), words joined to other characters (``big-data``,
``big_file``, ``file.big``, ``<big>``, ``size=big``), numbers, and capitalised words inside a sentence (names).
An unclosed fence, quote or bracket protects the rest of the text. Single quotes are
not treated as quotes (they are apostrophes far more often). Case is kept (``Big`` →
``Large``, ``BIG`` → ``LARGE``).

Verification: in the suspect's texts, each distinct (context, group) pair counts once,
with the member the suspect used most (ties to the alphabetically first): a hit if it
is the keyed member. A model that never saw our answers chooses independently of the key,
so a pair is a hit with probability ``1/|group|``, and the number of hits is a sum of
independent Bernoulli trials: its exact (Poisson-binomial) tail is the p-value. Counting
each pair once matters: a clean model that always writes ``big`` after ``the`` would
otherwise be counted once per occurrence, and its p-value would not be uniform.

**Green-list logit bias** (Unigram watermark, Zhao et al., "Provable Robust Watermarking
for AI-Generated Text", ICLR 2024). A keyed fraction ``gamma`` of the token ids
``[0, vocab)`` gets ``+bias`` in the upstream request's ``logit_bias``. Detection on a
suspect's tokens counts each distinct token once: with ``T`` distinct tokens of which
``g`` are green, ``z = (g − γT)/√(Tγ(1 − γ)·(V − T)/(V − 1))`` (the issue's formula with
the finite-vocabulary factor) and the p-value is the exact hypergeometric tail, since
under the null the green list is a uniformly random subset of the ``V`` ids, independent
of the model. Counting every occurrence instead would let a clean model that repeats a
few tokens (``the``, ``,``) look marked or unmarked wholesale. The evidence is bounded by
the vocabulary: a text can show at most ``V`` coins, so a small vocabulary (the example
server's 48 tokens) cannot reach a tiny p-value, and the synonyms carry the evidence.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..formats.base import Outputs, ParsedRequest
from ..postprocess.chain import Context
from ..postprocess.keyed import row_seeds
from . import pvalues
from .base import VerifyResult, Watermark
from .words import SYNONYMS, WORDS

GROUP_OF: dict[str, int] = {w: g for g, words in enumerate(SYNONYMS) for w in words}

# One token per match: fence, backtick, URL, word, number, quote, bracket, other.
_TOKEN = re.compile(
    r"```|`|(?:https?://|www\.)[^\s<>\"'`]*|[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,]\d+)*"
    r"|[\"“”{}\[\]]|\s+|[^\sA-Za-z\d`\"“”{}\[\]]+"
)
_JOINERS = frozenset("-_/\\@.<>=")
_OPEN = {"{": "}", "[": "]"}
_SENTENCE_END = frozenset(".!?:\n")
# Trailing characters a stream piece holds back: a word, backticks or a URL may go on.
_PARTIAL = re.compile(r"(?:[A-Za-z']+|`+|(?:https?:?/*|www\.?)|[A-Za-z]+[.:]/*)\Z")

TEXT, FENCE, CODE, QUOTE, CURLY, BRACKET = range(6)


@dataclass(slots=True)
class ScanState:
    """Where a text (or a stream of pieces) stands between two calls of :func:`mark`."""

    mode: int = TEXT
    context: str = ""
    sentence_start: bool = True
    last: str = ""
    """The text's last character so far (is the next word joined to it?)."""
    pending: str = ""
    """The tail of a stream piece held back until the next piece (see :func:`mark`)."""
    stack: list[str] = field(default_factory=list)


def keyed_member(key: bytes, context: str, group: int) -> int:
    """The index of the keyed member of ``SYNONYMS[group]`` after ``context``."""
    digest = hashlib.blake2b(
        b"%d\x00" % group + context.encode(), key=key[:64], digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") % len(SYNONYMS[group])


def _cased(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def scan(
    text: str, state: ScanState, on_word: Callable[[str, int, ScanState], str] | None = None
) -> str:
    """Walk ``text`` from ``state`` (updated in place). ``on_word(word, group, state)``
    is called for each replaceable word of a group, ``state.context`` being its context,
    and returns the word to write; the rewritten text is returned."""
    out: list[str] = []
    for match in _TOKEN.finditer(text):
        token = written = match.group()
        mode = state.mode
        if mode == FENCE:
            if token == "```":
                state.mode = TEXT
        elif mode == CODE:
            if token == "`" or "\n" in token:
                state.mode = TEXT
        elif mode in (QUOTE, CURLY):
            if (
                (token == '"' and mode == QUOTE)
                or (token == "”" and mode == CURLY)
                or "\n" in token
            ):
                state.mode = TEXT
        elif mode == BRACKET:
            if token in _OPEN:
                state.stack.append(_OPEN[token])
            elif state.stack and token == state.stack[-1]:
                state.stack.pop()
                if not state.stack:
                    state.mode = TEXT
        elif token == "```":
            state.mode = FENCE
        elif token == "`":
            state.mode = CODE
        elif token == '"':
            state.mode = QUOTE
        elif token == "“":
            state.mode = CURLY
        elif token in _OPEN:
            state.mode, state.stack = BRACKET, [_OPEN[token]]
        elif token[0].isalpha() and not token.startswith(("http", "www.")):
            written = _word(token, text[match.end() : match.end() + 2], state, on_word)
        if state.mode != TEXT:
            state.context = ""
        elif not token.isspace():
            if token[0].isalpha() or token[0].isdigit():
                state.context = written.lower()
            elif token not in ("`", "```", '"', "”", "]", "}"):
                state.context = token.strip()[-1:]
            state.sentence_start = token.strip()[-1:] in _SENTENCE_END
        elif "\n" in token:
            state.sentence_start = True
        out.append(written)
        state.last = token[-1:]
    return "".join(out)


def _word(
    word: str,
    following: str,
    state: ScanState,
    on_word: Callable[[str, int, ScanState], str] | None,
) -> str:
    group = GROUP_OF.get(word.lower())
    if group is None or on_word is None:
        return word
    if state.last in _JOINERS or state.last.isalnum():
        return word  # file.big, x-big
    if following[:1] in _JOINERS and not (following[:1] == "." and not following[1:2].strip()):
        return word  # big-data, big_file, big.txt (a full stop is no joiner)
    if word[:1].isupper() and not word.isupper() and not state.sentence_start:
        return word  # a name inside a sentence
    return on_word(word, group, state)


def mark(key: bytes, text: str, state: ScanState | None = None, *, final: bool = True) -> str:
    """``text`` with its synonym words replaced by the keyed members.

    For a stream, pass the same ``state`` for every piece of one choice and
    ``final=False`` until its last piece: the piece's trailing partial word (or backticks,
    or the start of a URL) is held back in ``state.pending`` and written at the front of
    the next piece, so a word split across pieces is marked whole; nothing else waits.
    """
    state = state if state is not None else ScanState()
    text = state.pending + text
    state.pending = ""
    if not final:
        tail = _PARTIAL.search(text)
        if tail is not None:
            text, state.pending = text[: tail.start()], tail.group()

    def choose(word: str, group: int, s: ScanState) -> str:
        member = SYNONYMS[group][keyed_member(key, s.context, group)]
        return _cased(member, word)

    return scan(text, state, choose)


def choices(texts: Iterable[str]) -> dict[tuple[str, int], Counter[str]]:
    """For each (context, group) pair in ``texts``, how often each member was used."""
    found: dict[tuple[str, int], Counter[str]] = {}

    def record(word: str, group: int, s: ScanState) -> str:
        found.setdefault((s.context, group), Counter())[word.lower()] += 1
        return word

    for text in texts:
        scan(text, ScanState(), record)
    return found


def synonym_test(key: bytes, texts: Iterable[str]) -> tuple[float, float, dict[str, Any]]:
    """``(z, p_value, details)`` of the keyed-synonym test (module docstring)."""
    found = choices(texts)
    hits = 0
    probabilities: list[float] = []
    for (context, group), used in found.items():
        most = max(used.values())
        pick = min(w for w, n in used.items() if n == most)
        members = SYNONYMS[group]
        hits += pick == members[keyed_member(key, context, group)]
        probabilities.append(1.0 / len(members))
    expected = float(sum(probabilities))
    variance = float(sum(p * (1 - p) for p in probabilities))
    z = (hits - expected) / math.sqrt(variance) if variance > 0 else 0.0
    p = pvalues.poisson_binomial_sf(hits, probabilities)
    return z, p, {"pairs": len(probabilities), "hits": hits, "expected": expected}


# -- green list ----------------------------------------------------------------------------


def green_ids(key: bytes, vocab: int, gamma: float) -> list[int]:
    """The keyed green list: ``round(gamma·vocab)`` token ids of ``[0, vocab)``, sorted."""
    size = round(gamma * vocab)
    seeds = row_seeds(key, [b"%d" % i for i in range(vocab)], b"text-green")
    return sorted(int(i) for i in np.argsort(seeds, kind="stable")[:size])


def green_test(
    token_ids: Sequence[int], green: Sequence[int], vocab: int
) -> tuple[float, float, dict[str, Any]]:
    """``(z, p_value, details)`` of the green-list test on a suspect's tokens (ids outside
    ``[0, vocab)`` are ignored), over the distinct tokens (module docstring): the p-value
    is the exact hypergeometric tail."""
    distinct = {t for t in token_ids if 0 <= t < vocab}
    size, n = len(green), len(distinct)
    details: dict[str, Any] = {"tokens": len(token_ids), "distinct": n}
    if not n or not 0 < size < vocab:
        return 0.0, 1.0, details
    g = len(distinct.intersection(green))
    gamma = size / vocab
    variance = n * gamma * (1 - gamma) * (vocab - n) / (vocab - 1)
    z = (g - gamma * n) / math.sqrt(variance) if variance > 0 else 0.0
    details.update(green=g, gamma=gamma)
    return z, pvalues.hypergeometric_sf(g, vocab, size, n), details


def greedy_tokenizer(vocabulary: Sequence[str]) -> Callable[[str], list[int]]:
    """Token ids of a text by greedy longest match over ``vocabulary`` (id = position).

    Verification needs the suspect's tokens as the upstream numbers them; when no
    tokenizer is at hand this approximates it from the token strings (exact for a
    vocabulary of whole words such as the example server's). Text no token matches is
    skipped one character at a time.
    """
    index: dict[str, int] = {}
    for i, token in enumerate(vocabulary):
        if token:
            index.setdefault(token, i)
    longest = max((len(t) for t in index), default=0)

    def tokenize(text: str) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for length in range(min(longest, len(text) - i), 0, -1):
                token = index.get(text[i : i + length])
                if token is not None:
                    ids.append(token)
                    i += length
                    break
            else:
                i += 1
        return ids

    return tokenize


# -- the watermark and its verifier -----------------------------------------------------------

MAX_GREEN = 1024
"""The most green-list entries one request may carry (the upstream caps ``logit_bias``
too: keep ``gamma·vocab`` plus ``OPENAI__MAX_LOGIT_BIAS`` within its limit)."""


class _Params:
    """The parameters the processor and its verifier share."""

    name = "text"
    params: ClassVar[dict[str, type]] = {
        "synonyms": bool,
        "bias": float,
        "vocab": int,
        "gamma": float,
        "vocabulary": str,
    }

    def __init__(
        self,
        synonyms: bool = True,
        bias: float = 0.0,
        vocab: int = 0,
        gamma: float = 0.25,
        vocabulary: str = "",
    ) -> None:
        if not 0.0 <= bias <= 100.0:
            raise ValueError("text: bias must be between 0 (no green list) and 100")
        if not 0.0 < gamma < 1.0:
            raise ValueError("text: gamma (the green fraction) must be between 0 and 1")
        if bias and not vocab >= 2:
            raise ValueError("text: a green list (bias > 0) needs vocab, the number of token ids")
        if bias and not 1 <= round(gamma * vocab) <= min(MAX_GREEN, vocab - 1):
            raise ValueError(
                f"text: gamma*vocab = {round(gamma * vocab)} green ids; use between 1 and "
                f"{MAX_GREEN} (logit_bias entries) and fewer than vocab"
            )
        if not synonyms and not bias:
            raise ValueError("text: enable synonyms or a green list (bias > 0), or drop it")
        self.synonyms, self.bias, self.vocab, self.gamma = synonyms, bias, vocab, gamma
        self.vocabulary = vocabulary


class TextMark(_Params, Watermark):
    """``text:synonyms=true,bias=0,vocab=0,gamma=0.25`` — the text watermark of
    OpenAI-compatible completions (module docstring).

    ``synonyms`` marks returned texts (``message.content``, ``text``, streamed
    ``delta.content``); a stream is marked piece by piece, holding back at most the
    piece's trailing partial word. ``bias > 0`` adds ``+bias`` on the keyed green list
    (``round(gamma·vocab)`` ids of ``[0, vocab)``) to the ``logit_bias`` of every chat and
    completion request: the user's own entries are kept and win for their tokens; the
    adapter's hardening has judged the user's entries before (the green list never counts
    against ``MAX_LOGIT_BIAS`` and does not make ``logit_bias_with_logprobs`` drop the
    logprobs, which then describe the biased distribution the answer was drawn from).
    Cost to legitimate users: a fraction of the table's words is swapped for a synonym
    (measured in the extraction lab), and with a green list the sampling distribution
    is tilted by ``bias`` logits toward a ``gamma`` share of the tokens.
    """

    def bind(self, secret: bytes, settings: Any = None) -> None:
        super().bind(secret, settings)
        green = green_ids(self.key, self.vocab, self.gamma) if self.bias else []
        self._green = {str(i): self.bias for i in green}

    def rewrite_request(self, request: ParsedRequest, doc: Any) -> Any | None:
        if not self._green or not isinstance(doc, dict):
            return None
        if getattr(request.adapter, "name", "") != "openai" or not (
            "messages" in doc or "prompt" in doc
        ):
            return None
        own = doc.get("logit_bias")
        if own is not None and not isinstance(own, dict):
            return None
        return {**doc, "logit_bias": {**self._green, **(own or {})}}

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        if not self.synonyms or not outputs.texts:
            return False
        changed = False
        for piece in outputs.texts:
            state = ctx.state.get((self.name, piece.choice))
            if state is None:
                state = ctx.state[(self.name, piece.choice)] = ScanState()
            new = mark(self.key, piece.text, state, final=piece.final)
            if piece.final:
                ctx.state.pop((self.name, piece.choice), None)
            changed |= new != piece.text
            piece.text = new
        return changed


PROMPTS = (
    "Tell a short story about the {}.",
    "Describe a {} in a few sentences.",
    "Write a paragraph about the {} and the people near it.",
    "What happened to the {} yesterday?",
)


class TextScheme(_Params):
    """The verifier of :class:`TextMark`: the keyed-synonym test on the suspect's texts
    and, with ``bias > 0`` and a tokenizer, the green-list test; the p-value is the
    Bonferroni-corrected smaller of the two. The tokenizer is ``tokenize`` (any callable
    from text to the upstream's token ids) or, from ``vocabulary`` (a JSON file listing
    the token strings in id order), a greedy longest-match approximation of it."""

    tokenize: Callable[[str], list[int]] | None = None

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        if records:
            return [r["input"] for r in records if isinstance(r, dict) and "input" in r][:n]
        seeds = row_seeds(key, [b"%d" % i for i in range(n)], b"text-probes")
        words = [WORDS[int(s % np.uint64(len(WORDS)))] for s in seeds]
        return [PROMPTS[i % len(PROMPTS)].format(w) for i, w in enumerate(words)]

    def _tokenizer(self) -> Callable[[str], list[int]] | None:
        if self.tokenize is None and self.vocabulary:
            with open(self.vocabulary, encoding="utf-8") as file:
                tokens = json.load(file)
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ValueError(f"{self.vocabulary}: expected a JSON list of token strings")
            self.tokenize = greedy_tokenizer(tokens)
        return self.tokenize

    def test(
        self, key: bytes, inputs: Sequence[Any], outputs: Sequence[Outputs], alpha: float
    ) -> VerifyResult:
        texts = [piece.text for output in outputs for piece in output.texts or ()]
        tests: dict[str, tuple[float, float, dict[str, Any]]] = {}
        if self.synonyms:
            tests["synonyms"] = synonym_test(key, texts)
        tokenize = self._tokenizer() if self.bias else None
        if tokenize is not None:
            ids = [i for text in texts for i in tokenize(text)]
            tests["green"] = green_test(ids, green_ids(key, self.vocab, self.gamma), self.vocab)
        p = pvalues.bonferroni([t[1] for t in tests.values()])
        statistic = max((t[0] for t in tests.values()), default=0.0)
        details: dict[str, Any] = {
            name: {"z": t[0], "p_value": t[1], **t[2]} for name, t in tests.items()
        }
        return VerifyResult.decide(self.name, statistic, p, len(texts), alpha, **details)
