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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis.exceptions import ResponseError

__all__ = ["LaneAddress", "LaneSubscriber", "RedisLane"]

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
    command_timeout: float = 1.0

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
            command_timeout=float(kwargs.get("socket_timeout") or 1.0),
        )


class _Protocol(asyncio.Protocol):
    """The connection: writes packed commands, resolves one waiter per parsed reply."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Subscribed (LaneSubscriber): what Redis sends when no caller waits (messages, pongs).
        self.pushed: Callable[[Any], None] | None = None
        self.lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection (uvloop's transports are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.write(packed)
        self.waiters.append(waiter)
        return waiter

    def write(self, packed: bytes) -> None:
        if self.closed or self.transport is None:
            raise ConnectionError("the connection to Redis is closed")
        self.transport.write(packed)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while (reply := reader.gets()) is not False:
                if not waiters:
                    if self.pushed is None:
                        raise hiredis.ProtocolError("Redis sent an answer nobody asked for")
                    self.pushed(reply)
                    continue
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
        if self.lost is not None:
            self.lost()


class RedisLane:
    """Commands on one shared connection, connected on first use and again after a loss.

    Raises ``ConnectionError`` (an ``OSError``) when the connection cannot be made or is lost,
    ``TimeoutError`` when connecting or an answer takes longer than the address's timeouts
    (as redis-py's socket timeouts), and redis-py's ``ResponseError`` for an error reply.
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
                async with asyncio.timeout(self.address.command_timeout):
                    reply = await protocol.send(packed)
            except (asyncio.CancelledError, TimeoutError):
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
        return await _connect(self.address)


async def _connect(address: LaneAddress) -> _Protocol:
    """A connection to ``address`` that has sent AUTH, SELECT and the client name and had
    them accepted, within the address's connect timeout."""
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


class LaneSubscriber:
    """One subscribed connection, for the session cache's invalidations
    (gateway/session_cache.py): a ping is written at once, and messages and pongs come out of
    :meth:`get_message` in the order Redis sent them, as redis-py's PubSub gives them
    (``{"type": "message" | "pong" | "subscribe", "data": ...}``). redis-py's took ~0.25 ms of
    CPU per confirmation ping in a process idle for a few milliseconds (issue 7).

    Never reconnects: a lost connection makes :meth:`get_message` raise ``ConnectionError``,
    and the session cache starts over with a new subscriber.
    """

    def __init__(self, address: LaneAddress) -> None:
        self.address = address
        self._protocol: _Protocol | None = None
        self._messages: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    async def subscribe(self, channel: str) -> None:
        if self._protocol is not None:
            raise RuntimeError("already subscribed")
        protocol = self._protocol = await _connect(self.address)
        protocol.pushed = self._pushed
        protocol.lost = self._wake
        protocol.write(_pack(("SUBSCRIBE", channel)))

    async def ping(self, token: bytes = b"") -> None:
        self.send_ping(token)

    def send_ping(self, token: bytes = b"") -> None:
        """Write ``PING token``; its ``pong`` comes out of :meth:`get_message`."""
        if self._protocol is None:
            raise ConnectionError("not subscribed")
        self._protocol.write(_pack(("PING", token)))

    def lost(self) -> bool:
        """Whether the connection is known to be gone (then every use of it fails)."""
        return self._protocol is not None and self._protocol.closed

    async def get_message(self, seconds: float) -> dict[str, Any] | None:
        """The next message or pong, None when none came within ``seconds``."""
        if not self._messages:
            if self.lost():
                raise ConnectionError("the subscription's connection to Redis was lost")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(seconds):
                    await waiter
            except TimeoutError:
                return None
            finally:
                self._waiter = None
            if not self._messages:
                raise ConnectionError("the subscription's connection to Redis was lost")
        reply = self._messages.popleft()
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        if not isinstance(reply, list) or len(reply) < 2 or not isinstance(reply[0], bytes):
            # Its type only: a message names a session key, which is never logged.
            raise ConnectionError(
                f"Redis sent a subscriber something unexpected: {type(reply).__name__}")
        return {"type": reply[0].decode("ascii", "replace"), "data": reply[-1]}

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.close()

    def _pushed(self, reply: Any) -> None:
        self._messages.append(reply)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
