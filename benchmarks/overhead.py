"""Middleware overhead: the shield against slowapi, in-process, in the same run.

Drives each ASGI app directly (no server, no HTTP client): a bare Starlette model
endpoint answering a KServe v1 request (64 features) with 10-class probabilities, the
same app behind slowapi (its pure-ASGI middleware, with a limit high enough never to
trigger), and behind the shield: with the limiter only (``FORMAT=none``); parsing the
payload and rounding (``round:3``) or perturbing (``FULL_CHAIN``) the outputs; with the
query monitor on and no perturbation (the defaults); on its full path (monitor and
perturbation) with either chain; and with ``FULL_CHAIN`` and Prometheus metrics
(``METRICS=true``, a registry of its own). Requests cycle through
1,009 distinct queries from one client. Rounds are
interleaved so that machine noise hits every variant alike; each figure is the
median over rounds of the mean µs per request in that round. Overheads are
differences from the bare app; the verdict is the ratio of overheads, which is what
survives a noisy shared machine.

    python benchmarks/overhead.py            # markdown table
    python benchmarks/overhead.py --json     # for machines
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry
from slowapi import Limiter as SlowLimiter
from slowapi.middleware import SlowAPIASGIMiddleware
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from asgi_extraction_shield import ExtractionShield

# Distinct queries, as a client's are: the monitor treats a query asked again as cheaper.
BODIES = [
    json.dumps({"instances": [[round(0.01 * ((i * 7 + j) % 101), 2) for i in range(64)]]}).encode()
    for j in range(1009)
]
_next_body = itertools.cycle(BODIES)
# A confident answer, as most answers to a benign client are (a low top-1/top-2 margin on
# every answer is one of the monitor's extraction signals).
PROBABILITIES = [[0.01, 0.02, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.1, 0.6]]
LIGHT_CHAIN = "round:3"
FULL_CHAIN = "reverse_sigmoid:beta=1:gamma=0.2:guard_top1=true,round:3"


def model_app() -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"predictions": PROBABILITIES})

    return Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"])])


def slowapi_app() -> ASGIApp:
    app = model_app()
    limiter = SlowLimiter(key_func=get_remote_address, default_limits=["100000000/minute"])
    app.state.limiter = limiter
    app.add_middleware(SlowAPIASGIMiddleware)
    return app


def shield_app(**overrides: Any) -> ASGIApp:
    """The shield with the limiter only: no payload parsing, monitor or post-processing."""
    settings = {"format": "none", "monitor": {"enabled": False}, **overrides}
    return ExtractionShield(
        model_app(),
        rate_limit="100000000/minute",
        secret_key="benchmark-secret-key-0123456789",
        **settings,
    )


def shield_round_app() -> ASGIApp:
    """A KServe v1 request parsed and its outputs rounded (``round:3``), no monitor."""
    return shield_app(format="auto", perturbation=LIGHT_CHAIN)


def shield_perturb_app() -> ASGIApp:
    """A KServe v1 request parsed and its outputs perturbed by ``FULL_CHAIN``, no monitor."""
    return shield_app(format="auto", perturbation=FULL_CHAIN)


# The benchmark's client sends thousands of synthetic queries, which the monitor rightly
# grades as an extraction: in shadow mode it still does all the work (monitor, policy,
# perturbation of every answer) but never refuses, so every request takes the full path.
FULL = {"format": "auto", "perturbation": FULL_CHAIN, "monitor": {"enabled": True}}


def shield_full_app() -> ASGIApp:
    """The full path: payload parsed, queries monitored and graded, outputs perturbed."""
    return shield_app(mode="shadow", **FULL)


def shield_defaults_app() -> ASGIApp:
    """The defaults: payload parsed, queries monitored and graded, answers read (for the
    monitor's margins) but not perturbed (``PERTURBATION=none``)."""
    return shield_app(mode="shadow", format="auto", monitor={"enabled": True})


def shield_full_round_app() -> ASGIApp:
    """The full path with the light chain (``round:3``) on every answer."""
    return shield_app(mode="shadow", **{**FULL, "perturbation": LIGHT_CHAIN})


def shield_metrics_app() -> ASGIApp:
    """The limiter only, with Prometheus metrics on: what metrics cost, on a quiet path."""
    return shield_app(metrics_registry=CollectorRegistry())


def shield_full_metrics_app() -> ASGIApp:
    """The full path with Prometheus metrics on."""
    return shield_app(mode="shadow", metrics_registry=CollectorRegistry(), **FULL)


def scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/models/m:predict",
        "raw_path": b"/v1/models/m:predict",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-api-key", b"client-0001"),
        ],
        "client": ("203.0.113.7", 50000),
        "server": ("bench", 80),
    }


def request(body: bytes | None = None) -> tuple[dict[str, Any], Callable[[], Awaitable[Message]]]:
    """A request's scope and receive callable (by default the next of ``BODIES``)."""
    body = next(_next_body) if body is None else body

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return scope(body), receive


async def run_round(app: ASGIApp, n: int) -> float:
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    start = time.perf_counter()
    for _ in range(n):
        await app(*request(), send)
    elapsed = time.perf_counter() - start
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {set(statuses)}")
    return elapsed / n * 1e6


async def response_body(app: ASGIApp) -> bytes:
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(*request(BODIES[0]), send)
    return b"".join(chunks)


async def check_paths(variants: dict[str, ASGIApp]) -> None:
    """The full path must really rewrite the answer, the others must not."""
    bodies = {name: await response_body(app) for name, app in variants.items()}
    if bodies["shield (full path)"] == bodies["bare"]:
        raise RuntimeError("the full path did not perturb the response")
    if bodies["shield (limiter only)"] != bodies["bare"]:
        raise RuntimeError("the limiter-only path changed the response")


async def measure(variants: dict[str, ASGIApp], rounds: int, n: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:  # warm-up: imports, caches, first-call paths
        await run_round(variants[name], n // 4 or 1)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(await run_round(variants[name], n))
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("asgi_extraction_shield").setLevel(logging.ERROR)

    builders: dict[str, Callable[[], ASGIApp]] = {
        "bare": model_app,
        "slowapi": slowapi_app,
        "shield (limiter only)": shield_app,
        "shield (limiter only + metrics)": shield_metrics_app,
        "shield (parse + round:3)": shield_round_app,
        "shield (parse + perturb)": shield_perturb_app,
        "shield (defaults: monitor, no perturbation)": shield_defaults_app,
        "shield (full path, round:3)": shield_full_round_app,
        "shield (full path)": shield_full_app,
        "shield (full path + metrics)": shield_full_metrics_app,
    }
    variants = {name: build() for name, build in builders.items()}
    asyncio.run(check_paths(variants))
    medians = asyncio.run(measure(variants, args.rounds, args.requests))
    bare = medians["bare"]
    slow_overhead = medians["slowapi"] - bare
    result: dict[str, Any] = {
        "us_per_request": medians,
        "overhead_us": {name: value - bare for name, value in medians.items() if name != "bare"},
        "ratio_shield_to_slowapi_overhead": (medians["shield (limiter only)"] - bare)
        / slow_overhead,
        "ratio_parse_round_to_slowapi_overhead": (medians["shield (parse + round:3)"] - bare)
        / slow_overhead,
        "ratio_parse_perturb_to_slowapi_overhead": (medians["shield (parse + perturb)"] - bare)
        / slow_overhead,
        "ratio_defaults_to_slowapi_overhead": (
            medians["shield (defaults: monitor, no perturbation)"] - bare
        )
        / slow_overhead,
        "ratio_full_path_round_to_slowapi_overhead": (medians["shield (full path, round:3)"] - bare)
        / slow_overhead,
        "ratio_full_path_to_slowapi_overhead": (medians["shield (full path)"] - bare)
        / slow_overhead,
        "metrics_us_limiter_only": medians["shield (limiter only + metrics)"]
        - medians["shield (limiter only)"],
        "ratio_metrics_full_path_overhead": (medians["shield (full path + metrics)"] - bare)
        / (medians["shield (full path)"] - bare),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| variant | µs/request | overhead µs |")
        print("|---|---:|---:|")
        for name, value in medians.items():
            overhead = "" if name == "bare" else f"{value - bare:.1f}"
            print(f"| {name} | {value:.1f} | {overhead} |")
        print(
            f"\nshield (limiter only) overhead / slowapi overhead = "
            f"{result['ratio_shield_to_slowapi_overhead']:.3f}"
            f"\nshield (parse + round:3) overhead / slowapi overhead = "
            f"{result['ratio_parse_round_to_slowapi_overhead']:.3f}"
            f"\nshield (parse + perturb) overhead / slowapi overhead = "
            f"{result['ratio_parse_perturb_to_slowapi_overhead']:.3f}"
            f"\nshield (defaults) overhead / slowapi overhead = "
            f"{result['ratio_defaults_to_slowapi_overhead']:.3f}"
            f"\nshield (full path, round:3) overhead / slowapi overhead = "
            f"{result['ratio_full_path_round_to_slowapi_overhead']:.3f}"
            f"\nshield (full path) overhead / slowapi overhead = "
            f"{result['ratio_full_path_to_slowapi_overhead']:.3f}"
            f"\nshield (full path + metrics) overhead / full path overhead = "
            f"{result['ratio_metrics_full_path_overhead']:.3f}"
            f"\nmetrics on the limiter-only path: "
            f"{result['metrics_us_limiter_only']:+.1f} µs/request"
        )
    return result


if __name__ == "__main__":
    main()
