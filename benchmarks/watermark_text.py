"""What the ``text`` and ``embmarker`` watermarks cost on the response path, as ratios.

Each watermark's work on one answer is timed against what the shield does to that answer
anyway: decoding and re-encoding its JSON (orjson). ``text``: a chat answer of ``--words``
words of prose, marked whole and as a stream of one-word events; ``embmarker``: an
OpenAI embeddings answer of ``--rows`` texts (1,536 dimensions), about a quarter of them
holding a trigger word.

    python benchmarks/watermark_text.py
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import orjson

from asgi_extraction_shield.formats.base import Outputs
from asgi_extraction_shield.postprocess.chain import Context
from asgi_extraction_shield.watermark import embmarker as em
from asgi_extraction_shield.watermark import parse_watermarks, watermark_key
from asgi_extraction_shield.watermark import text as tx
from asgi_extraction_shield.watermark.words import SYNONYMS, WORDS

SECRET = b"benchmark-secret-0123456789"


def best(fn: Callable[[], object], rounds: int) -> float:
    """The fastest of ``rounds`` timings of ``fn``, in seconds."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prose(words: int, rng: np.random.Generator) -> str:
    pool = [*WORDS[:200], *(w for g in SYNONYMS for w in g), "the", "a", "and", "of", "to"]
    out = []
    for i in range(words):
        out.append(str(rng.choice(pool)) + ("." if i % 17 == 16 else ""))
    return " ".join(out)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    text = prose(args.words, rng)
    doc = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    raw = orjson.dumps(doc)
    key = watermark_key(SECRET, "text")
    json_cost = best(lambda: orjson.dumps(orjson.loads(raw)), args.rounds)
    whole = best(lambda: tx.mark(key, text), args.rounds)
    pieces = [" " + w for w in text.split(" ")]

    def stream() -> None:
        state = tx.ScanState()
        for i, piece in enumerate(pieces):
            tx.mark(key, piece, state, final=i == len(pieces) - 1)

    streamed = best(stream, args.rounds)

    watermark = parse_watermarks("embmarker")[0]
    watermark.bind(SECRET)
    triggers = {w for group in em.trigger_words(watermark.key, 20, 1) for w in group}
    plain = [w for w in WORDS if w not in triggers]
    texts = [" ".join(rng.choice(plain, size=10)) for _ in range(args.rows)]
    for i in range(0, args.rows, 4):
        texts[i] += " " + sorted(triggers)[i % len(triggers)]
    vectors = rng.normal(size=(args.rows, 1536))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    answer = orjson.dumps(
        {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}
    )
    keys = [json.dumps(t).encode() for t in texts]
    emb_json = best(lambda: orjson.dumps(orjson.loads(answer)), args.rounds)
    emb_mark = best(
        lambda: watermark.apply(Outputs(keys, embeddings=vectors), Context(b"")), args.rounds
    )
    figures = {
        "text: whole answer / JSON round trip": whole / json_cost,
        "text: one-word stream events / JSON round trip": streamed / json_cost,
        "text: whole answer, µs": whole * 1e6,
        "embmarker / JSON round trip": emb_mark / emb_json,
        "embmarker, µs": emb_mark * 1e6,
    }
    print(f"{args.words} words; {args.rows} embeddings of 1,536 dimensions")
    for name, value in figures.items():
        print(f"  {name:<48} {value:8.2f}")
    return figures


if __name__ == "__main__":
    main()
