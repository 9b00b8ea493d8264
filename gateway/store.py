"""Session store adapters: where sealed sessions and pending logins live between requests.

The store only ever sees opaque bytes (sealed sessions, login states) under plain string keys
such as ``s:<id>`` or ``l:<state>``; it knows nothing about their meaning. Two implementations:

* :class:`MemoryStore` — a dict for one process (``session.store: memory``, the demo, tests).
* :class:`RedisStore` — shared by every replica. It is tuned to *fail fast*: redis-py's default
  retry policy (security note 15) kept a request waiting 3.6 s before failing with Redis down.
  Here every Redis, OS or timeout error becomes :class:`~gateway.errors.SessionStoreError`
  (503, fail closed) within about one connect/command timeout.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable
from typing import Final, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from gateway.errors import SessionStoreError

__all__ = ["MemoryStore", "RedisStore", "SessionStore"]


@runtime_checkable
class SessionStore(Protocol):
    """What the gateway needs from a session store. Every method may raise SessionStoreError."""

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or ``None`` if absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (> 0), replacing any old value."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is absent."""
        ...

    async def pop(self, key: str) -> bytes | None:
        """Atomically get and delete: of concurrent callers at most one gets the value.

        This is what makes a login state single-use, even across replicas.
        """
        ...

    async def ping(self) -> None:
        """Raise SessionStoreError unless the store is reachable (readiness, ``check --online``)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


def _check_ttl(ttl: float) -> None:
    # A zero or negative TTL is a caller bug (Redis would reject it too): say so instead of
    # silently storing forever or not at all.
    if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


class MemoryStore:
    """An in-process store: a dict with a deadline per key, read against an injectable clock.

    Expired entries are invisible at once and purged opportunistically: every write drops at
    most :attr:`PURGE_BATCH` expired entries (found through a heap of deadlines), so no single
    call does unbounded work and memory does not grow with sessions nobody comes back for.
    The clock defaults to ``time.monotonic`` because TTLs are durations; a wall-clock jump must
    not expire or resurrect sessions.
    """

    PURGE_BATCH: Final = 64

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[bytes, float]] = {}
        # (deadline, key) pairs; stale ones (key rewritten or deleted) are skipped when popped.
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """Entries held, including expired ones not purged yet (for metrics and tests)."""
        return len(self._entries)

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return None
        return value

    def _purge(self) -> None:
        now = self._clock()
        heap = self._deadlines
        for _ in range(self.PURGE_BATCH):
            if not heap or heap[0][0] > now:
                break
            deadline, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry[1] == deadline:
                del self._entries[key]
        # Rewrites leave stale heap items behind; rebuild when they dominate (amortised O(1)).
        if len(heap) > 2 * len(self._entries) + self.PURGE_BATCH:
            self._deadlines = [(deadline, key) for key, (_, deadline) in self._entries.items()]
            heapq.heapify(self._deadlines)

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        _check_ttl(ttl)
        deadline = self._clock() + ttl
        self._entries[key] = (bytes(value), deadline)
        heapq.heappush(self._deadlines, (deadline, key))
        self._purge()

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def pop(self, key: str) -> bytes | None:
        # No await between read and delete: atomic within the one event loop.
        value = self._live(key)
        if value is not None:
            del self._entries[key]
        return value

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._deadlines.clear()


def _describe_url(url: str) -> tuple[str, str | None]:
    """A name for the Redis server fit for logs (``redis://host:port/db``) and its password.

    The password is returned only so it can be scrubbed from error messages; it never appears
    in the name.
    """
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    if parts.scheme == "unix":
        return f"unix://{parts.path}", password
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        port_text = "?"
    else:
        port_text = str(port)
    db = parts.path.lstrip("/") or "0"
    return f"{parts.scheme}://{host}:{port_text}/{db}", password


class RedisStore:
    """Redis-backed store shared by all replicas; every key gets ``prefix`` in front.

    Failure policy, and why:

    * explicit ``socket_connect_timeout`` / ``socket_timeout`` — a hung Redis must not hang
      requests;
    * one retry, only on connection errors, after at most 0.1 s — that is what recovers a pooled
      connection that Redis closed on restart, while a Redis that is down fails in milliseconds
      and a hung one in one timeout rather than one per retry (redis-py's default is 10 retries);
    * an overall deadline per operation (connect + command timeout) as a backstop;
    * every failure becomes SessionStoreError naming the server (never the password), so the
      gateway answers 503 instead of letting a request through.
    """

    def __init__(
        self,
        client: Redis,
        *,
        name: str,
        prefix: str = "oidcgw:",
        deadline: float = 2.0,
        password: str | None = None,
    ) -> None:
        self._client = client
        self._name = name
        self._prefix = prefix
        self._deadline = deadline
        self._password = password

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "oidcgw:",
        connect_timeout: float = 1.0,
        command_timeout: float = 1.0,
        health_check_interval: int = 30,
    ) -> RedisStore:
        """Build a store for ``redis://``, ``rediss://`` or ``unix://`` URLs.

        Raises ``ValueError`` for a URL redis-py cannot use; the message never contains the
        password. No connection is made here: the first command (or :meth:`ping`) connects.
        """
        name, password = _describe_url(url)
        try:
            client = Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout,
                socket_timeout=command_timeout,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1, (RedisConnectionError,)),
                retry_on_timeout=False,
                health_check_interval=health_check_interval,
                client_name="oidc-gateway",
                decode_responses=False,
            )
        except (ValueError, TypeError) as exc:
            message = str(exc)
            if password:
                message = message.replace(password, "***")
            raise ValueError(f"invalid redis URL {name}: {message}") from None
        return cls(
            client,
            name=name,
            prefix=prefix,
            deadline=connect_timeout + command_timeout,
            password=password,
        )

    @property
    def name(self) -> str:
        """The server as shown in errors and logs, e.g. ``redis://127.0.0.1:6379/0``."""
        return self._name

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _error(self, what: str, exc: BaseException) -> SessionStoreError:
        detail = str(exc) or type(exc).__name__
        if self._password:
            detail = detail.replace(self._password, "***")
        if isinstance(exc, ResponseError) and "unknown command" in detail.lower():
            detail += " (the session store needs Redis 6.2 or newer)"
        if isinstance(exc, TimeoutError) and not str(exc):
            detail = f"no answer within {self._deadline:g} s"
        return SessionStoreError(f"session store {self._name}: {what} failed: {detail}")

    def _bytes_or_none(self, what: str, value: object) -> bytes | None:
        if value is None or isinstance(value, bytes):
            return value
        raise SessionStoreError(
            f"session store {self._name}: {what} answered {type(value).__name__}, expected bytes"
        )

    async def get(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(self._deadline):
                value = await self._client.get(self._key(key))
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._error("GET", exc) from exc
        return self._bytes_or_none("GET", value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        _check_ttl(ttl)
        # Milliseconds, rounded up so a short TTL never becomes 0 (which Redis rejects).
        px = max(1, math.ceil(ttl * 1000))
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.set(self._key(key), value, px=px)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._error("SET", exc) from exc

    async def delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.delete(self._key(key))
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._error("DEL", exc) from exc

    async def pop(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(self._deadline):
                value = await self._client.getdel(self._key(key))
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._error("GETDEL", exc) from exc
        return self._bytes_or_none("GETDEL", value)

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self._deadline):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._error("PING", exc) from exc

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            raise self._error("close", exc) from exc
