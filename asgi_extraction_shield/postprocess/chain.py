"""Post-processor chains: ``PERTURBATION=top_k:5,round:3`` and friends.

A chain is a tuple of processors applied in order to the :class:`Outputs` of one
response. Each processor touches the kinds of output it knows (probability rows,
embeddings, token log-probabilities) and leaves the others alone. Syntax: items
separated by commas, ``name`` or ``name:args``; args are ``value`` (the first
parameter) or ``param=value``, and a comma-separated ``param=value`` right after an
item continues it, so ``reverse_sigmoid:beta=1,gamma=0.2`` is one item.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, overload

import numpy as np
from numpy.typing import NDArray

from ..formats.base import Outputs, ParsedRequest
from . import perturb
from .keyed import row_seeds


@dataclass(slots=True)
class Context:
    """What a processor may key its randomness on: the secret-derived key, the rows'
    canonical inputs (in ``Outputs.keys``) and the identity's hashed key; ``request`` is
    what the shield understood of the request (its raw ``inputs``, ``features`` and
    ``texts``), for watermarks that key on the input itself or record it. ``state`` is
    the processors' scratch space for one response (a stream's pieces share it)."""

    key: bytes
    identity: str = ""
    request: ParsedRequest | None = None
    state: dict[Any, Any] = field(default_factory=dict)

    def seeds(self, outputs: Outputs, salt: bytes) -> NDArray[np.uint64]:
        """One seed per row of ``outputs``, separated by ``salt`` (one per processor)."""
        return row_seeds(self.key, outputs.keys, salt)


class Processor:
    """Base of the built-in processors. ``apply`` returns whether it changed anything."""

    name: ClassVar[str]
    params: ClassVar[dict[str, type]] = {}

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ":".join(f"{k}={getattr(self, k)}" for k in self.params)
        return f"{self.name}:{args}" if args else self.name


def _changed(before: NDArray[np.float64], after: NDArray[np.float64]) -> bool:
    if before.shape != after.shape:
        return True
    if before.size <= perturb.SMALL:  # one answer's rows: Python compares them faster than numpy
        return bool(before.tolist() != after.tolist())
    return bool((before != after).any())


class ProbabilityProcessor(Processor):
    """A processor of probability rows only: subclasses give the new rows."""

    def rows(self, p: NDArray[np.float64], outputs: Outputs, ctx: Context) -> NDArray[np.float64]:
        raise NotImplementedError

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        p = outputs.probabilities
        if p is None:
            return False
        outputs.probabilities = self.rows(p, outputs, ctx)
        return _changed(p, outputs.probabilities)


class Round(Processor):
    """Round probabilities (sums kept), scores and embeddings to ``decimals``.

    Token logprobs are rounded by :class:`LogprobHygiene`.
    """

    name = "round"
    params: ClassVar[dict[str, type]] = {"decimals": int}

    def __init__(self, decimals: int = 3) -> None:
        if not 0 <= decimals <= 12:
            raise ValueError("round: decimals must be between 0 and 12")
        self.decimals = decimals

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        changed = False
        if outputs.probabilities is not None:
            new = perturb.round_simplex(outputs.probabilities, self.decimals)
            changed |= _changed(outputs.probabilities, new)
            outputs.probabilities = new
        for name in ("scores", "embeddings"):
            values = getattr(outputs, name)
            if values is not None:
                new = perturb.round_values(values, self.decimals)
                changed |= _changed(values, new)
                setattr(outputs, name, new)
        return changed


class TopK(ProbabilityProcessor):
    name = "top_k"
    params: ClassVar[dict[str, type]] = {"k": int, "renormalize": bool}

    def __init__(self, k: int = 1, renormalize: bool = True) -> None:
        if k < 1:
            raise ValueError("top_k: k must be at least 1")
        self.k, self.renormalize = k, renormalize

    def rows(self, p: NDArray[np.float64], outputs: Outputs, ctx: Context) -> NDArray[np.float64]:
        return perturb.top_k(p, self.k, self.renormalize)


class LabelOnly(ProbabilityProcessor):
    name = "label_only"

    def rows(self, p: NDArray[np.float64], outputs: Outputs, ctx: Context) -> NDArray[np.float64]:
        return perturb.label_only(p)


class ReverseSigmoid(ProbabilityProcessor):
    name = "reverse_sigmoid"
    params: ClassVar[dict[str, type]] = {"beta": float, "gamma": float, "guard_top1": bool}

    def __init__(self, beta: float = 1.0, gamma: float = 0.1, guard_top1: bool = False) -> None:
        if beta < 0 or gamma <= 0:
            raise ValueError("reverse_sigmoid: beta must be >= 0 and gamma > 0")
        self.beta, self.gamma, self.guard_top1 = beta, gamma, guard_top1

    def rows(self, p: NDArray[np.float64], outputs: Outputs, ctx: Context) -> NDArray[np.float64]:
        return perturb.reverse_sigmoid(p, self.beta, self.gamma, self.guard_top1)


class Poison(ProbabilityProcessor):
    name = "poison"
    params: ClassVar[dict[str, type]] = {"alpha": float, "epsilon": float}

    def __init__(self, alpha: float = 0.5, epsilon: float = 0.5) -> None:
        # alpha = 1 would land exactly on the edge midpoint, a tie with the keyed class.
        if not 0 <= alpha < 1 or not 0 <= epsilon <= 2:
            raise ValueError("poison: alpha must be in [0, 1) and epsilon in [0, 2]")
        self.alpha, self.epsilon = alpha, epsilon

    def rows(self, p: NDArray[np.float64], outputs: Outputs, ctx: Context) -> NDArray[np.float64]:
        if p.shape[1] < 2:
            return p
        return perturb.poison(p, ctx.seeds(outputs, b"poison"), self.alpha, self.epsilon)


class Misinformation(ProbabilityProcessor):
    name = "misinformation"
    params: ClassVar[dict[str, type]] = {"tau": float, "nu": float}

    def __init__(self, tau: float = 0.5, nu: float = 10.0) -> None:
        if not 0 <= tau <= 1 or nu <= 0:
            raise ValueError("misinformation: tau must be in [0, 1] and nu > 0")
        self.tau, self.nu = tau, nu

    def rows(self, p: NDArray[np.float64], outputs: Outputs, ctx: Context) -> NDArray[np.float64]:
        return perturb.misinformation(p, ctx.seeds(outputs, b"misinformation"), self.tau, self.nu)


class EmbeddingNoise(Processor):
    name = "embedding_noise"
    params: ClassVar[dict[str, type]] = {"epsilon": float, "per_identity": bool}

    def __init__(self, epsilon: float = 0.05, per_identity: bool = False) -> None:
        if not 0 <= epsilon <= 1:
            raise ValueError("embedding_noise: epsilon must be in [0, 1]")
        self.epsilon, self.per_identity = epsilon, per_identity

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        if outputs.embeddings is None or self.epsilon == 0:
            return False
        salt = b"embedding_noise" + (ctx.identity.encode() if self.per_identity else b"")
        e = outputs.embeddings
        outputs.embeddings = perturb.embedding_noise(e, ctx.seeds(outputs, salt), self.epsilon)
        return _changed(e, outputs.embeddings)


class LogprobHygiene(Processor):
    """Token log-probabilities: at most ``max_top`` alternatives, rounded to ``decimals``.

    Fewer and coarser logprobs cut the information the logprob-based attacks
    (Carlini et al., 2024) recover per query.
    """

    name = "logprob_hygiene"
    params: ClassVar[dict[str, type]] = {"max_top": int, "decimals": int}

    def __init__(self, max_top: int = 5, decimals: int = 2) -> None:
        if max_top < 0 or not 0 <= decimals <= 12:
            raise ValueError("logprob_hygiene: max_top >= 0 and decimals in [0, 12]")
        self.max_top, self.decimals = max_top, decimals

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        if not outputs.tokens:
            return False
        changed = False
        for seq in outputs.tokens:
            rounded = [round(v, self.decimals) for v in seq.logprobs]
            changed |= rounded != seq.logprobs
            seq.logprobs = rounded
            for i, alternatives in enumerate(seq.top):
                kept = [(t, round(v, self.decimals)) for t, v in alternatives[: self.max_top]]
                changed |= kept != alternatives
                seq.top[i] = kept
        return changed


PROCESSORS: dict[str, type[Processor]] = {
    cls.name: cls
    for cls in (
        Round,
        TopK,
        LabelOnly,
        ReverseSigmoid,
        Poison,
        Misinformation,
        EmbeddingNoise,
        LogprobHygiene,
    )
}

Chain = tuple[Processor, ...]

P = TypeVar("P")


@overload
def parse_chain(text: str) -> Chain: ...


@overload
def parse_chain(text: str, registry: Mapping[str, type[P]]) -> tuple[P, ...]: ...


def parse_chain(text: str, registry: Mapping[str, type[Any]] | None = None) -> tuple[Any, ...]:
    """Parse a chain spec of the processors in ``registry`` (default: the perturbations);
    ``""`` or ``none`` is the empty chain. Raises ``ValueError``."""
    known: Mapping[str, type[Any]] = PROCESSORS if registry is None else registry
    items: list[tuple[str, list[str]]] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        if "=" in raw and ":" not in raw.split("=", 1)[0] and raw.split("=", 1)[0] not in known:
            if not items:
                raise ValueError(f"{raw!r} is a parameter without a processor before it")
            items[-1][1].append(raw)
            continue
        name, _, args = raw.partition(":")
        items.append((name.strip().lower(), [a.strip() for a in args.split(":")] if args else []))
    if len(items) == 1 and items[0][0] == "none" and not items[0][1]:
        return ()
    return tuple(_build(name, args, known) for name, args in items)


def _build(name: str, args: list[str], registry: Mapping[str, type[Any]]) -> Any:
    cls = registry.get(name)
    if cls is None:
        raise ValueError(
            f"{name!r} is not a post-processor: expected one of {', '.join(sorted(registry))} "
            "(or 'none')"
        )
    kwargs: dict[str, Any] = {}
    positional = list(cls.params)
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not eq:
            if i >= len(positional):
                raise ValueError(
                    f"{name}: too many values; parameters are {', '.join(positional) or 'none'}"
                )
            key, value = positional[i], arg
        key = key.strip()
        if key in kwargs:
            raise ValueError(f"{name}: {key} is given twice")
        if key not in cls.params:
            raise ValueError(
                f"{name}: unknown parameter {key!r}; expected {', '.join(positional) or 'none'}"
            )
        kwargs[key] = _convert(name, key, value.strip(), cls.params[key])
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


_CONVERTERS: dict[type, Callable[[str], Any]] = {
    int: int,
    float: float,
    bool: lambda v: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[
        v.lower()
    ],
}


def _convert(name: str, key: str, value: str, kind: type) -> Any:
    try:
        converted = _CONVERTERS[kind](value)
    except (ValueError, KeyError):
        raise ValueError(f"{name}: {key}={value!r} is not a valid {kind.__name__}") from None
    if kind is float and not np.isfinite(converted):
        raise ValueError(f"{name}: {key}={value!r} must be finite")
    return converted


def describe_chain(chain: Chain) -> str:
    return ",".join(repr(p) for p in chain) or "none"
