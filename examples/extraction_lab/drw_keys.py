"""How ``drw``'s evidence against a soft-label copy varies with the key.

The watermark lab (:mod:`.watermarks`) verifies with one fixed key; a key is one draw of
the target class, the keyed direction ``w`` and the keyed features, and the copy learns
some draws better than others. Here, for ``--keys`` random keys, the digits victim's
answers to the same Knockoff thief are marked by ``drw`` (as the shield marks them), an
MLP copy (the lab's soft-label thief) is trained on the first ``--answers`` of them, and
the copy is verified on the owner's 8,000 probes with ``drw`` alone and with the owner's
model (without the mark) as reference. Prints each key's ``z`` and a summary::

    python -m examples.extraction_lab.drw_keys                # 16 keys, 2,000 answers
    python -m examples.extraction_lab.drw_keys --keys 32 --answers 5000
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.neural_network import MLPRegressor

from asgi_extraction_shield.audit.attacks import knockoff
from asgi_extraction_shield.formats.base import Outputs, batch_request
from asgi_extraction_shield.formats.kserve_v1 import KServeV1
from asgi_extraction_shield.postprocess.chain import Context
from asgi_extraction_shield.watermark.drw import DRW

from .attacks import augment
from .victim import Victim, load_data
from .watermarks import _fit, _regressor, probes_of_owner

SEED = 20261129
PROBES = 8_000
SIGNIFICANCE = 1e-6


@dataclass(frozen=True)
class KeyResult:
    secret: str
    z: float
    z_reference: float


def one_by_one(p: np.ndarray) -> list[Outputs]:
    return [Outputs([b""], probabilities=p[i : i + 1]) for i in range(len(p))]


def run(keys: int, answers: int, seed: int = SEED) -> list[KeyResult]:
    data = load_data(seed)
    victim = Victim(data, seed)
    strategy = knockoff(augment)(data.x_pool, np.random.default_rng(seed), seed)
    queries = np.asarray([next(strategy) for _ in range(answers)])
    probes = probes_of_owner(data, PROBES, seed)
    request = batch_request(KServeV1(), queries.tolist())
    clean = victim.predict_proba(queries)
    reference = one_by_one(victim.predict_proba(np.asarray(probes)))
    results = []
    for i in range(keys):
        secret = f"drw-keys-{seed}-{i}"
        drw = DRW()
        drw.bind(secret.encode())
        outputs = Outputs(request.keys, probabilities=clean.copy())
        drw.apply(outputs, Context(b"", "thief", request))
        copy = _fit(
            lambda: MLPRegressor(hidden_layer_sizes=(64,), max_iter=300, random_state=seed),
            queries,
            outputs.probabilities,
        )
        suspect = one_by_one(np.asarray(_regressor(copy)(probes)))
        alone = drw.test(drw.key, probes, suspect, SIGNIFICANCE)
        against = drw.test_against(drw.key, probes, suspect, reference, SIGNIFICANCE)
        results.append(KeyResult(secret, alone.statistic, against.statistic))
    return results


def summary(results: Sequence[KeyResult]) -> dict[str, Any]:
    from asgi_extraction_shield.watermark.pvalues import normal_sf

    out: dict[str, Any] = {}
    for name, zs in (
        ("alone", [r.z for r in results]),
        ("reference", [r.z_reference for r in results]),
    ):
        ps = [normal_sf(z) for z in zs]
        out[name] = {
            "mean_z": statistics.fmean(zs),
            "median_p": statistics.median(ps),
            "below": sum(p < SIGNIFICANCE for p in ps),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--answers", type=int, default=2_000)
    args = parser.parse_args(argv)
    results = run(args.keys, args.answers)
    for r in results:
        print(f"{r.secret}: z {r.z:5.2f} alone, {r.z_reference:5.2f} with the reference")
    for name, s in summary(results).items():
        print(
            f"{name}: mean z {s['mean_z']:.2f}, median p {s['median_p']:.1e}, "
            f"{s['below']} of {len(results)} keys below {SIGNIFICANCE:g}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
