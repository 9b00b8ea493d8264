"""Identity header spoofing: whatever a client sends, the upstream sees only the gateway's word.

Every identity header in every spelling (case, ``_`` for ``-``, repeated), other gateways'
identity headers and method overrides, on protected routes, public routes and CORS
preflights; ``Connection`` naming the very headers the gateway sets; ``X-Forwarded-*`` and
forward-auth headers from a peer that is not a trusted proxy, including their effect on the
redirect URI sent to the provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio

from tests.integration.attacks_common import (
    HTML_ACCEPT,
    World,
    canonical_names,
    cookie_value,
    echoed_headers,
    gateway_world,
    new_browser,
    raw_exchange,
    register_at,
    request_bytes,
)
from tests.support.login import browser_login

pytestmark = [pytest.mark.provider, pytest.mark.asyncio(loop_scope="module")]

OURS = ("User", "Email", "Groups", "Preferred-Username", "Access-Token")


def spellings(suffix: str) -> list[str]:
    """``X-Forwarded-<suffix>`` as clients can write it and WSGI/PHP would still read it."""
    base = f"X-Forwarded-{suffix}"
    return [base, base.lower(), base.upper(), base.replace("-", "_"), base.lower().replace(
        "-", "_"), "X_Forwarded-" + suffix, base.swapcase()]


SPOOFED = [f"{name}: root" for suffix in OURS for name in spellings(suffix)]
SPOOFED += [f"X-Forwarded-{suffix}: admins" for suffix in OURS]  # the same header again
OTHERS = ["Remote-User", "Remote_User", "Remote-Email", "Remote-Groups", "Remote-Name",
          "X-Remote-User", "X-WebAuth-User", "X-Auth-Request-User", "X-Auth-Request-Email",
          "X-Auth-Request-Groups", "X-Auth-Request-Access-Token", "x_auth_request_user"]
SPOOFED += [f"{name}: root" for name in OTHERS]
OVERRIDES = ["X-HTTP-Method-Override: DELETE", "X-HTTP-Method: DELETE",
             "X-Method-Override: DELETE", "x_http_method_override: DELETE"]
SPOOFED += OVERRIDES

IDENTITY = {f"x-forwarded-{s.lower()}" for s in OURS}
FORBIDDEN = {n.lower().replace("_", "-") for n in OTHERS} | {
    "x-http-method-override", "x-http-method", "x-method-override"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    async with gateway_world(tmp_path_factory.mktemp("headers"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider)) as w:
        yield w


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alice_cookie(world: World) -> str:
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{world.url}/")).status == 200
        value = cookie_value(browser, "_oidc_gateway")
    assert value
    return f"_oidc_gateway={value}"


def _identity_values(record: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in echoed_headers(record):
        key = name.lower().replace("_", "-")
        if key in IDENTITY:
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize(
    ("method", "path", "signed_in"),
    [
        ("GET", "/app/page", True),
        ("POST", "/app/form", True),
        ("GET", "/public/page", False),
        ("GET", "/public/page", True),  # a session never leaks identity onto public routes
        ("OPTIONS", "/public/api", False),  # CORS preflight on a public route
        ("DELETE", "/public/api", False),
    ],
    ids=["protected-get", "protected-post", "public", "public-signed-in", "preflight",
         "public-delete"],
)
async def test_spoofed_identity_headers_never_reach_the_upstream(
    world: World, alice_cookie: str, method: str, path: str, signed_in: bool
) -> None:
    mark = world.mark()
    headers = ["Host: gw.test", *SPOOFED, "Connection: close", "Content-Length: 0"]
    if method == "OPTIONS":
        headers += ["Origin: https://evil.test", "Access-Control-Request-Method: DELETE",
                    "Access-Control-Request-Headers: x-forwarded-user"]
    if signed_in:
        headers.append(f"Cookie: {alice_cookie}")
    answer = await raw_exchange(world.port, request_bytes(method, path, headers))
    assert answer.status == 200, answer.raw[:300]
    [seen] = world.seen_since(mark)
    names = canonical_names(seen)
    assert not FORBIDDEN & set(names)
    values = _identity_values(seen)
    if path.startswith("/public/"):
        assert values == {}  # public routes get no identity headers at all
    else:
        # Exactly one of each, and it is the gateway's.
        assert values == {"x-forwarded-user": ["alice"],
                          "x-forwarded-email": ["alice@example.com"],
                          "x-forwarded-groups": ["eng,admins"],
                          "x-forwarded-preferred-username": ["alice"]}
    assert "root" not in [v for _, v in echoed_headers(seen)]


async def test_spoofed_headers_on_a_protected_preflight_reach_nothing(world: World) -> None:
    """A preflight carries no cookie: on a protected route it is refused (401) before
    anything is forwarded, spoofed headers or not."""
    mark = world.mark()
    headers = ["Host: gw.test", *SPOOFED, "Origin: https://evil.test",
               "Access-Control-Request-Method: POST", "Connection: close"]
    answer = await raw_exchange(world.port, request_bytes("OPTIONS", "/app/api", headers))
    assert answer.status == 401
    assert world.seen_since(mark) == []


@pytest.mark.parametrize(
    "connection",
    [
        ["Connection: X-Forwarded-User"],
        ["Connection: x_forwarded_user, X-Forwarded-Groups, X-Forwarded-Email"],
        ["Connection: close, X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto"],
        ["Connection: keep-alive", "Connection: X-Forwarded-User, Host"],
        ["Connection: X-Forwarded-Preferred-Username,,  ,X-FORWARDED-USER"],
    ],
    ids=["user", "underscore-and-list", "forwarding", "two-connection-headers", "odd-list"],
)
async def test_connection_cannot_strip_what_the_gateway_sets(
    world: World, alice_cookie: str, connection: list[str]
) -> None:
    """``Connection`` removes hop-by-hop headers the *client* sent; it must never remove
    (or let the client replace) the identity and forwarding headers the gateway adds."""
    mark = world.mark()
    headers = ["Host: gw.test", f"Cookie: {alice_cookie}", *connection,
               "X-Forwarded-For: 6.6.6.6", "X-Hop: drop-me", "Connection: X-Hop"]
    if not any("close" in c for c in connection):
        headers.append("Connection: close")
    answer = await raw_exchange(world.port, request_bytes("GET", "/app/x", headers))
    assert answer.status == 200
    [seen] = world.seen_since(mark)
    got = {k.lower(): v for k, v in echoed_headers(seen)}
    assert got["x-forwarded-user"] == "alice"
    assert got["x-forwarded-groups"] == "eng,admins"
    assert got["x-forwarded-email"] == "alice@example.com"
    assert got["x-forwarded-preferred-username"] == "alice"
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert got["x-forwarded-host"] == "gw.test"
    assert got["x-forwarded-proto"] == "http"
    assert got["host"] == "gw.test"
    assert "x-hop" not in got  # a header the client named in Connection is hop-by-hop
    assert "connection" not in got


SPOOFED_FORWARDING = [
    "X-Forwarded-For: 6.6.6.6, 10.0.0.1",
    "X-Forwarded-Host: evil.test",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Port: 443",
    "X-Forwarded-Uri: /admin",
    "X-Original-URI: /admin",
    "X-Original-URL: /admin",
    "X-Real-IP: 6.6.6.6",
    "Forwarded: for=6.6.6.6;host=evil.test;proto=https",
    "X_Forwarded_Host: evil.test",
]


async def test_forwarding_headers_from_an_untrusted_peer_are_replaced(
    world: World, alice_cookie: str
) -> None:
    for path, cookie in (("/public/x", None), ("/app/x", alice_cookie)):
        mark = world.mark()
        headers = ["Host: gw.test", *SPOOFED_FORWARDING, "Connection: close"]
        if cookie:
            headers.append(f"Cookie: {cookie}")
        answer = await raw_exchange(world.port, request_bytes("GET", path, headers))
        assert answer.status == 200
        [seen] = world.seen_since(mark)
        pairs = [(k.lower().replace("_", "-"), v) for k, v in echoed_headers(seen)]
        got = dict(pairs)
        assert [k for k, _ in pairs].count("x-forwarded-host") == 1
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-host"] == "gw.test"
        assert got["x-forwarded-proto"] == "http"
        for name in ("x-forwarded-port", "x-forwarded-uri", "x-original-uri", "x-real-ip",
                     "forwarded"):
            assert name not in got, name
        # X-Original-URL is not one the gateway knows; it passes, but the path is the real one.
        assert seen["raw_path"] == path


async def test_a_head_sent_again_reaches_the_upstream_alike_but_for_its_request_id(
    world: World, alice_cookie: str
) -> None:
    """The gateway keeps what a head settles (facts, route, cleaned headers) for the same
    bytes sent again: each time the upstream must get the same cleaned headers, the
    gateway's identity headers once, and that request's own id; spoofed values never."""
    headers = ["Host: gw.test", *SPOOFED, *SPOOFED_FORWARDING, "X-Request-Id: mine",
               "X-Hop: drop-me", "Connection: X-Hop", f"Cookie: {alice_cookie}; theme=dark",
               "Connection: close"]
    data = request_bytes("GET", "/app/again?q=1", headers)
    seen_headers, ids = [], []
    for _ in range(3):
        mark = world.mark()
        answer = await raw_exchange(world.port, data)
        assert answer.status == 200
        [seen] = world.seen_since(mark)
        assert seen["raw_path"] == "/app/again?q=1"
        pairs = echoed_headers(seen)
        got = {k.lower(): v for k, v in pairs}
        assert got["x-request-id"] == answer.header("X-Request-Id")
        ids.append(got["x-request-id"])
        seen_headers.append([(k, v) for k, v in pairs if k.lower() != "x-request-id"])
        assert _identity_values(seen) == {"x-forwarded-user": ["alice"],
                                          "x-forwarded-email": ["alice@example.com"],
                                          "x-forwarded-groups": ["eng,admins"],
                                          "x-forwarded-preferred-username": ["alice"]}
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["cookie"] == "theme=dark"  # the session cookie stays with the gateway
        assert "x-hop" not in got
        assert "root" not in [v for _, v in pairs]
    assert len(set(ids)) == 3
    assert "mine" not in ids
    assert seen_headers[0] == seen_headers[1] == seen_headers[2]


def _redirect_uri(location: str) -> str:
    return parse_qs(urlsplit(location).query)["redirect_uri"][0]


async def test_redirect_uri_ignores_x_forwarded_host_from_an_untrusted_peer(
    world: World, oidc_provider: Any
) -> None:
    """``public_url`` is unset, so the gateway builds the redirect URI from the request: from
    ``Host`` only, never from X-Forwarded-Host/-Proto sent by a peer it does not trust."""
    spoof = {"X-Forwarded-Host": "evil.test", "X-Forwarded-Proto": "https",
             "X_Forwarded_Host": "evil.test", "Forwarded": "host=evil.test;proto=https"}
    own = f"{world.url}/oauth2/callback"
    async with new_browser() as browser:
        for url, accept in ((f"{world.url}/private", HTML_ACCEPT),
                            (f"{world.url}/oauth2/start?rd=%2Fx", "*/*")):
            async with browser.get(url, headers={**spoof, "Accept": accept},
                                   allow_redirects=False) as r:
                assert r.status == 302
                assert _redirect_uri(r.headers["Location"]) == own
        async with browser.get(f"{world.url}/api", headers=spoof) as r:
            assert r.status == 401
            assert (await r.json())["login_url"].startswith(f"{world.url}/oauth2/start?")
        # A whole login with the spoofed headers on every request completes on our origin
        # (the provider would refuse a redirect URI it does not know, and so would we).
        result = await browser_login(browser, f"{world.url}/landing", headers=spoof)
        assert result.status == 200
        assert result.url == f"{world.url}/landing"
        assert _redirect_uri(result.trace[1][1]) == own


async def test_x_forwarded_host_is_believed_from_a_trusted_proxy(
    oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The control for the test above: the same header from a trusted peer is used."""
    async with gateway_world(
        tmp_path_factory.mktemp("trusted"), issuer=oidc_provider.issuer,
        client=lambda port: ("unregistered", "unused"),
        server={"trusted_proxies": ["127.0.0.1/32"]},
    ) as trusted, new_browser() as browser:
        headers = {"X-Forwarded-Host": "apps.example:8443", "X-Forwarded-Proto": "https",
                   "Accept": HTML_ACCEPT}
        async with browser.get(f"{trusted.url}/private", headers=headers,
                               allow_redirects=False) as r:
            assert r.status == 302
            assert _redirect_uri(r.headers["Location"]) == (
                "https://apps.example:8443/oauth2/callback")
