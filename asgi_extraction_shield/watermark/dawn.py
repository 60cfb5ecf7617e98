"""DAWN: keyed wrong answers over keyed regions of input space (after Szyller et al.,
"DAWN: Dynamic Adversarial Watermarking of Neural Networks", ACM MM 2021).

Every input falls in a keyed *region* (:func:`~.projection.cells`: a cell of a keyed,
offset grid over ``dims`` keyed projections of its direction, ``width`` wide). A keyed
fraction ``rate`` of regions is marked, and each marked region has a keyed label ``c``,
uniform over the classes and independent of everything else. Queries in a marked region
are answered ``c``: a label answer becomes ``c``; in a probability row the top class and
``c`` swap values, so the row stays the same distribution, with ``c`` on top. The marked
queries are recorded (:class:`~.records.RecordStore`, ``WATERMARK_RECORDS_PATH``).

Why regions: a wrong answer on one exact input does not survive in a substitute that
generalises (its correctly answered neighbours outvote it); a region answered alike is
learned like any other part of the decision function. Inputs that are neither numeric
rows nor texts are marked one by one (their canonical bytes are the region).

Verification asks the suspect the recorded queries, takes in each marked region the
suspect's majority label, and counts the regions where it is ``c``. For a model that
never saw the marks, ``c`` is a uniform class independent of its answers, so each region
agrees with probability exactly 1/K whatever the suspect's own label distribution: the
count is Binomial(regions, 1/K), and the p-value its upper tail.

Cost to legitimate users: a fraction ``rate`` of regions, so about ``rate`` of answers
(``rate·(1 − 1/K)`` change: a marked region's label is the true one 1/K of the time),
changes its top label; answers outside marked regions are untouched.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from ..formats.base import Outputs, canonical
from ..postprocess.chain import Context
from ..postprocess.keyed import row_seeds
from .base import VerifyResult, Watermark
from .projection import answered, cells, directions
from .records import RecordStore
from .stats import binomial_sf

if TYPE_CHECKING:
    from ..settings import ShieldSettings

_TWO64 = float(2**64)


class DAWN(Watermark):
    name = "dawn"
    params: ClassVar[dict[str, type]] = {
        "rate": float,
        "dims": int,
        "width": float,
        "classes": int,
        "keep": int,
    }

    def __init__(
        self,
        rate: float = 0.005,
        dims: int = 4,
        width: float = 0.5,
        classes: int = 0,
        keep: int = 1_000,
    ) -> None:
        if not 0.0 < rate <= 0.5:
            raise ValueError("dawn: rate must be in (0, 0.5]")
        if not 1 <= dims <= 16 or not 0.0 < width <= 10.0:
            raise ValueError("dawn: dims must be in [1, 16] and width in (0, 10]")
        if classes < 0 or classes == 1 or keep < 1:
            raise ValueError("dawn: classes must be 0 (from the answers) or >= 2, keep >= 1")
        self.rate, self.dims, self.width = rate, dims, width
        self.classes, self.keep = classes, keep
        self.store = RecordStore(None, keep)

    def bind(self, secret: bytes, settings: ShieldSettings | None = None) -> None:
        super().bind(secret, settings)
        path = settings.watermark_records_path if settings is not None else ""
        self.store = RecordStore(path or None, self.keep)

    # -- regions ------------------------------------------------------------------------------

    def regions(self, key: bytes, items: Sequence[Any]) -> list[bytes]:
        """The region of each input (its keyed cell, or its canonical bytes)."""
        x = directions(items)
        if x is None:
            return [b"exact:" + canonical(item) for item in items]
        return cells(x, key, self.dims, self.width)

    def marks(
        self, key: bytes, regions: Sequence[bytes], n_classes: int
    ) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
        """Whether each region is marked, and its keyed label."""
        marked = row_seeds(key, regions, b"mark").astype(np.float64) < self.rate * _TWO64
        labels = (row_seeds(key, regions, b"label") % np.uint64(n_classes)).astype(np.int64)
        return marked, labels

    # -- marking ------------------------------------------------------------------------------

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        request = ctx.request
        if request is None or request.keys != outputs.keys or not outputs.keys:
            return False
        p, given = outputs.probabilities, outputs.labels
        n_classes = p.shape[1] if p is not None else self.classes
        if n_classes < 2 or (p is None and given is None):
            return False
        marked, labels = self.marks(self.key, self.regions(self.key, request.inputs), n_classes)
        if not marked.any():
            return False
        rows = np.flatnonzero(marked)
        if p is not None:
            p = p.copy()
            top = np.argmax(p[rows], axis=1)
            c = labels[rows]
            p[rows, top], p[rows, c] = p[rows, c], p[rows, top].copy()
            outputs.probabilities = p
        if given is not None:
            given = given.copy()
            given[rows] = labels[rows]
            outputs.labels = given
        now = time.time()
        self.store.add(
            ctx.identity,
            (
                {
                    "input": request.inputs[i],
                    "label": int(labels[i]),
                    "identity": ctx.identity,
                    "time": now,
                }
                for i in rows.tolist()
            ),
        )
        return True

    # -- verification -------------------------------------------------------------------------

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        inputs: list[Any] = []
        seen: set[bytes] = set()
        for record in records:
            item = record["input"]
            k = canonical(item)
            if k not in seen:
                seen.add(k)
                inputs.append(item)
        if not inputs:
            raise ValueError(
                "dawn verifies on the queries it marked: give the records "
                "(WATERMARK_RECORDS_PATH, or RecordStore.export)"
            )
        return inputs[:n]

    def test(
        self, key: bytes, inputs: Sequence[Any], outputs: Sequence[Outputs], alpha: float
    ) -> VerifyResult:
        found = answered(inputs, outputs, _top_label)
        n_classes = self.classes or _classes_of(outputs)
        if found is None or n_classes < 2:
            return VerifyResult.decide(self.name, 0.0, 1.0, 0, alpha, reason="no labels")
        index, _, answers = found
        items = [inputs[i] for i in index]
        regions = self.regions(key, items)
        marked, labels = self.marks(key, regions, n_classes)
        votes: dict[bytes, Counter[int]] = {}
        keyed: dict[bytes, int] = {}
        for region, is_marked, label, answer in zip(
            regions, marked.tolist(), labels.tolist(), answers.tolist(), strict=True
        ):
            if is_marked:
                votes.setdefault(region, Counter())[int(answer)] += 1
                keyed[region] = label
        agree = sum(int(_majority(counts) == keyed[region]) for region, counts in votes.items())
        chance = 1.0 / n_classes
        p_value = binomial_sf(agree, len(votes), chance)
        return VerifyResult.decide(
            self.name,
            agree,
            p_value,
            sum(sum(c.values()) for c in votes.values()),
            alpha,
            regions=len(votes),
            agreeing=agree,
            chance=chance,
            classes=n_classes,
        )


def _top_label(out: Outputs) -> NDArray[np.int64] | None:
    if out.probabilities is not None and out.probabilities.ndim == 2:
        top: NDArray[np.int64] = np.argmax(out.probabilities, axis=1)
        return top
    if out.labels is not None:
        return out.labels
    return None


def _classes_of(outputs: Sequence[Outputs]) -> int:
    """K: the width of the probability rows, else the largest label + 1."""
    widths = Counter(
        out.probabilities.shape[1]
        for out in outputs
        if out.probabilities is not None and out.probabilities.ndim == 2
    )
    if widths:
        return int(widths.most_common(1)[0][0])
    labels = [
        int(out.labels.max()) for out in outputs if out.labels is not None and out.labels.size
    ]
    return max(labels, default=0) + 1


def _majority(counts: Counter[int]) -> int:
    """The most common label (ties: the smallest, a rule blind to the key)."""
    best = max(counts.values())
    return min(label for label, n in counts.items() if n == best)
