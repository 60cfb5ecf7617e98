"""What each perturbation costs a legitimate user: how far answers move, how often top-1 changes.

Applies every built-in perturbation, with its default parameters (and a few settings
worth comparing), to two sets of probability rows: the example model's answers on its
held-out data (confident, as benign in-distribution queries mostly are) and Dirichlet(1)
rows over 10 classes (uncertain answers). Rows are keyed by their index, as the shield
keys them by the canonical query. Embedding noise is measured on random unit vectors.

    python benchmarks/perturbation_cost.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from asgi_extraction_shield.formats.base import Outputs
from asgi_extraction_shield.postprocess import Context, parse_chain

CHAINS = [
    "round:3",
    "round:1",
    "top_k:3",
    "top_k:1",
    "label_only",
    "reverse_sigmoid",
    "reverse_sigmoid:beta=1:gamma=0.2",
    "reverse_sigmoid:beta=1:gamma=0.2:guard_top1=true",
    "poison",
    "poison:alpha=0.2:epsilon=0.1",
    "misinformation",
]


def example_probabilities() -> np.ndarray:
    path = Path(__file__).resolve().parent.parent / "examples" / "model_server.py"
    spec = importlib.util.spec_from_file_location("model_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_server"] = module
    spec.loader.exec_module(module)
    probs: np.ndarray = module.model.predict_proba(module.X_TEST)
    return probs


def cost(chain: str, p: np.ndarray) -> dict[str, float]:
    outputs = Outputs([b"row:%d" % i for i in range(len(p))], probabilities=p.copy())
    ctx = Context(b"benchmark-key".ljust(32, b"."))
    for processor in parse_chain(chain):
        processor.apply(outputs, ctx)
    q = outputs.probabilities
    assert q is not None
    l1 = np.abs(q - p).sum(axis=1)
    return {
        "top1_changed_pct": float((q.argmax(1) != p.argmax(1)).mean() * 100),
        "mean_l1": float(l1.mean()),
        "max_l1": float(l1.max()),
    }


def embedding_cost(epsilon: float, d: int = 384, n: int = 2000) -> dict[str, float]:
    rng = np.random.default_rng(0)
    e = rng.normal(size=(n, d))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    outputs = Outputs([b"row:%d" % i for i in range(n)], embeddings=e.copy())
    parse_chain(f"embedding_noise:{epsilon}")[0].apply(outputs, Context(b"k" * 32))
    assert outputs.embeddings is not None
    cosine = (outputs.embeddings * e).sum(axis=1)
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sets = {
        "example model (held-out)": example_probabilities(),
        "Dirichlet(1), 10 classes": np.random.default_rng(1).dirichlet(np.ones(10), size=2000),
    }
    result: dict[str, Any] = {
        "probabilities": {name: {c: cost(c, p) for c in CHAINS} for name, p in sets.items()},
        "embeddings": {f"embedding_noise:{eps}": embedding_cost(eps) for eps in (0.02, 0.05, 0.1)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    names = list(sets)
    print(
        "| perturbation | " + " | ".join(f"{n}: top-1 changed, mean / max L1" for n in names) + " |"
    )
    print("|---|" + "---:|" * len(names))
    for chain in CHAINS:
        cells = []
        for name in names:
            c = result["probabilities"][name][chain]
            cells.append(f"{c['top1_changed_pct']:.1f}%, {c['mean_l1']:.3f} / {c['max_l1']:.3f}")
        print(f"| `{chain}` | " + " | ".join(cells) + " |")
    print("\n| embedding perturbation (d=384, unit norm) | mean cosine to original | min cosine |")
    print("|---|---:|---:|")
    for chain, c in result["embeddings"].items():
        print(f"| `{chain}` | {c['mean_cosine']:.4f} | {c['min_cosine']:.4f} |")
    return result


if __name__ == "__main__":
    main()
