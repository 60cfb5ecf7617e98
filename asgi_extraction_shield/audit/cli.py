"""``extraction-shield audit``: its arguments, ``--fail-if`` checks and output.

Exit status: 0 when the audit ran and every ``--fail-if`` check passed, 1 when a check
failed, 2 when the audit could not run (bad arguments, samples, target or extras).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .run import (
    MAX_BENIGN,
    MAX_BUDGET,
    MAX_IDENTITIES,
    MAX_TIME_LIMIT,
    AuditConfig,
    AuditResult,
    run_audit,
)
from .wire import FORMATS

METRICS = {
    "fidelity": "best substitute fidelity of any run and thief (0-1: top-1, retrieval or "
    "next-word agreement, by the answers' kind)",
    "single_fidelity": "best fidelity of the one-identity runs",
    "sybil_fidelity": "best fidelity of the sybil runs",
    "unreacted": "attack runs the shield never reacted to",
    "benign_refused": "benign replay requests refused (before and after the attacks)",
    "benign_changed": "benign top-1 answers changed after the attacks",
}
_CHECK = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([0-9.]+)\s*$")


@dataclass(frozen=True)
class Check:
    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Check:
        match = _CHECK.match(text)
        if match is None or match.group(1) not in METRICS:
            raise ConfigurationError(
                f"--fail-if {text!r}: expected METRIC>VALUE (or >=, <, <=) with METRIC one of "
                f"{', '.join(METRICS)}, e.g. 'fidelity>0.8' or 'unreacted>0'"
            )
        try:
            threshold = float(match.group(3))
        except ValueError:
            raise ConfigurationError(
                f"--fail-if {text!r}: {match.group(3)!r} is not a number"
            ) from None
        return cls(match.group(1), match.group(2), threshold)

    def value(self, result: AuditResult) -> float:
        passes = result.passes
        if self.metric == "unreacted":
            return float(sum(run.first_reaction is None for run in result.runs))
        if self.metric == "benign_refused":
            return float(passes["before"].refused + passes["after"].refused)
        if self.metric == "benign_changed":
            return float(passes["after"].changed_top1)
        split = {"single_fidelity": "single", "sybil_fidelity": "sybil"}.get(self.metric)
        best = result.max_fidelity(split)
        return 0.0 if best is None else best

    def failed(self, value: float) -> bool:
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def add_parser(commands: Any) -> None:
    """Register ``audit`` on the console script's sub-command parsers."""
    audit = commands.add_parser(
        "audit",
        help="attack your own running endpoint at small budgets and report what a thief gets",
        description="Runs extraction attacks (small budgets, one and many identities) and a "
        "benign replay against a running endpoint of yours, and reports what a thief "
        "would get, when the shield reacted, and what a benign user experienced.",
    )
    add = audit.add_argument
    add(
        "--target",
        required=True,
        help="URL of the endpoint, e.g. http://127.0.0.1:8000/v1/models/m:predict",
    )
    add("--format", required=True, choices=FORMATS, help="the endpoint's payload format")
    add(
        "--samples",
        required=True,
        type=Path,
        help="JSONL (or a JSON list) of sample inputs as the API takes them",
    )
    add(
        "--budget",
        type=int,
        default=300,
        help=f"queries per attack run (default 300, at most {MAX_BUDGET})",
    )
    add(
        "--identities",
        type=int,
        default=10,
        help=f"API keys of the sybil runs (default 10, at most {MAX_IDENTITIES})",
    )
    add(
        "--time-limit",
        type=float,
        default=120.0,
        help=f"seconds for the whole audit (default 120, at most {MAX_TIME_LIMIT:.0f})",
    )
    add(
        "--attacks",
        default="",
        help="comma-separated subset: uniform,jbda,knockoff,boundary (numeric) or replay,augment (text)",
    )
    add(
        "--header",
        action="append",
        default=None,
        help="'Name: value' sent with every request, '{key}' replaced by each identity's key (default 'X-API-Key: {key}'; repeatable)",
    )
    add(
        "--extra",
        default="{}",
        help='JSON object merged into every request body, e.g. \'{"model": "m", "max_tokens": 8}\'',
    )
    add(
        "--holdout",
        type=float,
        default=0.3,
        help="share of the samples kept aside to score the thieves (default 0.3)",
    )
    add(
        "--benign",
        type=int,
        default=100,
        help=f"requests of each benign replay pass (default 100, at most {MAX_BENIGN})",
    )
    add(
        "--benign-users",
        type=int,
        default=5,
        help="benign identities sharing the replay, each a slice of its own (default 5)",
    )
    add(
        "--canary-every",
        type=int,
        default=20,
        help="an attacking identity re-sends a held-out sample every N queries (default 20)",
    )
    add("--timeout", type=float, default=10.0, help="seconds one request may take (default 10)")
    add("--seed", type=int, default=0, help="seed of the attacks' randomness (default 0)")
    add(
        "--out",
        type=Path,
        default=None,
        help="directory for AUDIT.md and its PNG plots (needs the 'lab' extra)",
    )
    add("--json", action="store_true", help="print a machine-readable summary")
    add(
        "--fail-if",
        action="append",
        default=[],
        help="exit 1 when METRIC>VALUE holds (>=, <, <= too); METRIC: " + ", ".join(METRICS),
    )
    add(
        "--allow-remote",
        action="store_true",
        help="allow a target that is not on this machine (loopback); audit only what you own",
    )
    audit.set_defaults(run=run_command)


def _config(args: argparse.Namespace) -> AuditConfig:
    try:
        extra = json.loads(args.extra)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--extra {args.extra!r}: not JSON ({exc.msg})") from None
    if not isinstance(extra, dict):
        raise ConfigurationError(f"--extra {args.extra!r}: expected a JSON object")
    names = {f.name for f in fields(AuditConfig)}
    given = {name: value for name, value in vars(args).items() if name in names}
    given["attacks"] = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    given["headers"] = tuple(args.header or ("X-API-Key: {key}",))
    given["extra"] = extra
    return AuditConfig(**given)


def run_command(args: argparse.Namespace) -> int:
    from .report import require, write_report

    try:
        checks = [Check.parse(text) for text in args.fail_if]
        config = _config(args)
        require("sklearn", "lab", "the audit's substitutes")
        if args.out is not None:
            require("matplotlib", "lab", "the audit report's plots")
        progress = None if args.json else (lambda line: print(f"audit: {line}", file=sys.stderr))
        result = run_audit(config, progress)
        paths = write_report(result, args.out, _command(args)) if args.out is not None else []
    except ConfigurationError as exc:
        print(f"extraction-shield audit: {exc}", file=sys.stderr)
        return 2
    outcomes = [(check, check.value(result)) for check in checks]
    failed = [str(check) for check, value in outcomes if check.failed(value)]
    if args.json:
        summary = result.summary()
        summary["checks"] = [
            {"check": str(c), "value": v, "failed": c.failed(v)} for c, v in outcomes
        ]
        summary["report"] = str(paths[0]) if paths else None
        print(json.dumps(summary, indent=2))
    else:
        _print_human(result, paths, failed)
    return 1 if failed else 0


def _print_human(result: AuditResult, paths: list[Path], failed: list[str]) -> None:
    print(f"Audit of {result.target_url}: {result.requests} requests in {result.seconds:.1f} s")
    for run in result.runs:
        s = run.summary()
        best = max((f for c in (run.fidelity or {}).values() for f in c.values()), default=None)
        reaction = (
            "no reaction"
            if run.first_reaction is None
            else f"reacted at query {run.first_reaction + 1}"
        )
        fidelity = "–" if best is None else f"{best:.0%}"
        print(
            f"  {run.attack:<9} {run.identities:>3} id: sent {s['sent']:>5}, refused "
            f"{s['refused']:>5}, {reaction}, thief fidelity {fidelity}"
        )
    for name, p in result.passes.items():
        print(
            f"  benign {name:<6}: {p.refused} of {p.sent} refused, {p.changed_top1} of {p.compared} top-1 changed"
        )
    for path in paths[:1]:
        print(f"Report: {path}")
    for check in failed:
        print(f"FAILED: {check}")


def _command(args: argparse.Namespace) -> str:
    """The command line that made the report (the header values are templates, no keys)."""
    words = ["extraction-shield", "audit", "--target", args.target, "--format", args.format]
    words += ["--samples", str(args.samples), "--budget", str(args.budget)]
    words += ["--identities", str(args.identities)]
    if args.attacks:
        words += ["--attacks", args.attacks]
    return shlex.join(words)
