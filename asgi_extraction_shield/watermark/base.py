"""What every watermark shares: its key, its place in the response chain, its verifier.

A watermark has two halves that never meet at run time. The *processor* (a
:class:`Watermark`, a post-processor of the response chain, run after the perturbation
of every policy level) marks answers; the *scheme* (a :class:`Scheme`) later asks a
suspect model chosen questions and tests its answers for the mark. Both derive the same
key from ``SECRET_KEY`` and the watermark's name (:func:`watermark_key`), so the owner
needs nothing but the secret (and, for record-keeping schemes, the exported records)
to verify a suspect.

A scheme's p-value is the probability, for a model that never saw the marked answers,
of a statistic at least as extreme; every scheme calibrates it so that an independent
model gives uniform p-values (and a wrong key detects nothing).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..formats.base import Outputs, ParsedRequest
from ..keys import derive_key
from ..postprocess.chain import Processor

if TYPE_CHECKING:
    from ..settings import ShieldSettings


def watermark_key(secret: bytes | str, name: str) -> bytes:
    """The 32-byte key of the watermark ``name``: a sub-key of ``secret`` for watermarks,
    then keyed BLAKE2b over the name (any length, unlike a personalisation string)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    base = derive_key(raw, "watermark")
    return hashlib.blake2b(name.encode(), key=base, digest_size=32).digest()


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of testing a suspect for one watermark.

    ``statistic`` is the scheme's test statistic (larger: more evidence), ``p_value`` the
    probability of a statistic at least as large for a model independent of the key,
    ``verdict`` is ``p_value < alpha``, ``probes`` the number of answers the test used.
    ``details`` holds scheme-specific numbers (JSON-serialisable).
    """

    scheme: str
    statistic: float
    p_value: float
    verdict: bool
    probes: int
    alpha: float
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decide(
        cls,
        scheme: str,
        statistic: float,
        p_value: float,
        probes: int,
        alpha: float,
        **details: Any,
    ) -> VerifyResult:
        """A result whose verdict is ``p_value < alpha`` (a non-finite p-value is 1)."""
        p = float(p_value) if math.isfinite(p_value) else 1.0
        p = min(max(p, 0.0), 1.0)
        stat = float(statistic) if math.isfinite(statistic) else 0.0
        return cls(scheme, stat, p, p < alpha, int(probes), float(alpha), dict(details))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), default=_plain, allow_nan=False)

    def describe(self) -> str:
        """A few lines for people: the verdict first, then the numbers behind it."""
        verdict = "WATERMARK DETECTED" if self.verdict else "no watermark detected"
        lines = [
            f"{self.scheme}: {verdict}",
            f"  p-value   {self.p_value:.3g} (significance {self.alpha:g})",
            f"  statistic {self.statistic:.4g}",
            f"  probes    {self.probes}",
        ]
        lines += [f"  {key:<9} {_short(value)}" for key, value in self.details.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Watermark(Processor):
    """Base of the watermark processors: a response-chain processor with its own key.

    Built unbound by the chain parser (so ``WATERMARK`` is validated at start-up), then
    :meth:`bind` gives it its key (and the settings it may need, such as where records
    go). :meth:`rewrite_request` lets a watermark change the request the app receives
    (e.g. a keyed ``logit_bias`` for a text model); the default leaves it alone.
    """

    key: bytes = b""

    def bind(self, secret: bytes, settings: ShieldSettings | None = None) -> None:
        self.key = watermark_key(secret, self.name)

    def rewrite_request(self, request: ParsedRequest, doc: Any) -> Any | None:
        """The JSON document to send upstream instead of ``doc``, or ``None`` to keep it.

        ``doc`` is the decoded body as the app would receive it (already hardened by the
        format adapter when it was); ``request`` is what the shield parsed of it.
        """
        return None

    @property
    def rewrites_requests(self) -> bool:
        return type(self).rewrite_request is not Watermark.rewrite_request


@runtime_checkable
class Scheme(Protocol):
    """The verifier of one watermark, keyed by :func:`watermark_key` of its name."""

    @property
    def name(self) -> str: ...

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        """Up to ``n`` inputs to send the suspect, as the API takes them: from ``records``
        (the JSONL objects a record-keeping scheme exported) or made from the key."""
        ...

    def test(
        self, key: bytes, inputs: Sequence[Any], outputs: Sequence[Outputs], alpha: float
    ) -> VerifyResult:
        """Test the suspect's answers: ``outputs[i]`` is its answer to ``inputs[i]``, read
        by the shield's format adapters (an empty :class:`Outputs` when unreadable)."""
        ...


@runtime_checkable
class ReferenceScheme(Scheme, Protocol):
    """A verifier that can also use the owner's own model, *without* the watermark, as a
    reference: its answers to the same probes show what any copy of the model would
    answer anyway, so that only the mark is left to test."""

    def test_against(
        self,
        key: bytes,
        inputs: Sequence[Any],
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs],
        alpha: float,
    ) -> VerifyResult:
        """:meth:`Scheme.test`, given ``reference[i]``, the unwatermarked model's answer to
        ``inputs[i]``."""
        ...
