"""A lean HTTP/1.1 client for the proxied requests, with a keep-alive pool per upstream origin;
:meth:`UpstreamClient.fetch` uses it for the gateway's own small calls (the provider's
endpoints, Microsoft Graph), which sit in every login's path.

Why not aiohttp's client: its per-request machinery (ClientRequest, timers, CIMultiDict, yarl
joins) cost more CPU than the rest of the proxy path together (issue 7). This client sends the
request head as one buffer and parses the answer with ``httptools`` (llhttp, the parser of
Node.js): nothing here parses HTTP by hand, it only decides framing and connection reuse.

Desync safety is the point of the reuse rules: a connection goes back to the pool only when its
answer was read to the end, the answer allowed keep-alive (HTTP/1.1 without ``Connection:
close``), the request body was sent whole, and nothing arrived that was not asked for. Everything
else closes it. Websockets do not come here; they stay on aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import httptools

# Methods after which aiohttp's client sends no "Content-Length: 0"; kept, so upstreams see the
# same requests as before.
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Bytes of answer body held per connection before reading from the upstream pauses: the browser
# sets the pace of a 100 MB download, not the upstream.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024

Origin = tuple[str, str, int]  # scheme, host, port
# What the gateway's own calls (provider, Microsoft Graph) say they are.
FETCH_USER_AGENT: Final = "oidc-gateway"


class BodySource(Protocol):
    """What the request body is read from: aiohttp's ``StreamReader`` of the browser's request."""

    async def readany(self) -> bytes: ...


class UpstreamClientError(Exception):
    """The exchange with the upstream failed; the message names the cause, never the data."""


class UpstreamConnectError(UpstreamClientError):
    """No connection could be opened (refused, unreachable, TLS, connect timeout)."""


class UpstreamResponseTimeout(UpstreamClientError):
    """The upstream sent no complete answer head within the read timeout."""


class UpstreamProtocolError(UpstreamClientError):
    """The upstream's answer is not valid HTTP/1.1 (or is ambiguous, like Content-Length and
    Transfer-Encoding together): it cannot be relayed safely."""


class UpstreamBrokenError(UpstreamClientError):
    """The connection broke off or stalled during the exchange."""


class UpstreamBodyTooLarge(UpstreamClientError):
    """A fetched answer was longer than the caller's limit."""


class _DeadConnection(UpstreamBrokenError):
    """A pooled connection was found closed before any answer byte: safe to retry elsewhere."""


class _HeadDone(Exception):
    """Stops llhttp at the end of a HEAD answer's head (httptools cannot skip its body)."""


class _Unsolicited(Exception):
    """Stops llhttp when bytes follow a complete answer."""


class ResponseHeaders:
    """The answer's headers in arrival order, duplicates (Set-Cookie) kept."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def getall(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self._items if k.lower() == low]

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self.getall(name)
        return found[0] if found else default


class _Connection(asyncio.Protocol):
    """One upstream connection, carrying one exchange at a time."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._timeout = 0.0
        self._reset()

    def _reset(self) -> None:
        self.active = False
        self.parser: httptools.HttpResponseParser | None = None
        self.is_head = False
        self.got_bytes = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.body_done = True
        self.body_started = False
        self.body_task: asyncio.Task[None] | None = None
        self.error: UpstreamClientError | None = None
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.has_te = False
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.informational = False
        self.head_tail = b""

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:
            # Bytes nobody asked for (on an idle connection, or after the answer): the stream
            # is out of step, so the connection must never carry another request.
            self.keep_alive = False
            self._close()
            return
        self.got_bytes = True
        if self._deadline is not None:
            self._deadline = self.loop.time() + self._timeout
        parser = self.parser
        assert parser is not None  # noqa: S101 - set while active
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                self._head_finished(data)
            elif self.complete:
                self._after_complete()
            elif isinstance(cause, UpstreamProtocolError):
                self._fail(cause)
            else:
                self._fail(UpstreamProtocolError("the app's answer could not be read"))
        except httptools.HttpParserError as exc:
            if self.complete:
                self._after_complete()
            else:
                self._fail(UpstreamProtocolError(f"the app sent invalid HTTP ({exc})"))
        else:
            if self.is_head and not self.complete:
                self.head_tail = data[-3:]

    def _after_complete(self) -> None:
        """Something followed a whole answer in the same read: relay the answer, then close."""
        self.keep_alive = False
        self._close()

    def eof_received(self) -> bool:
        return False  # close our side too: a half-closed upstream connection is useless

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # if idle, the pool drops it lazily (take, sweep)
        if self.active and not self.complete:
            if self.headers_done and self._ends_at_close():
                self.complete = True  # a read-until-close body ends here, as it should
                self.keep_alive = False
            elif not self.got_bytes:
                self.error = self.error or _DeadConnection("the app closed the connection")
            else:
                self.error = self.error or UpstreamBrokenError(
                    "the app closed the connection mid-answer"
                )
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Unsolicited  # a second answer to one request: out of step

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        low = name.lower()
        if low == b"content-length":
            # llhttp has checked the value is digits and not contradicted.
            self.content_length = int(value)
        elif low == b"transfer-encoding":
            self.has_te = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # noqa: S101 - set while active
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamProtocolError("the app switched protocols unasked")
            # 100 Continue, 103 Early Hints...: not the answer; the real one follows.
            self.informational = True
            self.reason = b""
            self.raw_headers = []
            self.content_length = None
            self.has_te = False
            return
        if self.content_length is not None and self.has_te:
            raise UpstreamProtocolError(
                "the app's answer has both Content-Length and Transfer-Encoding"
            )
        self.status = status
        self.keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        self.headers_done = True
        self._deadline = None
        self._wake()
        if self.is_head:
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        self._deadline = None
        self._wake()

    # -- internals ----------------------------------------------------------------------------

    def _head_finished(self, data: bytes) -> None:
        """A HEAD answer ends with its head. The connection stays reusable only when nothing
        followed the head in the same read: then the head's first CR LF CR LF ends the data."""
        self.complete = True
        seen = self.head_tail + data
        if not (seen.endswith(b"\r\n\r\n") and seen.find(b"\r\n\r\n") == len(seen) - 4):
            self.keep_alive = False

    def _ends_at_close(self) -> bool:
        no_body = self.is_head or self.status in (204, 304)
        return not no_body and self.content_length is None and not self._chunked()

    def _chunked(self) -> bool:
        for name, value in self.raw_headers:
            if name.lower() == b"transfer-encoding":
                last = value.rsplit(b",", 1)[-1].strip().lower()
                return last == b"chunked"
        return False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def arm(self) -> None:
        """Start (or keep) the inactivity clock: it runs only while we wait on the upstream."""
        self._deadline = self.loop.time() + self._timeout
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def touch(self) -> None:
        if self._deadline is not None:
            self._deadline = self.loop.time() + self._timeout

    def disarm(self) -> None:
        self._deadline = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or not self.active:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        if self.headers_done:
            self._fail(UpstreamBrokenError("the app's answer stalled"))
        else:
            self._fail(UpstreamResponseTimeout("no answer in time"))

    def _fail(self, error: UpstreamClientError) -> None:
        if self.error is None:
            self.error = error
        self.keep_alive = False
        self._close()
        self._wake()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.keep_alive = False
        if self.body_task is not None and not self.body_task.done():
            self.body_task.cancel()
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain = drain = self.loop.create_future()
            try:
                await drain
            finally:
                self._drain = None

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.body_done
            and self.error is None
            and not self.closed
            and (self.body_task is None or self.body_task.done())
        )

    # -- one exchange -------------------------------------------------------------------------

    def begin(self, head: bytes, is_head: bool, timeout: float) -> None:
        self._reset()
        self.active = True
        self.is_head = is_head
        self._timeout = timeout
        self.parser = httptools.HttpResponseParser(self)
        assert self.transport is not None  # noqa: S101 - connected
        self.transport.write(head)
        self.arm()

    async def send_body(self, body: BodySource, length: int | None) -> None:
        """Stream the browser's body upstream (chunked when its length is unknown), waiting
        for the socket to drain so that a 100 MB upload never sits whole in memory."""
        transport = self.transport
        assert transport is not None  # noqa: S101 - connected
        sent = 0
        try:
            while True:
                self.body_started = True
                chunk = await body.readany()
                if not chunk:
                    break
                if self.closed:
                    return
                sent += len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                elif sent > length:
                    self._fail(UpstreamBrokenError("the request body outgrew its length"))
                    return
                else:
                    transport.write(chunk)
                self.touch()
                if self._write_paused:
                    await self.drain()
            if self.closed:
                return
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                self._fail(UpstreamBrokenError("the request body ended short"))
                return
            self.body_done = True
        except asyncio.CancelledError:
            raise
        except Exception:  # the browser's side broke: the upstream got a partial body
            self._fail(UpstreamBrokenError("the request body broke off"))


class UpstreamResponse:
    """An upstream's answer whose head is in; its body is read with :meth:`read_chunk`.
    Always :meth:`release` it: that returns the connection to the pool or closes it."""

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")
        self.headers = ResponseHeaders(
            [
                (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                for k, v in conn.raw_headers
            ]
        )

    @property
    def content_length(self) -> int | None:
        return self._conn.content_length if self._conn is not None else None

    def buffered_body(self, limit: int) -> bytes | None:
        """The whole body when it is already in, has a Content-Length of at most ``limit`` bytes
        and is a body at all (not HEAD, 204, 304): it can go out in one write with the head."""
        conn = self._conn
        if (
            conn is None
            or not conn.complete
            or conn.is_head
            or conn.content_length is None
            or conn.content_length > limit
            or conn.status in (204, 304)
        ):
            return None
        body = b"".join(conn.chunks)
        conn.chunks.clear()
        conn.buffered = 0
        return body

    async def read_chunk(self) -> bytes:
        """The next piece of the body, ``b""`` at its end."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            if conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.reading_paused and conn.buffered <= _LOW_WATER:
                    conn.reading_paused = False
                    if conn.transport is not None and not conn.closed:
                        conn.transport.resume_reading()
                return chunk
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            conn.arm()
            try:
                await conn.wait()
            finally:
                conn.disarm()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.client._release(conn)


def _request_head(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    default_host: str,
    has_body: bool,
) -> tuple[bytes, int | None]:
    """The request head, and the body's length (None: chunked). Framing headers are ours to
    set: the body's actual framing decides them, never a header that could disagree with it."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    length: int | None = None
    has_host = False
    for name, value in headers:
        low = name.lower()
        if low == "content-length":
            if has_body and length is None:
                length = int(value)
            continue
        if low == "transfer-encoding":
            continue
        if low == "host":
            has_host = True
        lines.append(f"{name}: {value}\r\n")
    if not has_host:
        lines.insert(1, f"Host: {default_host}\r\n")
    if has_body:
        lines.append(
            "Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n"
        )
    elif method not in _NO_BODY_METHODS:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Each line ends in exactly one CR LF: a CR or LF inside the target or a header would split
    # the request (aiohttp's client refuses the same way).
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or " " in target:
        raise UpstreamProtocolError("a request header or the path holds a line break")
    return text.encode("utf-8", "surrogateescape"), length


class UpstreamClient:
    """Keep-alive connections per origin; idle ones are closed after ``keepalive_timeout``
    (shorter than nginx's 75 s, so we close before the upstream does, usually)."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        keepalive_timeout: float = 30.0,
        max_idle_per_origin: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Sequence[tuple[str, str]],
        *,
        host: str,
        body: BodySource | bytes | None,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Send one request; return once the answer's head is in. A ``bytes`` body is sent
        whole with the head, in one write (give its Content-Length in ``headers``)."""
        head, length = _request_head(method, target, headers, host, body is not None)
        conn = self._take(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, head, method, body, length, read_timeout)
            except _DeadConnection:
                if body is not None and conn.body_started:
                    raise
                # The upstream closed the pooled connection before our request reached it:
                # nothing was processed, so one fresh connection may carry it.
        conn = await self._connect(origin)
        return await self._exchange(conn, head, method, body, length, read_timeout)

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        limit: int,
        seconds: float,
    ) -> tuple[int, bytes]:
        """Send one small request and read its whole answer: (status, body).

        ``seconds`` bounds everything (connect, head, body): TimeoutError past it.
        UpstreamBodyTooLarge past ``limit`` bytes; other UpstreamClientErrors name the cause.
        Redirects are answers like any other (never followed). ``User-Agent: oidc-gateway``
        unless ``headers`` name one.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            port = None
            scheme = ""
        if scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamConnectError(f"not an http(s) URL with a host: {scheme or '?'}")
        origin = (scheme, parts.hostname, port or (443 if scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = [(name, value) for name, value in headers.items()
                if name.lower() not in ("host", "content-length", "transfer-encoding")]
        if not any(name.lower() == "user-agent" for name, _ in sent):
            sent.append(("User-Agent", FETCH_USER_AGENT))
        if body is not None:
            sent.append(("Content-Length", str(len(body))))
        async with asyncio.timeout(seconds):
            response = await self.request(
                method, origin, target, sent, host=parts.netloc.rpartition("@")[2],
                body=body, read_timeout=seconds)
            try:
                data = bytearray()
                while chunk := await response.read_chunk():
                    data += chunk
                    if len(data) > limit:
                        raise UpstreamBodyTooLarge(f"the answer is longer than {limit} bytes")
            finally:
                response.release()
        return response.status, bytes(data)

    async def _exchange(
        self,
        conn: _Connection,
        head: bytes,
        method: str,
        body: BodySource | bytes | None,
        length: int | None,
        read_timeout: float,
    ) -> UpstreamResponse:
        try:
            if isinstance(body, bytes):
                conn.begin(head + body, method == "HEAD", read_timeout)
                # Never sent again on another connection: the request may have been processed.
                conn.body_started = True
            else:
                conn.begin(head, method == "HEAD", read_timeout)
            if body is not None and not isinstance(body, bytes):
                conn.body_done = False
                conn.body_task = asyncio.create_task(conn.send_body(body, length))
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.abort()
            raise
        return UpstreamResponse(conn)

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                )
        except TimeoutError as exc:
            raise UpstreamConnectError("connect timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(type(exc).__name__) from exc
        return conn

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_timeout:
                return conn
            conn.abort()
        return None

    def _release(self, conn: _Connection) -> None:
        if not conn.reusable() or self._closed:
            conn.abort()
            return
        conn.active = False
        conn.parser = None
        conn.disarm()
        # A whole answer may be left partly unread (the browser left mid-download), and its
        # last bytes may have paused reading: drop them and read again, or the next answer on
        # this connection would never be read (the request would wait out its timeout).
        conn.chunks.clear()
        conn.buffered = 0
        if conn.reading_paused:
            conn.reading_paused = False
            if conn.transport is not None:
                conn.transport.resume_reading()
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle_per_origin:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(max(self.keepalive_timeout / 4, 0.05), self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive timeout (oldest first)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.keepalive_timeout
        remaining = False
        for origin, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and c.idle_since > cutoff]
            for conn in idle:
                if conn.closed or conn.idle_since <= cutoff:
                    conn.abort()
            if keep:
                self._idle[origin] = keep
                remaining = True
            else:
                del self._idle[origin]
        if remaining:
            self._sweeper = loop.call_later(max(self.keepalive_timeout / 4, 0.05), self._sweep)

    def close(self) -> None:
        """Close every idle connection; answers still in flight close on release."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                with contextlib.suppress(Exception):
                    conn.abort()
        self._idle.clear()
