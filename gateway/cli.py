"""The ``oidc-gateway`` command: the only place that reads files and the environment.

Exit codes: 0 success, 2 invalid configuration (every problem printed with its key path).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import Config, json_schema, load_config
from gateway.errors import ConfigError

EXIT_OK = 0
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oidc-gateway",
        description="OpenID Connect authentication gateway in front of web apps.",
    )
    parser.add_argument("--version", action="version", version=f"oidc-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve the gateway")
    run.add_argument("-c", "--config", required=True, type=Path, help="YAML config file")

    check = sub.add_parser("check", help="validate a config file; exit 0 (ok) or 2")
    check.add_argument("-c", "--config", required=True, type=Path, help="YAML config file")
    check.add_argument("--online", action="store_true",
                       help="also reach the provider's discovery, its JWKS and the session store")

    sub.add_parser("schema", help="print the config's JSON Schema")
    sub.add_parser("gen-key", help="print a fresh session key (base64 of 32 random bytes)")
    return parser


def _read_config(path: Path) -> Config | None:
    """Load and validate, printing every problem to stderr; None when invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot read the config file: {exc.strerror}", file=sys.stderr)
        return None
    try:
        return load_config(text, os.environ)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    if args.command == "gen-key":
        print(base64.b64encode(secrets.token_bytes(32)).decode())
        return EXIT_OK

    config = _read_config(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.command == "check":
        if args.online:
            from gateway.app import check_online

            problems = asyncio.run(check_online(config))
            if problems:
                for problem in problems:
                    print(problem, file=sys.stderr)
                return EXIT_CONFIG
        print("ok")
        return EXIT_OK

    from gateway.app import run
    from gateway.observability import configure_logging

    configure_logging(config.logging.level, config.logging.format)
    run(config)
    return EXIT_OK
