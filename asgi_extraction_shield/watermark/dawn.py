"""DAWN: keyed wrong answers over keyed regions of input space (after Szyller et al.,
"DAWN: Dynamic Adversarial Watermarking of Neural Networks", ACM MM 2021).

Every input falls in a keyed *region* (:func:`~.projection.cells`: a cell of a keyed,
offset grid over ``dims`` keyed projections of its direction, ``width`` wide). A keyed
fraction ``rate`` of regions is marked. In a marked region, each of the model's answers
``a`` has its own keyed label ``c(region, a)``, uniform over the classes and independent
of everything else: the *unit* of a label is the region and the model's answer there.
Queries in a marked region are answered ``c``: a label answer becomes ``c``; in a
probability row the top class and ``c`` swap values, so the row stays the same
distribution, with ``c`` on top. The marked queries are recorded with the model's own
answer (:class:`~.records.RecordStore`, ``WATERMARK_RECORDS_PATH``).

Why regions: a wrong answer on one exact input does not survive in a substitute that
generalises (its correctly answered neighbours outvote it); a region answered alike is
learned like any other part of the decision function. Why units: the p-value of a test
that draws one keyed label per region cannot fall below ``K^-R`` for ``R`` regions, and
a thief of 2,000 queries touches few marked regions (9 on the lab's digits at
``rate=0.02``); a marked region holds several of the model's classes, each a contiguous
piece of input space that a substitute learns as a whole, so a label per (region,
answer) multiplies the keyed evidence (22 units in those 9 regions) at the same cost.
Inputs that are neither numeric rows nor texts are marked one by one (their canonical
bytes are the region).

Verification asks the suspect the recorded queries and scores, in each marked unit (the
records give the model's answer; a record without it, as older versions wrote, has its
region as unit), the unit's keyed label ``c``: by the number of the suspect's answers
that are ``c`` (label answers), or by the rank of ``c`` among the classes by the
suspect's mean probability there (probability answers: a soft copy may move ``c`` up
without making it the top). For a model that never saw the marks, each unit's ``c`` is
a uniform class independent of its answers, so given the suspect's answers the sum of
scores has a known null distribution: a sum over units of "the score of a uniformly
chosen class", whose tail :func:`~.stats.keyed_choice_sf` computes exactly by
convolution, whatever the suspect's own label distribution. Answers are never treated as
independent: all answers of a unit share one keyed label.

Cost to legitimate users: a fraction ``rate`` of regions, so about ``rate`` of answers
(``rate·(1 − 1/K)`` change: a unit's label is the model's own answer 1/K of the time),
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
from .pvalues import keyed_choice_sf
from .records import RecordStore

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
        dims: int = 3,
        width: float = 0.4,
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
        self.answers: dict[bytes, int] = {}
        """The marked model's own answer to each recorded query (from the records), by
        canonical input: with the region, the unit of a keyed label."""

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
        self,
        key: bytes,
        regions: Sequence[bytes],
        n_classes: int,
        answers: Sequence[int | None] | None = None,
    ) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
        """Whether each region is marked, and the keyed label of each query (see
        :meth:`marked` and :meth:`labels`)."""
        return self.marked(key, regions), self.labels(key, regions, n_classes, answers)

    def marked(self, key: bytes, regions: Sequence[bytes]) -> NDArray[np.bool_]:
        """Whether each region is marked (a keyed draw at ``rate``)."""
        marked: NDArray[np.bool_] = (
            row_seeds(key, regions, b"mark").astype(np.float64) < self.rate * _TWO64
        )
        return marked

    def labels(
        self,
        key: bytes,
        regions: Sequence[bytes],
        n_classes: int,
        answers: Sequence[int | None] | None = None,
    ) -> NDArray[np.int64]:
        """The keyed label of each query: drawn for its *unit*, the region and the model's
        own answer there (``answers[i]``; a query whose answer is unknown, ``None``, has the
        region alone as its unit)."""
        seeds = row_seeds(key, units(regions, answers), b"label")
        labels: NDArray[np.int64] = (seeds % np.uint64(n_classes)).astype(np.int64)
        return labels

    # -- marking ------------------------------------------------------------------------------

    def apply(self, outputs: Outputs, ctx: Context) -> bool:
        request = ctx.request
        if request is None or request.keys != outputs.keys or not outputs.keys:
            return False
        p, given = outputs.probabilities, outputs.labels
        n_classes = p.shape[1] if p is not None else self.classes
        if n_classes < 2 or (p is None and given is None):
            return False
        regions = self.regions(self.key, request.inputs)
        marked = self.marked(self.key, regions)
        if not marked.any():
            return False
        rows = np.flatnonzero(marked)
        tops = np.argmax(p, axis=1) if p is not None else np.asarray(given)
        answers = tops.astype(np.int64).tolist()
        # Labels of the marked queries only: most batches have none, or few.
        labels = np.zeros(len(regions), dtype=np.int64)
        labels[rows] = self.labels(
            self.key, [regions[i] for i in rows], n_classes, [answers[i] for i in rows]
        )
        if p is not None:
            p = p.copy()
            top, c = tops[rows], labels[rows]
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
                (
                    request.keys[i],
                    {
                        "input": request.inputs[i],
                        "label": int(labels[i]),
                        "answer": int(answers[i]),
                        "identity": ctx.identity,
                        "time": now,
                    },
                )
                for i in rows.tolist()
            ),
        )
        return True

    # -- verification -------------------------------------------------------------------------

    def probes(self, key: bytes, n: int, records: Sequence[dict[str, Any]]) -> list[Any]:
        inputs: list[Any] = []
        seen: set[bytes] = set()
        self.answers = {}
        for record in records:
            item = record["input"]
            k = canonical(item)
            answer = record.get("answer")
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 2**31:
                self.answers.setdefault(k, answer)
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
        n_classes = self.classes or _classes_of(outputs)
        found = _answer_rows(inputs, outputs, n_classes) if n_classes >= 2 else None
        if found is None:
            return VerifyResult.decide(self.name, 0.0, 1.0, 0, alpha, reason="no answers")
        index, rows, kind = found
        probed = [inputs[i] for i in index]
        regions = self.regions(key, probed)
        answers = [self.answers.get(canonical(item)) for item in probed]
        marked, labels = self.marks(key, regions, n_classes, answers)
        unit_of = units(regions, answers)
        hits = np.flatnonzero(marked).tolist()
        sums: dict[bytes, NDArray[np.float64]] = {}
        keyed: dict[bytes, int] = {}
        for j in hits:
            unit = unit_of[j]
            sums[unit] = sums.get(unit, 0.0) + rows[j]
            keyed[unit] = int(labels[j])
        # Each unit's score of each class: its answers' votes, or the rank of the class by
        # the unit's mean probability. Any table works: the null draws the keyed class.
        tables = [
            (_ranks(total) if kind == "probabilities" else np.rint(total)).astype(np.int64)
            for total in sums.values()
        ]
        statistic = sum(int(table[keyed[r]]) for r, table in zip(sums, tables, strict=True))
        agreeing = sum(int(np.argmax(total) == keyed[r]) for r, total in sums.items())
        return VerifyResult.decide(
            self.name,
            statistic,
            keyed_choice_sf(statistic, [table.tolist() for table in tables]),
            int(marked.sum()),
            alpha,
            regions=len({regions[j] for j in hits}),
            units=len(sums),
            answers_known=sum(answers[j] is not None for j in hits),
            units_agreeing=agreeing,
            score="rank of the keyed class" if kind == "probabilities" else "agreeing answers",
            classes=n_classes,
        )


def units(regions: Sequence[bytes], answers: Sequence[int | None] | None) -> list[bytes]:
    """The unit of each query's keyed label: its region and the marked model's answer
    there, or the region alone when the answer is unknown."""
    if answers is None:
        return list(regions)
    return [r if a is None else r + b"/%d" % a for r, a in zip(regions, answers, strict=True)]


def _answer_rows(
    inputs: Sequence[Any], outputs: Sequence[Outputs], n_classes: int
) -> tuple[list[int], NDArray[np.float64], str] | None:
    """The probes answered with a probability row of ``n_classes``, else with a label (as
    one-hot rows; a label outside the classes is a zero row)."""
    found = answered(inputs, outputs, lambda out: out.probabilities)
    if found is not None and found[2].ndim == 2 and found[2].shape[1] == n_classes:
        rows = np.nan_to_num(found[2].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return found[0], rows, "probabilities"
    found = answered(inputs, outputs, _top_label)
    if found is None or found[2].ndim != 1:
        return None
    labels = found[2].astype(np.int64)
    one_hot = np.zeros((len(labels), n_classes))
    valid = (labels >= 0) & (labels < n_classes)
    one_hot[np.flatnonzero(valid), labels[valid]] = 1.0
    return found[0], one_hot, "labels"


def _ranks(values: NDArray[np.float64]) -> NDArray[np.int64]:
    """For each class, the number of classes with a strictly smaller value."""
    ranks: NDArray[np.int64] = (values[None, :] < values[:, None]).sum(axis=1)
    return ranks


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
