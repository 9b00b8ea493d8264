"""``python -m bench``: measure the gateway against its direct upstream (and other gateways).

One command starts, on 127.0.0.1 and free ports, its own redis-server, an nginx upstream
(bench/upstream/), the test OpenID Provider (tests/op, with its login and consent forms) and the
gateway (``python -m gateway run`` with Redis sessions); logs in like a browser; then, for every
case, warms up and runs ``wrk`` against the direct upstream, the gateway and each ``--compare``
gateway in turn (so noise hits every target alike), times complete logins (the targets taking
turns, one login each), reads the gateway's peak RSS, measures RSS per session in the memory
store, and prints one Markdown table.
Everything it started is stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import redis
import yaml

from bench import login
from bench.harness import (
    ONE_MIB,
    REPO_DIR,
    SMALL_BODY,
    ExternalProvider,
    Harness,
    HarnessError,
    cpu_seconds,
    find_program,
    gateway_env,
    listener_pids,
    signals_raise,
    tree_status_kib,
)
from bench.loadgen import (
    API_ACCEPT,
    BROWSER_ACCEPT,
    Request,
    check_loopback_url,
    probe,
    run_wrk,
)
from bench.report import DIRECT, Memory, Report, Row, render
from gateway.sessions import decode_ticket, parse_key, unseal

OURS = "oidc-gateway"
OK_STATUSES = frozenset(range(200, 400))  # what wrk does not count as a status error
PROFILE_RATE = 100  # py-spy samples per second
LOGIN_WARMUP = 5  # unrecorded logins per target before the timed ones (unless --warmup 0)
_LINE_NUMBER = re.compile(r":\d+\)$")
UPLOAD_BYTES = 10 * ONE_MIB


@dataclass(frozen=True)
class Case:
    """One thing to measure. ``direct`` names the case whose direct-upstream req/s is the
    denominator of the "÷ direct" column (None: no upstream counterpart, e.g. logins)."""

    key: str
    title: str
    method: str = "GET"
    path: str = "/bench"
    accept: str = BROWSER_ACCEPT
    signed_in: bool = True
    statuses: frozenset[int] = frozenset({200})
    body: bytes | None = None  # the exact body expected
    body_len: int | None = None  # or only its length
    upload_bytes: int = 0
    direct: str | None = None
    runs_direct: bool = False
    is_login: bool = False


CASES = (
    Case("get", "GET 64 B, signed in", body=SMALL_BODY, direct="get", runs_direct=True),
    Case("get1m", "GET 1 MB, signed in", path="/bench-1m", body_len=ONE_MIB, direct="get1m",
         runs_direct=True),
    Case("post10m", "POST 10 MB upload, signed in", method="POST", path="/bench-upload",
         accept="*/*", upload_bytes=UPLOAD_BYTES, direct="post10m", runs_direct=True),
    Case("redirect", "GET, no session, browser (302 to provider)", signed_in=False,
         statuses=frozenset({302, 303, 307}), direct="get"),
    Case("api401", "GET, no session, API (401)", accept=API_ACCEPT, signed_in=False,
         statuses=frozenset({401}), direct="get"),
    Case("login", "full login flow", is_login=True),
)


@dataclass
class Target:
    label: str
    url: str
    cookie: str | None = None
    login_error: str | None = None


# ------------------------------------------------------------------------------------ options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n\n")[0],
        epilog="Example: .venv/bin/python -m bench --compare apache-redis=http://127.0.0.1:7410")
    p.add_argument("--duration", type=int, help="seconds of measured load per case [10]")
    p.add_argument("--warmup", type=int, help="seconds of unrecorded load before each run [3]")
    p.add_argument("--smoke", action="store_true",
                   help="every case for about 1 s, no warm-up, 3 logins, 20,000 sessions")
    p.add_argument("--compare", action="append", default=[], metavar="[LABEL=]URL",
                   help="another gateway on loopback to run the same cases against (repeatable)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections [50]")
    p.add_argument("--upload-connections", type=int, default=8,
                   help="wrk connections for the 10 MB upload [8]")
    p.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    p.add_argument("--logins", type=int, help="timed logins per gateway [20]")
    p.add_argument("--sessions", type=int, help="sessions for the RSS-per-session figure [100000]")
    p.add_argument("--cases", help="comma-separated subset of: " + ",".join(c.key for c in CASES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML", dest="settings",
                   help="override a key of the generated gateway config, e.g. "
                        "--set server.workers=2 (repeatable)")
    p.add_argument("--gateway-src", type=Path, default=REPO_DIR, metavar="DIR",
                   help="run the gateway from this source tree (a folder holding gateway/, e.g. "
                        "`git worktree add /tmp/old HEAD~1`) instead of this checkout")
    p.add_argument("--profile-seconds", type=int, default=0,
                   help="after the runs, profile the gateway with py-spy for this many seconds "
                        "under one case's load (--profile-case) and print the top functions "
                        "[off]")
    p.add_argument("--profile-case", default="get",
                   help="the case whose load is profiled: get, get1m, post10m, redirect or "
                        "api401 [get]")
    p.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                   help="after the runs, hold the signed-in GET load this long (in 10 s slices) "
                        "and report the gateway's RSS after each slice, to show it stays flat "
                        "[off; the issue asks for 300]")
    p.add_argument("--provider", metavar="ISSUER",
                   help="log our gateway in at this running provider instead of starting "
                        "tests/op, e.g. the peer's http://127.0.0.1:7400, so that both gateways "
                        "use the same one; its client comes from OIDC_CLIENT_ID and "
                        "OIDC_CLIENT_SECRET (default: the peer's), the gateway listens on "
                        "SECOND_GATEWAY_PORT (default 4180), the port the peer registers")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the run folder (logs, configs)")
    return p


@dataclass(frozen=True)
class Options:
    duration: int
    warmup: int
    logins: int
    sessions: int
    connections: int
    upload_connections: int
    threads: int
    cases: tuple[Case, ...]
    compares: tuple[tuple[str, str], ...]
    settings: dict[str, Any]
    profile_seconds: int
    profile_case: Case
    pause: float
    gateway_src: Path
    soak: int = 0
    provider: ExternalProvider | None = None


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    smoke = bool(args.smoke)
    duration = args.duration if args.duration is not None else (1 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 3)
    logins = args.logins if args.logins is not None else (3 if smoke else 20)
    sessions = args.sessions if args.sessions is not None else (20_000 if smoke else 100_000)
    if not 1 <= duration <= 120:
        parser.error("--duration must be 1..120 s")
    if not 0 <= warmup <= 30:
        parser.error("--warmup must be 0..30 s")
    if not 1 <= logins <= 200:
        parser.error("--logins must be 1..200")
    if not 0 <= sessions <= 1_000_000:
        parser.error("--sessions must be 0..1000000")
    for name in ("connections", "upload_connections", "threads"):
        if not 1 <= getattr(args, name) <= 1000:
            parser.error(f"--{name.replace('_', '-')} must be 1..1000")
    if not 0 <= args.profile_seconds <= 60:
        parser.error("--profile-seconds must be 0..60")
    if not 0 <= args.soak <= 3600:
        parser.error("--soak must be 0..3600 s")
    profile_case = next((c for c in CASES if c.key == args.profile_case and not c.is_login),
                        None)
    if profile_case is None:
        parser.error(f"--profile-case: no load case {args.profile_case!r}")
    cases: tuple[Case, ...] = CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(wanted) - {c.key for c in CASES})
        if unknown:
            parser.error(f"unknown case(s) {', '.join(unknown)}; "
                         f"known: {', '.join(c.key for c in CASES)}")
        cases = tuple(c for c in CASES if c.key in wanted)
    compares: list[tuple[str, str]] = []
    for raw in args.compare:
        label, sep, url = raw.partition("=")
        if not sep:
            label, url = "", raw
        try:
            url = check_loopback_url(url)
        except HarnessError as exc:
            parser.error(f"--compare: {exc}")
        label = label or url.split("://", 1)[1]
        if label in (OURS, DIRECT) or label in dict(compares):
            parser.error(f"--compare: label {label!r} is taken")
        compares.append((label, url))
    settings: dict[str, Any] = {}
    for raw in args.settings:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            parser.error(f"--set wants KEY=YAML, got {raw!r}")
        settings[key] = yaml.safe_load(value)
    return Options(duration, warmup, logins, sessions, args.connections, args.upload_connections,
                   args.threads, cases, tuple(compares), settings, args.profile_seconds,
                   profile_case,
                   pause=0.2 if smoke else 1.0, gateway_src=_gateway_src(args.gateway_src, parser),
                   soak=args.soak, provider=_provider(args.provider, parser))


# The defaults of ../shared/peer/up.sh.
PEER_CLIENT_ID = "gateway-bench"
PEER_CLIENT_SECRET = "gateway-bench-secret-0123456789abcdef"  # noqa: S105 - a test peer's


def _provider(issuer: str | None, parser: argparse.ArgumentParser) -> ExternalProvider | None:
    if issuer is None:
        return None
    try:
        issuer = check_loopback_url(issuer)
    except HarnessError as exc:
        parser.error(f"--provider: {exc}")
    port = os.environ.get("SECOND_GATEWAY_PORT", "4180")
    if not port.isdigit():
        parser.error("SECOND_GATEWAY_PORT must be a port number")
    return ExternalProvider(
        issuer=issuer.rstrip("/"),
        client_id=os.environ.get("OIDC_CLIENT_ID", PEER_CLIENT_ID),
        client_secret=os.environ.get("OIDC_CLIENT_SECRET", PEER_CLIENT_SECRET),
        gateway_port=int(port),
    )


def _gateway_src(path: Path, parser: argparse.ArgumentParser) -> Path:
    path = path.resolve()
    if not (path / "gateway" / "__main__.py").is_file():
        parser.error(f"--gateway-src: no gateway/__main__.py under {path}")
    return path


# ------------------------------------------------------------------------------------ running


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _request(case: Case, cookie: str | None) -> Request:
    return Request(case.method, case.path, case.accept, cookie if case.signed_in else None,
                   case.upload_bytes)


def _check_probe(case: Case, url: str, req: Request) -> tuple[int | None, str | None]:
    """(expected bytes per answer, None) or (None, why this target cannot run the case).

    Two probes, and the second one's size counts: a first answer may carry one-off headers (a
    refreshed session cookie) that the thousands of answers under load do not.
    """
    try:
        probe(url, req)
        answer = probe(url, req)
    except (OSError, HarnessError) as exc:
        return None, f"probe failed: {exc}"
    if answer.status not in case.statuses:
        hint = ""
        if answer.status == 404 and case.path != "/bench":
            hint = " (its upstream lacks bench/upstream/locations.conf: see README)"
        elif case.signed_in and answer.status in (302, 303, 401):
            hint = " (the session was not accepted)"
        return None, f"HTTP {answer.status} at {case.method} {case.path}{hint}"
    if case.body is not None and not answer.body_head.startswith(case.body[:256]):
        return None, "unexpected body"
    want_len = len(case.body) if case.body is not None else case.body_len
    if want_len is not None and answer.body_len != want_len:
        return None, f"body of {answer.body_len} bytes, expected {want_len}"
    return answer.wire_bytes, None


def _measure(case: Case, label: str, url: str, cookie: str | None, opts: Options,
             wrk_log: Path) -> Row:
    row = Row(case.key, case.title, label)
    req = _request(case, cookie)
    if case.signed_in and not cookie and label != DIRECT:
        row.skipped = "no session (login failed)"
        return row
    expected, problem = _check_probe(case, url, req)
    if expected is None:
        row.skipped = problem
        return row
    conns = opts.upload_connections if case.upload_bytes else opts.connections
    if opts.warmup:
        run_wrk(url, req, duration=opts.warmup, connections=conns, threads=opts.threads)
        time.sleep(opts.pause)
    port = urlsplit(url).port or 80
    # CPU of the target's server processes (not Redis, not wrk) over the measured run.
    before = cpu_seconds(listener_pids(port))
    row.wrk = run_wrk(url, req, duration=opts.duration, connections=conns, threads=opts.threads,
                      log_path=wrk_log)
    after = cpu_seconds(listener_pids(port) | set(before))
    used = sum(after[p] - before.get(p, 0.0) for p in after)
    if row.wrk.requests and before:
        row.cpu_us = used * 1e6 / row.wrk.requests
    row.wrk = dataclasses.replace(row.wrk, status_expected=not case.statuses & OK_STATUSES)
    row.body_problem = row.wrk.body_check(expected, conns)
    # The session must still open after the run, or the numbers were not signed-in requests.
    if case.signed_in:
        still, problem = _check_probe(case, url, req)
        if still is None:
            row.body_problem = f"after the run: {problem}"
    time.sleep(opts.pause)
    _say(f"{case.key:9} {label:16} {row.rps:>10,.0f} req/s  p50 {row.p50_ms or 0:.2f} ms  "
         f"p99 {row.p99_ms or 0:.2f} ms  CPU {row.cpu_us or 0:.0f} us/req  "
         f"errors {row.wrk.error_text()}"
         + (f"  BODY CHECK: {row.body_problem}" if row.body_problem else ""))
    return row


def _logins(case: Case, targets: list[Target], count: int, *, warmup: bool) -> list[Row]:
    """Every target's logins, taking turns one login at a time (the machine's speed drifts
    by tens of percent from minute to minute on these VMs; one target's 20 logins after
    another's measured the drift as much as the gateways)."""
    urls = [t.url for t in targets]
    if warmup:
        # Unrecorded: the first logins of a fresh provider (V8 not yet optimised) and
        # gateway take several times longer; the peer's provider is usually warm already.
        login.alternating_logins(urls, LOGIN_WARMUP, max_seconds=60.0)
    samples, failed = login.alternating_logins(urls, count, max_seconds=240.0)
    rows = []
    for target in targets:
        row = Row(case.key, f"{case.title} (median of {count})", target.label, is_login=True)
        rows.append(row)
        if target.url in failed:
            row.skipped = f"login failed: {failed[target.url]}"[:300]
            continue
        row.login_ms = samples[target.url]
        row.login_seconds = sum(row.login_ms) / 1000.0
        row.login_failures = count - len(row.login_ms)
        _say(f"login     {target.label:16} median {row.p50_ms or 0:.1f} ms over "
             f"{len(row.login_ms)} logins")
    return rows


def _real_session_plaintext(h: Harness, cookie: str) -> bytes:
    """The run's own session as the gateway stored it, opened with the run's key."""
    _, _, value = cookie.partition("=")
    ticket = decode_ticket(value)
    if ticket is None or h.redis is None:
        raise HarnessError("the session cookie is not a gateway ticket")
    key = f"s:{ticket.session_id}"
    client = redis.Redis.from_url(h.redis.url, socket_timeout=5)
    try:
        blob = client.get(h.key_prefix + key)
    finally:
        client.close()
    if not isinstance(blob, bytes):
        raise HarnessError(f"no session under {h.key_prefix}s:… in Redis")
    return unseal(blob, keys=[parse_key(h.session_key)], secret=ticket.secret, aad=key.encode())


def _sessions_rss(h: Harness, cookie: str, count: int, memory: Memory) -> None:
    try:
        plain = _real_session_plaintext(h, cookie)
        done = subprocess.run(  # noqa: S603 - fixed argument list
            [sys.executable, "-m", "bench.sessions_rss", "--count", str(count)], input=plain,
            capture_output=True, timeout=600, check=False, cwd=h.gateway_src,
            env=gateway_env(h.gateway_src),
        )
        if done.returncode != 0:
            raise HarnessError(done.stderr.decode(errors="replace").strip()[-500:])
        result = json.loads(done.stdout)
    except (HarnessError, OSError, ValueError, subprocess.TimeoutExpired,
            redis.RedisError) as exc:
        memory.sessions_error = str(exc)
        return
    memory.sessions = int(result["count"])
    memory.sessions_rss_before_kib = int(result["rss_before_kib"])
    memory.sessions_rss_after_kib = int(result["rss_after_kib"])
    memory.sealed_bytes = float(result["blob_bytes"])
    _say(f"sessions  {count:,} in the memory store: {memory.bytes_per_session:,.0f} bytes each "
         f"({result['seconds']} s)")


SOAK_SLICE = 10  # seconds of load between two RSS readings


def _soak(h: Harness, cookie: str, opts: Options) -> list[str]:
    """The signed-in GET for ``opts.soak`` seconds in slices; the gateway's RSS after each.

    A leak shows as RSS that keeps growing slice after slice at a steady load; the first
    slices may grow while pools and caches fill, so the verdict compares the last reading with
    the one a fifth of the way in."""
    case = next(c for c in CASES if c.key == "get")
    req = _request(case, cookie)
    slices = max(1, opts.soak // SOAK_SLICE)
    readings: list[int] = []
    requests = errors = 0
    for _ in range(slices):
        result = run_wrk(h.gateway_url, req, duration=SOAK_SLICE, connections=opts.connections,
                         threads=opts.threads)
        requests += result.requests
        errors += result.errors
        readings.append(tree_status_kib(h.gateway_pid, "VmRSS")[0])
    settled = readings[len(readings) // 5]
    growth = readings[-1] - settled
    rate = requests / (slices * SOAK_SLICE)
    mib = ", ".join(f"{r / 1024:.1f}" for r in readings)
    _say(f"soak      {slices * SOAK_SLICE} s at {rate:,.0f} req/s: RSS {mib} MiB")
    return [
        f"Soak: {slices * SOAK_SLICE} s of signed-in GET at {rate:,.0f} req/s "
        f"({requests:,} requests, {errors} errors). Gateway RSS after each {SOAK_SLICE} s "
        f"(MiB): {mib}. From the reading at {(len(readings) // 5 + 1) * SOAK_SLICE} s to the "
        f"end: **{growth / 1024:+.1f} MiB** ({100 * growth / max(settled, 1):+.1f} %).",
    ]


def _profile(h: Harness, cookie: str, opts: Options) -> list[str]:
    """py-spy on the gateway under the signed-in GET load; the top functions as Markdown."""
    venv_spy = Path(sys.executable).parent / "py-spy"
    spy = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
    if not spy:
        return ["Profile: py-spy not found (`.venv/bin/pip install py-spy`; not a dependency)."]
    seconds = opts.profile_seconds
    out = h.run_dir / "profile.txt"
    case = opts.profile_case
    req = _request(case, cookie)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    if req.cookie:
        env["BENCH_COOKIE"] = req.cookie
    if req.body_bytes:
        env["BENCH_BODY_BYTES"] = str(req.body_bytes)
    conns = opts.upload_connections if req.body_bytes else opts.connections
    wrk = subprocess.Popen(  # noqa: S603 - fixed argument list
        [find_program("wrk", "wrk"), f"-t{min(opts.threads, conns)}", f"-c{conns}",
         f"-d{seconds + 4}s", "-s", str(Path(__file__).parent / "wrk" / "bench.lua"),
         "-H", f"Accept: {req.accept}", h.gateway_url + req.path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        time.sleep(1.5)
        spy_run = subprocess.run(  # noqa: S603 - fixed argument list
            # Blocking mode (py-spy's default) pauses the process for each sample: complete
            # stacks, at the price of a little throughput while profiling.
            [spy, "record", "--pid", str(h.gateway_pid), "--duration", str(seconds), "--rate",
             str(PROFILE_RATE), "--format", "raw", "--subprocesses", "--output", str(out)],
            capture_output=True, text=True, timeout=seconds + 60, check=False)
    finally:
        try:
            wrk.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            wrk.kill()
            wrk.wait(5)
    if spy_run.returncode != 0 or not out.exists():
        return [f"Profile: py-spy failed: {spy_run.stderr.strip()[-300:]}"]
    return profile_summary(out.read_text(), seconds, case.title)


def profile_summary(raw: str, seconds: int, case_title: str, top: int = 15) -> list[str]:
    """Sample shares per function from py-spy's raw (collapsed) output: self time of any
    function, and inclusive time of the gateway's own functions (where to look first)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # "func (file.py:123)" → "func (file.py)": one entry per function, not per line.
        frames = [_LINE_NUMBER.sub(")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["Profile: no samples."]
    lines = [f"Profile of {OURS} under the load of \"{case_title}\": py-spy, {seconds} s at "
             f"{PROFILE_RATE} Hz, {total:,} non-idle samples.", "",
             "| self % | function (file) | | inclusive % | gateway function (file) |",
             "| ---: | --- | --- | ---: | --- |"]
    mine = own.most_common(top)
    # Entry frames (main, run: in nearly every sample) say nothing about where time goes.
    incl = [(f, n) for f, n in inclusive.most_common()
            if "(gateway/" in f and n < 0.95 * total][:top]
    for i in range(max(len(mine), len(incl))):
        left = f"{100 * mine[i][1] / total:.1f} | `{mine[i][0]}`" if i < len(mine) else " | "
        right = f"{100 * incl[i][1] / total:.1f} | `{incl[i][0]}`" if i < len(incl) else " | "
        lines.append(f"| {left} | | {right} |")
    return lines


def _versions() -> str:
    def first_line(*cmd: str) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
        except OSError:
            return "?"
        text = (done.stdout or done.stderr).strip().splitlines()
        return text[0] if text else "?"

    wrk = first_line(find_program("wrk", "wrk"), "-v").split(" [")[0]
    nginx = first_line(find_program("nginx", "nginx-light"), "-v").replace("nginx version: ", "")
    redis_v = first_line("redis-server", "--version").split(" sha=")[0]
    node = first_line("node", "--version")
    return (f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}; {wrk}; {nginx}; "
            f"{redis_v}; node {node}")


def _revision(src: Path) -> str:
    """Which gateway code ran: the commit of its source tree, and whether gateway/ differs."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(src), *args], capture_output=True,  # noqa: S603, S607
                                  text=True, timeout=10, check=False)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return f"gateway from {src}"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "gateway") else ""
    return f"gateway at commit {commit}{dirty}"


def _machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (f"{os.cpu_count()} cores ({model}), {total} RAM, {platform.system()} "
            f"{platform.release()}; load average {load} at the start")


def run(opts: Options, run_dir: Path) -> tuple[Report, bool]:
    """Everything between starting and stopping the servers; returns (report, all ours ok)."""
    started_at = datetime.datetime.now(datetime.UTC)
    machine = _machine()
    with signals_raise(), Harness(run_dir, gateway_settings=opts.settings,
                                  gateway_src=opts.gateway_src, provider=opts.provider) as h:
        h.start_all(log=_say)
        memory = Memory()
        memory.start_rss_kib, memory.processes = tree_status_kib(h.gateway_pid, "VmRSS")
        targets = [Target(OURS, h.gateway_url)]
        targets += [Target(label, url) for label, url in opts.compares]
        for target in targets:
            try:
                target.cookie = login.session_cookie(target.url)
            except (HarnessError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                if target.label == OURS:
                    raise HarnessError(f"login through our gateway failed: {exc}\n"
                                       f"{h.gateway_log_tail()}") from exc
                target.login_error = str(exc)[:300]
                _say(f"{target.label}: login failed, signed-in cases skipped: {exc}")
        wrk_log = run_dir / "wrk.log"
        rows: list[Row] = []
        for case in opts.cases:
            if case.is_login:
                rows += _logins(case, targets, opts.logins, warmup=opts.warmup > 0)
                continue
            if case.runs_direct:
                rows.append(_measure(case, DIRECT, h.upstream_url, None, opts, wrk_log))
            rows += [_measure(case, t.label, t.url, t.cookie, opts, wrk_log) for t in targets]
        memory.peak_rss_kib, memory.processes = tree_status_kib(h.gateway_pid, "VmHWM")
        ours_cookie = targets[0].cookie or ""
        if opts.sessions:
            _sessions_rss(h, ours_cookie, opts.sessions, memory)
        profile = _profile(h, ours_cookie, opts) if opts.profile_seconds else []
        if opts.soak and ours_cookie:
            profile = [*_soak(h, ours_cookie, opts), *([""] if profile else []), *profile]
        gateway_alive = h.gateway is not None and h.gateway.alive()
    conns = f"-c{opts.connections}"
    if any(c.upload_bytes for c in opts.cases):
        conns += f" (10 MB upload: -c{opts.upload_connections})"
    settings = ", ".join(f"{k}={v}" for k, v in opts.settings.items()) or "default config"
    setup = [
        f"Machine: {machine}.",
        f"Software: {_revision(opts.gateway_src)}; {_versions()}.",
        f"Load: wrk -t{opts.threads} {conns} -d{opts.duration}s after {opts.warmup} s of "
        f"warm-up per run, on the same machine; the gateway with Redis sessions, one process "
        f"unless configured otherwise ({settings}), "
        f"no access log. Login: the provider's login and consent forms, fresh browser each time, "
        f"the targets taking turns one login at a time; its req/s is complete logins per "
        f"second, one after the other.",
    ]
    report = Report(
        heading=f"oidc-gateway benchmark, {started_at:%Y-%m-%d %H:%M} UTC", setup_lines=setup,
        rows=rows, memory=memory, ours=OURS, others=[label for label, _ in opts.compares],
        profile_lines=profile,
    )
    ours_ok = gateway_alive and all(r.ok for r in rows if r.target in (OURS, DIRECT))
    return report, ours_ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    opts = _options(args, parser)
    run_dir = Path(tempfile.mkdtemp(prefix="oidcgw-bench-"))
    keep = bool(args.keep)
    try:
        report, ok = run(opts, run_dir)
    except HarnessError as exc:
        _say(f"failed: {exc}")
        _say(f"logs kept in {run_dir}")
        return 1
    except KeyboardInterrupt:
        _say(f"interrupted; every server stopped; logs kept in {run_dir}")
        return 130
    direct_of = {c.key: c.direct for c in CASES}
    print(render(report, direct_of), end="", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "rows": [{**asdict(r), "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}
                     for r in report.rows],
            "memory": asdict(report.memory), "setup": report.setup_lines,
        }, indent=1))
    if not ok:
        _say(f"some cases of our gateway failed (see the table); logs kept in {run_dir}")
        return 1
    if keep:
        _say(f"logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0
