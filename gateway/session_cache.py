"""An in-process cache of sessions, kept correct across processes by Redis pub/sub.

Every signed-in request needs its session. Without a cache that is a Redis GET plus the AES-GCM
open and the JSON decode of the sealed session, about a third of the gateway's CPU time per
request. With it, a session seen in the last ``session.cache.ttl`` seconds comes from memory,
after one shared ping (below) instead of a read per request.

What keeps it correct (a revoked session is refused by every process from the moment the
revocation is answered, and a broken Redis still means 503):

* Every write or delete of a session key goes through :class:`InvalidatingStore`, which drops
  the entry here at once and then publishes the key on the channel ``<key_prefix>invalidate``.
  A write is not done until that publish is: if it fails, the operation fails (503) and the
  caller tries again, so no process keeps a revoked session because a message was never sent.
* Each process subscribes to that channel (:meth:`SessionCache.run`) and drops what it hears.
* Before a request uses the cache, Redis must answer a ping sent on that subscription after
  the request arrived (:meth:`SessionCache.confirmed`; one ping serves every request of the
  same event-loop turn). Redis runs one command at a time and sends a subscriber its messages
  in order, so by that pong every invalidation published earlier has been applied here. A hung
  Redis answers no ping: 503 after ``session.redis_timeout``, as a read would be.
* Without a live subscription (not yet subscribed, the connection closed, pings unanswered for
  :data:`ALIVE_FOR`) the cache is dropped and not used: every request reads Redis, as with no
  cache, until a new subscription is confirmed.
* A read racing an invalidation never fills the cache with the old value: the fill is refused
  when the key was invalidated after the read began (:meth:`SessionCache.begin`).
* An entry lives at most ``ttl`` seconds whatever happens, and the cache holds at most
  ``max_entries`` sessions (oldest out first). Absent sessions are never cached, so random
  cookies cannot fill it.

The cached value is the sealed blob as Redis returned it, plus the session it opened to and a
SHA-256 digest of the cookie secret that opened it. A request whose secret has the same digest
(compared in constant time) gets that session without opening the blob again; any other secret
goes through the full AES-GCM open, which fails for a wrong one.

The memory store lives in one process and needs no subscription: :class:`SessionCache` with
no ``bus`` is always usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.config import SessionConfig
from gateway.errors import SessionStoreError
from gateway.models import IndexEntry, Session
from gateway.observability import Metrics
from gateway.store import RedisStore, SessionStore

log = logging.getLogger("gateway.session_cache")

SESSION_KEY_PREFIX: Final = "s:"
# How often an idle subscription is pinged, and how long it may stay silent before it is taken
# for lost: the cache is dropped and the subscription made anew (RETRY_EVERY later). Requests
# never rely on it alone: each use of the cache waits for a ping of its own (confirmed()).
PING_EVERY: Final = 0.25
ALIVE_FOR: Final = 0.9
RETRY_EVERY: Final = 0.5


class Subscriber(Protocol):
    """One subscribed connection (the store's :meth:`gateway.store.RedisStore.pubsub`)."""

    async def subscribe(self, channel: str) -> None: ...

    async def ping(self, token: bytes = b"") -> None: ...

    async def get_message(self, seconds: float) -> dict[str, Any] | None:
        """The next message, pong or subscription (``{"type": ..., "data": ...}``), None when
        none came within ``seconds``; raises when the connection is lost."""
        ...

    def lost(self) -> bool:
        """Whether the connection is known to be closed (asked on every use of the cache)."""
        ...

    async def aclose(self) -> None: ...


class Bus(Protocol):
    """The pub/sub side of the Redis store (:class:`gateway.store.RedisStore`)."""

    async def publish(self, channel: str, message: bytes) -> None: ...

    def pubsub(self) -> Subscriber: ...

    def channel(self, name: str) -> str: ...


def secret_digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


@dataclass(slots=True)
class _Entry:
    blob: bytes
    expires: float
    digest: bytes | None = None
    session: Session | None = None


class _Batch:
    """The requests that one ping confirms."""

    __slots__ = ("timer", "waiters")

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[bool]] = []
        self.timer: asyncio.TimerHandle | None = None

    def settle(self, result: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for waiter in self.waiters:
            if not waiter.done():  # a request whose client went away is cancelled
                waiter.set_result(result)

    def fail(self, error: Exception) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(error)


class SessionCache:
    """Recently read sessions of this process; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        bus: Bus | None = None,
        deadline: float = 1.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.deadline = deadline
        self.max_entries = max_entries
        self._bus = bus
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # key -> the token of the read in progress; an invalidation removes it (begin/fill).
        self._loading: dict[str, object] = {}
        # Monotonic time of the subscription's last sign of life; -inf while not subscribed.
        self._alive_at = -float("inf")
        # The subscribed connection (None while there is none), and the confirmations
        # (confirmed()): requests waiting for the next ping, and pings awaiting their pong.
        # Whether its socket has seen the server close it is asked on every use, so a Redis
        # that just went away stops the cache before the listener task even runs.
        self._pubsub: Subscriber | None = None
        self._pending: _Batch | None = None
        self._in_flight: dict[bytes, _Batch] = {}
        self._sequence = 0
        # The newest ping (by sequence) whose pong came on the live subscription.
        self._answered = 0
        self._sends: set[asyncio.Task[None]] = set()
        self.channel = bus.channel("invalidate") if bus is not None else ""
        self._hits = metrics.cache_hits if metrics else None
        self._misses = metrics.session_cache.labels("miss") if metrics else None
        self._live = metrics.session_cache_live if metrics else None
        if self._live is not None:
            self._live.set(1 if bus is None else 0)

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        if self._bus is None:
            return True
        pubsub = self._pubsub
        if pubsub is not None and pubsub.lost():
            return False
        return self._clock() - self._alive_at < ALIVE_FOR

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._loading.clear()

    # ------------------------------------------------------------------ reads

    def lookup(self, key: str) -> _Entry | None:
        """The live entry of ``key`` when the cache may be trusted now, else None."""
        entry = self._entries.get(key)
        if entry is not None and (entry.expires <= self._clock() or not self.usable):
            del self._entries[key]
            entry = None
        if entry is not None and self._hits is not None:
            self._hits.count += 1  # reaches the counter at the next Metrics.flush()
        return entry

    def holds(self, key: str) -> bool:
        """Whether ``key`` has an entry at all: without one, a read goes straight to the store
        and needs no confirmation ping (:meth:`confirmed`)."""
        return key in self._entries

    def begin(self, key: str, *, read: bool = True) -> object:
        """Mark the start of a store read of ``key``; pass the token to :meth:`fill`.

        Reads that overlap with no invalidation between them share one token, and the first
        to finish fills the entry: all of them began after the last change of ``key`` was
        announced. (A token per read let every new read void the ones before it: under steady
        concurrent load of one session no read ever finished last, and every request missed.)
        ``read=False``: the start of a login's write of a new session, which then fills the
        entry with what it wrote (no miss counted); an invalidation in between voids it alike.
        """
        token = self._loading.get(key)
        if token is None:
            token = self._loading[key] = object()
        if read and self._misses is not None:  # every store read is a miss of the cache
            self._misses.inc()
        return token

    def fill(self, key: str, token: object, blob: bytes | None) -> _Entry | None:
        """Keep what the read of ``key`` returned, unless ``key`` was invalidated since
        :meth:`begin`, a read begun with it filled first, or the cache may not be trusted
        now."""
        if self._loading.get(key) is not token:
            return None
        del self._loading[key]
        if blob is None or not self.usable:
            return None
        entries = self._entries
        if key not in entries and len(entries) >= self.max_entries:
            del entries[next(iter(entries))]
        entry = _Entry(blob, self._clock() + self.ttl)
        entries[key] = entry
        return entry

    @staticmethod
    def opened(entry: _Entry, secret: bytes) -> Session | None:
        """The session ``entry`` opened to for this same secret, if it did."""
        if entry.session is None or entry.digest is None:
            return None
        if hmac.compare_digest(entry.digest, secret_digest(secret)):
            return entry.session
        return None

    @staticmethod
    def remember(entry: _Entry, secret: bytes, session: Session) -> None:
        entry.digest = secret_digest(secret)
        entry.session = session

    # ------------------------------------------------------------------ confirmation

    def ping_early(self) -> int | None:
        """A request that may use the cache has just arrived (its bytes, before they are
        parsed): its confirmation ping leaves before it is read and decided (the requests
        arriving in one event-loop turn share one, as in :meth:`confirmed`), so that the
        pong is on its way meanwhile. Returns the mark to hand to :meth:`confirmed` for that
        request (None when there is nothing to confirm: no subscription, nothing cached)."""
        if self._bus is None or self._pubsub is None or not self._entries or not self.usable:
            return None
        if self._pending is None:
            self._pending = _Batch()
            asyncio.get_running_loop().call_soon(self._send_pending)
        return self._sequence

    async def confirmed(self, after: int | None = None) -> bool:
        """True once Redis has answered a ping sent after this call began; False when there
        is no live subscription (read the store instead). SessionStoreError when Redis does
        not answer within the store's deadline (a hung Redis: 503, as a read would).

        Redis handles commands one at a time and sends a subscriber its messages in order,
        so the pong comes after every invalidation published before the ping: once this
        returns True, no session revoked before the request arrived is still here. All
        requests of one event-loop turn share one ping.
        """
        if self._bus is None:
            return True
        if not self.usable or self._pubsub is None:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        batch = None
        if after is not None and self._sequence > after:
            # ``after``: ping_early's mark, taken when the request arrived. A ping sent since
            # then serves it as well as one sent now: answered already, or still on its way.
            if self._answered > after:
                return True
            batch = self._in_flight.get(b"c%d" % self._sequence)
        if batch is None:
            batch = self._pending
            if batch is None:
                batch = self._pending = _Batch()
                loop.call_soon(self._send_pending)
        batch.waiters.append(waiter)
        return await waiter

    def _send_pending(self) -> None:
        batch, self._pending = self._pending, None
        if batch is None:
            return
        pubsub = self._pubsub
        if pubsub is None or not self.usable:
            batch.settle(False)
            return
        self._sequence += 1
        token = b"c%d" % self._sequence
        self._in_flight[token] = batch
        loop = asyncio.get_running_loop()
        batch.timer = loop.call_later(self.deadline, self._expire, token)
        send_now = getattr(pubsub, "send_ping", None)
        if send_now is not None:  # the lean subscriber writes at once (gateway/redis_lane.py)
            try:
                send_now(token)
            except Exception:  # the listener sees the broken connection too
                self._in_flight.pop(token, None)
                batch.settle(False)
            return
        task = loop.create_task(self._send_ping(pubsub, token))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send_ping(self, pubsub: Subscriber, token: bytes) -> None:
        try:
            await pubsub.ping(token)
        except Exception:  # the listener sees the broken connection too
            batch = self._in_flight.pop(token, None)
            if batch is not None:
                batch.settle(False)

    def _expire(self, token: bytes) -> None:
        batch = self._in_flight.pop(token, None)
        if batch is not None:
            batch.fail(
                SessionStoreError(
                    f"The session store did not answer within {self.deadline:g} s; try again."
                )
            )

    def _settle_all(self) -> None:
        """The subscription is gone: every waiting request reads the store instead."""
        self._answered = 0  # a request's mark is confirmed only by a pong still to come
        batches = list(self._in_flight.values())
        if self._pending is not None:
            batches.append(self._pending)
        self._in_flight.clear()
        self._pending = None
        for batch in batches:
            batch.settle(False)

    # ------------------------------------------------------------------ invalidation

    def invalidate(self, key: str) -> None:
        self._entries.pop(key, None)
        self._loading.pop(key, None)

    async def announce(self, key: str) -> None:
        """Tell every process (this one included, already done) that ``key`` changed."""
        self.invalidate(key)
        if self._bus is not None:
            await self._bus.publish(self.channel, key.encode())

    async def run(self) -> None:
        """Keep the subscription (and with it the cache) alive until cancelled."""
        bus = self._bus
        if bus is None:
            return
        while True:
            pubsub = bus.pubsub()
            try:
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: bypass the cache, then retry
                if self._alive_at != -float("inf"):
                    log.warning(
                        "session cache off: invalidation channel lost; reading Redis "
                        "until it is back",
                        extra={"error": type(exc).__name__},
                    )
            finally:
                self._pubsub = None
                self._settle_all()
                self._set_alive(-float("inf"))
                self.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # a fresh connection next time
            await asyncio.sleep(RETRY_EVERY)

    async def _listen(self, pubsub: Subscriber) -> None:
        # The subscriber never reconnects by itself (messages sent meanwhile would be lost
        # without a word): a lost connection surfaces here at once (the cache is dropped,
        # then a new subscription made).
        await asyncio.wait_for(pubsub.subscribe(self.channel), ALIVE_FOR)
        self._pubsub = pubsub
        # Messages sent before the subscription took effect are lost: start from nothing.
        self.clear()
        pinged = -float("inf")
        started = self._clock()
        while True:
            now = self._clock()
            if now - pinged >= PING_EVERY:
                await asyncio.wait_for(pubsub.ping(), ALIVE_FOR)
                pinged = now
            message = await pubsub.get_message(PING_EVERY)
            if message is None:
                if self._clock() - max(self._alive_at, started) >= ALIVE_FOR:
                    # Pings unanswered: a connection that went silent. Start over.
                    raise TimeoutError("the invalidation channel stopped answering pings")
                continue
            kind = message.get("type")
            if kind == "message":
                data = message.get("data")
                if isinstance(data, bytes):
                    self.invalidate(data.decode("utf-8", "replace"))
                self._set_alive(self._clock())
            elif kind == "pong":
                self._set_alive(self._clock())
                data = message.get("data")
                if isinstance(data, bytes):
                    batch = self._in_flight.pop(data, None)
                    if batch is not None:
                        self._answered = max(self._answered, int(data[1:]))  # b"c<sequence>"
                        batch.settle(True)
            elif kind == "subscribe":
                self._set_alive(self._clock())

    def _set_alive(self, at: float) -> None:
        was = self._alive_at
        self._alive_at = at
        if self._live is not None and (was == -float("inf")) != (at == -float("inf")):
            self._live.set(0 if at == -float("inf") else 1)


def with_cache(
    store: SessionStore,
    raw: SessionStore,
    settings: SessionConfig,
    metrics: Metrics | None = None,
) -> SessionStore:
    """``store`` with a session cache in front (``session.cache``), or as it is when the cache
    is off. ``raw`` is the store at the bottom of ``store``'s wrappers: a Redis store gives the
    cache its invalidation channel; the memory store, one process, needs none. Must be called
    with an event loop running (the subscription starts at once)."""
    if settings.cache.ttl <= 0:
        return store
    if isinstance(raw, RedisStore) and raw.is_cluster:
        # redis-py's cluster pub/sub does not give the confirmation ping this cache relies
        # on (tried: the subscription never confirms), so on a Cluster every read goes to Redis.
        return store
    bus = raw if isinstance(raw, RedisStore) else None
    cache = SessionCache(
        ttl=settings.cache.ttl,
        max_entries=settings.cache.max_entries,
        bus=bus,
        deadline=settings.redis_timeout,
        metrics=metrics,
    )
    return InvalidatingStore(store, cache)


class InvalidatingStore:
    """The session store, with every write or delete of a session key announced to the
    cache of every process (:meth:`SessionCache.announce`) before it counts as done."""

    def __init__(self, inner: SessionStore, cache: SessionCache) -> None:
        self.inner = inner
        self.cache = cache
        self._listener = asyncio.create_task(cache.run(), name="session-cache-invalidations")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _changed(self, key: str) -> None:
        # A failed publish is the Redis store's SessionStoreError (503): the change is not
        # answered as done until every process has been told.
        if key.startswith(SESSION_KEY_PREFIX):
            await self.cache.announce(key)

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.cache.invalidate(key)
        await self.inner.set(key, value, ttl)
        await self._changed(key)

    async def delete(self, key: str) -> None:
        self.cache.invalidate(key)
        await self.inner.delete(key)
        await self._changed(key)

    async def pop(self, key: str) -> bytes | None:
        self.cache.invalidate(key)
        value = await self.inner.pop(key)
        await self._changed(key)
        return value

    async def set_new(self, key: str, value: bytes, ttl: float) -> bool:
        # Only stores a key that was absent, and absent sessions are never cached: no process
        # can hold an old value of it, so there is nothing to invalidate.
        return await self.inner.set_new(key, value, ttl)

    async def set_new_indexed(
        self, key: str, value: bytes, ttl: float, index: Sequence[IndexEntry]
    ) -> bool:
        # As set_new: a key that was absent cannot be cached anywhere.
        return await self.inner.set_new_indexed(key, value, ttl, index)

    async def delete_if(self, key: str, value: bytes) -> bool:
        done = await self.inner.delete_if(key, value)
        if done:
            await self._changed(key)
        return done

    async def index_put(self, key: str, member: str, value: bytes, ttl: float) -> None:
        await self.inner.index_put(key, member, value, ttl)

    async def index_get(self, key: str) -> dict[str, bytes]:
        return await self.inner.index_get(key)

    async def index_remove(self, key: str, *members: str) -> None:
        await self.inner.index_remove(key, *members)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        self._listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._listener
        self.cache.clear()
        await self.inner.close()
