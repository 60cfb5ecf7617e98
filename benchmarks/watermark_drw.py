"""What ``drw`` costs on the response path, as ratios.

One KServe v1 answer of one probability row (10 classes) for an input of ``--width``
numbers, marked by ``drw`` with its keyed products (``features``, default 1,024) and with
the input's direction alone (``features=0``), each timed against what the shield does to
that answer anyway: decoding and re-encoding its JSON (orjson).

    python benchmarks/watermark_drw.py
"""

from __future__ import annotations

import argparse

import numpy as np
import orjson
from watermark_text import SECRET, best

from asgi_extraction_shield.formats.base import Outputs, batch_request
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.postprocess.chain import Context
from asgi_extraction_shield.watermark.drw import DRW


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 16.0, (1, args.width))
    p = rng.dirichlet(np.ones(10), 1)
    raw = orjson.dumps({"predictions": p.tolist()})
    request = batch_request(KServeV1(), x.tolist())
    json_cost = best(lambda: orjson.dumps(orjson.loads(raw)), args.rounds)
    out: dict[str, float] = {}
    for features in (args.features, 0):
        drw = DRW(features=features)
        drw.bind(SECRET)

        def mark(drw: DRW = drw) -> None:
            drw.apply(Outputs(request.keys, probabilities=p.copy()), Context(b"", "id", request))

        mark()  # the keyed matrices, drawn once and cached
        out[f"features={features}"] = best(mark, args.rounds) / json_cost
    for name, ratio in out.items():
        print(
            f"drw {name}: {ratio:.1f}× the JSON round trip of the answer "
            f"({ratio * json_cost * 1e6:.0f} µs)"
        )
    products, alone = out[f"features={args.features}"], out["features=0"]
    print(f"products against the direction alone: {products / alone:.2f}×")
    return out


if __name__ == "__main__":
    main()
