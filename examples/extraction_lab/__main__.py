"""``python -m examples.extraction_lab [--quick] [--out PATH] [--set group.field=value]``."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import ATTACKS, PRESETS, parse_override
from .lab import run_lab
from .report import write_report

DEFAULT_OUT = Path(__file__).resolve().parent / "REPORT.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.extraction_lab",
        description="Attack a digits classifier behind ExtractionShield and report what the "
        "shield detected, what the thieves stole and what benign users paid.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small budgets and populations (CI, seconds)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"report path (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="GROUP.FIELD=VALUE",
        help="a shield setting for the shielded worlds, e.g. monitor.coverage=0.3:0.6 or "
        "policy.degrade=0.6 (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default 2)")
    parser.add_argument(
        "--seed", type=int, default=None, help="another seed: other splits, users and attacks"
    )
    parser.add_argument(
        "--attacks",
        default=None,
        help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)",
    )
    args = parser.parse_args(argv)

    config = PRESETS["quick" if args.quick else "full"]()
    for text in args.overrides:
        try:
            config = config.with_overrides(parse_override(text))
        except ValueError as exc:
            parser.error(str(exc))
    if args.jobs is not None:
        config = replace(config, jobs=max(1, args.jobs))
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    if args.attacks:
        attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
        unknown = sorted(set(attacks) - set(ATTACKS))
        if unknown:
            parser.error(f"unknown attacks: {', '.join(unknown)}; expected {', '.join(ATTACKS)}")
        config = replace(config, attacks=attacks)

    started = time.perf_counter()

    def progress(world: str) -> None:
        print(f"  {time.perf_counter() - started:6.1f} s  {world}", file=sys.stderr, flush=True)

    print(f"extraction lab, {config.name} configuration, {config.jobs} job(s)", file=sys.stderr)
    result = run_lab(config, progress)
    for path in write_report(result, args.out):
        print(path)
    print(f"done in {result.seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
