"""The ``extraction-shield`` console script.

Human-readable output by default, ``--json`` for machines. Exit status 0 on success,
2 when the command itself could not run (bad settings, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .audit.cli import add_parser as add_audit_parser
from .errors import ConfigurationError
from .keys import generate_secret
from .settings import ShieldSettings


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
