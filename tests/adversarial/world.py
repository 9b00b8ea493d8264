"""A gateway process in front of the echo upstream, signing in through the adversarial provider.

:func:`running_world` starts one :class:`~tests.adversarial.provider.AdversarialProvider`,
one real gateway (``python -m gateway run``, Redis sessions under a key prefix of its own) and
hands back a :class:`World`. :func:`sign_in` walks a login like a browser, following redirects
by hand and recording each hop; :func:`assert_rejected` and :func:`assert_accepted` state what
a user (and an attacker) would observe.

"Rejected" is the whole of it, not just an error status: an HTML error page with the right
status, no stack trace and a "Try again" link that starts a new login; no session written to
the store; no session cookie; nothing forwarded to the upstream; and the error page is the
final answer of the callback, not a redirect that would bounce the browser back to the
provider in a loop.
"""

from __future__ import annotations

import html
import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from joserfc.jwk import Key
from multidict import CIMultiDictProxy

from tests.adversarial.provider import AdversarialProvider
from tests.support.gateway_proc import GatewayProcess, free_port, gateway_config, start_gateway
from tests.support.peers import delete_prefix
from tests.support.upstream import Upstream, running_upstream

CLIENT_ID = "gateway-rp"
# Characters that RFC 6749 §2.3.1 form-urlencoding changes, to catch a naive Basic header.
CLIENT_SECRET = "s3cret:with+odd %chars/and=more&" + "x" * 24
SESSION_COOKIE = "_oidc_gateway"
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Page → provider → callback → page is four hops; more means the gateway is bouncing.
MAX_HOPS = 6
START_PATH = "/app/page"


@dataclass(frozen=True)
class Snapshot:
    """What a rejection must leave unchanged (and an acceptance must change)."""

    sessions: int
    upstream: int
    calls: Counter[str]


@dataclass
class World:
    name: str
    provider: AdversarialProvider
    gateway: GatewayProcess
    upstream: Upstream
    redis: aioredis.Redis
    prefix: str

    async def sessions(self) -> int:
        """Sessions in the store: this gateway's keys ``<prefix>s:*``."""
        count = 0
        async for _ in self.redis.scan_iter(match=f"{self.prefix}s:*", count=1000):
            count += 1
        return count

    async def snapshot(self) -> Snapshot:
        return Snapshot(
            await self.sessions(), len(self.upstream.seen.requests), Counter(self.provider.calls)
        )

    def calls_since(self, before: Snapshot, endpoint: str) -> int:
        return self.provider.calls[endpoint] - before.calls[endpoint]


@dataclass
class Lab:
    """What every world of a test module shares: the echo upstream, the test run's Redis, a
    directory."""

    upstream: Upstream
    redis: aioredis.Redis
    redis_port: int
    directory: Path

    def world(
        self, name: str, keys: list[Key], **options: Any
    ) -> AbstractAsyncContextManager[World]:
        """:func:`running_world` in this lab."""
        return running_world(
            name,
            upstream=self.upstream,
            redis=self.redis,
            redis_port=self.redis_port,
            directory=self.directory,
            keys=keys,
            **options,
        )


@asynccontextmanager
async def running_lab(peer_info: Any, directory: Path) -> AsyncIterator[Lab]:
    """A module's :class:`Lab` on the shared redis-server (``peer_info``), with its own upstream."""
    if peer_info.redis_error or not peer_info.redis_port:
        pytest.fail(f"the shared redis-server did not start: {peer_info.redis_error}",
                    pytrace=False)
    port = int(peer_info.redis_port)
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)
    try:
        async with running_upstream() as upstream:
            yield Lab(upstream, client, port, directory)
    finally:
        await client.aclose()


@asynccontextmanager
async def running_world(
    name: str,
    *,
    upstream: Upstream,
    redis: aioredis.Redis,
    redis_port: int,
    directory: Path,
    keys: list[Key],
    gateway_auth: str = "client_secret_basic",
    provider_extra: dict[str, Any] | None = None,
    adjust: Callable[[AdversarialProvider, dict[str, Any]], None] | None = None,
    **provider_options: Any,
) -> AsyncIterator[World]:
    """Start the provider, then a gateway whose discovery it serves; stop both afterwards.
    ``adjust`` may change the gateway's config once the provider's address is known."""
    port = free_port()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    prefix = f"adversarial:{worker}:{name}:{uuid.uuid4().hex[:8]}:"
    async with AdversarialProvider(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=f"http://127.0.0.1:{port}/oauth2/callback",
        keys=keys,
        **provider_options,
    ) as provider:
        config = gateway_config(
            port=port,
            issuer=provider.issuer,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            upstream=upstream.url,
            store="redis",
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            key_prefix=prefix,
            token_endpoint_auth=gateway_auth,
            # A short provider timeout keeps the token-timeout case (and the suite) quick.
            provider_extra={"timeout": "2s", **(provider_extra or {})},
        )
        if adjust is not None:
            adjust(provider, config)
        gateway = await start_gateway(config, directory=directory / name)
        try:
            yield World(name, provider, gateway, upstream, redis, prefix)
        finally:
            gateway.stop()
            delete_prefix(redis_port, prefix)


# ---------------------------------------------------------------------------------------------
# A browser walking through a login
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    url: str
    status: int
    location: str | None


@dataclass
class Walk:
    """Every hop of one login walk and the final answer."""

    hops: list[Hop]
    status: int
    headers: CIMultiDictProxy[str]
    text: str
    cookies_set: list[str] = field(default_factory=list)  # names, in Set-Cookie order

    @property
    def page(self) -> str:
        """The final body with HTML entities decoded, for matching the message."""
        return html.unescape(self.text)


def new_browser() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for the IP host 127.0.0.1, as a browser does.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def jar_has(browser: aiohttp.ClientSession, name: str) -> bool:
    return any(cookie.key == name for cookie in browser.cookie_jar)


async def sign_in(world: World, browser: aiohttp.ClientSession, path: str = START_PATH) -> Walk:
    """Open ``path`` on the gateway as a browser navigation and follow redirects by hand."""
    url = world.gateway.url + path
    hops: list[Hop] = []
    cookies_set: list[str] = []
    for _ in range(MAX_HOPS):
        assert urlsplit(url).hostname == "127.0.0.1", f"left loopback: {url}"
        async with browser.get(url, headers=HTML, allow_redirects=False) as resp:
            text = await resp.text(errors="replace")
            location = resp.headers.get("Location")
            hops.append(Hop(url, resp.status, location))
            if urlsplit(url).netloc == urlsplit(world.gateway.url).netloc:
                cookies_set += [morsel.key for morsel in resp.cookies.values()]
            if resp.status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            return Walk(hops, resp.status, resp.headers, text, cookies_set)
    raise AssertionError(f"redirect loop: {[(h.status, h.url) for h in hops]}")


def _path(url: str) -> str:
    return urlsplit(url).path


async def assert_rejected(
    world: World,
    browser: aiohttp.ClientSession,
    walk: Walk,
    before: Snapshot,
    *,
    status: int,
    says: str,
) -> None:
    """The login failed the way a user should see it fail, and left nothing behind."""
    trace = [(h.status, h.url) for h in walk.hops]
    # Page → provider → callback, which answers with a final page: no loop, no bounce.
    assert len(walk.hops) == 3, trace
    assert walk.hops[0].status == 302, trace
    assert walk.hops[1].url.startswith(world.provider.issuer + "/authorize"), trace
    assert _path(walk.hops[2].url) == "/oauth2/callback", trace
    assert walk.status == status, (trace, walk.page[:2000])
    assert walk.headers.get("Location") is None
    # An HTML page for a person: the reason, a way to start over, no internals.
    assert walk.headers.get("Content-Type", "").startswith("text/html"), walk.headers
    assert "no-store" in walk.headers.get("Cache-Control", "")
    assert says.lower() in walk.page.lower(), walk.page
    for leak in ("Traceback", 'File "', "site-packages", "Exception"):
        assert leak not in walk.text, walk.text
    retry = "/oauth2/start?rd=" + "%2Fapp%2Fpage"
    assert f'href="{retry}">Try again</a>' in walk.text, walk.text
    # No session: no cookie set or kept, nothing in the store, nothing forwarded.
    assert SESSION_COOKIE not in walk.cookies_set, walk.cookies_set
    assert not jar_has(browser, SESSION_COOKIE)
    after = await world.snapshot()
    assert after.sessions == before.sessions, "a session was stored for a rejected login"
    assert after.upstream == before.upstream, "the upstream was reached"
    # "Try again" really starts a new login (to the provider), it is not another error.
    async with browser.get(world.gateway.url + retry, headers=HTML,
                           allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith(world.provider.issuer + "/authorize")


async def assert_accepted(
    world: World, browser: aiohttp.ClientSession, walk: Walk, before: Snapshot
) -> dict[str, str]:
    """The login succeeded: back on the page asked for, as alice; returns the upstream's
    view of the request headers (lower-cased names)."""
    trace = [(h.status, h.url) for h in walk.hops]
    assert [h.status for h in walk.hops] == [302, 302, 302, 200], (trace, walk.page[:2000])
    assert _path(walk.hops[2].url) == "/oauth2/callback", trace
    assert walk.hops[3].url == world.gateway.url + START_PATH, trace
    assert SESSION_COOKIE in walk.cookies_set
    assert jar_has(browser, SESSION_COOKIE)
    after = await world.snapshot()
    assert after.sessions == before.sessions + 1
    assert after.upstream == before.upstream + 1
    seen: dict[str, Any] = json.loads(walk.text)
    assert seen["path"] == START_PATH
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-user"] == "alice"
    return headers
