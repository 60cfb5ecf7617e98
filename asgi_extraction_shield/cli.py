"""The ``extraction-shield`` console script.

Human-readable output by default, ``--json`` for machines. Exit status 0 on success,
2 when the command itself could not run (bad settings, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import IO

from . import __version__
from .audit.cli import add_parser as add_audit_parser
from .errors import ConfigurationError, StorageError
from .keys import generate_secret
from .settings import ShieldSettings
from .verify import DEFAULT_ALPHA, DEFAULT_PROBES, FORMATS, VerificationError, verify
from .watermark import SCHEMES, parse_watermarks


def _settings(args: argparse.Namespace) -> int:
    try:
        rows = ShieldSettings().describe()
    except ConfigurationError as exc:
        print(f"extraction-shield: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"env": e, "value": v, "description": d} for e, v, d in rows], indent=2))
        return 0
    width = max(len(f"{env}={value}") for env, value, _ in rows)
    for env, value, description in rows:
        print(f"{f'{env}={value}':<{width}}  # {description}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    key = generate_secret()
    print(json.dumps({"secret_key": key}) if args.json else key)
    return 0


def _records(args: argparse.Namespace) -> int:
    """Export the watermark records kept on Redis as JSONL."""
    import asyncio

    from .storage.redis import RedisStorage, redact
    from .storage.redis_records import export_records

    async def export(out: IO[bytes]) -> int:
        settings = ShieldSettings()
        url = args.storage_url or settings.storage_url
        if not url.startswith(RedisStorage.schemes):
            raise ConfigurationError(
                f"EXTRACTION_SHIELD_STORAGE_URL={redact(url)!r}: records are kept on "
                "Redis only (redis:// or rediss://); without Redis they are in the file of "
                "EXTRACTION_SHIELD_WATERMARK_RECORDS_PATH"
            )
        storage = RedisStorage(url, prefix=settings.redis_prefix, timeout=args.timeout)
        try:
            return await export_records(storage, out, args.identity)
        finally:
            await storage.close()

    try:
        if args.out == "-":
            count = asyncio.run(export(sys.stdout.buffer))
        else:
            with open(args.out, "wb") as out:
                count = asyncio.run(export(out))
    except (ConfigurationError, OSError, StorageError) as exc:
        print(f"extraction-shield records: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # redis-py's own errors (refused connection, auth, ...)
        print(f"extraction-shield records: Redis: {exc!r}", file=sys.stderr)
        return 2
    print(f"{count} records written to {args.out}", file=sys.stderr)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from .policy import LEVELS
    from .settings import SIGNALS
    from .tune import parse_events, render, tune

    try:
        settings = ShieldSettings()  # the thresholds in force, to compare with
        known_bad = _known_bad(args.known_bad)
        with open(args.events, encoding="utf-8", errors="replace") as lines:
            policy, rules = settings.policy, settings.monitor.rules()
            result = tune(
                parse_events(lines),
                target_fpr=args.target_fpr,
                current_levels={level: getattr(policy, level) for level in LEVELS[1:]},
                current_rules={name: rules[name] for name in SIGNALS},
                min_queries=settings.monitor.min_queries,
                known_bad=known_bad,
                margin=args.margin,
                hysteresis=policy.hysteresis,
            )
    except (ConfigurationError, OSError, ValueError) as exc:
        print(f"extraction-shield tune: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


def _known_bad(path: str | None) -> list[str]:
    """Identity hashes, one a line (blank lines and ``#`` comments skipped)."""
    if path is None:
        return []
    with open(path, encoding="utf-8") as lines:
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _scheme_spec(name: str, watermark: str) -> str:
    """A bare scheme name takes its parameters from ``WATERMARK`` when it is there: the
    verifier must look for the mark the shield made."""
    if ":" in name or "=" in name:
        return name
    for configured in parse_watermarks(watermark):
        if configured.name == name.strip().lower():
            return repr(configured)
    return name


def _verify(args: argparse.Namespace) -> int:
    try:
        settings = ShieldSettings()
        key = args.key or (
            settings.secret_key.get_secret_value() if settings.secret_key is not None else None
        )
        if not key:
            raise VerificationError(
                "no key: set EXTRACTION_SHIELD_SECRET_KEY (the shield's) or pass --key"
            )
        headers = {}
        for header in args.header:
            name, sep, value = header.partition(":")
            if not sep or not name.strip():
                raise VerificationError(f"--header {header!r}: expected 'Name: value'")
            headers[name.strip()] = value.strip()
        result = verify(
            _scheme_spec(args.scheme, settings.watermark),
            args.suspect,
            key=key,
            records=args.records,
            alpha=args.alpha,
            probes=args.probes,
            format=args.format,
            headers=headers,
            model=args.model,
            reference=args.reference,
        )
    except (ConfigurationError, VerificationError) as exc:
        print(f"extraction-shield verify: {exc}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extraction-shield", description="Model-extraction shield for ASGI model servers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    settings = commands.add_parser(
        "settings", help="print the effective settings (secrets masked), one env var per line"
    )
    settings.add_argument("--json", action="store_true", help="machine-readable output")
    settings.set_defaults(run=_settings)
    keygen = commands.add_parser("keygen", help="print a new random EXTRACTION_SHIELD_SECRET_KEY")
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(run=_keygen)
    add_audit_parser(commands)
    records = commands.add_parser(
        "records",
        help="export the watermark records kept on Redis as JSONL (for verify --records)",
    )
    records.add_argument(
        "--out", default="-", help="the JSONL file to write (default: standard output)"
    )
    records.add_argument("--identity", help="only this identity's records (its hash)")
    records.add_argument(
        "--storage-url", help="the Redis URL (default: EXTRACTION_SHIELD_STORAGE_URL)"
    )
    records.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per Redis call (default 5)"
    )
    records.set_defaults(run=_records)
    from .tune import __doc__ as tune_doc

    tune = commands.add_parser(
        "tune",
        help="suggest thresholds for a target false-positive rate from a shadow event log",
        description=(tune_doc or "").split("**Assumption.**")[-1].strip().replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("--events", required=True, help="the shield's JSON event log (one a line)")
    tune.add_argument(
        "--target-fpr",
        type=float,
        default=0.01,
        help="share of benign identities allowed to reach 'degrade' (default 0.01)",
    )
    tune.add_argument(
        "--known-bad", help="a file of identity hashes known to be attackers, one a line"
    )
    tune.add_argument(
        "--margin",
        type=float,
        default=0.02,
        help="how far above the last tolerated benign peak a threshold goes (default 0.02)",
    )
    tune.add_argument("--json", action="store_true", help="machine-readable output")
    tune.set_defaults(run=_tune)
    check = commands.add_parser(
        "verify",
        help="test a suspect model for one of the shield's watermarks (verdict and p-value)",
        description="Ask a suspect (a URL of a compatible API, or a JSONL file of "
        '{"input": ..., "output": ...} answers) and test its answers for a watermark, keyed '
        "by EXTRACTION_SHIELD_SECRET_KEY. Exit status 0 whatever the verdict; 2 when the "
        "verification cannot run.",
    )
    check.add_argument(
        "--scheme",
        required=True,
        help=f"the watermark: {', '.join(sorted(SCHEMES))} or 'name:param=value,...'; a bare "
        "name takes the "
        "parameters EXTRACTION_SHIELD_WATERMARK gives it",
    )
    check.add_argument("--suspect", required=True, help="http(s) URL or JSONL path")
    check.add_argument(
        "--records",
        help='JSONL of probe inputs ({"input": ...} per line): the queries dawn marked '
        "(WATERMARK_RECORDS_PATH), or any inputs of the suspect's domain for drw",
    )
    check.add_argument(
        "--reference",
        help="drw: your own model WITHOUT the watermark (URL, asked with the same --format and "
        "--header, or JSONL of its answers to the same inputs): what any copy shares with it "
        "cancels out, and the test stays exact",
    )
    check.add_argument("--key", help="the secret key (default: EXTRACTION_SHIELD_SECRET_KEY)")
    check.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"significance of the verdict (default {DEFAULT_ALPHA:g})",
    )
    check.add_argument(
        "--probes",
        type=int,
        default=DEFAULT_PROBES,
        help=f"most questions asked or answers read (default {DEFAULT_PROBES})",
    )
    check.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="the URL suspect's payload format (default: by its path)",
    )
    check.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a header sent to a URL suspect, e.g. 'Authorization: Bearer ...' (repeatable)",
    )
    check.add_argument("--model", default="", help="model name in OpenAI requests")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    code: int = args.run(args)
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
