"""The per-process session cache: fast, yet never keeps a revoked session past one second.

Two real gateway processes share one real Redis. Each keeps the sessions it used in memory
(``session.cache``); revocation reaches the other process through Redis pub/sub, and a process
whose subscription is lost stops trusting its cache at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.gateway_proc import GatewayProcess, free_port, new_session_key
from tests.support.login import browser_login
from tests.support.world import GatewayWorld, open_world

pytestmark = [pytest.mark.provider, pytest.mark.redis]

API = {"Accept": "application/json"}
# The promise: a revoked session is refused by every process within this long.
REVOCATION_BOUND = 1.0


class World(GatewayWorld):
    async def pair(
        self, redis_url: str, prefix: str, **session_extra: Any
    ) -> tuple[GatewayProcess, GatewayProcess]:
        """Two gateways sharing Redis, a session key and a client: one service, two pods."""
        port_a, port_b = free_port(), free_port()
        client = self.register(port_a, port_b)
        key = new_session_key()
        gateways = []
        for port in (port_a, port_b):
            config = self.base_config(
                port, client=client, store="redis", redis_url=redis_url, key_prefix=prefix,
                session_key=key, session_extra=session_extra or None)
            gateways.append(await self.start(config))
        return gateways[0], gateways[1]


@pytest.fixture
async def world(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(World, oidc_provider, tmp_path) as w:
        yield w


async def signed_in_cookie(gw: GatewayProcess) -> str:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        assert (await browser_login(browser, f"{gw.url}/")).status == 200
        for cookie in jar:
            if cookie.key == "_oidc_gateway":
                return f"_oidc_gateway={cookie.value}"
    raise AssertionError("no session cookie after login")


async def metric(http: aiohttp.ClientSession, gw: GatewayProcess, name: str) -> float:
    async with http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


HITS = 'oidc_gateway_session_cache_total{result="hit"}'
STORE_GETS = 'oidc_gateway_session_store_duration_seconds_count{operation="get"}'
LIVE = "oidc_gateway_session_cache_live"


async def status(http: aiohttp.ClientSession, gw: GatewayProcess, cookie: str) -> int:
    async with http.get(f"{gw.url}/app", headers={**API, "Cookie": cookie},
                        allow_redirects=False) as r:
        return r.status


async def wait_until_refused(http: aiohttp.ClientSession, gw: GatewayProcess, cookie: str,
                             *, limit: float = 3.0) -> float:
    """Seconds until ``gw`` refuses ``cookie`` (401), polled every 10 ms, at most ``limit``."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if await status(http, gw, cookie) == 401:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{gw.url} still admits the revoked session after {limit} s")


async def wait_metric(http: aiohttp.ClientSession, gw: GatewayProcess, name: str, value: float,
                      *, limit: float = 5.0) -> None:
    started = time.monotonic()
    while await metric(http, gw, name) != value:
        assert time.monotonic() - started < limit, f"{name} never became {value}"
        await asyncio.sleep(0.02)


async def test_signed_in_requests_are_served_from_memory(world: World, redis_target: Any) -> None:
    gw_a, gw_b = await world.pair(redis_target.url, redis_target.prefix)
    cookie = await signed_in_cookie(gw_a)
    async with aiohttp.ClientSession() as http:
        await wait_metric(http, gw_b, LIVE, 1.0)
        gets_before = await metric(http, gw_b, STORE_GETS)
        for _ in range(30):
            assert await status(http, gw_b, cookie) == 200
        gets = await metric(http, gw_b, STORE_GETS) - gets_before
        hits = await metric(http, gw_b, HITS)
    # One read of Redis for the first request, the other 29 from memory.
    assert gets <= 2, f"{gets} store reads for 30 requests of one session"
    assert hits >= 28


async def test_the_page_a_login_returns_to_needs_no_store_read(
    world: World, redis_target: Any
) -> None:
    """The login keeps the session it wrote in its process's cache: the page the browser
    comes back to (on the same connection) is served without reading Redis, and signing out
    there still ends it at once."""
    gw_a, _ = await world.pair(redis_target.url, redis_target.prefix)
    async with aiohttp.ClientSession() as http:
        await wait_metric(http, gw_a, LIVE, 1.0)
        gets_before = await metric(http, gw_a, STORE_GETS)
        hits_before = await metric(http, gw_a, HITS)
        cookie = await signed_in_cookie(gw_a)  # ends with the page, 200
        assert await metric(http, gw_a, STORE_GETS) == gets_before
        assert await metric(http, gw_a, HITS) == hits_before + 1
        async with http.get(f"{gw_a.url}/oauth2/sign_out", headers={"Cookie": cookie},
                            allow_redirects=False) as r:
            assert r.status == 302
        assert await status(http, gw_a, cookie) == 401


async def test_sign_out_on_one_gateway_ends_the_session_on_the_other_at_once(
    world: World, redis_target: Any
) -> None:
    gw_a, gw_b = await world.pair(redis_target.url, redis_target.prefix)
    cookie = await signed_in_cookie(gw_a)
    async with aiohttp.ClientSession() as http:
        await wait_metric(http, gw_b, LIVE, 1.0)
        for _ in range(3):  # B now holds the session in memory
            assert await status(http, gw_b, cookie) == 200
        assert await metric(http, gw_b, HITS) >= 2
        async with http.get(f"{gw_a.url}/oauth2/sign_out", headers={"Cookie": cookie},
                            allow_redirects=False) as r:
            assert r.status == 302
        # Not "soon": B's very next request is refused (its cache use waits for a ping that
        # Redis answers after the invalidation it sent B).
        assert await status(http, gw_b, cookie) == 401


async def test_lost_subscription_turns_the_cache_off_until_it_is_back(
    world: World, redis_server_factory: Any
) -> None:
    # A Redis of its own: the test cuts every subscriber of the server it uses.
    server = redis_server_factory()
    prefix = "cache-test:"
    gw_a, gw_b = await world.pair(server.url, prefix)
    cookie = await signed_in_cookie(gw_a)
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with aiohttp.ClientSession() as http:
            await wait_metric(http, gw_b, LIVE, 1.0)
            for _ in range(3):
                assert await status(http, gw_b, cookie) == 200
            # Cut every gateway's subscription, then revoke behind their backs: no message
            # can reach them. What they cached must no longer be trusted.
            killed = await admin.client_kill_filter(_type="pubsub")
            assert killed >= 2
            keys = [k async for k in admin.scan_iter(match=f"{prefix}s:*")]
            assert len(keys) == 1
            await admin.delete(*keys)
            took = await wait_until_refused(http, gw_b, cookie)
            assert took < REVOCATION_BOUND
            # The gateway noticed (its gauge says the cache is off) ...
            await wait_metric(http, gw_b, LIVE, 0.0)
            # ... and the subscription comes back on its own, and with it the cache.
            await wait_metric(http, gw_b, LIVE, 1.0)
            fresh = await signed_in_cookie(gw_a)
            hits = await metric(http, gw_b, HITS)
            for _ in range(5):
                assert await status(http, gw_b, fresh) == 200
            assert await metric(http, gw_b, HITS) >= hits + 3
    finally:
        await admin.aclose()


async def test_cache_off_reads_the_store_every_time(world: World, redis_target: Any) -> None:
    gw_a, gw_b = await world.pair(redis_target.url, redis_target.prefix, cache={"ttl": 0})
    cookie = await signed_in_cookie(gw_a)
    async with aiohttp.ClientSession() as http:
        gets_before = await metric(http, gw_b, STORE_GETS)
        for _ in range(10):
            assert await status(http, gw_b, cookie) == 200
        assert await metric(http, gw_b, STORE_GETS) - gets_before == 10
        assert await metric(http, gw_b, HITS) == 0
