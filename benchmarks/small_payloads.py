"""What the plain-Python paths for small payloads save: each against the numpy path.

One online request carries one query (64 features) and gets one answer (10 classes).
For such payloads the shield keys the query with :mod:`array` (``formats.base.FEW_ROWS``)
and rounds and reverse-sigmoids the answer on Python floats (``postprocess.perturb.SMALL``),
with results identical to the bit to the numpy paths (``tests/test_small_payloads.py``).
This benchmark times each operation both ways, in interleaved rounds on the same inputs
(the numpy path by setting the thresholds to zero), and prints the ratio of the medians:
below 1.0, the small path is faster.

    python benchmarks/small_payloads.py            # markdown table
    python benchmarks/small_payloads.py --json     # for machines
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from starlette.datastructures import Headers

from asgi_extraction_shield.formats import base as formats_base
from asgi_extraction_shield.formats.base import batch_request, canonical_keys, numeric_rows
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.postprocess import OutputTransform, parse_chain
from asgi_extraction_shield.postprocess import perturb as perturb_module
from asgi_extraction_shield.postprocess.chain import Context

QUERY = [[round(0.01 * ((i * 7 + 3) % 101), 2) for i in range(64)]]
# A confident answer (plain rounding keeps its sum) and one where units must move.
CONFIDENT = np.array([[0.01, 0.02, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.1, 0.6]])
UNEVEN = perturb_module.reverse_sigmoid(CONFIDENT, 1.0, 0.2, True)
FULL_CHAIN = "reverse_sigmoid:beta=1:gamma=0.2:guard_top1=true,round:3"
JSON_HEADERS = Headers(raw=[(b"content-type", b"application/json")])


def rewrite(chain: str) -> Callable[[], bytes]:
    """The whole rewrite of one KServe v1 answer, as the response transform does it."""
    request = batch_request(KServeV1(), [list(QUERY[0])])
    processors = parse_chain(chain)
    body = orjson.dumps({"predictions": CONFIDENT.tolist()})

    def run() -> bytes:
        transform = OutputTransform(request, processors, Context(b"k" * 32, "", request), 1 << 20)
        transform.accepts(200, JSON_HEADERS)
        return transform.feed(body, False)

    return run


def operations() -> dict[str, Callable[[], Any]]:
    features = numeric_rows(QUERY)
    return {
        "keys of one 64-feature query": lambda: canonical_keys(QUERY, features),
        "round:3, sum kept (1x10)": lambda: perturb_module.round_simplex(CONFIDENT, 3),
        "round:3, units moved (1x10)": lambda: perturb_module.round_simplex(UNEVEN, 3),
        "reverse_sigmoid + guard (1x10)": lambda: perturb_module.reverse_sigmoid(
            CONFIDENT, 1.0, 0.2, True
        ),
        "answer rewritten, round:3": rewrite("round:3"),
        "answer rewritten, reverse_sigmoid + round:3": rewrite(FULL_CHAIN),
    }


def set_small(on: bool, saved: tuple[int, int]) -> None:
    formats_base.FEW_ROWS = saved[0] if on else 0
    perturb_module.SMALL = saved[1] if on else -1


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def measure(rounds: int, n: int) -> dict[str, dict[str, float]]:
    saved = (formats_base.FEW_ROWS, perturb_module.SMALL)
    ops = operations()
    samples: dict[str, dict[bool, list[float]]] = {name: {True: [], False: []} for name in ops}
    try:
        for r in range(rounds):
            for on in (r % 2 == 0, r % 2 == 1):  # alternate which path goes first
                set_small(on, saved)
                for name, fn in ops.items():
                    fn()  # warm
                    samples[name][on].append(per_call_us(fn, n))
    finally:
        set_small(True, saved)
    out = {}
    for name, by_path in samples.items():
        small, general = statistics.median(by_path[True]), statistics.median(by_path[False])
        out[name] = {"small_us": small, "numpy_us": general, "ratio": small / general}
    return out


def check_identical() -> None:
    """The two paths must give the same bytes (the tests pin this more thoroughly)."""
    saved = (formats_base.FEW_ROWS, perturb_module.SMALL)
    results: dict[bool, list[Any]] = {}
    try:
        for on in (True, False):
            set_small(on, saved)
            values = [fn() for fn in operations().values()]
            results[on] = [v.tobytes() if isinstance(v, np.ndarray) else v for v in values]
    finally:
        set_small(True, saved)
    if results[True] != results[False]:
        raise RuntimeError("the small and numpy paths disagree")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3000, help="calls per round and path")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    check_identical()
    result: dict[str, Any] = {
        "operations": measure(args.rounds, args.calls),
        "rounds": args.rounds,
        "calls_per_round": args.calls,
    }
    print(json.dumps(result, indent=2) if args.json else markdown(result["operations"]))
    return result


def markdown(operations: dict[str, dict[str, float]]) -> str:
    lines = ["| operation | small path µs | numpy path µs | ratio |", "|---|---:|---:|---:|"]
    lines += [
        f"| {name} | {row['small_us']:.2f} | {row['numpy_us']:.2f} | {row['ratio']:.2f} |"
        for name, row in operations.items()
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
