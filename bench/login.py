"""Browser logins through any gateway, with the integration tests' driver (tests/support/login.py).

It follows the gateway → provider → login and consent forms → callback → page walk over HTTP,
as a browser does, so the same code logs in through our gateway and through Apache +
mod_auth_openidc (``--compare``).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from bench.harness import HarnessError
from bench.loadgen import BROWSER_ACCEPT, Request, probe
from tests.support.login import browser_login, new_browser

LOGIN_TIMEOUT = 10.0  # per HTTP request of a login


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


async def _login_once(gateway_url: str, path: str) -> list[tuple[str, str]]:
    """One full login in a fresh browser; the cookies the browser would send to the gateway."""
    async with new_browser() as browser:
        result = await browser_login(browser, gateway_url + path, request_timeout=LOGIN_TIMEOUT)
        if result.status != 200 or not _same_origin(result.url, gateway_url):
            raise HarnessError(
                f"login through {gateway_url} ended with HTTP {result.status} at "
                f"{urlsplit(result.url).path} (expected 200 at {path}): "
                f"{' '.join(result.text.split())[:200]}")
        jar = browser.cookie_jar.filter_cookies(URL(gateway_url + path))
        return [(name, morsel.value) for name, morsel in jar.items()]


def session_cookie(gateway_url: str, path: str = "/bench") -> str:
    """Log in once and return the ``Cookie`` header value that carries the session.

    A browser keeps cookies per host, not per port, so the provider's cookies on 127.0.0.1
    would ride along; wrk should send only the gateway's session cookie. It is found by trying
    each cookie alone (the first that opens ``path`` with a 200 wins), whatever the gateway
    calls it; all cookies together are the fallback.
    """
    pairs = asyncio.run(_login_once(gateway_url, path))
    for name, value in pairs:
        cookie = f"{name}={value}"
        if probe(gateway_url, Request("GET", path, BROWSER_ACCEPT, cookie)).status == 200:
            return cookie
    cookie = "; ".join(f"{name}={value}" for name, value in pairs)
    status = probe(gateway_url, Request("GET", path, BROWSER_ACCEPT, cookie)).status
    if status != 200:
        raise HarnessError(f"after login, GET {path} on {gateway_url} with the browser's cookies "
                           f"answered {status}, not 200")
    return cookie


async def _timed_logins(gateway_url: str, path: str, count: int,
                        max_seconds: float) -> list[float]:
    samples: list[float] = []
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        await _login_once(gateway_url, path)
        samples.append((time.perf_counter() - started) * 1000.0)
    return samples


def timed_logins(gateway_url: str, count: int, *, path: str = "/bench",
                 max_seconds: float = 120.0) -> list[float]:
    """Milliseconds of ``count`` complete logins, one after the other, each in a fresh browser
    (new cookie jar, new connections), from the first request to the final 200."""
    return asyncio.run(_timed_logins(gateway_url, path, count, max_seconds))


async def _alternating(urls: list[str], path: str, count: int,
                       max_seconds: float) -> tuple[dict[str, list[float]], dict[str, str]]:
    samples: dict[str, list[float]] = {url: [] for url in urls}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        for url in urls:
            if url in failed:
                continue
            started = time.perf_counter()
            try:
                await _login_once(url, path)
            except (HarnessError, aiohttp.ClientError, TimeoutError) as exc:
                failed[url] = str(exc)
                continue
            samples[url].append((time.perf_counter() - started) * 1000.0)
    return samples, failed


def alternating_logins(urls: list[str], count: int, *, path: str = "/bench",
                       max_seconds: float = 240.0,
                       ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """``count`` logins through each gateway, taking turns (one login each, then again), so
    that a slow minute of the machine falls on every gateway alike: milliseconds per gateway,
    and why a gateway whose login failed was left out."""
    return asyncio.run(_alternating(urls, path, count, max_seconds))
