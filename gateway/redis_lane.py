"""One lean connection to Redis for the session store's hottest commands (issue 7).

redis-py's asyncio client costs about 0.3 ms of CPU per command in a process that has been
idle a few milliseconds (its client, retry, connection and stream layers: a ``SET NX`` after
20 ms of idling took 0.46 ms of CPU through the client, 0.42 ms through a pooled connection,
0.14 ms here), and a login's callback waits for two commands. This connection writes commands
packed by hiredis and hands the replies hiredis parses to the callers in the order they asked:
Redis answers the commands of one connection in order, so any number of concurrent callers
share it (pipelining).

It serves a plain TCP or Unix-socket server, with AUTH, SELECT and a client name as redis-py
sends them; stores over TLS, Sentinel or Cluster use redis-py alone (:class:`LaneAddress`).
A caller that stops waiting (the store's deadline) closes the connection, so that the answer
it leaves behind can never be handed to the next caller; the next command connects again.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis.exceptions import ResponseError

__all__ = ["LaneAddress", "RedisLane"]

Arg = bytes | str | int


def _pack(command: tuple[Arg, ...]) -> bytes:
    # hiredis's stub types the command as a one-element tuple; it takes any length.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed


@dataclass(frozen=True)
class LaneAddress:
    """Where and how to connect: a TCP ``host``/``port`` or a Unix socket ``path``."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    client_name: str | None = None
    connect_timeout: float = 1.0

    @classmethod
    def of_pool(cls, kwargs: dict[str, Any], *, unix: bool) -> LaneAddress:
        """The address of a redis-py connection pool's ``connection_kwargs``."""
        return cls(
            host=None if unix else str(kwargs.get("host", "localhost")),
            port=int(kwargs.get("port", 6379)),
            path=str(kwargs["path"]) if unix else None,
            username=kwargs.get("username") or None,
            password=kwargs.get("password") or None,
            db=int(kwargs.get("db") or 0),
            client_name=kwargs.get("client_name") or None,
            connect_timeout=float(kwargs.get("socket_connect_timeout") or 1.0),
        )


class _Protocol(asyncio.Protocol):
    """The connection: writes packed commands, resolves one waiter per parsed reply."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection (uvloop's transports are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise ConnectionError("the connection to Redis is closed")
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.transport.write(packed)
        return waiter

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while (reply := reader.gets()) is not False:
                if not waiters:
                    raise hiredis.ProtocolError("Redis sent an answer nobody asked for")
                waiter = waiters.popleft()
                if not waiter.done():  # else its caller stopped waiting (and closes us)
                    waiter.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.close(ConnectionError(f"Redis's answer cannot be read: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(
            f"the connection to Redis was lost: {exc}" if exc else
            "Redis closed the connection"))

    def close(self, exc: Exception | None = None) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail(exc or ConnectionError("the connection to Redis was closed"))

    def _fail(self, exc: Exception) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)


class RedisLane:
    """Commands on one shared connection, connected on first use and again after a loss.

    Raises ``ConnectionError`` (an ``OSError``) when the connection cannot be made or is lost,
    ``TimeoutError`` when connecting takes longer than the address's connect timeout, and
    redis-py's ``ResponseError`` for an error reply, as redis-py would.
    """

    def __init__(self, address: LaneAddress) -> None:
        self.address = address
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def call(self, *args: Arg) -> Any:
        """Send one command and return its reply (bytes, int, None or a list of them).

        A connection lost under the command is replaced and the command sent once more, as
        the store's redis-py client retries once on connection errors (a connection that
        Redis closed on restart)."""
        packed = _pack(args)
        for attempt in range(2):
            protocol = self._protocol
            if protocol is None or protocol.closed:
                protocol = await self._connected()
            try:
                reply = await protocol.send(packed)
            except asyncio.CancelledError:
                protocol.close()  # the answer still to come must not reach the next caller
                raise
            except ConnectionError:
                if attempt:
                    raise
                continue
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def _connected(self) -> _Protocol:
        async with self._connecting:
            protocol = self._protocol
            if protocol is None or protocol.closed:
                protocol = self._protocol = await self._connect()
            return protocol

    async def _connect(self) -> _Protocol:
        address = self.address
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(address.connect_timeout):
            if address.path is not None:
                _, protocol = await loop.create_unix_connection(_Protocol, address.path)
            else:
                _, protocol = await loop.create_connection(
                    _Protocol, address.host or "localhost", address.port)
            try:
                hello: list[tuple[Arg, ...]] = []
                if address.password is not None:
                    hello.append(("AUTH", address.username, address.password)
                                 if address.username else ("AUTH", address.password))
                if address.db:
                    hello.append(("SELECT", address.db))
                if address.client_name:
                    hello.append(("CLIENT", "SETNAME", address.client_name))
                replies = await asyncio.gather(
                    *(protocol.send(_pack(command)) for command in hello))
            except BaseException:
                protocol.close()
                raise
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                protocol.close()
                raise ResponseError(str(reply))
        return protocol
