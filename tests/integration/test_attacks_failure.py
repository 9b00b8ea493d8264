"""Failures an attacker may cause or wait for: the gateway fails closed, fast, and plainly.

Redis stopped or hung in the middle of traffic: 503 within the configured timeout, never a
pass, never a redirect (a login cannot even start without the store), and after recovery
every session is its own again. The provider dying during a login: an error page, no
session. The upstream resetting the connection: 502 (or a cut connection once the answer
has begun), never a truncated answer passed off as complete.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from yarl import URL

from gateway.session_cache import PING_EVERY
from tests.integration.attacks_common import (
    HTML_ACCEPT,
    World,
    cookie_value,
    gateway_world,
    new_browser,
    register_at,
)
from tests.support.login import browser_login

pytestmark = [pytest.mark.provider]

REDIS_TIMEOUT = 0.5
HTML = {"Accept": HTML_ACCEPT}
JSON = {"Accept": "application/json"}


async def answer(url: str, headers: dict[str, str], cookie: str | None = None
                 ) -> tuple[int, float, str, dict[str, Any] | None]:
    """(status, seconds taken, body, upstream's record when it answered)."""
    if cookie:
        headers = {**headers, "Cookie": f"_oidc_gateway={cookie}"}
    started = time.monotonic()
    async with aiohttp.ClientSession() as client, client.get(
        URL(url, encoded=True), headers=headers, allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        text = await r.text()
        took = time.monotonic() - started
        record = await r.json() if r.status == 200 and "raw_path" in text else None
        return r.status, took, text, record


async def sessions(world: World) -> tuple[str, str, str]:
    """alice's and bob's session tickets, and a pending callback URL of a third browser."""
    tickets = []
    for user, password in (("alice", "wonderland"), ("bob", "builder")):
        async with new_browser() as browser:
            result = await browser_login(browser, f"{world.url}/", username=user,
                                         password=password)
            assert result.status == 200
            ticket = cookie_value(browser, "_oidc_gateway")
            assert ticket
            tickets.append(ticket)
    async with new_browser() as browser:
        pending = await browser_login(browser, f"{world.url}/p", stop_before_callback=True)
        assert pending.callback_url
    return tickets[0], tickets[1], pending.callback_url


async def assert_fails_closed(world: World, alice: str, callback: str, limit: float) -> None:
    mark = world.mark()
    for path, headers, cookie, what in (
        ("/secret", HTML, alice, "signed-in navigation"),
        ("/api/data", JSON, alice, "signed-in API call"),
        ("/secret", HTML, None, "anonymous navigation (a login needs the store)"),
        (callback.replace(world.url, ""), HTML, None, "callback"),
    ):
        status, took, text, _ = await answer(f"{world.url}{path}", headers, cookie)
        assert status == 503, (what, status)
        assert took < limit, (what, took)
        assert "Traceback" not in text
    assert world.seen_since(mark) == []
    async with aiohttp.ClientSession() as client, client.get(f"{world.url}/ready") as r:
        assert r.status == 503
        assert (await r.json())["store"] is False


async def assert_recovered(world: World, alice: str, bob: str) -> None:
    """Every session is its own again (a late Redis answer never lands on another request)."""
    deadline = time.monotonic() + 10
    while True:
        status, _, _, record = await answer(f"{world.url}/back", JSON, alice)
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    for _ in range(3):
        for ticket, user in ((alice, "alice"), (bob, "bob"), (alice, "alice")):
            status, _, _, record = await answer(f"{world.url}/back", JSON, ticket)
            assert status == 200
            assert record is not None
            got = {k.lower(): v for k, v in record["headers"]}
            assert got["x-forwarded-user"] == user


def _pings(port: int) -> int:
    """PING commands the Redis on ``port`` has answered so far (INFO commandstats)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


@pytest.mark.redis
@pytest.mark.parametrize("cache", ["off", "on"])
async def test_a_flood_of_sign_ins_is_no_flood_of_pings(
    oidc_provider: Any, redis_server_factory: Any, tmp_path: Path, cache: str
) -> None:
    """A sign-in checks that the store answers (the session cache's ping, or with
    ``session.cache.ttl: 0``, as on a Redis Cluster, a PING of its own); a flood of anonymous
    navigations checks it at most four times a second (plus the cache's keep-alive ping), and
    a Redis that stops still turns them into 503 within a second."""
    server = redis_server_factory()
    settings: dict[str, Any] = {"redis_timeout": f"{REDIS_TIMEOUT}s"}
    if cache == "off":
        settings["cache"] = {"ttl": 0}
    async with gateway_world(
        tmp_path, issuer=oidc_provider.issuer, client=register_at(oidc_provider),
        store="redis", redis_url=server.url, session=settings,
    ) as world:
        before = _pings(server.port)
        started = time.monotonic()
        for i in range(200):
            status, _, _, _ = await answer(f"{world.url}/page/{i}", HTML)
            assert status == 302
        took = time.monotonic() - started
        checks = _pings(server.port) - before
        # Sign-ins ask at most every quarter second (the background check keeps the answer
        # younger than half a second); the session cache adds its own keep-alive ping on the
        # subscription every PING_EVERY. Both bounded by time, not by the 200 requests.
        bound = took / 0.25 + 2
        if cache == "on":
            bound += took / PING_EVERY + 1
        assert 1 <= checks <= bound, (checks, took)
        server.stop()
        deadline = time.monotonic() + 3.0
        while True:
            status, _, text, _ = await answer(f"{world.url}/after", HTML)
            if status != 302 or time.monotonic() > deadline:
                break
        assert status == 503  # within 3 s: a check every 0.5 s, then the store's timeout
        assert "Traceback" not in text


@pytest.mark.redis
@pytest.mark.parametrize("outage", ["stopped", "hung"])
async def test_redis_outage_fails_closed_within_the_timeout(
    oidc_provider: Any, redis_server_factory: Any, tmp_path: Path, outage: str
) -> None:
    server = redis_server_factory()
    async with gateway_world(
        tmp_path, issuer=oidc_provider.issuer, client=register_at(oidc_provider),
        store="redis", redis_url=server.url, session={"redis_timeout": f"{REDIS_TIMEOUT}s"},
    ) as world:
        alice, bob, callback = await sessions(world)
        if outage == "stopped":
            server.stop()
        else:
            server.freeze()
        try:
            # connect + command timeout, plus one quick retry: well under 3 s either way.
            await assert_fails_closed(world, alice, callback, limit=3.0)
        finally:
            if outage == "stopped":
                server.start()
            else:
                server.thaw()
        await assert_recovered(world, alice, bob)


async def test_provider_down_during_login_shows_an_error_page(
    oidc_provider_factory: Any, tmp_path: Path
) -> None:
    op = oidc_provider_factory()
    async with gateway_world(tmp_path, issuer=op.issuer, client=register_at(op),
                             provider={"timeout": "2s"}) as world, new_browser() as browser:
        pending = await browser_login(browser, f"{world.url}/wanted", stop_before_callback=True)
        assert pending.callback_url
        op.stop()
        mark = world.mark()
        async with browser.get(URL(pending.callback_url, encoded=True), headers=HTML,
                               allow_redirects=False) as r:
            assert r.status in (502, 504)
            text = await r.text()
            assert r.headers["Cache-Control"] == "no-store"
        assert "Sign-in failed" in text
        assert "cannot be reached" in text or "did not answer" in text
        assert "/oauth2/start?rd=%2Fwanted" in text  # "try again" returns to the page
        assert cookie_value(browser, "_oidc_gateway") is None
        assert world.seen_since(mark) == []


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing process or a firewall does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _broken_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    path = head.split(b" ", 2)[1]
    if path == b"/reset":
        _reset(writer)
    elif path == b"/close":
        writer.close()
    elif path == b"/garbage":
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()
        writer.close()
    elif path == b"/reset-mid-body":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.1)
        _reset(writer)
    elif path == b"/reset-mid-chunked":
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        _reset(writer)
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()


@asynccontextmanager
async def broken_upstream() -> AsyncIterator[str]:
    server = await asyncio.start_server(_broken_upstream, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_upstream_reset_is_502_or_a_cut_connection(
    oidc_provider: Any, tmp_path: Path
) -> None:
    async with broken_upstream() as broken, gateway_world(
        tmp_path, issuer=oidc_provider.issuer, client=lambda port: ("u", "u"),
        routes=lambda _: [{"name": "broken", "match": {"path": "/"}, "upstream": broken,
                           "auth": "public"}],
    ) as world, aiohttp.ClientSession() as client:
        for path in ("/reset", "/close", "/garbage"):
            async with client.get(f"{world.url}{path}", headers=HTML) as r:
                assert r.status == 502, path
                assert "not answering" in await r.text()
        for path in ("/reset-mid-body", "/reset-mid-chunked"):
            async with client.get(f"{world.url}{path}") as r:
                assert r.status == 200  # the answer had begun: the status is out
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()  # ...but the client learns the body is incomplete
        async with client.get(f"{world.url}/fine") as r:  # the control
            assert r.status == 200
            assert await r.text() == "ok"
