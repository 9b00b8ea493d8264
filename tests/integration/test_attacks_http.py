"""HTTP-level attacks on the gateway: request smuggling, duplicate Host, oversized headers,
upgrades without a session, h2c, slow and idle clients, connection floods, large bodies.

Requests go over raw sockets (:func:`raw_exchange`) because aiohttp's client refuses to write
most of them. "Refused" means: the status the gateway promises, nothing reached the upstream,
and no second (smuggled) request was answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.attacks_common import (
    World,
    gateway_world,
    new_browser,
    raw_exchange,
    register_at,
    request_bytes,
)
from tests.support.login import browser_login

pytestmark = [pytest.mark.provider, pytest.mark.asyncio(loop_scope="module")]

KEEPALIVE = 1.0  # server.keepalive_timeout of this module's gateway, seconds


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    async with gateway_world(
        tmp_path_factory.mktemp("http"), issuer=oidc_provider.issuer,
        client=register_at(oidc_provider), server={"keepalive_timeout": f"{KEEPALIVE}s"},
    ) as w:
        yield w


def smuggle(headers: list[str], body: bytes) -> bytes:
    """A POST to a public path whose body hides a second request to /smuggled."""
    return request_bytes("POST", "/public/front", ["Host: gw.test", *headers], body)


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
CHUNKED_THEN_SMUGGLED = b"0\r\n\r\n" + SMUGGLED


@pytest.mark.parametrize(
    "headers",
    [
        # CL.TE and TE.CL: the two framings disagree; whichever the gateway used, an upstream
        # reading the other one would see a second request.
        [f"Content-Length: {len(CHUNKED_THEN_SMUGGLED)}", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: chunked", f"Content-Length: {len(CHUNKED_THEN_SMUGGLED)}"],
        ["Transfer-Encoding: chunked", "Content-Length: 3"],
        ["Content-Length: 5", "Transfer-Encoding: identity, chunked"],
        # obfuscated Transfer-Encoding that some servers read as chunked and others ignore
        ["Transfer-Encoding: chunked", "Transfer-Encoding: identity"],
        ["Transfer-Encoding: xchunked", "Content-Length: 5"],
        ["Transfer-Encoding : chunked", "Content-Length: 5"],
        ["Transfer-Encoding:\x0bchunked", "Content-Length: 5"],
        ["Transfer-Encoding: chunked, chunked"],
        # two lengths
        ["Content-Length: 5", f"Content-Length: {len(CHUNKED_THEN_SMUGGLED)}"],
        ["Content-Length: 5, 40"],
        ["Content-Length: +5"],
    ],
    ids=lambda h: " | ".join(h),
)
async def test_ambiguous_body_framing_is_400_and_nothing_is_forwarded(
    world: World, headers: list[str]
) -> None:
    mark = world.mark()
    answer = await raw_exchange(world.port, smuggle(headers, CHUNKED_THEN_SMUGGLED))
    assert answer.status == 400, answer.raw[:300]
    assert answer.responses == 1  # the hidden request was never answered
    assert answer.closed
    assert world.seen_since(mark) == []


async def test_framing_control_a_plain_chunked_post_is_forwarded_once(world: World) -> None:
    """The positive control for the smuggling cases: a well-framed chunked body passes, and
    what follows it on the connection is a request of its own, judged on its own."""
    mark = world.mark()
    data = smuggle(["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n")
    data += request_bytes("GET", "/public/second", ["Host: gw.test", "Connection: close"])
    answer = await raw_exchange(world.port, data)
    assert answer.status == 200
    assert answer.responses == 2
    seen = world.seen_since(mark)
    assert [(r["raw_path"], r["body_len"]) for r in seen] == [("/public/front", 5),
                                                             ("/public/second", 0)]


@pytest.mark.parametrize(
    "hosts",
    [["Host: gw.test", "Host: evil.test"], ["Host: evil.test", "host: gw.test"],
     ["Host: gw.test", "Host: gw.test"], ["Host: gw.test, evil.test"], ["Host: "],
     ["Host: gw.test:99999"], ["Host: user@gw.test"], ["Host: gw test"]],
    ids=lambda h: " | ".join(h),
)
async def test_duplicate_or_malformed_host_is_400_and_nothing_is_forwarded(
    world: World, hosts: list[str]
) -> None:
    mark = world.mark()
    answer = await raw_exchange(
        world.port, request_bytes("GET", "/public/x", [*hosts, "Connection: close"]))
    assert answer.status == 400
    assert world.seen_since(mark) == []


def _many(count: int, size: int) -> list[str]:
    return [f"X-Filler-{i}: {'v' * size}" for i in range(count)]


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (_many(90, 10), 200),  # control: many small headers are fine
        ([f"X-Big: {'a' * 8000}"], 200),  # one long header within max_header_bytes
        (_many(101, 1), 431),  # more than max_header_count (100)
        (_many(3, 6000), 431),  # more than max_header_bytes (16384) in total
        ([f"X-Big: {'a' * 20000}"], 431),  # one header beyond max_header_bytes
        ([f"Cookie: {'c' * 70000}"], 431),  # beyond anything configurable
        (_many(2000, 1), 431),  # far more headers than the parser keeps
    ],
    ids=["90-small", "one-8k", "101", "3x6000", "one-20k", "cookie-70k", "2000"],
)
async def test_oversized_headers_are_431_and_nothing_is_forwarded(
    world: World, extra: list[str], status: int
) -> None:
    mark = world.mark()
    data = request_bytes("GET", "/public/x", ["Host: gw.test", *extra, "Connection: close"])
    answer = await raw_exchange(world.port, data)
    assert answer.status == status, answer.raw[:200]
    assert len(world.seen_since(mark)) == (1 if status == 200 else 0)


WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(
    ("method", "path", "upgrade"),
    [
        ("GET", "/ws", ["Upgrade: websocket", "Connection: Upgrade"]),
        ("GET", "/ws", ["Upgrade: WebSocket", "Connection: keep-alive, Upgrade"]),
        ("GET", "/admin/ws", ["upgrade: websocket", "connection: upgrade"]),
        ("POST", "/ws", ["Upgrade: websocket", "Connection: Upgrade"]),
    ],
    ids=["plain", "mixed-case", "lower-case-admin", "post"],
)
async def test_websocket_upgrade_without_a_session_opens_no_tunnel(
    world: World, method: str, path: str, upgrade: list[str]
) -> None:
    mark = world.mark()
    data = request_bytes(method, path, [
        "Host: gw.test", *upgrade, f"Sec-WebSocket-Key: {WS_KEY}",
        "Sec-WebSocket-Version: 13"])
    answer = await raw_exchange(world.port, data, deadline=3, until_close=False)
    assert answer.status == 401
    assert world.seen_since(mark) == []


async def test_websocket_control_signed_in_the_tunnel_opens(world: World) -> None:
    async with new_browser() as browser:
        await browser_login(browser, f"{world.url}/")
        async with browser.ws_connect(f"{world.url}/ws") as ws:
            await ws.send_str("ping")
            assert await ws.receive_str(timeout=5) == "alice:ping"


H2C = ["Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
       "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA"]


async def test_h2c_upgrade_is_never_forwarded(world: World) -> None:
    mark = world.mark()
    data = request_bytes("GET", "/public/h2c", ["Host: gw.test", *H2C])
    # What a client would send once upgraded: an HTTP/2 preface, then frames.
    data += b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    answer = await raw_exchange(world.port, data, deadline=3)
    assert answer.status == 200  # answered as plain HTTP/1.1, not 101 Switching Protocols
    assert b"101" not in answer.raw.split(b"\r\n", 1)[0]
    [seen] = world.seen_since(mark)
    names = {k.lower() for k, _ in seen["headers"]}
    assert not names & {"upgrade", "http2-settings", "connection"}
    # Protected path, no session: refused before anything is forwarded.
    mark = world.mark()
    data = request_bytes("GET", "/h2c", ["Host: gw.test", *H2C, "Accept: application/json"])
    answer = await raw_exchange(world.port, data, deadline=3, until_close=False)
    assert answer.status == 401
    assert world.seen_since(mark) == []


async def test_http2_prior_knowledge_preface_is_refused(world: World) -> None:
    mark = world.mark()
    answer = await raw_exchange(world.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", deadline=3)
    assert answer.status == 400 or answer.status is None
    assert answer.closed
    assert world.seen_since(mark) == []


async def _seconds_until_closed(port: int, trickle: list[bytes], every: float,
                                limit: float) -> float:
    """Connect, send ``trickle`` one piece per ``every`` seconds (then nothing), and return
    how long the gateway took to close the connection (``limit`` if it never did)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def drip() -> None:
        for piece in trickle:
            try:
                writer.write(piece)
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                return
            await asyncio.sleep(every)  # the attack is slowness itself

    sender = asyncio.create_task(drip())
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
        return time.monotonic() - started
    except TimeoutError:
        return limit
    except ConnectionResetError:
        return time.monotonic() - started
    finally:
        sender.cancel()
        writer.close()


async def test_slow_header_client_is_cut_off(world: World) -> None:
    mark = world.mark()
    pieces = [b"GET /public/slow HTTP/1.1\r\n", b"Host: gw.test\r\n"]
    pieces += [f"X-Slow-{i}: x\r\n".encode() for i in range(40)]
    took = await _seconds_until_closed(world.port, pieces, every=0.25, limit=8)
    assert took < KEEPALIVE + 2.5
    assert world.seen_since(mark) == []


async def test_silent_and_idle_connections_are_closed(world: World) -> None:
    took = await _seconds_until_closed(world.port, [], every=0, limit=8)
    assert took < KEEPALIVE + 2.5
    # Idle after a complete exchange (keep-alive): closed as well.
    request = request_bytes("GET", "/public/idle", ["Host: gw.test"])
    took = await _seconds_until_closed(world.port, [request], every=0, limit=8)
    assert took < KEEPALIVE + 2.5


async def test_connection_cap_refuses_the_flood_then_serves_again(
    oidc_provider: Any, tmp_path: Path
) -> None:
    cap = 4
    async with gateway_world(
        tmp_path, issuer=oidc_provider.issuer, client=lambda port: ("unused", "unused"),
        server={"max_connections": cap, "keepalive_timeout": "30s"}, wait_ready=False,
    ) as world:
        held = [await asyncio.open_connection("127.0.0.1", world.port) for _ in range(cap)]
        try:
            # The held connections are idle, but they count: one more is refused at once.
            ping = request_bytes("GET", "/ping", ["Host: gw.test", "Connection: close"])
            answer = await raw_exchange(world.port, ping, deadline=5)
            assert answer.status == 503
            assert b"Too many connections" in answer.body
            assert answer.closed
            mark = world.mark()
            answer = await raw_exchange(world.port, request_bytes(
                "GET", "/public/over-cap", ["Host: gw.test", "Connection: close"]), deadline=5)
            assert answer.status == 503
            assert world.seen_since(mark) == []
            # The held ones still work.
            reader, writer = held[0]
            writer.write(ping)
            await writer.drain()
            async with asyncio.timeout(5):
                first = await reader.readline()
            assert first.startswith(b"HTTP/1.1 200")
        finally:
            for _, writer in held:
                writer.close()
        # Once they are gone, new connections are served (the release is asynchronous).
        deadline = time.monotonic() + 5
        while True:
            answer = await raw_exchange(world.port, ping, deadline=5)
            if answer.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert answer.status == 200


async def test_large_bodies_stream_through_with_or_without_a_length(world: World) -> None:
    """16 MiB, chunked and with Content-Length: far beyond aiohttp's 1 MiB ``read()`` cap, so
    this only passes if the gateway streams (security note 9)."""
    size = 16 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256(block * (size // len(block))).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with new_browser() as browser:
        await browser_login(browser, f"{world.url}/")
        async with browser.post(f"{world.url}/upload", data=body()) as r:  # chunked
            assert r.status == 200
            assert await r.json() == {"size": size, "sha256": digest, "content_encoding": None}
        whole = io.BytesIO(block * (size // len(block)))
        async with browser.post(f"{world.url}/upload", data=whole) as r:
            assert r.status == 200  # with Content-Length: beyond aiohttp's 1 MiB read cap
            assert (await r.json())["size"] == size


@asynccontextmanager
async def _body_held_back(
    port: int, head: bytes, *, within: float
) -> AsyncIterator[tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]]:
    """Send only a request's head (its body held back, as a client waiting for ``100
    Continue`` does) and read the first answer head that comes within ``within`` seconds;
    the connection stays open inside the block."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(within):
            first = await reader.readuntil(b"\r\n\r\n")
        yield first, reader, writer
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body_is_sent(world: World) -> None:
    """A client that holds its body back (curl does above 1 KB) hears "100 Continue" at once,
    not after its own wait, then its body is forwarded whole and answered once."""
    mark = world.mark()
    body = os.urandom(4096)
    head = request_bytes("POST", "/public/upload", [
        "Host: gw.test", "Expect: 100-continue", f"Content-Length: {len(body)}",
        "Connection: close"], b"")
    # curl waits 1 s before sending anyway
    async with _body_held_back(world.port, head, within=1.0) as (interim, reader, writer):
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        async with asyncio.timeout(5.0):
            rest = await reader.read()
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert b"100 Continue" not in rest
    assert [(r["raw_path"], r["body_len"]) for r in world.seen_since(mark)] == [
        ("/public/upload", len(body))]


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
async def test_an_upload_without_a_session_is_refused_before_its_body_is_invited(
    world: World, accept: str
) -> None:
    """``100 Continue`` comes only once the request may go ahead: a client holding back its
    body for a protected path without a session hears the 401 (JSON, or the sign-in page a
    browser's form gets) and is never asked to send the body; nothing reaches the upstream."""
    mark = world.mark()
    head = request_bytes("POST", "/private/upload", [
        "Host: gw.test", "Expect: 100-continue", f"Accept: {accept}",
        "Content-Length: 1048576"], b"")
    async with _body_held_back(world.port, head, within=5.0) as (first, _, _):
        assert first.startswith(b"HTTP/1.1 401 "), first
    assert world.seen_since(mark) == []


async def test_an_unknown_expectation_is_417_and_nothing_is_forwarded(world: World) -> None:
    mark = world.mark()
    answer = await raw_exchange(world.port, request_bytes("POST", "/public/upload", [
        "Host: gw.test", "Expect: 200-ok", "Content-Length: 2", "Connection: close"], b"hi"))
    assert answer.status == 417
    assert answer.responses == 1
    assert b"only 100-continue" in answer.body  # the gateway's answer, not the app's
    assert world.seen_since(mark) == []


def _answers(raw: bytes, methods: list[str]) -> list[tuple[str, int, dict[str, str], bytes]]:
    """Split a stream of answers, framed by Content-Length as a client must (a HEAD answer's
    Content-Length promises no body): (status line's version, status, headers, body)."""
    out = []
    for method in methods:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete answer for the {method}"
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ")[0], int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice in one answer"
            headers[name.lower()] = value.strip()
        assert "transfer-encoding" not in headers  # every answer here has a length
        size = 0 if method == "HEAD" else int(headers["content-length"])
        out.append((version, status, headers, raw[:size]))
        raw = raw[size:]
    assert raw == b"", "bytes after the last answer"
    return out


async def test_pipelined_requests_with_and_without_bodies_are_answered_in_order(
    world: World
) -> None:
    """Requests without a body are answered in the connection's own task, one write each;
    the first with a body hands the connection to aiohttp's loop (app.GatewayRequestHandler).
    Sent at once on one connection, all are answered, in order, each framed right (a HEAD
    answer promises the GET's length and sends no body), and the upstream sees each proxied
    one once, with its body."""
    mark = world.mark()
    api = ["Accept: application/json"]
    sent = [("GET", "/public/one", []), ("HEAD", "/public/two", []),
            ("GET", "/private", api), ("HEAD", "/private", api),
            ("POST", "/public/three", ["Content-Length: 5"]), ("GET", "/public/four", []),
            ("GET", "/public/five", ["Connection: close"])]
    data = b"".join(
        request_bytes(method, path, ["Host: gw.test", *headers],
                      b"hello" if method == "POST" else b"")
        for method, path, headers in sent)
    answer = await raw_exchange(world.port, data)
    assert answer.closed  # after the last, which asked for it
    methods = [method for method, _, _ in sent]
    answers = _answers(answer.raw, methods)
    assert [status for _, status, _, _ in answers] == [200, 200, 401, 401, 200, 200, 200]
    for (_, status, headers, body), (method, path, _) in zip(answers, sent, strict=True):
        assert headers["x-request-id"]
        assert headers["date"]
        if method == "GET" and status == 200:
            assert json.loads(body)["raw_path"] == path
    # Each HEAD answer carries the length its GET's body has, and no body.
    assert int(answers[1][2]["content-length"]) > 0
    assert answers[3][2]["content-length"] == str(len(answers[2][3]))
    assert json.loads(answers[2][3])["error"] == "unauthenticated"
    assert answers[0][2].get("connection") is None  # kept open: HTTP/1.1's default
    assert answers[6][2]["connection"] == "close"
    seen = world.seen_since(mark)
    assert [(r["method"], r["raw_path"], r["body_len"]) for r in seen] == [
        ("GET", "/public/one", 0), ("HEAD", "/public/two", 0), ("POST", "/public/three", 5),
        ("GET", "/public/four", 0), ("GET", "/public/five", 0)]


async def _http10(port: int, keep_alive: bool) -> tuple[bytes, bool]:
    """Two HTTP/1.0 GETs on one connection; what came back, and whether it was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = b"Connection: keep-alive\r\n" if keep_alive else b""
    request = b"GET /public/old HTTP/1.0\r\nHost: gw.test\r\n" + extra + b"\r\n"
    raw, closed = b"", False
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            while b"\r\n\r\n" not in raw:
                raw += await reader.read(65536)
            await asyncio.sleep(0.1)  # the body and a close, if one comes
            if keep_alive:
                writer.write(request)
            while chunk := await reader.read(65536):
                raw += chunk
                if keep_alive and raw.count(b"HTTP/1.0 200") == 2 and raw.endswith(b"}"):
                    break
            else:
                closed = True
    finally:
        writer.close()
    return raw, closed


async def test_http10_clients_get_http10_answers_and_their_connection_handling(
    world: World
) -> None:
    """HTTP/1.0 closes after each answer unless the client asks to keep the connection, and
    then the answer says it is kept (RFC 9112 9.3); a length frames every answer."""
    raw, closed = await _http10(world.port, keep_alive=False)
    assert closed
    ((version, status, headers, body),) = _answers(raw, ["GET"])
    assert (version, status) == ("HTTP/1.0", 200)
    assert "keep-alive" not in headers.get("connection", "")
    assert json.loads(body)["raw_path"] == "/public/old"
    raw, closed = await _http10(world.port, keep_alive=True)
    assert not closed
    answers = _answers(raw, ["GET", "GET"])
    assert [(a[0], a[1], a[2]["connection"]) for a in answers] == [
        ("HTTP/1.0", 200, "keep-alive")] * 2
