"""The gateway's HTTP/1.1 upstream client against a raw-socket upstream that misbehaves on cue.

The upstream here is a plain ``asyncio.start_server``: each test scripts the exact bytes it
answers with, and the server counts connections and records every request head it reads, so
the tests see what a real app would see: which requests shared a keep-alive connection, and that
a connection the gateway could not trust (invalid or ambiguous answer, ``Connection: close``, a
request body left unread) never carries another request. Requests go through a real gateway
process on a public route.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.upstream_client import _HIGH_WATER, UpstreamBodyTooLarge, UpstreamClient
from tests.support.gateway_proc import GatewayProcess, free_port
from tests.support.world import GatewayWorld, open_world

pytestmark = [pytest.mark.provider]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


@dataclass
class Head:
    """One request head as the upstream read it."""

    conn: int
    method: str
    target: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


# A script answers one request: given its head and the connection, it writes whatever it likes
# and returns whether the server should read the next request on this connection.
Script = Callable[[Head, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def read_body(head: Head, reader: asyncio.StreamReader) -> bytes:
    length = head.header("Content-Length")
    if length is not None:
        return await reader.readexactly(int(length))
    if (head.header("Transfer-Encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return b""


async def reply_ok(head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await read_body(head, reader)
    writer.write(OK)
    await writer.drain()
    return True


def answer(*parts: bytes, keep: bool) -> Script:
    """A script that writes ``parts`` (50 ms apart, so each reaches the gateway on its own)
    without reading a request body, then keeps the connection open (``keep``) or closes it."""

    async def script(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.05)
            writer.write(part)
            await writer.drain()
        return keep

    return script


@dataclass
class RawUpstream:
    script: Script = reply_ok
    connections: int = 0
    heads: list[Head] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [
                    (name, value.strip())
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                ]
                head = Head(conn, method, target, headers)
                self.heads.append(head)
                if not await self.script(head, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def on(self, conn: int) -> list[str]:
        """The targets requested on connection ``conn`` (1 is the first)."""
        return [h.target for h in self.heads if h.conn == conn]


@dataclass
class Env:
    upstream: RawUpstream
    gateway: GatewayProcess

    async def get(
        self, path: str, method: str = "GET", **kwargs: Any
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as browser,
            browser.request(
                method,
                URL(self.gateway.url + path, encoded=True),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=20),
                **kwargs,
            ) as r,
        ):
            return r.status, await r.read(), r


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def env(raw: RawUpstream, oidc_provider: Any, tmp_path: Path) -> AsyncIterator[Env]:
    async with open_world(GatewayWorld, oidc_provider, tmp_path) as world:
        port = free_port()
        routes = [
            {
                "name": "raw",
                "match": {"path": "/public/"},
                "upstream": raw.url,
                "auth": "public",
                "timeout": "1s",
            },
            {
                "name": "refused",
                "match": {"path": "/refused/"},
                "upstream": f"http://127.0.0.1:{free_port()}",
                "auth": "public",
            },
        ]
        gw = await world.start(world.base_config(port, routes=routes))
        yield Env(raw, gw)


async def test_sequential_requests_share_one_keep_alive_connection(env: Env) -> None:
    for i in range(5):
        status, body, _ = await env.get(f"/public/{i}")
        assert (status, body) == (200, b"ok")
    assert env.upstream.connections == 1
    assert env.upstream.on(1) == [f"/public/{i}" for i in range(5)]


async def test_no_headers_are_invented_and_the_target_is_sent_verbatim(env: Env) -> None:
    status, _, _ = await env.get(
        "/public/a%20b?q=%41&x=%2F", skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")
    )
    assert status == 200
    head = env.upstream.heads[-1]
    assert head.target == "/public/a%20b?q=%41&x=%2F"
    names = {k.lower() for k, _ in head.headers}
    assert not names & {"user-agent", "accept", "accept-encoding", "content-length"}
    assert head.header("Host") is not None


async def test_pooled_connection_closed_by_the_upstream_is_not_a_failure(env: Env) -> None:
    # A keep-alive answer, then the upstream closes the idle connection.
    env.upstream.script = answer(OK, keep=False)
    assert (await env.get("/public/one"))[0] == 200
    await asyncio.sleep(0.2)
    assert (await env.get("/public/two"))[:2] == (200, b"ok")
    assert env.upstream.connections == 2


async def test_pooled_connection_dying_before_any_answer_byte_is_retried(env: Env) -> None:
    served = 0

    async def second_request_is_dropped(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        nonlocal served
        served += 1
        if head.conn == 1 and served == 2:
            return False  # the race: the request reached a connection the app was closing
        writer.write(OK)
        await writer.drain()
        return True

    env.upstream.script = second_request_is_dropped
    assert (await env.get("/public/one"))[0] == 200
    assert (await env.get("/public/two"))[:2] == (200, b"ok")
    assert env.upstream.on(1) == ["/public/one", "/public/two"]
    assert env.upstream.on(2) == ["/public/two"]


async def test_connection_close_is_honoured(env: Env) -> None:
    # "Connection: close", but the app keeps the socket open anyway.
    env.upstream.script = answer(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", keep=True
    )
    for _ in range(2):
        assert (await env.get("/public/x"))[:2] == (200, b"ok")
    assert env.upstream.connections == 2
    assert env.upstream.on(1) == ["/public/x"]


async def test_http_1_0_answer_is_not_kept_alive(env: Env) -> None:
    env.upstream.script = answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", keep=True)
    for _ in range(2):
        assert (await env.get("/public/x"))[:2] == (200, b"ok")
    assert env.upstream.connections == 2


async def test_chunked_answer_is_relayed_whole_and_the_connection_reused(env: Env) -> None:
    env.upstream.script = answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"6\r\n world\r\n0\r\n\r\n",
        keep=True,
    )
    for _ in range(2):
        assert (await env.get("/public/c"))[:2] == (200, b"hello world")
    assert env.upstream.connections == 1


async def test_read_until_close_answer_is_relayed_whole(env: Env) -> None:
    env.upstream.script = answer(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ",
        b"second part",
        keep=False,
    )
    for _ in range(2):
        assert (await env.get("/public/u"))[:2] == (200, b"first part, second part")
    assert env.upstream.connections == 2


async def test_head_answer_has_no_body_and_the_connection_is_reused(env: Env) -> None:
    async def head_then_get(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if head.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        else:
            writer.write(OK)
        await writer.drain()
        return True

    env.upstream.script = head_then_get
    status, body, r = await env.get("/public/h", method="HEAD")
    assert (status, body, r.headers["Content-Length"]) == (200, b"", "100")
    assert (await env.get("/public/g"))[:2] == (200, b"ok")
    assert env.upstream.on(1) == ["/public/h", "/public/g"]


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_end_at_their_head(env: Env, status: int) -> None:
    async def bodiless(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if head.target.endswith("/empty"):
            writer.write(f'HTTP/1.1 {status} Whatever\r\nETag: "v1"\r\n\r\n'.encode())
        else:
            writer.write(OK)
        await writer.drain()
        return True

    env.upstream.script = bodiless
    got, body, r = await env.get("/public/empty")
    assert (got, body) == (status, b"")
    assert r.headers["ETag"] == '"v1"'
    assert (await env.get("/public/next"))[:2] == (200, b"ok")
    assert env.upstream.connections == 1


async def test_informational_answers_are_skipped(env: Env) -> None:
    async def early_hints(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade")
        await writer.drain()
        return True

    env.upstream.script = early_hints
    status, body, r = await env.get("/public/i")
    assert (status, body) == (201, b"made")
    assert "Link" not in r.headers
    assert (await env.get("/public/i"))[:2] == (201, b"made")
    assert env.upstream.connections == 1


async def test_duplicate_set_cookie_headers_are_all_relayed(env: Env) -> None:
    async def cookies(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2; Path=/\r\n"
            b"Content-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        return True

    env.upstream.script = cookies
    status, _, r = await env.get("/public/k")
    assert status == 200
    assert r.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok", id="bad-status-line"),
        pytest.param(b"hello there\r\n\r\n", id="not-http"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            id="content-length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok", id="bad-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="two-lengths"
        ),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", id="upgrade"),
    ],
)
async def test_invalid_answer_is_502_and_its_connection_is_not_reused(
    env: Env, answer: bytes
) -> None:
    async def first_invalid(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(answer if head.target.endswith("/bad") else OK)
        await writer.drain()
        return True

    env.upstream.script = first_invalid
    status, body, _ = await env.get("/public/bad", headers={"Accept": "application/json"})
    assert status == 502
    assert b"ok" not in body
    assert (await env.get("/public/good"))[:2] == (200, b"ok")
    assert env.upstream.on(1) == ["/public/bad"]
    assert env.upstream.on(2) == ["/public/good"]


async def test_no_answer_head_within_the_route_timeout_is_504(env: Env) -> None:
    async def silent(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        await asyncio.sleep(5)
        return False

    env.upstream.script = silent
    started = time.monotonic()
    status, _, _ = await env.get("/public/slow", headers={"Accept": "application/json"})
    assert status == 504
    assert time.monotonic() - started < 4


async def test_stalled_body_cuts_the_browser_connection(env: Env) -> None:
    async def stall(head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(5)
        return False

    env.upstream.script = stall
    with pytest.raises(aiohttp.ClientPayloadError):
        await env.get("/public/stall")


async def test_browser_leaving_mid_download_is_not_an_upstream_fault(env: Env) -> None:
    browser_gone = asyncio.Event()

    async def big(head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"a" * 100000)
        await writer.drain()
        await browser_gone.wait()
        for _ in range(2):
            writer.write(b"b" * 100000)
            await writer.drain()
        return True

    env.upstream.script = big
    reader, writer = await asyncio.open_connection("127.0.0.1", env.gateway.port)
    writer.write(b"GET /public/big HTTP/1.1\r\nHost: app\r\n\r\n")
    await reader.readexactly(1000)  # the answer has started
    writer.close()
    await writer.wait_closed()
    browser_gone.set()
    for _ in range(250):  # up to 5 s for the gateway to notice
        if "browser left before the answer was whole" in env.gateway.logs():
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the gateway did not log the browser leaving")
    assert "upstream answer broken off" not in env.gateway.logs()
    env.upstream.script = reply_ok
    assert (await env.get("/public/after"))[:2] == (200, b"ok")


async def test_connection_refused_is_502(env: Env) -> None:
    status, body, _ = await env.get("/refused/x", headers={"Accept": "application/json"})
    assert status == 502
    assert b"cannot be reached" in body


async def test_request_body_left_unread_never_lets_the_connection_be_reused(env: Env) -> None:
    async def early_answer(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if head.method == "POST":
            # Answers without reading the body, and claims keep-alive: the rest of the body
            # would be read as the next request if the gateway sent one on this connection.
            writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
            await writer.drain()
            return True
        return await reply_ok(head, reader, writer)

    gate = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"GET /public/smuggled HTTP/1.1 x"
        await gate.wait()
        yield b"Host: evil x" * 100

    env.upstream.script = early_answer
    # The upload is still going on (its browser is connected) while the next request is sent.
    async with (
        aiohttp.ClientSession() as uploader,
        uploader.post(
            URL(env.gateway.url + "/public/upload", encoded=True),
            data=slow_body(),
            timeout=aiohttp.ClientTimeout(total=20),
        ) as r,
    ):
        assert (r.status, await r.read()) == (413, b"big")
        assert (await env.get("/public/after"))[:2] == (200, b"ok")
        gate.set()
    assert [h.target for h in env.upstream.heads] == ["/public/upload", "/public/after"]
    assert env.upstream.on(1) == ["/public/upload"]


async def test_request_bodies_arrive_whole_with_their_framing(env: Env) -> None:
    bodies: list[bytes] = []

    async def record(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        bodies.append(await read_body(head, reader))
        writer.write(OK)
        await writer.drain()
        return True

    async def streamed() -> AsyncIterator[bytes]:
        for part in (b"one ", b"two ", b"three"):
            yield part

    env.upstream.script = record
    payload = bytes(range(256)) * 4096  # 1 MiB with a Content-Length
    assert (await env.get("/public/p", method="POST", data=payload))[0] == 200
    assert (await env.get("/public/p", method="PUT", data=streamed()))[0] == 200
    assert (await env.get("/public/p", method="POST"))[0] == 200
    assert bodies == [payload, b"one two three", b""]
    lengths = [
        (h.header("Content-Length"), h.header("Transfer-Encoding")) for h in env.upstream.heads
    ]
    assert lengths == [(str(len(payload)), None), (None, "chunked"), ("0", None)]
    assert env.upstream.connections == 1


class QueuedBody:
    """A request body that arrives when the test says (the browser's side of an upload)."""

    def __init__(self) -> None:
        self.parts: asyncio.Queue[bytes] = asyncio.Queue()

    async def readany(self) -> bytes:
        return await self.parts.get()


async def test_client_never_reuses_a_connection_while_its_request_body_is_unsent(
    raw: RawUpstream,
) -> None:
    async def early_answer(
        head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if head.method == "POST":
            writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
            await writer.drain()
            return True  # and the rest of the body would be read as the next request
        return await reply_ok(head, reader, writer)

    raw.script = early_answer
    client = UpstreamClient()
    origin = ("http", "127.0.0.1", raw.port)
    body = QueuedBody()
    body.parts.put_nowait(b"GET /smuggled HTTP/1.1 x")
    try:
        answer = await client.request(
            "POST",
            origin,
            "/upload",
            [("Host", "app"), ("Content-Length", "100")],
            host="app",
            body=body,
            read_timeout=5,
        )
        assert (answer.status, await answer.read_chunk()) == (413, b"big")
        assert await answer.read_chunk() == b""
        answer.release()
        after = await client.request(
            "GET", origin, "/after", [("Host", "app")], host="app", body=None, read_timeout=5
        )
        assert (after.status, await after.read_chunk()) == (200, b"ok")
        after.release()
        body.parts.put_nowait(b"x" * 76)
        body.parts.put_nowait(b"")
        await asyncio.sleep(0.1)
    finally:
        client.close()
    assert [h.target for h in raw.heads] == ["/upload", "/after"]
    assert raw.on(1) == ["/upload"]


# -- fetch: the provider's and Microsoft Graph's calls (gateway/idp.py, gateway/graph.py)


async def test_fetch_reads_a_whole_answer_and_sends_the_body_with_its_length(
    raw: RawUpstream,
) -> None:
    async def token(head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        got = await read_body(head, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(got):x}\r\n".encode() + got + b"\r\n0\r\n\r\n")
        await writer.drain()
        return True

    raw.script = token
    client = UpstreamClient()
    url = f"http://127.0.0.1:{raw.port}/token?x=1"
    try:
        first = await client.fetch("POST", url, headers={"Content-Type": "a/b"},
                                   body=b"code=abc", limit=100, seconds=5)
        second = await client.fetch("GET", url, headers={}, limit=100, seconds=5)
    finally:
        client.close()
    assert first == (200, b"code=abc")
    assert second == (200, b"")
    assert [(h.method, h.target) for h in raw.heads] == [
        ("POST", "/token?x=1"), ("GET", "/token?x=1")]
    assert raw.heads[0].header("Content-Length") == "8"
    assert raw.heads[0].header("Host") == f"127.0.0.1:{raw.port}"
    assert raw.heads[0].header("Transfer-Encoding") is None
    assert raw.heads[0].header("User-Agent") == "oidc-gateway"  # what the provider's logs show
    assert raw.on(1) == ["/token?x=1", "/token?x=1"]  # one keep-alive connection


async def test_fetch_follows_no_redirect(raw: RawUpstream) -> None:
    raw.script = answer(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.example/\r\n"
                        b"Content-Length: 0\r\n\r\n", keep=True)
    client = UpstreamClient()
    try:
        got = await client.fetch("GET", f"http://127.0.0.1:{raw.port}/jwks", headers={},
                                 limit=100, seconds=5)
    finally:
        client.close()
    assert got == (302, b"")
    assert [h.target for h in raw.heads] == ["/jwks"]


async def test_fetch_refuses_an_answer_over_its_limit_and_drops_the_connection(
    raw: RawUpstream,
) -> None:
    # Past the limit with most of the answer still to come: the rest must not be read as the
    # next request's answer.
    raw.script = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n" + b"x" * 2000,
                        keep=True)
    client = UpstreamClient()
    url = f"http://127.0.0.1:{raw.port}/big"
    try:
        with pytest.raises(UpstreamBodyTooLarge):
            await client.fetch("GET", url, headers={}, limit=1000, seconds=5)
        raw.script = reply_ok
        assert await client.fetch("GET", url, headers={}, limit=1000, seconds=5) == (200, b"ok")
    finally:
        client.close()
    assert raw.on(1) == ["/big"]  # the cut-off answer's connection carried nothing more
    assert raw.on(2) == ["/big"]


async def test_answer_left_unread_after_reading_paused_does_not_stall_the_next(
    raw: RawUpstream,
) -> None:
    # A large answer whose last bytes pushed the client over its buffer mark (reading paused),
    # then released unread, as when the browser leaves mid-download: the connection goes back
    # to the pool, and the next request on it must get its answer (it used to wait out its
    # timeout: nothing read from the socket any more).
    size = _HIGH_WATER + 1
    raw.script = answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size,
                        keep=True)
    client = UpstreamClient()
    origin = ("http", "127.0.0.1", raw.port)
    try:
        response = await client.request("GET", origin, "/big", [], host="127.0.0.1", body=None,
                                        read_timeout=5)
        body = None
        async with asyncio.timeout(5):
            while body is None:  # until the whole answer is in
                body = response.buffered_body(size)
                await asyncio.sleep(0.005)
        response.release()
        raw.script = reply_ok
        got = await client.fetch("GET", f"{raw.url}/next", headers={}, limit=100, seconds=2)
    finally:
        client.close()
    assert len(body) == size
    assert got == (200, b"ok")
    assert raw.on(1) == ["/big", "/next"]  # still one keep-alive connection


async def test_fetch_deadline_covers_a_body_that_trickles(raw: RawUpstream) -> None:
    raw.script = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\na", b"b", b"c", b"d",
                        b"e", b"f", b"g", b"h", b"i", b"j", keep=True)  # 50 ms apart
    client = UpstreamClient()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await client.fetch("GET", f"http://127.0.0.1:{raw.port}/slow", headers={},
                               limit=100, seconds=0.2)
    finally:
        client.close()
    assert time.monotonic() - started < 0.4
