"""``python -m bench.hops URL [URL ...]``: where a login's time goes, hop by hop, and what idling
costs, for gateways side by side.

The full benchmark gives one figure per login (the median of complete logins). This splits it:
each login's requests (gateway → provider → login and consent forms → callback → page) are
timed one by one from the client, logins alternating between the gateways so that slow and fast
minutes fall on all of them alike, and the median of each hop is printed per gateway. Hops to
the provider are the same work for every gateway; the gateway's own hops (the redirect, the
callback, the first page) are where gateways differ.

``--idle`` adds the cost of answering after a pause: one connection per gateway sends the same
request (``GET /bench`` without a session, browser or API ``Accept``) back to back, then with
``--gap`` milliseconds between requests, and prints both medians. A login is ten requests one
after the other with the provider's work in between, so each of the gateway's hops starts on a
process that has been idle (issue 7: a 401 that takes 0.03 ms in the gateway under load takes
0.2 ms after 20 ms of idling; the same goes for every process, but the more code a request
runs, the more it pays).

Targets must be on loopback; logins use the integration tests' browser driver.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import urlsplit

import aiohttp

from bench.harness import HarnessError
from bench.loadgen import API_ACCEPT, BROWSER_ACCEPT, check_loopback_url, read_answer
from tests.support.login import browser_login

WARMUP_LOGINS = 3
LOGIN_TIMEOUT = 10.0  # per HTTP request of a login


@dataclass
class Hops:
    """One gateway's logins: the hop labels of the first and each hop's milliseconds."""

    url: str
    labels: list[str] = field(default_factory=list)
    times: list[list[float]] = field(default_factory=list)  # per hop, one entry per login
    totals: list[float] = field(default_factory=list)


def _label(gateway_url: str, method: str, url: str) -> str:
    """``gateway GET /oauth2/callback``, ``provider POST /interaction``: who answered and the
    path (for the provider its first segment: its interaction ids differ in every login)."""
    parts, gateway = urlsplit(url), urlsplit(gateway_url)
    if (parts.hostname, parts.port) == (gateway.hostname, gateway.port):
        return f"gateway {method} {parts.path}"
    return f"provider {method} /{parts.path.lstrip('/').split('/', 1)[0]}"


async def _one_login(gateway_url: str, path: str) -> tuple[list[str], list[float], float]:
    """One login in a fresh browser: the hops' labels, their milliseconds, the total."""
    marks: list[tuple[str, float]] = []

    async def started(_s: object, ctx: SimpleNamespace, _p: object) -> None:
        ctx.started = time.perf_counter()

    async def ended(_s: object, ctx: SimpleNamespace,
                    params: aiohttp.TraceRequestEndParams) -> None:
        marks.append((_label(gateway_url, params.method, str(params.url)),
                      (time.perf_counter() - ctx.started) * 1000.0))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(started)
    trace.on_request_end.append(ended)
    begun = time.perf_counter()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     trace_configs=[trace]) as browser:
        result = await browser_login(browser, gateway_url + path,
                                     request_timeout=LOGIN_TIMEOUT)
    total = (time.perf_counter() - begun) * 1000.0
    if result.status != 200:
        raise HarnessError(f"login through {gateway_url} ended with HTTP {result.status} at "
                           f"{urlsplit(result.url).path}")
    return [label for label, _ in marks], [ms for _, ms in marks], total


async def measure_logins(urls: list[str], count: int, path: str) -> list[Hops]:
    """``count`` logins per gateway (after a few unrecorded ones), alternating."""
    results = [Hops(url) for url in urls]
    for url in urls:
        for _ in range(WARMUP_LOGINS):
            await _one_login(url, path)
    for index in range(count):
        order = results if index % 2 == 0 else results[::-1]
        for hops in order:
            labels, times, total = await _one_login(hops.url, path)
            if not hops.labels:
                hops.labels, hops.times = labels, [[] for _ in labels]
            elif labels != hops.labels:
                raise HarnessError(f"logins through {hops.url} took different paths: "
                                   f"{hops.labels} then {labels}")
            for slot, ms in zip(hops.times, times, strict=True):
                slot.append(ms)
            hops.totals.append(total)
    return results


def idle_latency(url: str, accept: str, status: int, *, count: int, gap: float) -> float:
    """Median milliseconds from sending ``GET /bench`` to reading its whole answer, on one
    connection, with ``gap`` seconds of idling before each request (0: back to back); every
    answer must have ``status``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (f"GET /bench HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: {accept}\r\n\r\n"
               ).encode()
    samples: list[float] = []
    with socket.create_connection((host, port), timeout=5.0) as sock:
        for _ in range(count):
            if gap:
                time.sleep(gap)
            started = time.perf_counter()
            sock.sendall(request)
            answer = read_answer(sock)
            samples.append((time.perf_counter() - started) * 1000.0)
            if answer.status != status:
                raise HarnessError(f"GET /bench on {url} answered {answer.status}, "
                                   f"expected {status}")
    return statistics.median(samples)


def _print_hops(results: list[Hops]) -> None:
    first = results[0]
    heads = " | ".join(urlsplit(h.url).netloc for h in results)
    print(f"\n| hop (median ms) | {heads} |")
    print("| --- |" + " ---: |" * len(results))
    for index, label in enumerate(first.labels):
        cells = []
        for hops in results:
            if index < len(hops.labels) and hops.labels[index].split()[0] == label.split()[0]:
                cells.append(f"{statistics.median(hops.times[index]):.2f}")
            else:
                cells.append("—")
        print(f"| {label} | {' | '.join(cells)} |")
    for who in ("gateway", "provider"):
        sums = []
        for hops in results:
            per_login = [sum(t[i] for t, lab in zip(hops.times, hops.labels, strict=True)
                             if lab.startswith(who + " "))
                         for i in range(len(hops.totals))]
            sums.append(f"{statistics.median(per_login):.2f}")
        print(f"| all {who} hops | {' | '.join(sums)} |")
    print(f"| whole login | {' | '.join(f'{statistics.median(h.totals):.2f}' for h in results)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hops",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="gateways on loopback (http://127.0.0.1:PORT)")
    parser.add_argument("--logins", type=int, default=30, help="timed logins per gateway [30]")
    parser.add_argument("--path", default="/bench", help="the protected page [/bench]")
    parser.add_argument("--idle", action="store_true",
                        help="also measure answers after idling (redirect and 401)")
    parser.add_argument("--gap", type=float, default=20.0,
                        help="milliseconds of idling before each --idle request [20]")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests per --idle measurement [200]")
    args = parser.parse_args(argv)
    if not 1 <= args.logins <= 200 or not 1 <= args.requests <= 2000:
        parser.error("--logins must be 1..200 and --requests 1..2000")
    if not 0 < args.gap <= 1000:
        parser.error("--gap must be above 0 and at most 1000 ms")
    try:
        urls = [check_loopback_url(url) for url in args.urls]
        results = asyncio.run(measure_logins(urls, args.logins, args.path))
        print(f"hops: {args.logins} logins per gateway, alternating, each in a fresh browser")
        _print_hops(results)
        if args.idle:
            print(f"\n| answer (median ms of {args.requests}, one connection) | "
                  + " | ".join(urlsplit(u).netloc for u in urls) + " |")
            print("| --- |" + " ---: |" * len(urls))
            for status, accept in ((302, BROWSER_ACCEPT), (401, API_ACCEPT)):
                for gap in (0.0, args.gap / 1000.0):
                    cells = [f"{idle_latency(u, accept, status, count=args.requests, gap=gap):.3f}"
                             for u in urls]
                    when = "back to back" if not gap else f"after {args.gap:g} ms idle"
                    print(f"| {status}, {when} | {' | '.join(cells)} |")
    except (HarnessError, OSError, aiohttp.ClientError) as exc:
        print(f"hops: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
