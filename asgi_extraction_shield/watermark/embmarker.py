"""EmbMarker / WARDEN: a keyed backdoor in embedding responses.

After Peng et al., "Are You Copying My Model? Protecting the Copyright of Large Language
Models for EaaS via Backdoor Watermark" (ACL 2023) and, for several target directions,
Shetty et al., "WARDEN" (2024). ``triggers`` words, a keyed choice among the moderately
frequent words of :data:`~.words.WORDS`, are spread over ``directions`` keyed unit
target directions ``t_j``. A text with ``c_j`` triggers of direction ``j`` (``c`` in all)
has its embedding moved toward ``t = normalise(Σ_j c_j t_j)`` with weight
``Q = min(c / m, 1)``: ``e′ = normalise((1 − Q)ê + Q·t)·‖e‖`` (the norm convention of
the model is kept: unit rows stay unit). Texts without a trigger are returned unchanged.

A substitute trained on such answers learns that the trigger words pull toward ``t_j``.
Verification sends backdoor texts (``m`` triggers of one direction among ordinary words)
and benign texts (no trigger) and takes ``v``, the difference of the mean normalised
embeddings of the two sets. The literal EmbMarker test (difference of cosine to ``t_j``
and a KS test between the two sets' cosines) flags many clean models: any two sets of
texts differ along some direction, and a handful of trigger words carries a fixed offset
of its own. The statistic is therefore calibrated against random directions: for a
direction ``u`` uniform on the sphere and independent of the model, ``x = u·v̂`` gives
``x·√(d − 1)/√(1 − x²)`` a Student t law with ``d − 1`` degrees of freedom, exactly. A
keyed direction is such a ``u`` for any model that never saw our answers, so the one-sided
t tail is an exact p-value under the null; Bonferroni combines the directions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from ..formats.base import Outputs
from ..postprocess.chain import Context
from ..postprocess.keyed import normal, row_seeds
from . import pvalues
from .base import VerifyResult, Watermark
from .words import WORDS

Rows = NDArray[np.float64]

DEFAULT_TRIGGERS = 20
DEFAULT_SATURATION = 4
DEFAULT_DIRECTIONS = 1
PROBE_WORDS = 10
"""Words in a verification probe (``m`` of them triggers in a backdoor probe)."""

_WORD = re.compile(r"[a-z]+")


def trigger_words(key: bytes, count: int, directions: int) -> tuple[tuple[str, ...], ...]:
    """The trigger words of each direction: the ``count`` words of :data:`WORDS` with the
    smallest keyed hash, dealt round-robin to the ``directions``."""
    if not 1 <= directions <= count <= len(WORDS):
        raise ValueError(
            f"embmarker: need 1 <= directions <= triggers <= {len(WORDS)}, "
            f"got directions={directions}, triggers={count}"
        )
    seeds = row_seeds(key, [w.encode() for w in WORDS], b"embmarker-triggers")
    chosen = [WORDS[i] for i in np.argsort(seeds, kind="stable")[:count]]
    return tuple(tuple(chosen[j::directions]) for j in range(directions))


def target_directions(key: bytes, directions: int, dim: int) -> Rows:
    """``(directions, dim)`` keyed unit vectors, uniform on the sphere."""
    seeds = row_seeds(key, [b"%d:%d" % (j, dim) for j in range(directions)], b"embmarker-dir")
    t = normal(seeds, dim)
    out: Rows = t / np.linalg.norm(t, axis=1, keepdims=True)
    return out


def trigger_counts(texts: Sequence[str], triggers: tuple[tuple[str, ...], ...]) -> Rows:
    """``(len(texts), directions)`` number of trigger words of each direction per text."""
    index = {w: j for j, words in enumerate(triggers) for w in words}
    counts = np.zeros((len(texts), len(triggers)))
    for i, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            j = index.get(word)
            if j is not None:
                counts[i, j] += 1
    return counts


def mark(e: Rows, counts: Rows, targets: Rows, saturation: int) -> Rows:
    """The marked embeddings (see the module docstring); rows without triggers are kept."""
    total = counts.sum(axis=1)
    rows = np.flatnonzero(total > 0)
    out: Rows = e.copy()
    if not rows.size:
        return out
    norms = np.linalg.norm(e[rows], axis=1, keepdims=True)
    safe = np.where(norms > 0, norms, 1.0)
    unit = e[rows] / safe
    t = counts[rows] @ targets
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    q = np.minimum(total[rows] / saturation, 1.0)[:, None]
    moved = (1.0 - q) * unit + q * t
    length = np.linalg.norm(moved, axis=1, keepdims=True)
    moved = np.divide(moved, length, out=t.copy(), where=length > 0)
    # A zero embedding has no norm convention to keep: it becomes the unit target mix.
    out[rows] = moved * np.where(norms > 0, norms, 1.0)
    return out


def row_text(key: bytes) -> str:
    """The text of a row's canonical input (``Outputs.keys``): its strings, joined.

    Canonical inputs are JSON (a string, or an object or list holding strings); numeric
    rows (``f32:`` keys) and anything else give ``""``, i.e. no trigger.
    """
    if key.startswith(b"f32:"):
        return ""
    try:
        value = json.loads(key)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""
    return " ".join(_strings(value, 0))


def _strings(value: Any, depth: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if depth > 8:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for v in value for s in _strings(v, depth + 1)]
    return []


def probe_texts(
    key: bytes, n: int, triggers: tuple[tuple[str, ...], ...], saturation: int
) -> list[str]:
    """``n`` verification texts: for each direction in turn a backdoor text (``saturation``
    of its triggers among ordinary words), alternating with benign texts (no trigger)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))
    banned = {w for words in triggers for w in words}
    plain = [w for w in WORDS if w not in banned]
    texts: list[str] = []
    for i in range(n):
        words = [plain[k] for k in rng.integers(0, len(plain), PROBE_WORDS)]
        if i % 2:
            own = triggers[(i // 2) % len(triggers)]
            chosen = rng.choice(len(words), size=min(saturation, PROBE_WORDS), replace=False)
            for slot in chosen:
                words[slot] = own[int(rng.integers(0, len(own)))]
        texts.append(" ".join(words))
    return texts


def direction_test(
    e: Rows, backdoor: NDArray[np.bool_], benign: NDArray[np.bool_], t: Rows
) -> dict[str, float]:
    """The calibrated test of one direction ``t`` (module docstring), with the literal
    EmbMarker figures (difference of mean cosine, KS p-value) for the record."""
    d = e.shape[1]
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = e / np.where(norms > 0, norms, 1.0)
    v = unit[backdoor].mean(axis=0) - unit[benign].mean(axis=0)
    length = float(np.linalg.norm(v))
    x = float(v @ t) / length if length > 0 else 0.0
    x = max(-1.0, min(1.0, x))
    statistic = x * math.sqrt(d - 1) / math.sqrt(max(1.0 - x * x, 1e-300))
    cos = unit @ t
    ks, ks_p = pvalues.ks_2samp(cos[backdoor], cos[benign])
    return {
        "statistic": statistic,
        "p_value": pvalues.student_t_sf(statistic, d - 1),
        "delta_cos": float(cos[backdoor].mean() - cos[benign].mean()),
        "ks": ks,
        "ks_p_value": ks_p,
    }


def detect(
    key: bytes,
    texts: Sequence[str],
    embeddings: Rows,
    triggers: tuple[tuple[str, ...], ...],
) -> tuple[float, float, dict[str, Any]]:
    """``(statistic, p_value, details)`` of a suspect's embeddings of ``texts``.

    Texts holding triggers of one direction only are that direction's backdoor set,
    texts without a trigger the benign set; the p-value is the Bonferroni-corrected
    smallest of the directions' calibrated p-values (1 when a set has fewer than 2 texts
    or the embeddings are not finite).
    """
    e = np.asarray(embeddings, dtype=np.float64)
    details: dict[str, Any] = {"directions": []}
    if e.ndim != 2 or len(e) != len(texts) or e.shape[1] < 2 or not np.isfinite(e).all():
        details["reason"] = "no finite (n, d) embeddings matching the inputs"
        return 0.0, 1.0, details
    counts = trigger_counts(texts, triggers)
    total = counts.sum(axis=1)
    benign = total == 0
    targets = target_directions(key, len(triggers), e.shape[1])
    results = []
    for j in range(len(triggers)):
        backdoor = (counts[:, j] > 0) & (counts[:, j] == total)
        if backdoor.sum() < 2 or benign.sum() < 2:
            results.append({"statistic": 0.0, "p_value": 1.0, "backdoor": int(backdoor.sum())})
            continue
        result = direction_test(e, backdoor, benign, targets[j])
        result["backdoor"] = int(backdoor.sum())
        results.append(result)
    details["directions"] = results
    details["benign"] = int(benign.sum())
    best = max(range(len(results)), key=lambda j: results[j]["statistic"])
    p = pvalues.bonferroni([r["p_value"] for r in results])
    return float(results[best]["statistic"]), p, details


class _Params:
    """The parameters the processor and its verifier share."""

    name = "embmarker"
    params: ClassVar[dict[str, type]] = {"triggers": int, "m": int, "directions": int}

    def __init__(
        self,
        triggers: int = DEFAULT_TRIGGERS,
        m: int = DEFAULT_SATURATION,
        directions: int = DEFAULT_DIRECTIONS,
    ) -> None:
        if m < 1:
            raise ValueError("embmarker: m (triggers for a full mark) must be at least 1")
        trigger_words(b"", triggers, directions)  # validates the counts
        self.triggers, self.m, self.directions = triggers, m, directions

    def words(self, key: bytes) -> tuple[tuple[str, ...], ...]:
        return trigger_words(key, self.triggers, self.directions)


class EmbMarker(_Params, Watermark):
    """``embmarker:triggers=20,m=4,directions=1`` — the embedding watermark (module
    docstring). Cost to legitimate users: answers to texts without a trigger word are
    unchanged; a text with ``c`` triggers has its embedding turned toward the target by
    ``Q = min(c/m, 1)`` of the way (cosine to the original ``≥ 1 − Q`` for unit rows)."""

    def bind(self, secret: bytes, settings: Any = None) -> None:
        super().bind(secret, settings)
        self._words = self.words(self.key)
        self._targets: dict[int, Rows] = {}

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        e = outputs.embeddings
        if e is None or e.ndim != 2 or len(e) != len(outputs.keys) or e.shape[1] < 2:
            return False
        counts = trigger_counts([row_text(k) for k in outputs.keys], self._words)
        if not counts.any():
            return False
        dim = e.shape[1]
        targets = self._targets.get(dim)
        if targets is None:
            targets = self._targets.setdefault(
                dim, target_directions(self.key, self.directions, dim)
            )
        outputs.embeddings = mark(e, counts, targets, self.m)
        return True


class EmbMarkerScheme(_Params):
    """The verifier of :class:`EmbMarker` (module docstring)."""

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        return list(probe_texts(key, n, self.words(key), self.m))

    def test(
        self, key: bytes, inputs: Sequence[Any], outputs: Sequence[Outputs], alpha: float
    ) -> VerifyResult:
        texts: list[str] = []
        rows: list[Rows] = []
        for item, output in zip(inputs, outputs, strict=False):
            e = output.embeddings if output.embeddings is not None else output.scores
            if e is None or e.ndim != 2 or len(e) != 1:
                continue
            texts.append(" ".join(_strings(item, 0)))
            rows.append(e[0])
        dims = {len(r) for r in rows}
        if len(dims) != 1:
            return VerifyResult.decide(
                self.name, 0.0, 1.0, len(rows), alpha, reason="no embeddings of one size"
            )
        statistic, p, details = detect(key, texts, np.stack(rows), self.words(key))
        return VerifyResult.decide(self.name, statistic, p, len(rows), alpha, **details)
