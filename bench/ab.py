"""``python -m bench.ab OLD_SRC NEW_SRC``: CPU per request of two gateway trees, side by side.

A full ``python -m bench`` run compares against Apache, but on a shared VM its 10-second
slices drift by 10-20 % within minutes, which hides a change of that size. This measures one
change: each source tree (a folder holding ``gateway/``, e.g. a ``git worktree`` of the commit
before) runs as its own gateway (one process unless ``--workers``) with the same config, and
short wrk slices go to A and B in alternating order (ABBAAB...), so slow and fast minutes fall
on both alike. The figure is the gateway's own CPU (user + system, every process of it) per
request, summed over all slices;
the probe before each slice checks the answer (status and body) so a broken variant cannot
pass for fast.

Cases: ``api401`` (no provider needed), ``redirect`` and ``get`` (signed in: logs in at the
provider first). Both need ``--provider`` (e.g. the peer's ``http://127.0.0.1:7400``) whose
client allows ``http://127.0.0.1:PORT/oauth2/callback``; the gateway listens on ``--port``
(4180, what the peer registers), one variant at a time, restarted for every slice. Sessions
live in the memory store, or with ``--store redis`` in a redis-server of the run's own (as in
``python -m bench``: the session cache and its confirmation ping then take part); the upstream
is ``--upstream`` (the peer's nginx by default). ``--workers N`` runs ``server.workers: N``
(with ``--store redis``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from bench.harness import (
    START_DEADLINE,
    HarnessError,
    bench_config,
    cpu_seconds,
    every_worker_ready,
    gateway_env,
    listener_pids,
)
from bench.loadgen import API_ACCEPT, BROWSER_ACCEPT, Request, probe, run_wrk
from bench.login import session_cookie
from tests.support.peers import ChildProcess, RedisServer, tail

CASES = {"api401": (API_ACCEPT, 401), "redirect": (BROWSER_ACCEPT, 302), "get": ("*/*", 200)}


def _config(port: int, args: argparse.Namespace, redis_url: str | None) -> dict[str, Any]:
    """The bench's gateway config, with sessions in the memory store or at ``redis_url``."""
    store: dict[str, Any] = (
        {"store": "redis", "redis_url": redis_url} if redis_url is not None else {})
    config = bench_config(port=port, issuer=args.provider, client_id=args.client_id,
                          client_secret=args.client_secret, upstream=args.upstream, **store)
    if args.workers > 1:
        config["server"]["workers"] = args.workers
    return config


def _probed(url: str, request: Request) -> int | str:
    """The status of one probe, or the connection error that stopped it."""
    try:
        return probe(url, request).status
    except OSError as exc:
        return type(exc).__name__


def _slice(src: Path, config: Path, log: Path, args: argparse.Namespace) -> tuple[float, int]:
    """Start the gateway from ``src``, check one answer, warm up, then one measured wrk run:
    (CPU seconds of the gateway's processes, requests answered)."""
    url = f"http://127.0.0.1:{args.port}"
    accept, status = CASES[args.case]
    gateway = ChildProcess("gateway", [sys.executable, "-m", "gateway", "run", "-c", str(config)],
                           log, cwd=src, env=gateway_env(src), group=True)
    gateway.start()
    try:
        gateway.wait_until(lambda: every_worker_ready(args.port, args.workers),
                           START_DEADLINE, f"it is ready on {url}/ready")
        cookie = session_cookie(url) if args.case == "get" else None
        request = Request("GET", "/bench", accept, cookie)
        # Ten ready answers can all have come from one worker; another may still be loading
        # the provider (a 503 until it has): asked again, on a new connection each time,
        # until the answer is right or the start-up deadline has passed.
        # A refused connection counts as a wrong answer: CI once saw one right after ten
        # ready answers (workers=2), which a retry a moment later would have passed.
        deadline = time.monotonic() + START_DEADLINE
        while (seen := _probed(url, request)) != status:
            if time.monotonic() > deadline:
                raise HarnessError(f"{src}: GET /bench answered {seen}, expected "
                                   f"{status}; the gateway's log ends:\n{tail(log, 20)}")
            time.sleep(0.1)
        run_wrk(url, request, duration=1, connections=args.connections, threads=1)
        # The gateway's process, or with --workers its supervisor and workers.
        pids = listener_pids(args.port)
        if gateway.pid is not None:
            pids.add(gateway.pid)
        before = cpu_seconds(pids)
        result = run_wrk(url, request, duration=args.seconds, connections=args.connections,
                         threads=1)
        after = cpu_seconds(pids)
        used = sum(after[pid] - before[pid] for pid in after if pid in before)
        if result.err_connect or result.err_read or result.err_write or result.err_timeout:
            raise HarnessError(f"{src}: wrk saw errors: {result.error_text()}")
        return used, result.requests
    finally:
        gateway.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="source tree A (holds gateway/)")
    parser.add_argument("new", type=Path, help="source tree B (holds gateway/)")
    parser.add_argument("--case", choices=sorted(CASES), default="get")
    parser.add_argument("--rounds", type=int, default=6, help="slices per variant [6]")
    parser.add_argument("--seconds", type=int, default=4, help="measured seconds per slice [4]")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--port", type=int, default=4180)
    parser.add_argument("--provider", default="http://127.0.0.1:7400")
    parser.add_argument("--client-id", default="gateway-bench")
    parser.add_argument("--client-secret", default="gateway-bench-secret-0123456789abcdef")
    parser.add_argument("--upstream", default="http://127.0.0.1:7401")
    parser.add_argument("--store", choices=("memory", "redis"), default="memory",
                        help="where sessions live [memory]; redis: a redis-server of its own")
    parser.add_argument("--workers", type=int, default=1,
                        help="server.workers [1], with --store redis; the CPU of the "
                             "supervisor and every worker counts")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 50 or not 1 <= args.seconds <= 60:
        parser.error("--rounds must be 1..50 and --seconds 1..60")
    if not 1 <= args.workers <= 8:
        parser.error("--workers must be 1..8")
    if args.workers > 1 and args.store == "memory":
        parser.error("--workers needs --store redis: memory-store sessions are per worker")
    sources = {"A": args.old.resolve(), "B": args.new.resolve()}
    for src in sources.values():
        if not (src / "gateway" / "__init__.py").is_file():
            parser.error(f"{src} holds no gateway/ package")
    totals = {name: [0.0, 0] for name in sources}
    with tempfile.TemporaryDirectory(prefix="oidcgw-ab-") as folder, ExitStack() as stack:
        redis_url = None
        if args.store == "redis":
            redis = RedisServer(Path(folder) / "redis", persist=False)
            stack.callback(redis.stop)
            redis.start()
            redis_url = redis.url
        print(f"ab: sessions in {redis_url or 'the memory store'}, "
              f"server.workers {args.workers}", flush=True)
        config = Path(folder) / "gateway.yaml"
        config.write_text(yaml.safe_dump(_config(args.port, args, redis_url)))
        try:
            for index in range(args.rounds):
                order = ("A", "B") if index % 2 == 0 else ("B", "A")
                for name in order:
                    used, count = _slice(sources[name], config, Path(folder) / f"{name}.log", args)
                    totals[name][0] += used
                    totals[name][1] += count
                    print(f"ab: round {index + 1} {name}: {count / args.seconds:,.0f} req/s, "
                          f"{used / max(count, 1) * 1e6:,.0f} µs CPU/req", flush=True)
        except HarnessError as exc:
            print(f"ab: {exc}", file=sys.stderr)
            return 1
    per = {name: used / max(count, 1) * 1e6 for name, (used, count) in totals.items()}
    for name, src in sources.items():
        print(f"ab: {name} {src}: {per[name]:,.1f} µs CPU/req over {totals[name][1]:,} requests")
    print(f"ab: B ÷ A = {per['B'] / per['A']:.3f} (CPU per request, {args.case})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
