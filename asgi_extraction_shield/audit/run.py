"""One audit: benign replay, attacks from one and from many identities, benign replay again.

1. ``before``: ``benign_users`` fresh benign identities send the held-out samples and
   part of the pool (``benign`` requests, each user a slice of its own), one per request. Its answers are the *reference*: the audit cannot see the model
   without the shield, so it compares everything to what a fresh, well-behaved client
   was answered. ``repeat``: the same identities send them again at once; the differences
   are the endpoint's own noise, and set the tolerance of every later comparison.
2. Each attack runs from one identity (``single``) and from ``identities`` sybils taking
   turns (``sybil``), with fresh keys, at most ``budget`` queries. Every
   ``canary_every`` queries the asking identity also sends a held-out sample (a canary,
   not counted in the budget and not learned from): an answer that differs from the
   reference beyond the tolerance is a *perturbed-looking* answer.
3. ``after``: the benign identities replay their samples once more.

Substitutes are then trained on each attack's answers and scored on the held-out samples
against the reference answers: classifier thieves by top-1 agreement, an embedding thief
by retrieval agreement (see :mod:`.substitutes`), a text thief by next-word agreement
(see :mod:`.bigram`). Bounded: ``budget``,
``identities``, ``time_limit`` and ``benign`` have hard caps; requests go one at a time.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .attacks import Array, Box, Campaign, jitter, strategies
from .bigram import text_copy_curve
from .client import Client, Reply, parse_headers, resolve_target
from .samples import Samples, load_samples
from .substitutes import (
    embedding_fidelity_curve,
    fidelity_curve,
    text_fidelity_curve,
    word_features,
)
from .text import TEXT_ATTACKS, text_queries
from .wire import EMBEDDINGS, LABELS, TEXT, Answer, Wire, one_hot

NUMERIC_ATTACKS = ("uniform", "jbda", "knockoff", "boundary")
SPLITS = ("single", "sybil")
MAX_BUDGET = 5_000
MAX_IDENTITIES = 100
MAX_TIME_LIMIT = 1_800.0
MAX_BENIGN = 1_000
MAX_CONSECUTIVE_REFUSALS = 100
"""A run that was refused this many times in a row stops: the shield has shut it out."""


@dataclass(frozen=True)
class AuditConfig:
    """What to audit and how hard (every bound is checked by :meth:`check`)."""

    target: str
    format: str
    samples: Path
    budget: int = 300
    identities: int = 10
    time_limit: float = 120.0
    attacks: tuple[str, ...] = ()
    """Empty: every attack of the format (four numeric ones, or replay and augment)."""
    headers: tuple[str, ...] = ("X-API-Key: {key}",)
    extra: dict[str, Any] = field(default_factory=dict)
    allow_remote: bool = False
    holdout: float = 0.3
    benign: int = 100
    benign_users: int = 5
    canary_every: int = 20
    timeout: float = 10.0
    seed: int = 0

    def check(self) -> None:
        bounds: tuple[tuple[str, float, float, float], ...] = (
            ("--budget", self.budget, 10, MAX_BUDGET),
            ("--identities", self.identities, 2, MAX_IDENTITIES),
            ("--time-limit", self.time_limit, 1, MAX_TIME_LIMIT),
            ("--benign", self.benign, 1, MAX_BENIGN),
            ("--benign-users", self.benign_users, 1, MAX_IDENTITIES),
            ("--holdout", self.holdout, 0.05, 0.5),
            ("--canary-every", self.canary_every, 2, 10_000),
            ("--timeout", self.timeout, 0.1, 120),
        )
        for name, value, low, high in bounds:
            if not low <= value <= high:
                raise ConfigurationError(f"{name}={value}: expected a number from {low} to {high}")

    def attack_names(self, numeric: bool) -> tuple[str, ...]:
        known = NUMERIC_ATTACKS if numeric else TEXT_ATTACKS
        names = self.attacks or known
        unknown = [a for a in names if a not in known]
        if unknown:
            raise ConfigurationError(
                f"--attacks {','.join(unknown)}: unknown for --format {self.format}; "
                f"expected some of {','.join(known)}"
            )
        return names


@dataclass
class BenignPass:
    """What the benign identity experienced in one replay of its samples."""

    name: str
    sent: int = 0
    refused: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    compared: int = 0
    changed_top1: int = 0
    max_distance: float = 0.0

    def summary(self) -> dict[str, Any]:
        ms = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {
            "sent": self.sent,
            "refused": self.refused,
            "failed": self.failed,
            "latency_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "latency_ms_p95": round(float(np.percentile(ms, 95)), 2),
            "compared": self.compared,
            "changed_top1": self.changed_top1,
            "max_distance": round(self.max_distance, 6),
        }


@dataclass
class AttackRun:
    """One attack from one split of identities: what it sent, got, and met."""

    attack: str
    split: str
    identities: int
    outcomes: list[str] = field(default_factory=list)
    """Per query sent: ``ok``, ``refused`` (non-2xx), ``failed`` (no answer) or
    ``unread`` (2xx without an answer the format adapter could read)."""
    first_refusal: int | None = None
    refusal_status: int | None = None
    refusal_type: str | None = None
    first_429: int | None = None
    first_perturbed: int | None = None
    canaries: int = 0
    perturbed_canaries: int = 0
    ratelimit_policy: str | None = None
    ratelimit_first: str | None = None
    ratelimit_at_refusal: str | None = None
    retry_after: str | None = None
    stopped: str = "budget"
    seconds: float = 0.0
    fidelity: dict[str, dict[int, float]] | None = None
    mean_cosine: dict[int, float] | None = None
    """Embedding answers: the mean cosine of the copy's embeddings with the reference's."""

    @property
    def first_reaction(self) -> int | None:
        marks = [m for m in (self.first_refusal, self.first_perturbed) if m is not None]
        return min(marks) if marks else None

    def summary(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "split": self.split,
            "identities": self.identities,
            "sent": len(self.outcomes),
            "answered": self.outcomes.count("ok"),
            "refused": self.outcomes.count("refused"),
            "failed": self.outcomes.count("failed") + self.outcomes.count("unread"),
            "first_reaction": self.first_reaction,
            "first_refusal": self.first_refusal,
            "refusal_status": self.refusal_status,
            "refusal_type": self.refusal_type,
            "first_429": self.first_429,
            "first_perturbed": self.first_perturbed,
            "canaries": self.canaries,
            "perturbed_canaries": self.perturbed_canaries,
            "ratelimit_policy": self.ratelimit_policy,
            "ratelimit_first": self.ratelimit_first,
            "ratelimit_at_refusal": self.ratelimit_at_refusal,
            "retry_after": self.retry_after,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
            "fidelity": None
            if self.fidelity is None
            else {t: _by_budget(c) for t, c in self.fidelity.items()},
            "mean_cosine": None if self.mean_cosine is None else _by_budget(self.mean_cosine),
        }


@dataclass
class AuditResult:
    config: AuditConfig
    target_url: str
    samples: int
    pool: int
    held_out: int
    answer_kind: str
    tolerance: float
    passes: dict[str, BenignPass]
    runs: list[AttackRun]
    requests: int = 0
    seconds: float = 0.0
    stopped_by_time_limit: bool = False
    notes: list[str] = field(default_factory=list)

    def max_fidelity(self, split: str | None = None) -> float | None:
        values = [
            f
            for run in self.runs
            if run.fidelity and (split is None or run.split == split)
            for curve in run.fidelity.values()
            for f in curve.values()
        ]
        return max(values) if values else None

    def summary(self) -> dict[str, Any]:
        reacted = [run for run in self.runs if run.first_reaction is not None]
        return {
            "target": self.target_url,
            "format": self.config.format,
            "answer_kind": self.answer_kind,
            "samples": self.samples,
            "pool": self.pool,
            "held_out": self.held_out,
            "budget": self.config.budget,
            "identities": self.config.identities,
            "requests": self.requests,
            "seconds": round(self.seconds, 2),
            "stopped_by_time_limit": self.stopped_by_time_limit,
            "tolerance": self.tolerance,
            "benign": {name: p.summary() for name, p in self.passes.items()},
            "attacks": [run.summary() for run in self.runs],
            "shield_reacted": len(reacted),
            "runs_without_reaction": len(self.runs) - len(reacted),
            "max_fidelity": self.max_fidelity(),
            "notes": self.notes,
        }


Progress = Callable[[str], None]


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.hit = False

    def passed(self, reserve: float = 0.0) -> bool:
        if time.monotonic() + reserve >= self.end:
            self.hit = True
        return self.hit


def run_audit(config: AuditConfig, progress: Progress | None = None) -> AuditResult:
    """Run the audit ``config`` describes; :class:`ConfigurationError` when it cannot run."""
    config.check()
    started = time.perf_counter()
    say = progress or (lambda _: None)
    target = resolve_target(config.target, config.allow_remote)
    headers = parse_headers(list(config.headers))
    wire = Wire(config.format, target.path, config.extra)
    samples = load_samples(config.samples, wire)
    if samples.tensor is not None:
        wire = Wire(config.format, target.path, config.extra, samples.tensor)
    attacks = config.attack_names(wire.numeric)
    rng = np.random.default_rng(config.seed)
    pool, held = samples.split(config.holdout, rng)
    deadline = _Deadline(config.time_limit)
    token = secrets.token_hex(4)
    client = Client(target, headers, config.timeout)
    try:
        audit = _Audit(config, wire, samples, client, deadline, token, say)
        result = audit.run(pool, held, attacks, rng)
    finally:
        client.close()
    result.requests = client.requests
    result.seconds = time.perf_counter() - started
    result.stopped_by_time_limit = deadline.hit
    return result


class _Audit:
    def __init__(
        self,
        config: AuditConfig,
        wire: Wire,
        samples: Samples,
        client: Client,
        deadline: _Deadline,
        token: str,
        say: Progress,
    ) -> None:
        self.config = config
        self.wire = wire
        self.samples = samples
        self.client = client
        self.deadline = deadline
        self.token = token
        self.say = say
        self.reference: dict[int, Answer] = {}
        self.tolerance = 1e-9
        self.width = 2  # columns of one-hot rows, for label answers
        self.kind = "mixed"  # of the reference answers, once they are in

    def key(self, role: str) -> str:
        return f"audit-{self.token}-{role}"

    def send(self, item: Any, key: str) -> tuple[Reply, Answer | None]:
        body = self.wire.body(item)
        reply = self.client.post(body, key)
        answer = self.wire.answer(body, reply.body) if reply.ok else None
        return reply, answer

    # -- benign ----------------------------------------------------------------------

    def benign(self, name: str, indices: list[int]) -> tuple[BenignPass, dict[int, Answer]]:
        record = BenignPass(name)
        answers: dict[int, Answer] = {}
        users = self.config.benign_users
        for position, i in enumerate(indices):
            if self.deadline.passed():
                break
            user = position * users // len(indices)  # each user replays a slice of its own
            reply, answer = self.send(self.samples.items[i], self.key(f"benign-{user}"))
            record.sent += 1
            if reply.status == 0:
                record.failed += 1
                continue
            record.latencies.append(reply.seconds)
            if not reply.ok:
                record.refused += 1
            elif answer is not None:
                answers[i] = answer
                ref = self.reference.get(i)
                if ref is not None:
                    record.compared += 1
                    record.changed_top1 += ref.top1() != answer.top1()
                    record.max_distance = max(record.max_distance, ref.distance(answer))
        return record, answers

    # -- attacks ---------------------------------------------------------------------

    def vector(self, answer: Answer | None) -> Array | None:
        if answer is None or answer.row is None:
            return None
        if answer.kind == LABELS:
            return np.asarray(one_hot(answer.row, self.width)[0], dtype=np.float64)
        return answer.row

    def label(self, answer: Answer) -> int | None:
        """A classifier answer's class: the argmax of its row, the label of a label (within
        the classes, as :meth:`vector` has it, without building its one-hot row)."""
        if answer.row is None:
            return None
        if answer.kind == LABELS:
            return min(max(int(answer.row[0]), 0), self.width - 1)
        return int(np.argmax(answer.row))

    def attack(
        self,
        run: AttackRun,
        queries: Callable[[], Any | None],
        deliver: Callable[[Any, Answer | None], None],
        canaries: list[int],
    ) -> None:
        started = time.perf_counter()
        keys = [self.key(f"{run.attack}-{run.split}-{i}") for i in range(run.identities)]
        refusals_in_a_row = 0
        turn = 0
        while True:
            if self.deadline.passed(reserve=0.1 * self.config.time_limit):
                run.stopped = "time limit"
                break
            query = queries()
            if query is None:
                run.stopped = "budget" if len(run.outcomes) >= self.config.budget else "attack done"
                break
            key = keys[turn % len(keys)]
            turn += 1
            reply, answer = self.send(query, key)
            index = len(run.outcomes)
            self.observe(run, reply, index)
            if reply.status == 0:
                run.outcomes.append("failed")
            elif not reply.ok:
                run.outcomes.append("refused")
            else:
                run.outcomes.append("ok" if answer is not None else "unread")
            deliver(query, answer)
            refusals_in_a_row = refusals_in_a_row + 1 if not reply.ok else 0
            if refusals_in_a_row >= MAX_CONSECUTIVE_REFUSALS:
                run.stopped = f"{MAX_CONSECUTIVE_REFUSALS} refusals in a row"
                break
            if canaries and len(run.outcomes) % self.config.canary_every == 0:
                self.canary(run, canaries[run.canaries % len(canaries)], key, index)
        run.seconds = time.perf_counter() - started

    def observe(self, run: AttackRun, reply: Reply, index: int) -> None:
        headers = reply.headers
        if run.ratelimit_first is None and "ratelimit" in headers:
            run.ratelimit_first = headers["ratelimit"]
        run.ratelimit_policy = run.ratelimit_policy or headers.get("ratelimit-policy")
        if reply.ok or reply.status == 0:
            return
        if run.first_refusal is None:
            run.first_refusal = index
            run.refusal_status = reply.status
            run.refusal_type = _problem_type(reply.body)
            run.ratelimit_at_refusal = headers.get("ratelimit")
            run.retry_after = headers.get("retry-after")
        if reply.status == 429 and run.first_429 is None:
            run.first_429 = index

    def canary(self, run: AttackRun, sample: int, key: str, index: int) -> None:
        _, answer = self.send(self.samples.items[sample], key)
        run.canaries += 1
        reference = self.reference.get(sample)
        if answer is None or reference is None:
            return
        if answer.top1() != reference.top1() or answer.distance(reference) > self.tolerance:
            run.perturbed_canaries += 1
            if run.first_perturbed is None:
                run.first_perturbed = index

    def numeric_run(self, run: AttackRun, pool: list[int], rng: np.random.Generator) -> Campaign:
        assert self.samples.features is not None
        x_pool = self.samples.features[pool]
        box = Box.around(x_pool)
        seeds = min(len(pool), max(8, self.config.budget // 8))
        factory = strategies(box, jitter(box), jbda_seeds=seeds)[run.attack]
        campaign = Campaign(factory(x_pool, rng, self.config.seed), self.config.budget)
        shape = self.samples.shape

        def queries() -> Any | None:
            query = campaign.next_query()
            return None if query is None else query.reshape(shape)

        def deliver(query: Any, answer: Answer | None) -> None:
            campaign.deliver(self.vector(answer))

        self.attack(run, queries, deliver, self.canary_samples)
        return campaign

    # -- the whole audit -------------------------------------------------------------

    def run(
        self, pool: list[int], held: list[int], attacks: tuple[str, ...], rng: np.random.Generator
    ) -> AuditResult:
        config = self.config
        replay = held + pool[: max(0, config.benign - len(held))]
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

        # One thread for the substitutes' arithmetic: small fits, on a machine the
        # audited server shares, are slower with a thread pool than without.
        with threadpool_limits(1):
            return self._run(pool, held, replay, attacks, rng)

    def _run(
        self,
        pool: list[int],
        held: list[int],
        replay: list[int],
        attacks: tuple[str, ...],
        rng: np.random.Generator,
    ) -> AuditResult:
        config = self.config
        self.say(f"benign replay of {len(replay)} samples")
        before, self.reference = self.benign("before", replay)
        if not self.reference:
            raise ConfigurationError(
                f"--target {config.target}: no answer to the benign replay could be read as "
                f"--format {config.format} ({before.refused} refused, {before.failed} failed); "
                "check the URL, the format, --header and --extra"
            )
        kinds = {a.kind for a in self.reference.values()}
        kind = self.kind = kinds.pop() if len(kinds) == 1 else "mixed"
        repeat, _ = self.benign("repeat", replay)
        self.tolerance = max(1e-9, 2 * repeat.max_distance)
        labels = [a.row for a in self.reference.values() if a.kind == LABELS and a.row is not None]
        if labels:
            self.width = max(2, int(max(float(r[0]) for r in labels)) + 1)
        self.canary_samples = [i for i in held if i in self.reference]
        notes: list[str] = []
        if repeat.changed_top1:
            notes.append(
                f"{repeat.changed_top1} of {repeat.compared} answers changed their top-1 "
                "when the benign identity asked again at once: the endpoint is not "
                "deterministic, and perturbed-looking answers are judged against that noise."
            )
        runs: list[AttackRun] = []
        for attack in attacks:
            for split in SPLITS:
                identities = 1 if split == "single" else config.identities
                run = AttackRun(attack, split, identities)
                self.say(f"{attack} from {identities} identit{'y' if identities == 1 else 'ies'}")
                if self.wire.numeric:
                    campaign = self.numeric_run(
                        run, pool, np.random.default_rng(rng.integers(2**32))
                    )
                    self.numeric_fidelity(run, campaign, pool, held)
                else:
                    self.text_run(run, pool, held, np.random.default_rng(rng.integers(2**32)))
                runs.append(run)
        after, _ = self.benign("after", replay)
        if kind == "mixed":
            notes.append(
                "The endpoint's answers were of several kinds: substitute fidelity is "
                "measured when every reference answer is of one kind."
            )
        return AuditResult(
            config,
            self.client.target.url,
            len(self.samples),
            len(pool),
            len(held),
            kind,
            self.tolerance,
            {"before": before, "repeat": repeat, "after": after},
            runs,
            notes=notes,
        )

    def budgets(self) -> list[int]:
        budget = self.config.budget
        return sorted({max(1, budget // 4), max(1, budget // 2), budget})

    def held_out(self, held: list[int]) -> list[int]:
        """The held-out samples whose reference answer is of the audit's kind."""
        return [i for i in held if i in self.reference and self.reference[i].kind == self.kind]

    def numeric_fidelity(
        self, run: AttackRun, campaign: Campaign, pool: list[int], held: list[int]
    ) -> None:
        assert self.samples.features is not None
        rows = [a for a in campaign.answers if a is not None]
        held = self.held_out(held)
        if not rows or any(r.shape != rows[0].shape for r in rows) or not held:
            return
        box = Box.around(self.samples.features[pool])
        x_eval = self.samples.features[held]
        if self.kind == EMBEDDINGS:
            x = box.scaled(np.asarray(campaign.queries))
            self.embedding_fidelity(run, x, campaign.answers, box.scaled(x_eval), held)
            return
        target = np.asarray([self.label(self.reference[i]) for i in held], dtype=np.int64)
        run.fidelity = fidelity_curve(
            campaign.queries, campaign.answers, self.budgets(), x_eval, target, [0], box.scaled
        )

    def embedding_fidelity(
        self, run: AttackRun, x: Any, answers: list[Array | None], x_eval: Any, held: list[int]
    ) -> None:
        if len(held) < 2:  # retrieving the only candidate is no agreement at all
            return
        reference = np.stack([row for i in held if (row := self.reference[i].row) is not None])
        run.fidelity, run.mean_cosine = embedding_fidelity_curve(
            x, answers, self.budgets(), x_eval, reference
        )

    def text_run(
        self, run: AttackRun, pool: list[int], held: list[int], rng: np.random.Generator
    ) -> None:
        texts = [str(self.samples.items[i]) for i in pool]
        planned = iter(text_queries(run.attack, texts, self.config.budget, rng))
        sent: list[str] = []
        answers: list[Answer | None] = []

        def deliver(query: Any, answer: Answer | None) -> None:
            sent.append(str(query))
            answers.append(answer)

        self.attack(run, lambda: next(planned, None), deliver, self.canary_samples)
        held = self.held_out(held)
        texts_eval = [str(self.samples.items[i]) for i in held]
        if not held or not sent:
            return
        if self.kind == TEXT:
            completions = [None if a is None else a.text for a in answers]
            references = [
                (t, self.reference[i].text or "") for t, i in zip(texts_eval, held, strict=True)
            ]
            run.fidelity = text_copy_curve(sent, completions, self.budgets(), references)
        elif self.kind == EMBEDDINGS:
            rows = [None if a is None else a.row for a in answers]
            x, x_eval = word_features(sent), word_features(texts_eval)
            self.embedding_fidelity(run, x, rows, x_eval, held)
        elif any(a is not None for a in answers):
            labels = [None if a is None else self.label(a) for a in answers]
            target = np.asarray([self.label(self.reference[i]) for i in held], dtype=np.int64)
            run.fidelity = text_fidelity_curve(sent, labels, self.budgets(), texts_eval, target)


def _by_budget(curve: dict[int, float]) -> dict[str, float]:
    return {str(budget): round(value, 4) for budget, value in curve.items()}


def _problem_type(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = doc.get("type") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
