"""What the trackers observe of one request or one answer, in a form other processes replay.

With several workers or replicas each process serves part of a client's requests. To
see the whole client, a process shares what its trackers observed (an :class:`Observation`
per request, an :class:`Answers` per parsed response) and replays what the others shared
into its own trackers, which then compute every signal (PRADA, novelty, coverage,
shares, …) over the client's whole traffic. Rows travel as float32 feature vectors
(``dim`` × 4 bytes a query, projected but not centred: each process centres them on its
own running mean); :func:`pack` and :func:`unpack` are the wire format.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from .tracker import Tracker

Matrix = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Observation:
    """One request of ``identity``: its queries' feature rows, flags and digests."""

    identity: str
    rows: Matrix | None
    text: bool
    distribution: bool
    logit_bias: tuple[str, ...]
    digests: list[int]

    @property
    def queries(self) -> int:
        """What the request counts for in a pool's member shares (1 without rows)."""
        return 1 if self.rows is None else len(self.rows)


@dataclass(frozen=True, slots=True)
class Answers:
    """One response to ``identity``: each answer's top-1/top-2 margin and top-1 class, out
    of ``width`` classes."""

    identity: str
    margins: NDArray[Any]
    labels: NDArray[Any]
    width: int


class SharedObservations(Protocol):
    """Where processes share observations (:class:`~..storage.redis_observations.RedisObservations`)."""

    def record(self, keys: list[str], observation: Observation | Answers) -> None:
        """Queue an observation of the trackers ``keys`` (an identity and its pools)."""
        ...

    def due(self, key: str, tracker: Tracker) -> bool:
        """True when identity ``key`` should exchange observations now."""
        ...

    async def exchange(
        self, trackers: dict[str, Tracker]
    ) -> dict[str, list[Observation | Answers]]:
        """Send the queued observations of ``trackers``, and return what the other
        processes observed of each since it last asked (advancing its ``cursor``)."""
        ...


_QUERIES = struct.Struct("<cBIHHI")  # kind, flags, rows, dim, identity bytes, logit-bias bytes
_ANSWERS = struct.Struct("<cIIH")  # kind, answers, classes, identity bytes
_DISTRIBUTION, _TEXT, _ROWS = 1, 2, 4


def pack(observation: Observation | Answers) -> bytes:
    """The wire form of an observation (compact; float32 rows and margins)."""
    identity = observation.identity.encode()
    if isinstance(observation, Answers):
        n = len(observation.labels)
        return b"".join(
            (
                _ANSWERS.pack(b"a", n, observation.width, len(identity)),
                identity,
                np.asarray(observation.margins, dtype="<f4").tobytes(),
                np.asarray(observation.labels, dtype="<i4").tobytes(),
            )
        )
    rows = observation.rows
    bias = "\0".join(observation.logit_bias).encode()
    flags = (
        (_DISTRIBUTION if observation.distribution else 0)
        | (_TEXT if observation.text else 0)
        | (_ROWS if rows is not None else 0)
    )
    n, dim = (0, 0) if rows is None else rows.shape
    return b"".join(
        (
            _QUERIES.pack(b"q", flags, n, dim, len(identity), len(bias)),
            identity,
            bias,
            np.asarray(observation.digests, dtype="<i8").tobytes(),
            b"" if rows is None else np.asarray(rows, dtype="<f4").tobytes(),
        )
    )


def unpack(data: bytes) -> Observation | Answers:
    """The observation :func:`pack` wrote (``ValueError`` when ``data`` is not one)."""
    if data[:1] == b"a":
        _, n, width, length = _ANSWERS.unpack_from(data)
        at = _ANSWERS.size
        identity = data[at : at + length].decode()
        at += length
        margins = np.frombuffer(data, "<f4", n, at).astype(np.float64)
        labels = np.frombuffer(data, "<i4", n, at + 4 * n).astype(np.int64)
        return Answers(identity, margins, labels, width)
    if data[:1] != b"q":
        raise ValueError("not an observation")
    _, flags, n, dim, length, bias_length = _QUERIES.unpack_from(data)
    at = _QUERIES.size
    identity = data[at : at + length].decode()
    at += length
    bias = data[at : at + bias_length].decode()
    at += bias_length
    digests = np.frombuffer(data, "<i8", n, at).tolist()
    at += 8 * n
    rows = None
    if flags & _ROWS:
        rows = np.frombuffer(data, "<f4", n * dim, at).astype(np.float64).reshape(n, dim)
    return Observation(
        identity,
        rows,
        bool(flags & _TEXT),
        bool(flags & _DISTRIBUTION),
        tuple(bias.split("\0")) if bias else (),
        digests,
    )
