"""One contract suite for every SessionStore, run against MemoryStore and a real redis-server.

Like oauth2-proxy's RunSessionStoreTests: the same behaviour is demanded of both stores, so the
gateway can switch between them by config alone. Redis runs as a private server on a free
loopback port (never the shared 127.0.0.1:6379), without persistence, killed at teardown.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.utils import HIREDIS_AVAILABLE

from gateway.errors import SessionStoreError
from gateway.models import IndexEntry
from gateway.store import MemoryStore, RedisStore, SessionStore
from tests.support.peers import free_port

REDIS_SERVER = "/usr/bin/redis-server"
START_DEADLINE = 10.0


def _answers_ping(port: int, password: str | None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            if password:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private redis-server that a test can stop, freeze and restart on the same port."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_DEADLINE
        while not _answers_ping(self.port, self.password):
            if self.proc.poll() is not None:
                log_text = (self.workdir / "redis.log").read_text(errors="replace")
                self.proc = None
                raise RuntimeError(f"redis-server exited at start:\n{log_text[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {START_DEADLINE} s")
            time.sleep(0.02)  # poll interval of a bounded wait, not a guess at readiness

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a test froze it
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server just for one test that stops or freezes it; it needs a password (not leaked)."""
    server = RedisServer(tmp_path, password="s3cret-" + secrets.token_hex(8))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """A store under test, plus how to make its entries older."""

    kind: str
    store: SessionStore
    clock: FakeClock | None = None
    raw: Redis | None = None  # a plain client on the same server, to look behind the store
    prefix: str = ""


@pytest.fixture(
    params=["memory", pytest.param("redis", marks=pytest.mark.redis)],
)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        yield Harness("memory", store, clock=clock)
        await store.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test-{secrets.token_hex(4)}:"
    redis_store = RedisStore.from_url(server.url, prefix=prefix)
    raw = Redis.from_url(server.url)
    try:
        yield Harness("redis", redis_store, raw=raw, prefix=prefix)
    finally:
        await redis_store.close()
        await raw.aclose()


async def _wait_until_gone(store: SessionStore, key: str, limit: float = 3.0) -> float:
    """Poll until ``key`` is gone; returns how long it took (bounded, fails past ``limit``)."""
    start = time.monotonic()
    while await store.get(key) is not None:
        assert time.monotonic() - start < limit, f"{key} still present after {limit} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


# --------------------------------------------------------------------------- the contract


async def test_is_a_session_store(harness: Harness) -> None:
    assert isinstance(harness.store, SessionStore)
    await harness.store.ping()


async def test_get_missing_is_none(harness: Harness) -> None:
    assert await harness.store.get("s:missing") is None


async def test_set_get(harness: Harness) -> None:
    await harness.store.set("s:one", b"value-1", 60)
    assert await harness.store.get("s:one") == b"value-1"
    assert await harness.store.get("s:one") == b"value-1"  # reading does not consume


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00", bytes(range(256)), b"\xff" * 100_000],
    ids=["empty", "nul", "all", "big"],
)
async def test_binary_values_roundtrip(harness: Harness, value: bytes) -> None:
    await harness.store.set("s:bin", value, 60)
    assert await harness.store.get("s:bin") == value


async def test_overwrite(harness: Harness) -> None:
    await harness.store.set("s:k", b"first", 60)
    await harness.store.set("s:k", b"second", 60)
    assert await harness.store.get("s:k") == b"second"


async def test_keys_are_independent(harness: Harness) -> None:
    await harness.store.set("s:a", b"A", 60)
    await harness.store.set("l:a", b"L", 60)
    assert await harness.store.get("s:a") == b"A"
    assert await harness.store.get("l:a") == b"L"
    await harness.store.delete("s:a")
    assert await harness.store.get("l:a") == b"L"


async def test_delete(harness: Harness) -> None:
    await harness.store.set("s:d", b"v", 60)
    await harness.store.delete("s:d")
    assert await harness.store.get("s:d") is None
    await harness.store.delete("s:d")  # deleting what is gone is fine
    await harness.store.delete("s:never-existed")


async def test_pop_is_single_use(harness: Harness) -> None:
    await harness.store.set("l:state", b"login", 60)
    assert await harness.store.pop("l:state") == b"login"
    assert await harness.store.pop("l:state") is None
    assert await harness.store.get("l:state") is None
    assert await harness.store.pop("l:never-existed") is None


async def test_concurrent_pops_exactly_one_wins(harness: Harness) -> None:
    for round_ in range(3):
        key = f"l:race-{round_}"
        await harness.store.set(key, b"login", 60)
        results = await asyncio.gather(*(harness.store.pop(key) for _ in range(20)))
        assert results.count(b"login") == 1
        assert results.count(None) == 19


async def test_set_new_indexed_stores_once_and_lists_the_member(harness: Harness) -> None:
    store = harness.store
    index = [IndexEntry("x:sub:alice", "sess-1", b'{"user":"alice"}', 600),
             IndexEntry("x:user:alice", "sess-1", b'{"user":"alice"}', 600),
             IndexEntry("x:h:abc", "sess-1", b"meta", 600)]
    assert await store.set_new_indexed("s:sess-1", b"sealed-1", 60, index)
    assert await store.get("s:sess-1") == b"sealed-1"
    for entry in index:
        assert await store.index_get(entry.key) == {"sess-1": entry.value}
    # A second session of the same user joins the indexes; the first stays listed.
    assert await store.set_new_indexed(
        "s:sess-2", b"sealed-2", 60, [IndexEntry("x:sub:alice", "sess-2", b"two", 600)])
    assert await store.index_get("x:sub:alice") == {"sess-1": b'{"user":"alice"}',
                                                    "sess-2": b"two"}
    # A taken key is never overwritten (False); its index entry is still written, as the
    # contract says (readers skip entries of absent sessions).
    assert not await store.set_new_indexed(
        "s:sess-1", b"intruder", 60, [IndexEntry("x:sid:op-1", "sess-1", b"late", 600)])
    assert await store.get("s:sess-1") == b"sealed-1"
    assert await store.index_get("x:sid:op-1") == {"sess-1": b"late"}


async def test_set_new_indexed_gives_each_key_its_ttl(harness: Harness) -> None:
    """The session key lives as long as the session; an index lives as long as its longest
    entry: a new entry extends a shorter index and never shortens a longer one."""
    store = harness.store
    await store.index_put("x:sub:long", "older", b"o", 900)
    await store.index_put("x:sub:short", "older", b"o", 5)
    assert await store.set_new_indexed("s:ttl", b"sealed", 60, [
        IndexEntry("x:sub:long", "new", b"n", 300), IndexEntry("x:sub:short", "new", b"n", 300),
        IndexEntry("x:sub:fresh", "new", b"n", 300)])
    if harness.clock is not None:
        harness.clock.now += 61
        assert await store.get("s:ttl") is None
        harness.clock.now += 240  # 301 s: every index past 300 s is gone but the longest
        assert await store.index_get("x:sub:short") == {}
        assert await store.index_get("x:sub:fresh") == {}
        assert await store.index_get("x:sub:long") != {}
        return
    assert harness.raw is not None
    pttl = harness.raw.pttl
    assert 59_000 < await pttl(harness.prefix + "s:ttl") <= 60_000
    assert 899_000 < await pttl(harness.prefix + "x:sub:long") <= 900_000
    assert 299_000 < await pttl(harness.prefix + "x:sub:short") <= 300_000
    assert 299_000 < await pttl(harness.prefix + "x:sub:fresh") <= 300_000


async def test_set_new_indexed_with_no_index_is_set_new(harness: Harness) -> None:
    assert await harness.store.set_new_indexed("s:alone", b"v", 60, [])
    assert not await harness.store.set_new_indexed("s:alone", b"w", 60, [])
    assert await harness.store.get("s:alone") == b"v"


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
async def test_invalid_ttl_is_rejected(harness: Harness, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await harness.store.set("s:bad-ttl", b"v", ttl)
    assert await harness.store.get("s:bad-ttl") is None


async def test_ttl_expiry(harness: Harness) -> None:
    store = harness.store
    if harness.clock is not None:
        clock = harness.clock
        await store.set("s:t", b"v", 10)
        await store.set("l:t", b"v", 10)
        clock.now += 9.999
        assert await store.get("s:t") == b"v"
        clock.now += 0.001
        assert await store.get("s:t") is None
        assert await store.pop("l:t") is None  # pop honours expiry too
        return
    # Redis: expiry itself, with a short TTL and a bounded wait...
    await store.set("s:t", b"v", 0.05)
    await store.set("l:t", b"v", 0.05)
    waited = await _wait_until_gone(store, "s:t")
    assert waited < 3.0
    assert await store.pop("l:t") is None
    # ...and the TTL a long value really gets, checked with PTTL instead of waiting for it.
    assert harness.raw is not None
    await store.set("s:long", b"v", 100)
    pttl = await harness.raw.pttl(harness.prefix + "s:long")
    assert 99_000 < pttl <= 100_000
    # sub-millisecond TTLs round up to 1 ms rather than becoming an invalid 0
    await store.set("s:tiny", b"v", 0.0004)
    await _wait_until_gone(store, "s:tiny")


async def test_overwrite_replaces_the_ttl(harness: Harness) -> None:
    store = harness.store
    await store.set("s:r", b"old", 1)
    await store.set("s:r", b"new", 100)
    if harness.clock is not None:
        harness.clock.now += 50
        assert await store.get("s:r") == b"new"
        harness.clock.now += 50
        assert await store.get("s:r") is None
        return
    assert harness.raw is not None
    assert await harness.raw.pttl(harness.prefix + "s:r") > 99_000
    await store.set("s:r", b"newer", 5)
    assert await harness.raw.pttl(harness.prefix + "s:r") <= 5_000


# --------------------------------------------------------------------------- MemoryStore


async def test_memory_store_purges_expired_entries_in_bounded_batches() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(200):
        await store.set(f"s:{i}", b"v", 1)
    assert len(store) == 200
    clock.now += 2
    await store.set("s:fresh", b"v", 100)
    assert len(store) == 201 - MemoryStore.PURGE_BATCH  # one write, one bounded batch
    for _ in range(3):
        await store.set("s:fresh", b"v", 100)
    assert len(store) == 1
    assert await store.get("s:fresh") == b"v"


async def test_memory_store_deadline_heap_stays_bounded_under_rewrites() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(5000):
        clock.now += 1
        await store.set("s:touched", str(i).encode(), 3600)
    assert len(store) == 1
    assert len(store._deadlines) <= 2 + 2 * MemoryStore.PURGE_BATCH
    assert await store.get("s:touched") == b"4999"


async def test_memory_store_rewrite_keeps_latest_deadline() -> None:
    """A stale heap entry of an earlier write must not purge the rewritten key."""
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.set("s:k", b"short", 1)
    await store.set("s:k", b"long", 100)
    clock.now += 2
    await store.set("s:other", b"v", 100)  # triggers a purge that pops the stale deadline
    assert await store.get("s:k") == b"long"


async def test_memory_store_full_refuses_new_keys_and_keeps_existing_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refuse, never evict: an unauthenticated flood of logins must not sign anyone out."""
    clock = FakeClock()
    store = MemoryStore(clock=clock, max_entries=3)
    await store.set("s:alice", b"alice", 100)
    await store.set("l:1", b"login", 10)
    await store.set("l:2", b"login", 10)
    with caplog.at_level("WARNING", logger="gateway.store"):
        for attempt in range(3):
            with pytest.raises(SessionStoreError, match=r"session\.memory_max_sessions") as info:
                await store.set(f"l:flood-{attempt}", b"login", 10)
            assert info.value.status_hint == 503
    # One log line for the burst, not one per refused write.
    full = [r for r in caplog.records if "memory session store full" in r.getMessage()]
    assert len(full) == 1
    assert store.refused == 3
    # Signed-in users are untouched and can still be rewritten (idle-timeout updates).
    assert await store.get("s:alice") == b"alice"
    await store.set("s:alice", b"alice-touched", 100)
    assert await store.get("s:alice") == b"alice-touched"
    # A used login state frees its slot at once...
    assert await store.pop("l:1") == b"login"
    await store.set("s:bob", b"bob", 100)
    # ...and so does expiry: a full store sweeps every expired entry before refusing.
    clock.now += 11
    await store.set("s:carol", b"carol", 100)
    assert len(store) == 3  # alice, bob, carol; l:2 was swept
    assert await store.get("l:2") is None


async def test_memory_store_refusal_is_logged_again_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock, max_entries=1)
    await store.set("s:one", b"v", 10_000)
    with caplog.at_level("WARNING", logger="gateway.store"):
        for _ in range(2):
            with pytest.raises(SessionStoreError):
                await store.set("s:two", b"v", 10)
            clock.now += MemoryStore.FULL_LOG_INTERVAL
    assert sum("memory session store full" in r.getMessage() for r in caplog.records) == 2


def test_memory_store_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryStore(max_entries=0)


# --------------------------------------------------------------------------- RedisStore


@pytest.mark.redis
def test_hiredis_is_in_use() -> None:
    assert HIREDIS_AVAILABLE


@pytest.mark.redis
async def test_values_are_stored_under_the_prefix(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, prefix="pfx-a:")
    raw = Redis.from_url(redis_server.url)
    try:
        await store.set("s:abc", b"v", 60)
        assert await raw.get("pfx-a:s:abc") == b"v"
        assert await raw.get("s:abc") is None
    finally:
        await store.close()
        await raw.aclose()


@pytest.mark.redis
async def test_prefix_isolation(redis_server: RedisServer) -> None:
    one = RedisStore.from_url(redis_server.url, prefix="iso-one:")
    two = RedisStore.from_url(redis_server.url, prefix="iso-two:")
    try:
        await one.set("s:same", b"one", 60)
        assert await two.get("s:same") is None
        assert await two.pop("s:same") is None
        await two.set("s:same", b"two", 60)
        await two.delete("s:same")
        assert await one.get("s:same") == b"one"
        await two.set("s:same", b"two", 60)
        assert await one.pop("s:same") == b"one"
        assert await two.get("s:same") == b"two"
    finally:
        await one.close()
        await two.close()


def test_from_url_rejects_bad_urls_without_leaking_the_password() -> None:
    with pytest.raises(ValueError, match="invalid redis URL") as info:
        RedisStore.from_url("http://user:hunter2-pw@127.0.0.1:6379/0")
    assert "hunter2-pw" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("redis://:pw@10.0.0.1:6380/2", "redis://10.0.0.1:6380/2"),
        ("redis://user:pw@cache.internal/0", "redis://cache.internal:6379/0"),
        ("rediss://cache.internal:7000", "rediss://cache.internal:7000/0"),
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock"),
    ],
)
def test_store_name_never_has_the_password(url: str, name: str) -> None:
    store = RedisStore.from_url(url)
    assert store.name == name


async def _timed(coro_factory: Callable[[], Awaitable[object]]) -> tuple[float, SessionStoreError]:
    """Run one store call that must fail; return how long failing took, and the error."""
    start = time.monotonic()
    with pytest.raises(SessionStoreError) as info:
        await coro_factory()
    return time.monotonic() - start, info.value


@pytest.mark.redis
async def test_redis_down_fails_fast_and_closed_then_recovers(
    own_redis_server: RedisServer,
) -> None:
    server = own_redis_server
    assert server.password is not None
    store = RedisStore.from_url(server.url, prefix="down:")
    try:
        await store.set("s:k", b"v", 60)
        assert await store.get("s:k") == b"v"  # a pooled connection now exists

        server.stop()
        operations = {
            "GET": lambda: store.get("s:k"),
            "SET": lambda: store.set("s:k", b"v2", 60),
            "DEL": lambda: store.delete("s:k"),
            "GETDEL": lambda: store.pop("s:k"),
            "PING": lambda: store.ping(),
        }
        for op, call in operations.items():
            elapsed, error = await _timed(call)
            assert elapsed < 2.0, f"{op} took {elapsed:.3f} s to fail with Redis down"
            message = str(error)
            assert f"127.0.0.1:{server.port}" in message
            assert op in message
            assert server.password not in message
            assert error.status_hint == 503
            assert error.reason == "session_store_unavailable"

        server.start()  # same port; nothing persisted, so the store is empty again
        await store.ping()
        assert await store.get("s:k") is None
        await store.set("s:k", b"back", 60)
        assert await store.get("s:k") == b"back"
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_restart_is_invisible_to_the_next_command(
    own_redis_server: RedisServer,
) -> None:
    """A pooled connection that Redis closed on restart is replaced by the one retry."""
    server = own_redis_server
    store = RedisStore.from_url(server.url, prefix="restart:")
    try:
        await store.set("s:k", b"v", 60)
        server.stop()
        server.start()
        assert await store.get("s:k") is None  # no error: the stale connection was retried
    finally:
        await store.close()


@pytest.mark.redis
async def test_a_burst_beyond_the_pool_waits_instead_of_failing(
    own_redis_server: RedisServer,
) -> None:
    """Commands on redis-py's pool (index entries, scripts, pub/sub), 400 at once: past the
    pool's connections they wait for one (redis-py's default pool failed them at once with
    "Too many connections", a 503 each)."""
    store = RedisStore.from_url(own_redis_server.url, prefix="burst:")
    try:
        await asyncio.gather(*(store.index_put(f"x:sub:{i}", "m", b"v", 60) for i in range(400)))
        found = await asyncio.gather(*(store.index_get(f"x:sub:{i}") for i in range(400)))
        assert found == [{"m": b"v"}] * 400
    finally:
        await store.close()


@pytest.mark.redis
async def test_hung_redis_fails_within_the_timeouts(own_redis_server: RedisServer) -> None:
    """A frozen server (accepts TCP, never answers) costs one command timeout, not a retry each."""
    server = own_redis_server
    store = RedisStore.from_url(server.url, prefix="hung:", command_timeout=0.3)
    try:
        await store.set("s:k", b"v", 60)
        server.freeze()
        try:
            elapsed, error = await _timed(lambda: store.get("s:k"))
            assert elapsed < 1.0, f"took {elapsed:.3f} s"
            assert f"127.0.0.1:{server.port}" in str(error)
            elapsed, error = await _timed(lambda: store.ping())
            assert elapsed < 1.0, f"took {elapsed:.3f} s"
        finally:
            server.thaw()
        assert await store.get("s:k") == b"v"
    finally:
        await store.close()


async def test_unreachable_host_fails_fast_without_the_password() -> None:
    port = free_port()  # nothing listens here
    store = RedisStore.from_url(f"redis://:pw-{port}-secret@127.0.0.1:{port}/0")
    try:
        elapsed, error = await _timed(lambda: store.get("s:k"))
        assert elapsed < 2.0
        assert f"127.0.0.1:{port}" in str(error)
        assert f"pw-{port}-secret" not in str(error)
    finally:
        await store.close()
