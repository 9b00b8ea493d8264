"""Requests answered before aiohttp reads them (``Gateway.answer_at_once``, issue 7), and a
login's return page decided before it is asked for (``Gateway._prepare_return``).

A request without credentials on a protected route (the 401 of an API client, a browser's
redirect to the provider) is answered by the server as soon as its head arrives, through a
plan made once per distinct head. Here that answer is held to the one ``Gateway.handle``
gives the same request: the gateway runs in-process on a real socket and a real provider,
and a head sent in two pieces (which only aiohttp's parser reads) gets the answer of
``handle``. The server's wrapper around ``Live.answer_at_once`` records which requests were
answered at once, so each test knows which path it saw.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from aiohttp import web

from gateway.app import (
    _HEAD_MEMO,
    LIVE,
    GatewaySite,
    Live,
    _HeadReader,
    create_app,
    server_options,
)
from gateway.config import parse_config
from gateway.endpoints import _PLAN_MEMO, RequestFacts, RequestHead, WholeAnswer, _KeptAccess
from gateway.models import Identity, Session, TokenSet
from tests.support.config_source import FixedSource
from tests.support.gateway_proc import free_port, gateway_config

pytestmark = [pytest.mark.provider]

# The parts of an answer that differ between any two requests.
_FRESH_PARAMS = frozenset({"state", "nonce", "code_challenge"})


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def normal(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """The answer less what is new for every request: date, request id, a login's
        state, nonce and PKCE challenge, the binding cookie's value."""
        headers = []
        for name, value in self.headers:
            if name in ("Date", "X-Request-Id"):
                value = "*"
            elif name == "Location":
                parts = urlsplit(value)
                query = [(k, "*" if k in _FRESH_PARAMS else v) for k, v in parse_qsl(parts.query)]
                value = parts._replace(query=urlencode(query)).geturl()
            elif name == "Set-Cookie":
                value = re.sub(r"=[^;]*", "=*", value, count=1)
            headers.append((name, value))
        return self.status, headers, self.body


class Conn:
    """One client connection, sending heads exactly as told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, data: bytes, *, split: bool = False) -> None:
        """``split``: the head in two writes 50 ms apart, so that the server reads it in two
        pieces (never answered at once)."""
        if split:
            self.writer.write(data[:7])
            await self.writer.drain()
            await asyncio.sleep(0.05)
            data = data[7:]
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, bodiless: bool = False) -> Answer:
        async with asyncio.timeout(5):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = [(k, v.strip()) for k, _, v in (x.partition(":") for x in lines[1:] if x)]
            answer = Answer(status, headers, b"")
            length = answer.header("Content-Length")
            if length and not bodiless:
                answer.body = await self.reader.readexactly(int(length))
            return answer

    async def closed(self) -> bool:
        """Whether the server closed the connection (within 5 s)."""
        async with asyncio.timeout(5):
            return await self.reader.read(1) == b""

    def close(self) -> None:
        self.writer.close()


@dataclass
class Served:
    port: int
    live: Live
    answered: list[str] = field(default_factory=list)  # targets answered at once

    raw: dict[str, Any] = field(default_factory=dict)  # the config
    site: Any = None  # the GatewaySite

    async def ask(self, data: bytes, *, split: bool = False) -> Answer:
        conn = await Conn.open(self.port)
        try:
            await conn.send(data, split=split)
            return await conn.answer(bodiless=data.startswith(b"HEAD "))
        finally:
            conn.close()


def head(target: str, *headers: str, method: str = "GET", version: str = "1.1",
         host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def slow_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request 200 ms late."""
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "public", "match": {"path": "/public/"}, "upstream": upstream,
         "auth": "public"},
        {"name": "optional", "match": {"path": "/opt/"}, "upstream": upstream,
         "auth": "optional"},
        {"name": "api", "match": {"path": "/api/"}, "upstream": upstream,
         "unauthenticated": "401"},
        {"name": "web", "match": {"path": "/web/"}, "upstream": upstream,
         "unauthenticated": "redirect"},
        {"name": "office", "match": {"path": "/office/"}, "upstream": upstream,
         "allow": [{"networks": ["10.0.0.0/8"]}]},
        {"name": "named", "match": {"host": "app.example", "path": "/"}, "upstream": upstream},
        {"name": "app", "match": {"path": "/"}, "upstream": upstream},
    ]


@asynccontextmanager
async def serving(provider: Any, **server: Any) -> AsyncIterator[Served]:
    upstream = await asyncio.start_server(slow_upstream, "127.0.0.1", 0)
    port = free_port()
    client_id, secret = provider.register_client([f"http://127.0.0.1:{port}/oauth2/callback"])
    raw = gateway_config(
        port=port, issuer=provider.issuer, client_id=client_id, client_secret=secret,
        upstream="http://127.0.0.1:9",
        routes=routes(f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}"))
    raw["server"].update(server)
    config = parse_config(raw, {})
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    served = Served(port, app[LIVE], raw=raw)

    def at_once(head: RequestHead) -> WholeAnswer | None:
        answer = served.live.answer_at_once(head)
        if answer is not None:
            served.answered.append(head.raw_path)
        return answer

    site = GatewaySite(runner, "127.0.0.1", port, handler=served.live.handle,
                       handler_options=server_options(config), at_once=at_once,
                       max_connections=config.server.max_connections, shutdown_timeout=1.0)
    await site.start()
    served.site = site
    store_check = asyncio.create_task(served.live.keep_store_checked())  # as serve() does
    try:
        for _ in range(500):  # up to 10 s for the provider's metadata: sign-ins can start
            if served.live.current.gateway.idp.ready:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the provider's metadata did not load")
        yield served
    finally:
        store_check.cancel()
        await runner.cleanup()
        upstream.close()


@pytest.fixture
async def served(oidc_provider: Any) -> AsyncIterator[Served]:
    async with serving(oidc_provider, trusted_proxies=["10.9.0.0/16"]) as s:
        yield s


JSON = "Accept: application/json"
HTML = "Accept: text/html,application/xhtml+xml"

SAME_ANSWER = {
    "api client": head("/bench?x=1&y=%2F", JSON),
    "browser": head("/page?q=a%20b", HTML),
    "script asking for html": head("/page", HTML, "X-Requested-With: XMLHttpRequest"),
    "route that always answers 401": head("/api/v1/items", HTML),
    "route that always redirects": head("/web/report", JSON),
    "route by host": head("/x", JSON, host="app.example"),
    "host with port": head("/x", HTML, host="127.0.0.1:8080"),
    "path to normalise": head("/a/./b/../c%2Fd//e", JSON),
    "no accept header": head("/"),
    "network rule": head("/office/plan", HTML),
    "untrusted forwarded headers": head(
        "/fwd", HTML, "X-Forwarded-Host: evil.example", "X-Forwarded-Proto: https",
        "X-Forwarded-For: 10.1.2.3", "X-Request-Id: chosen-by-client"),
}


@pytest.mark.parametrize("name", list(SAME_ANSWER))
async def test_answer_at_once_is_the_answer_of_handle(
    served: Served, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = SAME_ANSWER[name]
    caplog.set_level(logging.INFO, logger="gateway.audit")
    slow = await served.ask(data, split=True)  # also the store check a redirect needs
    assert served.answered == []
    fast = await served.ask(data)
    assert served.answered == [data.split(b" ")[1].decode()]
    assert slow.status in (302, 401)
    assert fast.normal() == slow.normal()
    assert fast.header("X-Request-Id") != slow.header("X-Request-Id")
    assert fast.header("X-Request-Id") != "chosen-by-client"
    # The same audit line, less its request id and duration.
    lines = [{k: v for k, v in vars(r).items() if k not in ("request_id", "duration_ms")}
             | {"message": r.getMessage()} for r in caplog.records if r.name == "gateway.audit"]
    assert len(lines) == 2
    keys = ("message", "method", "host", "path", "status", "route", "decision", "user",
            "auth", "client_ip", "reason", "rule")
    first, second = ({k: line[k] for k in keys} for line in lines)
    assert first == second


async def test_a_trusted_proxy_sets_origin_and_request_id_alike(oidc_provider: Any) -> None:
    async with serving(oidc_provider, trusted_proxies=["127.0.0.1/32"]) as served:
        data = head("/dash?tab=2", JSON, "X-Forwarded-Host: portal.example:8443",
                    "X-Forwarded-Proto: https", "X-Forwarded-For: 10.1.2.3",
                    "X-Request-Id: ingress-7f3a")
        slow = await served.ask(data, split=True)
        fast = await served.ask(data)
        assert served.answered == ["/dash?tab=2"]
        assert fast.normal() == slow.normal()
        assert fast.header("X-Request-Id") == slow.header("X-Request-Id") == "ingress-7f3a"
        assert b"https://portal.example:8443/oauth2/start?rd=%2Fdash%3Ftab%3D2" in fast.body


NOT_AT_ONCE = {
    "session cookie": (head("/page", HTML, "Cookie: _oidc_gateway=abc"), 302),
    "any cookie": (head("/page", JSON, "Cookie: theme=dark"), 401),
    "cookie, any case": (head("/page", JSON, "cOOKIE: theme=dark"), 401),
    "authorization, any case": (head("/page", JSON, "AUTHORIZATION: Bearer x"), 401),
    "authorization": (head("/page", JSON, "Authorization: Bearer x"), 401),
    "HEAD": (head("/page", JSON, method="HEAD"), 401),
    "POST": (head("/page", JSON, "Content-Length: 0", method="POST"), 401),
    "HTTP/1.0": (head("/page", JSON, version="1.0"), 401),
    "connection close": (head("/page", JSON, "Connection: close"), 401),
    "expect": (head("/page", JSON, "Expect: 100-continue"), 401),
    "upgrade": (head("/page", JSON, "Connection: Upgrade", "Upgrade: websocket"), 401),
    "own endpoint": (head("/ping"), 200),
    "prefix": (head("/oauth2/nothing", JSON), 404),
    "public route": (head("/public/x", JSON), 200),
    "optional route, anonymous": (head("/opt/x", JSON), 200),
    "two Host headers": (head("/page", JSON, "Host: other"), 400),
    "malformed host": (head("/x", JSON, host="bad host"), 400),
    "not ASCII": (head("/caf\u00e9", JSON), 400),  # aiohttp's parser refuses it
}


@pytest.mark.parametrize("name", list(NOT_AT_ONCE))
async def test_requests_the_plan_does_not_cover_go_to_handle(served: Served, name: str) -> None:
    data, status = NOT_AT_ONCE[name]
    answer = await served.ask(data)
    assert answer.status == status
    assert served.answered == []


async def test_pipelined_heads_are_answered_in_order_by_handle(served: Served) -> None:
    conn = await Conn.open(served.port)
    try:
        await conn.send(head("/public/first", JSON) + head("/second", JSON))
        first, second = await conn.answer(), await conn.answer()
    finally:
        conn.close()
    assert (first.status, first.body) == (200, b"slow")
    assert second.status == 401
    assert served.answered == []


async def test_pipelined_answers_of_handle_keep_their_order_to_the_last_that_closes(
    served: Served,
) -> None:
    """Whole answers of handle() on a kept connection go out at the end of the event-loop
    turn (app.TurnWriter); one that closes the connection goes out at once, but never ahead
    of those before it, and never lost to the close."""
    other = "Cookie: unrelated=1"  # not the gateway's cookie: handle() answers, no store I/O
    conn = await Conn.open(served.port)
    try:
        await conn.send(head("/one", JSON, other) + head("/two", JSON, other)
                        + head("/three", JSON, other, "Connection: close"))
        answers = [await conn.answer() for _ in range(3)]
        assert await conn.closed()
    finally:
        conn.close()
    assert [a.status for a in answers] == [401, 401, 401]
    assert [json.loads(a.body)["login_url"].rsplit("rd=", 1)[1] for a in answers] == [
        "%2Fone", "%2Ftwo", "%2Fthree"]
    assert served.answered == []


async def test_an_answer_never_overtakes_the_one_before(served: Served) -> None:
    conn = await Conn.open(served.port)
    try:
        await conn.send(head("/public/first", JSON))  # the upstream answers 200 ms later
        await asyncio.sleep(0.05)
        await conn.send(head("/second", JSON))
        first, second = await conn.answer(), await conn.answer()
        # Once the connection had data for aiohttp while a request was in progress, it stays
        # aiohttp's.
        await conn.send(head("/third", JSON))
        third = await conn.answer()
    finally:
        conn.close()
    assert (first.status, first.body, second.status, third.status) == (200, b"slow", 401, 401)
    assert served.answered == []


async def test_after_a_request_for_handle_the_next_is_answered_at_once(served: Served) -> None:
    conn = await Conn.open(served.port)
    try:
        for target in ("/first", "/ping", "/public/x", "/second"):
            await conn.send(head(target, JSON))
            await conn.answer()
    finally:
        conn.close()
    assert served.answered == ["/first", "/second"]


async def test_keep_alive_timeout_closes_a_connection_answered_at_once(
    oidc_provider: Any,
) -> None:
    async with serving(oidc_provider, keepalive_timeout="1s") as served:
        conn = await Conn.open(served.port)
        try:
            # Each answer starts the timeout again: 1.2 s of requests 0.6 s apart.
            for i in range(3):
                if i:
                    await asyncio.sleep(0.6)
                await conn.send(head(f"/x{i}", JSON))
                assert (await conn.answer()).status == 401
            assert served.answered == ["/x0", "/x1", "/x2"]
            started = asyncio.get_running_loop().time()
            assert await conn.closed()
            assert asyncio.get_running_loop().time() - started < 3
        finally:
            conn.close()


async def test_browser_redirect_waits_for_a_fresh_store_check(served: Served) -> None:
    # Without a store check within the last half second, a sign-in is not started at once:
    # handle() asks the store first (503 when it is down), then the next ones go at once.
    data = head("/page", HTML)
    assert (await served.ask(data)).status == 302
    assert served.answered == []
    assert (await served.ask(data)).status == 302
    assert served.answered == ["/page"]


def bare(target: str) -> RequestHead:
    return RequestHead("GET", target, [("Host", "127.0.0.1")], "127.0.0.1", False)


async def test_a_sign_in_after_a_pause_starts_at_once(served: Served) -> None:
    # The store check is renewed in the background while sign-ins come: after a pause longer
    # than the check's half second, the next sign-in still waits for no store round trip.
    data = head("/page", HTML)
    assert (await served.ask(data)).status == 302  # asks the store itself
    await asyncio.sleep(0.8)
    assert (await served.ask(data)).status == 302
    assert served.answered == ["/page"]


async def test_the_same_head_again_gets_the_same_401_with_its_own_request_id(
    served: Served,
) -> None:
    """Repeated 401s are joined from bytes framed once: each must still be handle()'s answer,
    with its own request id and its own log line."""
    data = head("/again", JSON)
    slow = await served.ask(data, split=True)
    fast = [await served.ask(data) for _ in range(3)]
    assert served.answered == ["/again"] * 3
    ids = {answer.header("X-Request-Id") for answer in [slow, *fast]}
    assert len(ids) == 4
    assert all(re.fullmatch(r"[0-9a-f]{16}", i or "") for i in ids)
    for answer in fast:
        assert answer.normal() == slow.normal()
        assert answer.headers[-1][0] == "Server"


async def test_plans_are_bounded(served: Served) -> None:
    for i in range(_PLAN_MEMO + 10):
        answer = served.live.answer_at_once(bare(f"/n/{i}"))
        assert answer is not None
        assert answer.status == 401
    assert 0 < len(served.live.current.gateway._plans) <= _PLAN_MEMO


def test_heads_read_once_are_the_heads_read_anew_and_the_memo_is_bounded() -> None:
    """Heads are read once per distinct bytes, address and scheme (the server's memo): the
    same bytes from another client or over TLS are that client's head; a head the parser
    refuses stays refused; past _HEAD_MEMO distinct heads the memo starts over."""
    memo: dict[tuple[bytes, str, bool], RequestHead | None] = {}
    data = b"GET /a?x=1 HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n\r\n"
    first = _HeadReader("10.0.0.1", False, memo).read(data)
    again = _HeadReader("10.0.0.1", False, memo).read(data)
    fresh = _HeadReader("10.0.0.1", False).read(data)
    assert first is again
    assert first == fresh
    assert first is not None
    assert (first.raw_path, first.items) == ("/a?x=1", [("Host", "gw"), ("Accept", "*/*")])
    other = _HeadReader("10.0.0.2", True, memo).read(data)
    assert other is not None
    assert (other.remote, other.secure) == ("10.0.0.2", True)
    assert (first.remote, first.secure) == ("10.0.0.1", False)
    closing = b"GET /a HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    assert _HeadReader("10.0.0.1", False, memo).read(closing) is None
    assert _HeadReader("10.0.0.1", False, memo).read(closing) is None
    # Found again by its bytes alone (the server's first look), for that client only.
    assert _HeadReader("10.0.0.1", False, memo).known(data) is first
    assert _HeadReader("10.0.0.3", False, memo).known(data) is None
    assert _HeadReader("10.0.0.1", False, memo).known(closing) is None
    reader = _HeadReader("10.0.0.1", False, memo)
    for i in range(_HEAD_MEMO + 10):
        assert reader.read(b"GET /n/%d HTTP/1.1\r\nHost: gw\r\n\r\n" % i) is not None
    assert 0 < len(memo) <= _HEAD_MEMO


async def test_a_reload_replaces_the_plans(served: Served) -> None:
    assert (await served.ask(head("/n/1", JSON))).status == 401
    assert served.answered == ["/n/1"]
    raw = copy.deepcopy(served.raw)
    raw["routes"][-1]["auth"] = "public"  # the catch-all route: no sign-in any more
    assert await served.live.reload(FixedSource(parse_config(raw, {})), trigger="test")
    assert served.live.answer_at_once(bare("/n/1")) is None
    assert (await served.ask(head("/n/1", JSON))).status == 200


# -- after a login: the page it returns to is decided before its request arrives -------------


def login_facts(served: Served, host: str = "127.0.0.1") -> RequestFacts:
    gateway = served.live.current.gateway
    return gateway._facts_of([("Host", host)], [host], "/oauth2/callback", secure=False,
                             remote="127.0.0.1", request_id="r1")


def signed_in(groups: list[str]) -> Session:
    identity = Identity(sub="s-alice", user="alice", email="alice@example.com",
                        claims={"groups": groups})
    return Session(identity, TokenSet("id", "at"), 0.0, 0.0, 3600.0, "https://op")


async def test_a_login_decides_the_page_it_returns_to_as_the_page_would(
    served: Served,
) -> None:
    gateway = served.live.current.gateway
    session = signed_in(["eng"])
    gateway._prepare_return(login_facts(served), "/office/plan?x=1", session)
    memo = gateway._memos[id(session.identity)]
    route = gateway.routes.match("127.0.0.1", "/office/plan", "GET")
    assert route is not None
    # What the page's own request computes (from a fresh memo, another identity object).
    fresh = signed_in(["eng"])
    expected = gateway._access(route, fresh.identity, "GET", "127.0.0.1")
    kept = memo[("access", "office", "GET", "127.0.0.1")]
    assert isinstance(kept, _KeptAccess)
    assert (kept.forward, kept.login_needed, kept.decision) == (
        expected.forward, expected.login_needed, expected.decision)
    assert not expected.forward  # the office route admits only 10.0.0.0/8: no headers planned
    assert ("headers", "office", None) not in memo

    gateway._prepare_return(login_facts(served), "/page", session)
    assert ("access", "app", "GET", "127.0.0.1") in memo
    headers = memo[("headers", "app", None)]
    assert isinstance(headers, tuple)
    assert ("X-Forwarded-User", "alice") in headers
    app = gateway.routes.match("127.0.0.1", "/page", "GET")
    assert app is not None
    assert list(headers) == gateway._planned_headers("r2", app, fresh.identity, None)


@pytest.mark.parametrize("target", ["/public/x", "http://app.example/x", "/oauth2/start"])
async def test_a_login_returning_elsewhere_decides_nothing_ahead(
    served: Served, target: str
) -> None:
    gateway = served.live.current.gateway
    session = signed_in(["eng"])
    gateway._prepare_return(login_facts(served), target, session)
    assert id(session.identity) not in gateway._memos


async def test_a_client_that_reads_no_answers_is_not_answered_into_memory(
    served: Served,
) -> None:
    # 40,000 requests (17 MB of answers) sent without reading a byte back: once the answers
    # back up, the gateway takes no more requests until they are read, so its unsent answers
    # stay bounded (they used to pile up in memory, as much as the client sent for).
    _, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    batch = head("/flood", JSON) * 100
    largest = 0
    try:
        for _ in range(400):
            writer.write(batch)
        for _ in range(150):  # 3 s of the gateway working through them
            await asyncio.sleep(0.02)
            manager = served.site._manager
            for handler in manager.connections if manager is not None else []:
                if handler.transport is not None:
                    largest = max(largest, handler.transport.get_write_buffer_size())
    finally:
        writer.transport.abort()
    assert 0 < largest < 1024 * 1024
