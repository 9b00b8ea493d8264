"""The session store's lean connection (gateway/redis_lane.py) against a real redis-server.

``set_new`` (a login's single-use mark, a refresh lock) and ``set_new_indexed`` (a login's new
session) go through it on a plain TCP or Unix-socket server: with the server's password and
database, many callers at once, a frozen, restarted or stopped server, and error replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis.asyncio import Redis

from gateway.errors import SessionStoreError
from gateway.models import IndexEntry
from gateway.session_cache import SessionCache
from gateway.store import RedisStore
from tests.support.peers import RedisServer, RedisServerFactory

pytestmark = pytest.mark.redis


@pytest.fixture
def server(redis_server_factory: RedisServerFactory) -> RedisServer:
    """A server with a password, which a test may freeze, restart or stop."""
    return redis_server_factory(persist=False, password="lane-" + secrets.token_hex(8))


@contextlib.asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[RedisStore]:
    """A store on ``url``, closed when the block ends."""
    store = RedisStore.from_url(url, **options)
    try:
        yield store
    finally:
        await store.close()


def url_with_db(server: RedisServer, db: int) -> str:
    return server.url.rsplit("/", 1)[0] + f"/{db}"


async def test_commands_reach_the_configured_database_with_the_password(
    server: RedisServer,
) -> None:
    store = RedisStore.from_url(url_with_db(server, 3), prefix="lane:")
    raw = Redis(port=server.port, password=server.password, db=3)
    try:
        assert await store.set_new("l:used:a", b"1", 60)
        assert not await store.set_new("l:used:a", b"2", 60)
        assert await store.set_new_indexed(
            "s:one", b"sealed", 60, [IndexEntry("x:sub:alice", "one", b"meta", 600)])
        assert await raw.get("lane:l:used:a") == b"1"
        assert await raw.get("lane:s:one") == b"sealed"
        assert await raw.hgetall("lane:x:sub:alice") == {b"one": b"meta"}
        assert await store.get("s:one") == b"sealed"  # the same data through redis-py
        # The lane's connection carries the gateway's client name, like redis-py's.
        clients = await raw.client_list()
        assert sum(c["name"] == "oidc-gateway" for c in clients) >= 1
    finally:
        await raw.aclose()
        await store.close()


async def test_concurrent_callers_each_get_their_own_answer(server: RedisServer) -> None:
    """Replies come back in the order asked: 300 callers at once, half of them on keys already
    taken, each told exactly its own outcome."""
    async with opened(server.url, prefix="many:") as store:
        taken = [f"l:used:{i}" for i in range(0, 300, 2)]
        await asyncio.gather(*(store.set_new(key, b"first", 60) for key in taken))
        keys = [f"l:used:{i}" for i in range(300)]
        results = await asyncio.gather(*(store.set_new(key, b"again", 60) for key in keys))
        assert results == [i % 2 == 1 for i in range(300)]
        # Exactly one of many racing for the same key wins.
        race = await asyncio.gather(*(store.set_new("l:race", b"x", 60) for _ in range(50)))
        assert race.count(True) == 1
        # A signed-in request's read and write, 300 at once: each gets its own answer (redis-py's
        # pool answered "Too many connections" past 100 commands in flight).
        await asyncio.gather(*(store.set(f"s:{i}", b"v%d" % i, 60) for i in range(300)))
        values = await asyncio.gather(*(store.get(f"s:{i}") for i in range(300)))
        assert values == [b"v%d" % i for i in range(300)]
        popped = await asyncio.gather(*(store.pop(f"s:{i}") for i in range(0, 300, 3)))
        assert popped == [b"v%d" % i for i in range(0, 300, 3)]
        await asyncio.gather(*(store.delete(f"s:{i}") for i in range(1, 300, 3)))
        left = await asyncio.gather(*(store.get(f"s:{i}") for i in range(300)))
        assert left == [b"v%d" % i if i % 3 == 2 else None for i in range(300)]


async def test_an_error_reply_is_a_store_error_naming_the_operation(
    server: RedisServer,
) -> None:
    store = RedisStore.from_url(server.url, prefix="err:")
    raw = Redis(port=server.port, password=server.password)
    try:
        await raw.set("err:x:sub:bob", b"not a hash")  # the script's HSET meets a string
        with pytest.raises(SessionStoreError, match=r"SET NX \+ index HSET.*WRONGTYPE"):
            await store.set_new_indexed(
                "s:two", b"sealed", 60, [IndexEntry("x:sub:bob", "two", b"meta", 600)])
        assert await store.set_new("l:after", b"1", 60)  # the connection is still good
    finally:
        await raw.aclose()
        await store.close()


async def test_a_wrong_password_fails_closed_without_the_password(server: RedisServer) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    async with opened(f"redis://:{wrong}@127.0.0.1:{server.port}/0") as store:
        with pytest.raises(SessionStoreError) as info:
            await store.set_new("l:used:x", b"1", 60)
        assert f"127.0.0.1:{server.port}" in str(info.value)
        assert wrong not in str(info.value)


async def test_a_frozen_server_fails_within_the_deadline_and_answers_stay_matched(
    server: RedisServer,
) -> None:
    """A caller that stops waiting leaves the connection: the answer it leaves behind never
    reaches the next caller."""
    async with opened(server.url, prefix="frozen:", command_timeout=0.3) as store:
        assert await store.set_new("l:warm", b"1", 60)
        server.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(SessionStoreError, match=f"127.0.0.1:{server.port}"):
                await store.set_new("l:during", b"1", 60)
            assert time.monotonic() - started < 1.0  # the command timeout, not the deadline
        finally:
            server.thaw()
        fresh = f"l:fresh-{secrets.token_hex(4)}"
        assert await store.set_new(fresh, b"1", 60)
        assert not await store.set_new(fresh, b"1", 60)
        assert not await store.set_new("l:warm", b"1", 60)


async def test_a_restart_is_invisible_and_a_stopped_server_fails_fast(
    server: RedisServer,
) -> None:
    async with opened(server.url, prefix="restart:") as store:
        assert await store.set_new("l:before", b"1", 60)
        server.stop()
        server.start()
        assert await store.set_new("l:before", b"1", 60)  # the old key is gone, no error
        server.stop()
        started = time.monotonic()
        with pytest.raises(SessionStoreError, match="SET NX"):
            await store.set_new("l:down", b"1", 60)
        assert time.monotonic() - started < 2.0
        server.start()
        assert await store.set_new("l:down", b"1", 60)


async def test_a_unix_socket_server_is_served_too(
    redis_server_factory: RedisServerFactory,
) -> None:
    # A short directory: a Unix socket's path is limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="lane") as workdir:
        sock = Path(workdir) / "redis.sock"
        redis_server_factory(persist=False, unixsocket=sock)
        store = RedisStore.from_url(f"unix://{sock}?db=2", prefix="unix:")
        raw = Redis(unix_socket_path=str(sock), db=2)
        try:
            assert await store.set_new("l:used:u", b"1", 60)
            assert not await store.set_new("l:used:u", b"1", 60)
            assert await raw.get("unix:l:used:u") == b"1"
        finally:
            await raw.aclose()
            await store.close()


def test_under_uvloop_as_the_gateway_runs(server: RedisServer) -> None:
    """The gateway serves on uvloop, whose transports are not asyncio's own classes."""

    async def scenario() -> list[bool]:
        async with opened(server.url, prefix="uvloop:") as store:
            return list(await asyncio.gather(
                store.set_new("l:one", b"1", 60), store.set_new("l:one", b"1", 60),
                store.set_new_indexed("s:uv", b"sealed", 60,
                                      [IndexEntry("x:sub:uv", "uv", b"meta", 600)])))

    assert uvloop.run(scenario()) == [True, False, True]


async def test_a_subscriber_hears_messages_and_pongs_in_order(server: RedisServer) -> None:
    """What the session cache relies on: a pong comes after every message published before
    its ping; a lost connection is noticed at once."""
    store = RedisStore.from_url(url_with_db(server, 2), prefix="sub:")
    raw = Redis(port=server.port, password=server.password)
    subscriber = store.pubsub()
    try:
        channel = store.channel("invalidate")
        await subscriber.subscribe(channel)
        first = await subscriber.get_message(1.0)
        assert first is not None
        assert first["type"] == "subscribe"
        assert await subscriber.get_message(0.05) is None  # nothing more: None, not a hang
        for i in range(3):
            await raw.publish(channel, f"s:{i}")  # another client (pub/sub ignores the db)
        await subscriber.ping(b"c1")
        got = [await subscriber.get_message(1.0) for _ in range(4)]
        assert got == [{"type": "message", "data": b"s:0"}, {"type": "message", "data": b"s:1"},
                       {"type": "message", "data": b"s:2"}, {"type": "pong", "data": b"c1"}]
        assert not subscriber.lost()
        killed = await raw.client_kill_filter(_type="pubsub")
        assert killed == 1
        with pytest.raises(ConnectionError):
            await subscriber.get_message(1.0)
        assert subscriber.lost()
    finally:
        await subscriber.aclose()
        await raw.aclose()
        await store.close()


async def test_a_request_is_confirmed_only_by_a_ping_sent_after_it_arrived(
    server: RedisServer,
) -> None:
    """The session cache's early ping (SessionCache.ping_early, sent when a request's bytes
    arrive): a request may use the pong of a ping sent after its mark, never of one sent
    before. With Redis frozen, the first request is still confirmed by its answered ping;
    one that arrived after that ping waits for its own and gets 503 (SessionStoreError)."""
    store = RedisStore.from_url(server.url, prefix="early:")
    cache = SessionCache(ttl=60.0, max_entries=10, bus=store, deadline=0.3)
    listener = asyncio.create_task(cache.run())
    try:
        deadline = time.monotonic() + 5.0
        while not cache.usable:
            assert time.monotonic() < deadline, "the subscription never came up"
            await asyncio.sleep(0.01)
        assert cache.ping_early() is None  # nothing cached: nothing to confirm
        token = cache.begin("s:one")
        assert cache.fill("s:one", token, b"sealed") is not None
        first = cache.ping_early()
        assert first is not None
        assert await cache.confirmed(after=first)
        server.freeze()
        try:
            assert await cache.confirmed(after=first)  # its ping was answered: no wait
            later = cache.ping_early()
            assert later is not None
            await asyncio.sleep(0)  # its ping leaves (in the server: before the request is read)
            started = time.monotonic()
            with pytest.raises(SessionStoreError):
                await cache.confirmed(after=later)
            assert time.monotonic() - started >= 0.25
        finally:
            server.thaw()
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await store.close()
