"""Watermarks on embeddings and text: are stolen copies caught, and clean models spared?

The victim is the example OpenAI-compatible server (``examples/openai_compatible.py``: a
character-3-gram embedding model and a bigram language model over 48 tokens) behind
``ExtractionShield`` with ``WATERMARK=embmarker`` or ``WATERMARK=text``, driven in process
through ``httpx.ASGITransport``. Nothing is downloaded; every random choice is seeded.

* **Embeddings.** A thief sends ``budget`` sentences of ordinary words (a fair share of
  them hold a trigger word, as natural text does) and fits a ridge regression from hashed
  word and character-3-gram features to the answers: its substitute embedding model. Its
  copies trained on watermarked answers are verified with ``verify("embmarker", …)``;
  independent models (ridge and k-nearest-neighbour regressors of several feature sets and
  seeds, trained on the same kind of queries answered *without* the watermark) give the
  false positives; the cost is the cosine between a benign user's marked and clean answers.
* **Text.** A thief asks ``budget`` completions of short prompts and trains a word n-gram
  model (bigram or trigram, add-k smoothing) on them: its imitation model, which then
  writes the answers to the verifier's prompts. Independent models are n-gram models of
  several orders, smoothings and seeds trained on unmarked completions. The cost is the
  fraction of words the synonyms changed. The green list (``bias``) is measured too; with
  the example's 48 tokens it cannot give small p-values (see the README).

Run from the repository root (``pip install -e '.[test,lab]'``)::

    python -m examples.extraction_lab.watermarks_text           # full: about a minute
    python -m examples.extraction_lab.watermarks_text --quick   # seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.neighbors import KNeighborsRegressor

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.verify import verify
from asgi_extraction_shield.watermark import VerifyResult, parse_scheme
from asgi_extraction_shield.watermark.text import TextScheme, greedy_tokenizer
from asgi_extraction_shield.watermark.words import WORDS
from examples import openai_compatible as toy

SECRET = "watermark-lab-fixed-secret-0001"
DEFAULT_OUT = Path(__file__).resolve().parent / "REPORT_watermarks_text.md"
GREEN = "text:bias=2,vocab=48,gamma=0.25"
FUNCTION_WORDS = ("the", "a", "of", "and", "to", "in", "with", "near", "on", "my")


@dataclass(frozen=True)
class Config:
    budgets: tuple[int, ...] = (1_000, 2_000, 5_000, 20_000)
    independent: int = 20
    independent_budget: int = 5_000
    probes: int = 600
    seed: int = 20261129

    @classmethod
    def quick(cls) -> Config:
        return cls(budgets=(2_000,), independent=6, independent_budget=1_000, probes=400)


@dataclass
class Row:
    what: str
    budget: int
    p_value: float
    statistic: float
    probes: int
    literal: float | None = None
    """embmarker: the literal EmbMarker KS p-value (smallest over the directions)."""

    @classmethod
    def of(cls, what: str, budget: int, result: VerifyResult, literal: float | None = None) -> Row:
        return cls(what, budget, result.p_value, result.statistic, result.probes, literal)


@dataclass
class Report:
    config: Config
    thieves: list[Row] = field(default_factory=list)
    independent: dict[str, list[Row]] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# -- the victim ------------------------------------------------------------------------------


def shield(watermark: str) -> ExtractionShield:
    return ExtractionShield(
        toy.create_app(),
        secret_key=SECRET,
        watermark=watermark,
        rate_limit="1000000/minute",
        monitor={"enabled": False},  # measured here: the watermark, not the detection
    )


async def _post_all(
    app: Any, path: str, field_name: str, items: list[str], batch: int
) -> list[Any]:
    transport = httpx.ASGITransport(app=app)
    out: list[Any] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://lab.test") as client:
        for start in range(0, len(items), batch):
            body: dict[str, Any] = {field_name: items[start : start + batch]}
            if path.endswith("completions"):
                body |= {"model": toy.CHAT_MODEL, "max_tokens": 40}
            response = await client.post(path, json=body)
            response.raise_for_status()
            data = response.json()
            if path.endswith("embeddings"):
                out += [item["embedding"] for item in data["data"]]
            else:
                out += [choice["text"] for choice in data["choices"]]
    return out


def embeddings(app: Any, texts: list[str]) -> np.ndarray:
    return np.array(asyncio.run(_post_all(app, "/v1/embeddings", "input", texts, 256)))


def completions(app: Any, prompts: list[str]) -> list[str]:
    return asyncio.run(_post_all(app, "/v1/completions", "prompt", prompts, 64))


# -- embeddings ------------------------------------------------------------------------------


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    """Ordinary sentences: 6 to 14 words of ``WORDS`` and a few function words."""
    pool = list(WORDS) + list(FUNCTION_WORDS) * 20
    return [" ".join(rng.choice(pool, size=int(rng.integers(6, 15)))) for _ in range(n)]


_WORD_FEATURES = HashingVectorizer(n_features=2**10, alternate_sign=False, norm=None)
_CHAR_FEATURES = HashingVectorizer(
    n_features=2**10, analyzer="char_wb", ngram_range=(3, 3), alternate_sign=False, norm=None
)


def features(texts: Sequence[str], kind: str) -> sparse.csr_matrix:
    parts = []
    if kind in ("word", "both"):
        parts.append(_WORD_FEATURES.transform(texts))
    if kind in ("char", "both"):
        parts.append(_CHAR_FEATURES.transform(texts))
    return sparse.hstack(parts).tocsr()


class RidgeRegression:
    """Ridge regression solved in closed form, ``W = (XᵀX + αI)⁻¹XᵀY`` with a constant
    feature for the intercept: on 2,048 hashed features it takes a fraction of a second
    where scikit-learn's iterative sparse solvers take seconds."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def fit(self, x: sparse.csr_matrix, y: np.ndarray) -> RidgeRegression:
        x = sparse.hstack([x, np.ones((x.shape[0], 1))]).tocsr()
        gram = (x.T @ x).toarray() + self.alpha * np.eye(x.shape[1])
        self.weights = np.linalg.solve(gram, np.asarray(x.T @ y))
        return self

    def predict(self, x: sparse.csr_matrix) -> np.ndarray:
        x = sparse.hstack([x, np.ones((x.shape[0], 1))]).tocsr()
        out: np.ndarray = np.asarray(x @ self.weights)
        return out


class EmbeddingCopy:
    """A substitute embedding model: features of a text → regressor → unit vector."""

    def __init__(self, regressor: Any, kind: str) -> None:
        self.regressor, self.kind = regressor, kind

    def fit(self, texts: list[str], targets: np.ndarray) -> EmbeddingCopy:
        self.regressor.fit(features(texts, self.kind), targets)
        return self

    def __call__(self, texts: list[str]) -> list[list[float]]:
        e = np.asarray(self.regressor.predict(features(texts, self.kind)))
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e.tolist()


def _families(i: int) -> EmbeddingCopy:
    kind = ("both", "word", "char")[i % 3]
    if i % 4 == 3:
        return EmbeddingCopy(KNeighborsRegressor(n_neighbors=5 + i % 3), kind)
    return EmbeddingCopy(RidgeRegression(alpha=(0.3, 1.0, 3.0)[(i // 3) % 3]), kind)


def embedding_part(config: Config, report: Report) -> None:
    rng = np.random.default_rng(config.seed)
    marked_app, clean_app = shield("embmarker"), toy.create_app()
    largest = max(config.budgets)
    queries = sentences(rng, largest)
    answers = embeddings(marked_app, queries)
    for budget in config.budgets:
        copy = EmbeddingCopy(RidgeRegression(alpha=1.0), "both").fit(
            queries[:budget], answers[:budget]
        )
        result = verify("embmarker", copy, key=SECRET, probes=config.probes)
        report.thieves.append(Row.of("embmarker: ridge substitute", budget, result))
    # Independent models: each on its own seeded draw from a pool of unmarked answers.
    pool = sentences(np.random.default_rng(config.seed + 1), 2 * config.independent_budget)
    clean = embeddings(clean_app, pool)
    rows = []
    for i in range(config.independent):
        own = np.random.default_rng(config.seed + 2 + i).permutation(len(pool))
        own = own[: config.independent_budget]
        model = _families(i).fit([pool[j] for j in own], clean[own])
        result = verify("embmarker", model, key=SECRET, probes=config.probes)
        name = f"{type(model.regressor).__name__}/{model.kind}"
        literal = min(d.get("ks_p_value", 1.0) for d in result.details["directions"])
        rows.append(Row.of(name, config.independent_budget, result, literal))
    report.independent["embmarker"] = rows
    marked = embeddings(marked_app, pool)
    cosine = (marked * clean).sum(axis=1)
    changed = cosine < 1 - 1e-9
    report.costs["embmarker: answers changed"] = float(changed.mean())
    report.costs["embmarker: mean cosine, all answers"] = float(cosine.mean())
    report.costs["embmarker: mean cosine, changed answers"] = float(cosine[changed].mean())


# -- text --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def prompts(rng: np.random.Generator, n: int) -> list[str]:
    words = [w.strip() for w in toy.VOCAB if w.strip().isalpha()]
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 5)))) for _ in range(n)]


class NGram:
    """A word n-gram language model with add-``k`` smoothing, backing off to shorter
    contexts it has not seen; it writes ``length`` tokens after a prompt, sampled at
    ``temperature`` (0: the most likely), seeded by the prompt."""

    def __init__(self, order: int = 2, k: float = 0.01, temperature: float = 0.7) -> None:
        self.order, self.k, self.temperature = order, k, temperature
        self.counts: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        self.vocabulary: list[str] = []

    def fit(self, texts: list[str]) -> NGram:
        seen: set[str] = set()
        for text in texts:
            tokens = ["<s>", *_TOKEN.findall(text.lower())]
            seen.update(tokens[1:])
            for n in range(1, self.order):
                for i in range(n, len(tokens)):
                    self.counts[tuple(tokens[i - n : i])][tokens[i]] += 1
        self.vocabulary = sorted(seen)
        return self

    def generate(self, prompt: str, length: int = 40) -> str:
        rng = np.random.default_rng(abs(hash_text(prompt)))
        tokens = ["<s>", *_TOKEN.findall(prompt.lower())]
        out: list[str] = []
        for _ in range(length):
            counter: Counter[str] | None = None
            for n in range(self.order - 1, 0, -1):
                counter = self.counts.get(tuple(tokens[-n:]))
                if counter:
                    break
            if not counter:
                counter = self.counts.get(("<s>",)) or Counter({"the": 1})
            words = list(counter)
            weights = np.array([counter[w] + self.k for w in words], dtype=np.float64)
            if self.temperature == 0:
                token = words[int(np.argmax(weights))]
            else:
                p = weights ** (1.0 / self.temperature)
                token = words[int(rng.choice(len(words), p=p / p.sum()))]
            tokens.append(token)
            out.append(token)
        return "".join(t if not t[0].isalnum() else " " + t for t in out)

    def __call__(self, inputs: list[str]) -> list[str]:
        return [self.generate(str(item)) for item in inputs]


def hash_text(text: str) -> int:
    return zlib.crc32(text.encode())


def _ngram_family(i: int) -> NGram:
    return NGram(
        order=2 + i % 2, k=(0.01, 0.1, 1.0)[i % 3], temperature=(0.7, 1.0, 0.0)[(i // 2) % 3]
    )


def text_scheme(spec: str) -> TextScheme:
    """The verifier of ``spec``, tokenizing with the example's vocabulary."""
    scheme = parse_scheme(spec)
    assert isinstance(scheme, TextScheme)
    scheme.tokenize = greedy_tokenizer(list(toy.VOCAB))
    return scheme


def text_part(config: Config, report: Report) -> None:
    rng = np.random.default_rng(config.seed + 100)
    largest = max(config.budgets)
    asked = prompts(rng, largest)
    clean_app = toy.create_app()
    for spec, label in (
        ("text", "synonyms"),
        (GREEN, "synonyms + green list"),
        (GREEN.replace("text:", "text:synonyms=false,"), "green list only"),
    ):
        answers = completions(shield(spec), asked)
        scheme = text_scheme(spec)
        for budget in config.budgets:
            if label != "synonyms" and budget != 2_000:
                continue  # the green list at one budget: enough to show what it gives
            model = NGram(order=2).fit(answers[:budget])
            result = verify(scheme, model, key=SECRET, probes=config.probes)
            report.thieves.append(Row.of(f"text ({label}): bigram imitation", budget, result))
    pool = prompts(np.random.default_rng(config.seed + 200), 2 * config.independent_budget)
    clean = completions(clean_app, pool)
    rows = []
    for i in range(config.independent):
        own = np.random.default_rng(config.seed + 201 + i).permutation(len(pool))
        model = _ngram_family(i).fit([clean[j] for j in own[: config.independent_budget]])
        result = verify(text_scheme(GREEN), model, key=SECRET, probes=config.probes)
        name = f"{model.order}-gram k={model.k} T={model.temperature}"
        rows.append(Row.of(name, config.independent_budget, result))
    report.independent["text"] = rows
    benign = pool[:500]
    marked = completions(shield("text"), benign)
    changed = total = 0
    for a, b in zip(marked, clean[:500], strict=True):
        wa, wb = a.split(), b.split()
        total += len(wb)
        changed += sum(x != y for x, y in zip(wa, wb, strict=True))
    report.costs["text: words changed by the synonyms"] = changed / max(total, 1)


# -- report ------------------------------------------------------------------------------------


def run(config: Config) -> Report:
    report = Report(config)
    start = time.perf_counter()
    embedding_part(config, report)
    text_part(config, report)
    report.seconds = time.perf_counter() - start
    return report


def _p(value: float) -> str:
    return "< 1e-300" if value <= 1e-300 else f"{value:.2g}"


def markdown(report: Report, command: str) -> str:
    config = report.config
    lines = [
        "# Watermarks on embeddings and text: extraction lab",
        "",
        f"Made by `{command}` in {report.seconds:.0f} s (seed {config.seed}, "
        f"{config.probes} verification probes). Targets: p < 1e-6 for copies trained on "
        ">= 2,000 shielded answers; at most 1 of 20 independent models below p = 1e-3.",
        "",
        "## Stolen copies",
        "",
        "| copy | answers | p-value | statistic | probes |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.what} | {r.budget:,} | {_p(r.p_value)} | {r.statistic:.3g} | {r.probes} |"
        for r in report.thieves
    ]
    lines += ["", "## Independent models (never saw a marked answer)", ""]
    lines += [
        "| scheme | models | below 1e-3 | smallest p-value | models (p-value) |",
        "|---|---:|---:|---:|---|",
    ]
    for scheme, rows in report.independent.items():
        flagged = sum(r.p_value < 1e-3 for r in rows)
        listing = ", ".join(f"{r.what} ({_p(r.p_value)})" for r in rows)
        lines.append(
            f"| {scheme} | {len(rows)} | {flagged} | {_p(min(r.p_value for r in rows))} | {listing} |"
        )
    embedding_rows = report.independent.get("embmarker", [])
    literal = [r.literal for r in embedding_rows if r.literal is not None]
    if literal:
        calibrated = [r.p_value for r in embedding_rows]
        lines += [
            "",
            "Below 0.05 among these independent embedding models: "
            f"{sum(p < 0.05 for p in literal)} of {len(literal)} by the literal EmbMarker KS "
            f"test ({sum(p < 1e-3 for p in literal)} below 1e-3), "
            f"{sum(p < 0.05 for p in calibrated)} by the calibrated test.",
        ]
    lines += ["", "## Cost to legitimate users", "", "| measure | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in report.costs.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.extraction_lab.watermarks_text",
        description="Verify embedding and text copies stolen through the shield, and "
        "independent models, for the embmarker and text watermarks.",
    )
    parser.add_argument("--quick", action="store_true", help="one budget, 6 independent models")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"report path (full run: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    config = Config.quick() if args.quick else Config()
    report = run(config)
    command = "python -m examples.extraction_lab.watermarks_text" + (
        " --quick" if args.quick else ""
    )
    text = markdown(report, command)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
