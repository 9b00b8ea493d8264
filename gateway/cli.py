"""The ``oidc-gateway`` command: the only place that reads files and the environment.

Exit codes: 0 success, 2 invalid configuration (every problem printed with its key path);
``explain`` exits 1 when the request it judges would not reach the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
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
EXIT_DENIED = 1  # explain: the request would not reach the upstream
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
    # Set by the supervisor of server.workers for the processes it starts; not for people.
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a config file; exit 0 (ok) or 2")
    check.add_argument("-c", "--config", required=True, type=Path, help="YAML config file")
    check.add_argument("--online", action="store_true",
                       help="also reach the provider's discovery, its JWKS and the session store")

    explain = sub.add_parser(
        "explain",
        help="what the gateway would do with one request: route, sign-in, decision, headers; "
        "exit 0 forwarded, 1 not, 2 config error",
    )
    explain.add_argument("-c", "--config", required=True, type=Path, help="YAML config file")
    explain.add_argument("method", metavar="METHOD", help="GET, POST, ...")
    explain.add_argument("url", metavar="URL", help="absolute URL: https://wiki.example.com/x")
    explain.add_argument("--claims", metavar="JSON",
                         help='the ID token claims of the signed-in user: {"sub": "1", ...}')
    explain.add_argument("--user", metavar="U", help="signed in as U (its sub too)")
    explain.add_argument("--groups", metavar="A,B", help="with --user: comma-separated groups")
    explain.add_argument("--email", metavar="E", help="with --user: e-mail address")
    explain.add_argument("--client-ip", metavar="IP",
                         help="address the request comes from (default: unknown, so network "
                         "conditions never admit and always deny)")
    explain.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                         help="a request header the client sends (repeatable)")

    sub.add_parser("schema", help="print the config's JSON Schema")
    sub.add_parser("gen-key", help="print a fresh session key (base64 of 32 random bytes)")

    demo = sub.add_parser("demo", help="try it: gateway, demo provider and echo app on 127.0.0.1")
    demo.add_argument("--port", type=int, default=4180, help="gateway port (default 4180)")
    demo.add_argument("--provider-port", type=int, help="demo provider port (default port+1)")
    demo.add_argument("--app-port", type=int, help="echo app port (default port+2)")
    return parser


def _print_problems(path: Path, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _read_config(path: Path) -> Config | None:
    """Load and validate, printing every problem to stderr; None when invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{path}: cannot read the config file: {exc.strerror}", file=sys.stderr)
        return None
    try:
        config = load_config(text, os.environ)
        # Files the config names are part of it: a key file that cannot be read is a
        # config error at check time, not a traceback at start.
        from gateway.assertion_keys import check_key_file

        check_key_file(config)
    except ConfigError as exc:
        _print_problems(path, exc)
        return None
    return config


def _explain(args: argparse.Namespace, config: Config) -> int:
    """``explain``: 0 when the request would be forwarded, 1 when not, 2 for bad arguments."""
    from gateway.explain import (
        claims_from_options,
        explain,
        identity_of,
        provider_lines,
        render,
    )

    def bad(message: str) -> int:
        print(f"oidc-gateway explain: {message}", file=sys.stderr)
        return EXIT_CONFIG

    if args.claims is not None and (args.user or args.groups or args.email):
        return bad("give either --claims or --user/--groups/--email, not both")
    if args.user is None and (args.groups or args.email):
        return bad("--groups and --email describe a user: add --user")
    claims: object = None
    if args.claims is not None:
        try:
            claims = json.loads(args.claims)
        except ValueError as exc:
            return bad(f"--claims is not JSON: {exc}")
        if not isinstance(claims, dict):
            return bad('--claims must be a JSON object: {"sub": "...", ...}')
    elif args.user is not None:
        groups = [g.strip() for g in (args.groups or "").split(",") if g.strip()]
        claims = claims_from_options(
            config.provider.claims, user=args.user, email=args.email, groups=groups
        )
    if args.client_ip is not None:
        try:
            ipaddress.ip_address(args.client_ip)
        except ValueError:
            return bad(f"--client-ip {args.client_ip!r} is not an IP address")
    headers: list[tuple[str, str]] = []
    for line in args.header:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            return bad(f"-H {line!r} is not 'Name: value'")
        headers.append((name.strip(), value.strip()))
    try:
        identity = identity_of(config, claims) if isinstance(claims, dict) else None
        result = explain(config, method=args.method, url=args.url, identity=identity,
                         client_ip=args.client_ip, headers=headers)
    except ValueError as exc:
        return bad(str(exc))
    for line in provider_lines(config):
        print(line)
    print(render(result))
    return EXIT_OK if result.forwarded else EXIT_DENIED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    if args.command == "gen-key":
        print(base64.b64encode(secrets.token_bytes(32)).decode())
        return EXIT_OK
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo(args.port, provider_port=args.provider_port, app_port=args.app_port)

    config = _read_config(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.command == "explain":
        return _explain(args, config)
    if args.command == "check":
        if args.online:
            from gateway.app import check_online

            problems = asyncio.run(check_online(config))
            if problems:
                for problem in problems:
                    print(problem, file=sys.stderr)
                return EXIT_CONFIG
        from gateway.explain import provider_lines

        # With provider.preset: the settings in effect and where each comes from.
        for line in provider_lines(config):
            print(line)
        print("ok")
        return EXIT_OK

    return _run(args, config)


class ConfigFile:
    """The config file ``run`` serves, for reloads (``gateway.app.ConfigSource``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def load(self) -> Config:
        return load_config(self.path.read_text(encoding="utf-8"), os.environ)

    def fingerprint(self) -> tuple[str, int, int, int, int]:
        """Where the path leads now and what is there. A Kubernetes ConfigMap update swaps
        the ``..data`` symlink to a new directory: the resolved path changes even when the
        new file's size and mtime happen to equal the old one's."""
        resolved = os.path.realpath(self.path)
        st = os.stat(resolved)
        return resolved, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _run(args: argparse.Namespace, config: Config) -> int:
    from gateway.app import run
    from gateway.observability import configure_logging

    path: Path = args.config
    worker: int | None = args.worker
    supervised = worker is not None or config.server.workers > 1
    configure_logging(config.logging.level, config.logging.format, pid=supervised)

    def worker_command(index: int) -> list[str]:
        return [sys.executable, "-m", "gateway", "run", "-c", str(path.resolve()),
                "--worker", str(index)]

    try:
        return run(
            config,
            source=ConfigFile(path),
            worker=worker,
            worker_command=worker_command,
            # Set by the supervisor: where the workers' metric samples meet.
            metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR") if worker is not None else None,
        )
    except ConfigError as exc:
        # Found while building the app (a file the config names went away since the check).
        _print_problems(path, exc)
        return EXIT_CONFIG
