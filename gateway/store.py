"""Session store adapters: where sealed sessions and pending logins live between requests.

The store only ever sees opaque bytes (sealed sessions, login states) under plain string keys
such as ``s:<id>`` or ``l:<state>``; it knows nothing about their meaning. Two implementations:

* :class:`MemoryStore` — a bounded dict for one process (``session.store: memory``, the demo,
  tests).
* :class:`RedisStore` — shared by every replica: one Redis server, a Sentinel-managed master, or
  a Redis Cluster (``session.redis``). It is tuned to *fail fast*: redis-py's default retry
  policy (security note 15) kept a request waiting 3.6 s before failing with Redis down. Here
  every Redis, OS or timeout error becomes :class:`~gateway.errors.SessionStoreError` (503,
  fail closed) within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, cast, runtime_checkable
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.config import SessionConfig
from gateway.errors import SessionStoreError
from gateway.models import IndexEntry
from gateway.redis_lane import LaneAddress, LaneSubscriber, RedisLane

__all__ = ["MemoryStore", "RedisStore", "SessionStore", "store_from_config"]

log = logging.getLogger(__name__)


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

    async def set_new(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` only if ``key`` is absent (``SET NX``); True when this call stored it.

        Of concurrent callers exactly one wins: a refresh lock, a logout token's ``jti`` seen
        for the first time.
        """
        ...

    async def set_new_indexed(
        self, key: str, value: bytes, ttl: float, index: Sequence[IndexEntry]
    ) -> bool:
        """:meth:`set_new`, and every entry of ``index`` put as by :meth:`index_put`, in one
        round trip to the store: a login waits for one answer, not one per index. The index
        entries are written even when the key was taken (an entry naming an absent session
        is skipped and pruned when read). True when this call stored the key."""
        ...

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Delete ``key`` only while it still holds ``value`` (compare-and-delete, atomic).

        Releases a lock without deleting one that expired and was taken by someone else.
        """
        ...

    async def index_put(self, key: str, member: str, value: bytes, ttl: float) -> None:
        """Put ``member`` → ``value`` in the index (a hash) ``key``; the whole index lives
        ``ttl`` more seconds (never less than before): sid/sub/user → sessions."""
        ...

    async def index_get(self, key: str) -> dict[str, bytes]:
        """Every member of the index ``key`` with its value (empty when absent or expired)."""
        ...

    async def index_remove(self, key: str, *members: str) -> None:
        """Remove ``members`` from the index ``key``; no error for absent ones."""
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


def store_from_config(session: SessionConfig) -> SessionStore:
    """The store ``session`` describes: memory, or Redis (single server, Sentinel or Cluster)."""
    if session.store == "memory":
        return MemoryStore(max_entries=session.memory_max_sessions)
    return RedisStore.from_config(session)


# ---------------------------------------------------------------------------------------------
# MemoryStore
# ---------------------------------------------------------------------------------------------


class MemoryStore:
    """An in-process store: a bounded dict with a deadline per key, read against a clock.

    Expired entries are invisible at once and swept opportunistically: every write drops at
    most :attr:`PURGE_BATCH` expired entries (found through a heap of deadlines), so no single
    call does unbounded work and memory does not grow with sessions nobody comes back for.
    The clock defaults to ``time.monotonic`` because TTLs are durations; a wall-clock jump must
    not expire or resurrect sessions.

    **When full** (``max_entries`` live sessions and pending logins), a write of a *new* key is
    refused with SessionStoreError (503) after sweeping every expired entry; rewriting or
    deleting an existing key always works. Refusing rather than evicting the oldest entry is
    deliberate: pending logins are created by anyone who can reach ``/oauth2/start``, so with
    eviction an unauthenticated flood would silently sign every user out; with refusal the
    flood can at worst stop *new* sign-ins until its entries expire (10 minutes), while everyone
    signed in stays signed in, and the operator sees a log line saying why.
    """

    PURGE_BATCH: Final = 64
    DEFAULT_MAX_ENTRIES: Final = 100_000
    # At most one "store full" warning per this many seconds: a flood must not flood the logs.
    FULL_LOG_INTERVAL: Final = 60.0

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, tuple[bytes, float]] = {}
        # (deadline, key) pairs; stale ones (key rewritten or deleted) are skipped when popped.
        self._deadlines: list[tuple[float, str]] = []
        self._full_logged_at: float | None = None
        # Index key → (members → values, deadline): sid/sub/user → sessions.
        self._indexes: dict[str, tuple[dict[str, bytes], float]] = {}
        self.refused = 0  # writes refused because the store was full (metrics and tests)

    def __len__(self) -> int:
        """Entries held, including expired ones not purged yet (for metrics and tests)."""
        return len(self._entries)

    @property
    def max_entries(self) -> int:
        return self._max_entries

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return None
        return value

    def _purge(self, limit: int | None = PURGE_BATCH) -> None:
        """Drop expired entries: at most ``limit`` of them, or all with ``limit=None``."""
        now = self._clock()
        heap = self._deadlines
        dropped = 0
        while heap and heap[0][0] <= now and (limit is None or dropped < limit):
            deadline, key = heapq.heappop(heap)
            dropped += 1
            entry = self._entries.get(key)
            if entry is not None and entry[1] == deadline:
                del self._entries[key]
        # Rewrites leave stale heap items behind; rebuild when they dominate (amortised O(1)).
        if len(heap) > 2 * len(self._entries) + self.PURGE_BATCH:
            self._deadlines = [(deadline, key) for key, (_, deadline) in self._entries.items()]
            heapq.heapify(self._deadlines)

    def _make_room(self, key: str) -> None:
        """Raise SessionStoreError if ``key`` is new and the store holds ``max_entries``."""
        if key in self._entries or len(self._entries) < self._max_entries:
            return
        self._purge(limit=None)  # full: sweep every expired entry before refusing
        if key in self._entries or len(self._entries) < self._max_entries:
            return
        self.refused += 1
        now = self._clock()
        if self._full_logged_at is None or now - self._full_logged_at >= self.FULL_LOG_INTERVAL:
            self._full_logged_at = now
            log.warning(
                "memory session store full: new sessions and sign-ins are refused (503) "
                "until entries expire; existing sessions keep working",
                extra={"max_entries": self._max_entries, "refused": self.refused},
            )
        raise SessionStoreError(
            f"the in-memory session store is full ({self._max_entries} sessions and pending "
            "sign-ins); raise session.memory_max_sessions or use store: redis"
        )

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        _check_ttl(ttl)
        self._make_room(key)
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

    async def set_new(self, key: str, value: bytes, ttl: float) -> bool:
        # No await between the check and the write: atomic within the one event loop.
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def set_new_indexed(
        self, key: str, value: bytes, ttl: float, index: Sequence[IndexEntry]
    ) -> bool:
        stored = await self.set_new(key, value, ttl)
        for entry in index:
            await self.index_put(entry.key, entry.member, entry.value, entry.ttl)
        return stored

    async def delete_if(self, key: str, value: bytes) -> bool:
        if self._live(key) != value:
            return False
        del self._entries[key]
        return True

    def _live_index(self, key: str) -> dict[str, bytes] | None:
        entry = self._indexes.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._indexes[key]
            return None
        return entry[0]

    async def index_put(self, key: str, member: str, value: bytes, ttl: float) -> None:
        _check_ttl(ttl)
        members = self._live_index(key)
        deadline = self._clock() + ttl
        if members is None:
            # Indexes point at sessions, so they are bounded by the same cap.
            if len(self._indexes) >= self._max_entries:
                self._indexes = {k: v for k, v in self._indexes.items()
                                 if v[1] > self._clock()}
                if len(self._indexes) >= self._max_entries:
                    raise SessionStoreError(
                        f"the in-memory session store is full ({self._max_entries} indexes); "
                        "raise session.memory_max_sessions or use store: redis")
            members = {}
        else:
            deadline = max(deadline, self._indexes[key][1])
        members[member] = bytes(value)
        self._indexes[key] = (members, deadline)

    async def index_get(self, key: str) -> dict[str, bytes]:
        return dict(self._live_index(key) or {})

    async def index_remove(self, key: str, *members: str) -> None:
        current = self._live_index(key)
        if current is None:
            return
        for member in members:
            current.pop(member, None)
        if not current:
            del self._indexes[key]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._deadlines.clear()
        self._indexes.clear()


# ---------------------------------------------------------------------------------------------
# RedisStore
# ---------------------------------------------------------------------------------------------


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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Connections of a single server's redis-py pool (redis-py's own default); beyond them a
# command waits for one (RedisStore.from_url).
POOL_CONNECTIONS: Final = 100


def _retry() -> Retry:
    """One retry, on connection errors only, after at most 0.1 s (see RedisStore)."""
    return Retry(ExponentialBackoff(cap=0.1, base=0.02), 1, (RedisConnectionError,))


def _timeouts(connect_timeout: float, command_timeout: float) -> dict[str, Any]:
    return {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": command_timeout,
        "retry": _retry(),
    }


def _tls(tls_ca_file: str | None) -> dict[str, Any]:
    # Certificate and host name checks stay at redis-py's defaults (required, on): a CA file
    # only says whom to trust, never whether to check.
    return {} if tls_ca_file is None else {"ssl_ca_certs": tls_ca_file}


def _invalid(name: str, exc: BaseException, redact: Sequence[str]) -> ValueError:
    message = str(exc)
    for secret in redact:
        message = message.replace(secret, "***")
    return ValueError(f"invalid redis URL {name}: {message}")


class _FollowMasterPool(SentinelConnectionPool):
    """A Sentinel pool that, on learning a new master address, drops *every* connection.

    redis-py's pool drops only the idle ones; a connection busy at that moment went back to the
    pool afterwards still pointing at the old master, which after a planned failover accepts
    (and later loses) writes for seconds. A command cut off this way fails over through the
    store's one retry on connection errors.
    """

    async def get_master_address(self) -> Any:
        previous = self.master_address
        address = await super().get_master_address()  # type: ignore[no-untyped-call]
        if previous is not None and address != previous:
            await self.disconnect(inuse_connections=True)
        return address


class RedisStore:
    """Redis-backed store shared by all replicas; every key gets ``prefix`` in front.

    Failure policy, and why:

    * explicit ``socket_connect_timeout`` / ``socket_timeout`` — a hung Redis must not hang
      requests;
    * one retry, only on connection errors, after at most 0.1 s — that is what recovers a pooled
      connection that Redis closed on restart, or that still points at a master Sentinel has
      just demoted, while a Redis that is down fails in milliseconds and a hung one in one
      timeout rather than one per retry (redis-py's default is 10 retries);
    * an overall deadline per operation as a backstop (connect + command timeout; Sentinel and
      Cluster add one discovery round trip);
    * every failure becomes SessionStoreError naming the server (never a password), so the
      gateway answers 503 instead of letting a request through.

    Only single-key commands are used (GET, SET PX, DEL, GETDEL, and one-key scripts and hash
    commands for locks and indexes), so a Redis Cluster spreads
    sessions over all its slots and no command ever spans two of them.

    With Sentinel, a pooled connection keeps talking to the server it connected to. After a
    crash that server is gone, but after a planned failover (``SENTINEL FAILOVER``) the old
    master stays a writable master for about ten more seconds until the sentinel reconfigures
    it: sessions written there in that window would be lost. So at most once per
    :attr:`MASTER_RECHECK` seconds, in the background, the store asks a sentinel where the
    master is and drops every connection to a server that is no longer it.
    """

    MASTER_RECHECK: Final = 1.0

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        name: str,
        prefix: str = "oidcgw:",
        deadline: float = 2.0,
        password: str | None = None,
        redact: Sequence[str] = (),
        sentinel: Sentinel | None = None,
        tls_ca_file: str | None = None,
        lane: RedisLane | None = None,
    ) -> None:
        self._client = client
        self._lane = lane
        self._tls_ca_file = tls_ca_file
        self._name = name
        self._prefix = prefix
        self._deadline = deadline
        self._redact = tuple(s for s in (password, *redact) if s)
        self._sentinel = sentinel
        self._master_pool = (
            None if sentinel is None or not isinstance(client, Redis)
            else cast(_FollowMasterPool, client.connection_pool)
        )
        self._master_checked_at = -math.inf
        self._master_check: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, session: SessionConfig) -> RedisStore:
        """The Redis store of ``session.redis_url`` and ``session.redis`` (validated config)."""
        redis = session.redis
        common: dict[str, Any] = {
            "prefix": session.key_prefix,
            "connect_timeout": session.redis_timeout,
            "command_timeout": session.redis_timeout,
            "username": redis.username,
            "password": redis.password.get_secret_value() if redis.password else None,
            "tls_ca_file": redis.tls_ca_file,
        }
        sentinel = redis.sentinel
        if sentinel.master is not None:
            url_set = "redis_url" in session.model_fields_set
            return cls.from_sentinel(
                sentinel.master,
                sentinel.addresses,
                url=session.redis_url if url_set else "redis:///0",
                sentinel_password=(
                    sentinel.password.get_secret_value() if sentinel.password else None
                ),
                **common,
            )
        if redis.cluster:
            return cls.from_cluster(session.redis_url, **common)
        return cls.from_url(session.redis_url, **common)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "oidcgw:",
        connect_timeout: float = 1.0,
        command_timeout: float = 1.0,
        health_check_interval: int = 30,
        username: str | None = None,
        password: str | None = None,
        tls_ca_file: str | None = None,
    ) -> RedisStore:
        """Build a store for one server: ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs.

        ``username``/``password`` are for when they are not in the URL. Raises ``ValueError``
        for settings redis-py cannot use; the message never contains a password. No connection
        is made here: the first command (or :meth:`ping`) connects.
        """
        name, url_password = _describe_url(url)
        redact = [s for s in (url_password, password) if s]
        if tls_ca_file is not None and urlsplit(url).scheme != "rediss":
            raise ValueError(f"invalid redis settings for {name}: a CA file needs a rediss:// URL")
        try:
            # A blocking pool: past POOL_CONNECTIONS commands in flight, the next waits for a
            # connection (within the deadline) instead of failing at once with "Too many
            # connections", as redis-py's default pool does (a 503 for most requests of a
            # burst of 300 when every request read Redis).
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=POOL_CONNECTIONS,
                timeout=connect_timeout + command_timeout,
                **_timeouts(connect_timeout, command_timeout),
                **_credentials(username, password),
                **_tls(tls_ca_file),
                health_check_interval=health_check_interval,
                client_name="oidc-gateway",
                decode_responses=False,
            )
            client = Redis.from_pool(pool)
        except (ValueError, TypeError) as exc:
            raise _invalid(name, exc, redact) from None
        return cls(
            client,
            name=name,
            prefix=prefix,
            deadline=connect_timeout + command_timeout,
            redact=redact,
            tls_ca_file=tls_ca_file,
            lane=_lane_of(client),
        )

    @classmethod
    def from_sentinel(
        cls,
        master: str,
        nodes: Sequence[tuple[str, int]],
        *,
        url: str = "redis:///0",
        sentinel_password: str | None = None,
        prefix: str = "oidcgw:",
        connect_timeout: float = 1.0,
        command_timeout: float = 1.0,
        health_check_interval: int = 30,
        username: str | None = None,
        password: str | None = None,
        tls_ca_file: str | None = None,
    ) -> RedisStore:
        """Build a store for the master that the sentinels at ``nodes`` know as ``master``.

        ``url`` gives everything but the address (the sentinels know that): ``rediss://`` for
        TLS (to the sentinels too), credentials, and the database, e.g. ``rediss:///0``; a host
        in it is ignored. Every new connection asks a sentinel for the current master, and a
        connection to a master that was demoted fails (``READONLY`` is turned into a connection
        error by redis-py), so after a failover the one retry lands on the new master.
        """
        if not nodes:
            raise ValueError(f"invalid redis settings for sentinel master {master!r}: no nodes")
        scheme = urlsplit(url).scheme
        name = (f"{scheme}+sentinel://{','.join(_address(h, p) for h, p in nodes)}"
                f"/{master}")
        redact = [s for s in (password, sentinel_password) if s]
        try:
            options: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise _invalid(name, exc, redact) from None
        if options.get("password"):
            redact.append(str(options["password"]))
        options.pop("host", None)
        options.pop("port", None)
        connection_class = options.pop("connection_class", None)
        if scheme not in ("redis", "rediss") or connection_class not in (None, SSLConnection):
            raise ValueError(f"invalid redis settings for {name}: use a redis:// or rediss:// URL")
        tls: dict[str, Any] = {}
        if scheme == "rediss":
            tls = {"ssl": True, **_tls(tls_ca_file)}
        elif tls_ca_file is not None:
            raise ValueError(f"invalid redis settings for {name}: a CA file needs rediss://")
        name += f"/{options.get('db', 0)}"
        # The sentinels: same TLS as the data nodes, their own (optional) password, and the
        # same fail-fast timeouts (redis-py would copy only the socket_* options).
        sentinel_options: dict[str, Any] = {
            **_timeouts(connect_timeout, command_timeout),
            **tls,
            **_credentials(None, sentinel_password),
            "client_name": "oidc-gateway",
        }
        try:
            manager = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                list(nodes), sentinel_kwargs=sentinel_options
            )
            client = manager.master_for(
                master,
                connection_pool_class=_FollowMasterPool,
                **{
                    **options,
                    **_timeouts(connect_timeout, command_timeout),
                    **_credentials(username, password),
                    **tls,
                    "health_check_interval": health_check_interval,
                    "client_name": "oidc-gateway",
                    "decode_responses": False,
                },
            )
        except (ValueError, TypeError) as exc:
            raise _invalid(name, exc, redact) from None
        return cls(
            client,
            name=name,
            prefix=prefix,
            # Asking a sentinel is one more connect + command before the master's own.
            deadline=2 * (connect_timeout + command_timeout),
            redact=redact,
            sentinel=manager,
            tls_ca_file=tls_ca_file,
        )

    @classmethod
    def from_cluster(
        cls,
        url: str,
        *,
        prefix: str = "oidcgw:",
        connect_timeout: float = 1.0,
        command_timeout: float = 1.0,
        health_check_interval: int = 30,
        username: str | None = None,
        password: str | None = None,
        tls_ca_file: str | None = None,
    ) -> RedisStore:
        """Build a store for the Redis Cluster that the node at ``url`` belongs to.

        The client learns every node and slot from that first node (``CLUSTER SLOTS``) and
        follows ``MOVED`` redirects after a resharding or failover; the URL names one node
        only, so point it at a name that resolves to several (a Kubernetes Service, DNS).
        """
        name, url_password = _describe_url(url)
        name = name.replace("://", "+cluster://", 1).rsplit("/", 1)[0]
        redact = [s for s in (url_password, password) if s]
        if tls_ca_file is not None and urlsplit(url).scheme != "rediss":
            raise ValueError(f"invalid redis settings for {name}: a CA file needs a rediss:// URL")
        try:
            client = RedisCluster.from_url(
                url,
                **_timeouts(connect_timeout, command_timeout),
                **_credentials(username, password),
                **_tls(tls_ca_file),
                health_check_interval=health_check_interval,
                client_name="oidc-gateway",
                decode_responses=False,
            )
        except (ValueError, TypeError, RedisClusterException) as exc:
            raise _invalid(name, exc, redact) from None
        return cls(
            client,
            name=name,
            prefix=prefix,
            # Learning the slots is one more connect + command before the first command.
            deadline=2 * (connect_timeout + command_timeout),
            redact=redact,
            tls_ca_file=tls_ca_file,
        )

    # ------------------------------------------------------------------ operations

    @property
    def name(self) -> str:
        """The server as shown in errors and logs, e.g. ``redis://127.0.0.1:6379/0``."""
        return self._name

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _error(self, what: str, exc: BaseException) -> SessionStoreError:
        detail = str(exc) or type(exc).__name__
        for secret in self._redact:
            detail = detail.replace(secret, "***")
        if isinstance(exc, ResponseError) and "unknown command" in detail.lower():
            detail += " (the session store needs Redis 6.2 or newer)"
        if isinstance(exc, TimeoutError) and not str(exc):
            detail = f"no answer within {self._deadline:g} s"
        if self._tls_ca_file is not None and "No such file" in detail:
            detail += f" (session.redis.tls_ca_file: {self._tls_ca_file})"
        elif "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
            detail += (" (the server's certificate is not signed by a CA in "
                       + (self._tls_ca_file or "the system's store: set session.redis.tls_ca_file")
                       + ", or does not name the host you connect to)")
        return SessionStoreError(f"session store {self._name}: {what} failed: {detail}")

    def _bytes_or_none(self, what: str, value: object) -> bytes | None:
        if value is None or isinstance(value, bytes):
            return value
        raise SessionStoreError(
            f"session store {self._name}: {what} answered {type(value).__name__}, expected bytes"
        )

    # RedisClusterException is not a RedisError (no nodes reachable, slots not covered...).
    _FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)

    def _watch_master(self) -> None:
        """Sentinel only: start a background master check if the last one is old enough."""
        if self._master_pool is None:
            return
        now = time.monotonic()
        if now - self._master_checked_at < self.MASTER_RECHECK or (
            self._master_check is not None and not self._master_check.done()
        ):
            return
        self._master_checked_at = now
        self._master_check = asyncio.create_task(self._check_master(), name="redis-master-check")

    async def _check_master(self) -> None:
        pool = self._master_pool
        if pool is None:
            return
        try:
            async with asyncio.timeout(self._deadline):
                # On a new address the pool drops every connection (_FollowMasterPool).
                await pool.get_master_address()
        except self._FAILURES as exc:
            # Not a request's failure: the sentinels may be down while the master serves. The
            # next connection attempt (which asks a sentinel too) reports real trouble.
            log.debug("sentinel master check failed", extra={"store": self._name,
                                                              "error": type(exc).__name__})

    async def _call(self, op: str, command: Awaitable[Any]) -> Any:
        """Run one Redis command within the store's overall deadline; any failure becomes a
        SessionStoreError (503) naming the operation. Every public operation goes through here."""
        self._watch_master()
        try:
            async with asyncio.timeout(self._deadline):
                return await command
        except self._FAILURES as exc:
            raise self._error(op, exc) from exc

    # -- pub/sub, for the session cache's invalidations (gateway/session_cache.py)

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._client, RedisCluster)

    def channel(self, name: str) -> str:
        """A pub/sub channel named under this store's key prefix, so that gateways sharing a
        Redis under different prefixes do not hear each other."""
        return self._key(name)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call("PUBLISH", self._client.publish(channel, message))

    def pubsub(self) -> LaneSubscriber | _PubSub:
        """A new subscriber connection (the session cache is not used on a Cluster, see
        session_cache.with_cache): the lean one where the lane serves, else redis-py's."""
        if self._lane is not None:
            return LaneSubscriber(self._lane.address)
        return _PubSub(self._client.pubsub())

    def _run(self, op: str, *command: bytes | str | int,
             via: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """``command`` on the lean connection where it serves (gateway/redis_lane.py: a
        login's commands, every signed-in request's session read), else redis-py's ``via``;
        within the store's deadline either way (:meth:`_call`)."""
        lane = self._lane
        return self._call(op, lane.call(*command) if lane is not None else via())

    async def get(self, key: str) -> bytes | None:
        name = self._key(key)
        value = await self._run("GET", "GET", name, via=lambda: self._client.get(name))
        return self._bytes_or_none("GET", value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        # Milliseconds, rounded up so a short TTL never becomes 0 (which Redis rejects).
        name, px = self._key(key), _px(ttl)
        await self._run("SET", "SET", name, value, "PX", px,
                        via=lambda: self._client.set(name, value, px=px))

    async def delete(self, key: str) -> None:
        name = self._key(key)
        await self._run("DEL", "DEL", name, via=lambda: self._client.delete(name))

    async def pop(self, key: str) -> bytes | None:
        name = self._key(key)
        value = await self._run("GETDEL", "GETDEL", name, via=lambda: self._client.getdel(name))
        return self._bytes_or_none("GETDEL", value)

    async def set_new(self, key: str, value: bytes, ttl: float) -> bool:
        name, px = self._key(key), _px(ttl)
        done = await self._run("SET NX", "SET", name, value, "PX", px, "NX",
                               via=lambda: self._client.set(name, value, px=px, nx=True))
        return bool(done)

    async def set_new_indexed(
        self, key: str, value: bytes, ttl: float, index: Sequence[IndexEntry]
    ) -> bool:
        if not isinstance(self._client, RedisCluster):
            # One script, one command: a pipeline of four cost redis-py 0.2 ms more of CPU in
            # a login's callback at idle (issue 7), and Redis four commands instead of one.
            args: list[bytes | str | int] = [value, _px(ttl)]
            for entry in index:
                args += [entry.member, entry.value, _px(entry.ttl)]
            keys = [self._key(key), *(self._key(entry.key) for entry in index)]
            done = await self._run(
                "SET NX + index HSET", "EVAL", _NEW_INDEXED_LUA, len(keys), *keys, *args,
                via=lambda: self._client.eval(_NEW_INDEXED_LUA, len(keys), *keys, *args))
            return bool(done)
        # On a Cluster the keys may live on different nodes: a pipeline, not a transaction
        # (each command stands alone, as set_new and index_put do), and redis-py sends each
        # node its commands.
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key(key), value, px=_px(ttl), nx=True)
        for entry in index:
            pipe.eval(_INDEX_PUT_LUA, 1, self._key(entry.key), entry.member, entry.value,
                      _px(entry.ttl))
        done = await self._call("SET NX + index HSET", pipe.execute())
        return bool(done[0])

    async def delete_if(self, key: str, value: bytes) -> bool:
        # One key per script call, so a Cluster routes it to that key's slot.
        done = await self._call("compare-and-delete",
                                self._client.eval(_DELETE_IF_LUA, 1, self._key(key), value))
        return bool(done)

    async def index_put(self, key: str, member: str, value: bytes, ttl: float) -> None:
        px = _px(ttl)
        # HSET and the TTL in one script (one key, one slot): an index never exists without a
        # TTL, and a later, shorter TTL never cuts an older one short.
        await self._call("index HSET",
                         self._client.eval(_INDEX_PUT_LUA, 1, self._key(key), member, value, px))

    async def index_get(self, key: str) -> dict[str, bytes]:
        raw = await self._call("index HGETALL", self._client.hgetall(self._key(key)))
        return {(k.decode() if isinstance(k, bytes) else str(k)):
                (v if isinstance(v, bytes) else str(v).encode())
                for k, v in dict(raw).items()}

    async def index_remove(self, key: str, *members: str) -> None:
        if members:
            await self._call("index HDEL", self._client.hdel(self._key(key), *members))

    async def ping(self) -> None:
        if self.is_cluster:
            # Every master, not one random node: ready means every slot is served (with a
            # master down and no replica, Redis Cluster refuses all keys anyway).
            await self._call("PING", self._client.ping(target_nodes=RedisCluster.PRIMARIES))
        else:
            await self._call("PING", self._client.ping())

    async def close(self) -> None:
        if self._lane is not None:
            await self._lane.close()
        if self._master_check is not None:
            self._master_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._master_check
        try:
            await self._client.aclose()
            if isinstance(self._client, RedisCluster):  # narrows the type for mypy
                # redis-py 8.1: after a node failure the client is marked for re-initialisation
                # and its aclose() then returns without closing anything, leaking a socket per
                # node. Close the nodes it knows of ourselves (a no-op when already closed).
                nodes = self._client.nodes_manager
                await nodes.aclose()
                await nodes.aclose("startup_nodes")
            if self._sentinel is not None:
                await self._sentinel.aclose()
        except self._FAILURES as exc:
            raise self._error("close", exc) from exc


_DELETE_IF_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# set_new_indexed on one server: KEYS[1] the session, ARGV[1..2] its value and PX; then per
# index KEYS[i] (i >= 2) its member, value and PX at ARGV[3i-3..3i-1], put as _INDEX_PUT_LUA
# puts one, whether or not the session key was taken (the store's contract).
_NEW_INDEXED_LUA: Final = """
local stored = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
for i = 2, #KEYS do
  local a = 3 * i - 3
  redis.call('HSET', KEYS[i], ARGV[a], ARGV[a + 1])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[a + 2]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[a + 2])
  end
end
if stored then return 1 end
return 0
"""

_INDEX_PUT_LUA: Final = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


class _PubSub:
    """redis-py's PubSub as the session cache's subscriber (TLS, Sentinel)."""

    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub
        self._at_eof: Callable[[], bool] | None = None
        self._own_retry: Retry | None = None

    async def subscribe(self, channel: str) -> None:
        pubsub = self._pubsub
        await pubsub.subscribe(channel)
        connection = pubsub.connection
        if connection is None:
            raise RedisConnectionError("the subscription has no connection")
        # redis-py would quietly reconnect and resubscribe after a lost connection, and the
        # messages sent meanwhile would be lost without a word. No retries on this connection
        # (the pool's own retry is put back before the connection returns to the pool).
        self._own_retry = connection.retry
        connection.retry = Retry(NoBackoff(), 0)
        # redis-py keeps the asyncio StreamReader private; without it, the ping timer alone
        # notices a closed connection (within session_cache.ALIVE_FOR).
        at_eof = getattr(getattr(connection, "_reader", None), "at_eof", None)
        self._at_eof = at_eof if callable(at_eof) else None

    async def ping(self, token: bytes = b"") -> None:
        await self._pubsub.ping(token or None)

    async def get_message(self, seconds: float) -> dict[str, Any] | None:
        message: dict[str, Any] | None = await self._pubsub.get_message(timeout=seconds)
        return message

    def lost(self) -> bool:
        return self._at_eof is not None and self._at_eof()

    async def aclose(self) -> None:
        # Not back into the pool with no retries: a fresh connection next time.
        connection = self._pubsub.connection
        if connection is not None:
            await connection.disconnect()
            if self._own_retry is not None:
                connection.retry = self._own_retry
        pubsub: Any = self._pubsub  # redis-py's aclose() is untyped
        await pubsub.aclose()


def _lane_of(client: Redis) -> RedisLane | None:
    """The lean connection for the hottest commands, for a plain TCP or Unix-socket server
    (what redis-py's pool connects to, with the same credentials, database and name); None
    for TLS, whose set-up stays redis-py's."""
    pool = client.connection_pool
    kind = pool.connection_class
    if kind is Connection or kind is UnixDomainSocketConnection:
        return RedisLane(LaneAddress.of_pool(
            dict(pool.connection_kwargs), unix=kind is UnixDomainSocketConnection))
    return None


def _px(ttl: float) -> int:
    """A checked TTL in milliseconds, rounded up so a short TTL never becomes 0."""
    _check_ttl(ttl)
    return max(1, math.ceil(ttl * 1000))


def _credentials(username: str | None, password: str | None) -> dict[str, Any]:
    """Only what is given: an absent key keeps what the URL says."""
    out: dict[str, Any] = {}
    if username:
        out["username"] = username
    if password:
        out["password"] = password
    return out
