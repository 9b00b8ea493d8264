"""The gateway's cookies: how they are set, and what a forged, broken or foreign one gets.

With ``cookie.secure`` (the default) and no ``cookie.domain`` both cookies carry the
``__Host-`` prefix, so browsers take them only from this host over https with ``Path=/`` and
no ``Domain``: a sibling subdomain cannot plant a session (fixation) or a login binding (login
CSRF). Every cookie is ``HttpOnly`` and ``SameSite=Lax``. A cookie that is tampered with,
truncated, oversized, garbage, or sealed by another gateway's key is simply no session: a
401 or a login, never a 500, never a pass.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.integration.attacks_common import (
    HTML_ACCEPT,
    World,
    cookie_value,
    gateway_world,
    new_browser,
    register_at,
)
from tests.support.gateway_proc import new_session_key
from tests.support.login import browser_login
from tests.support.peers import delete_prefix

pytestmark = [pytest.mark.provider, pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

HOST_COOKIE = "__Host-_oidc_gateway"
PLAIN_COOKIE = "_oidc_gateway"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[World]:
    """A gateway with the default cookie settings (secure, no domain)."""
    async with gateway_world(tmp_path_factory.mktemp("secure"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider),
                             session={"cookie": {}}) as w:
        yield w


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def redis_prefix(peer_info: Any) -> AsyncIterator[tuple[str, str]]:
    prefix = f"test:attacks-cookies:{uuid.uuid4().hex[:12]}:"
    try:
        yield f"redis://127.0.0.1:{peer_info.redis_port}/0", prefix
    finally:
        delete_prefix(peer_info.redis_port, prefix)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory,
                redis_prefix: tuple[str, str]) -> AsyncIterator[World]:
    """Plain-http cookies (secure: false), sessions in the shared Redis."""
    url, prefix = redis_prefix
    async with gateway_world(tmp_path_factory.mktemp("plain"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider), store="redis", redis_url=url,
                             key_prefix=prefix) as w:
        yield w


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain_ticket(plain: World) -> str:
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{plain.url}/")).status == 200
        value = cookie_value(browser, PLAIN_COOKIE)
    assert value
    return value


def set_cookies(headers: Any) -> dict[str, str]:
    """Set-Cookie headers by cookie name (the whole header line as value)."""
    return {v.split("=", 1)[0]: v for v in headers.getall("Set-Cookie", [])}


def attributes(line: str) -> dict[str, str]:
    out = {}
    for part in line.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        out[name.lower()] = value
    return out


async def get_as(world: World, cookie_header: str | None, path: str = "/whoami",
                 accept: str = "application/json") -> tuple[int, dict[str, str] | None]:
    headers = {"Accept": accept}
    if cookie_header is not None:
        headers["Cookie"] = cookie_header
    async with aiohttp.ClientSession() as client, client.get(
        f"{world.url}{path}", headers=headers, allow_redirects=False
    ) as r:
        if r.status != 200:
            return r.status, None
        return r.status, {k.lower(): v for k, v in (await r.json())["headers"]}


async def test_secure_cookies_are_host_prefixed_http_only_lax_and_host_only(
    secure: World
) -> None:
    async with new_browser(secure.url) as browser:
        result = await browser_login(browser, f"{secure.url}/page", stop_before_callback=True)
        assert result.callback_url
        async with browser.get(URL(result.callback_url, encoded=True),
                               headers={"Accept": HTML_ACCEPT}, allow_redirects=False) as r:
            assert r.status == 302
            session_line = set_cookies(r.headers)[HOST_COOKIE]
        async with browser.get(f"{secure.url}/oauth2/start", allow_redirects=False) as r:
            binding_line = set_cookies(r.headers)[f"{HOST_COOKIE}_login"]
        ticket = cookie_value(browser, HOST_COOKIE)
        assert ticket
        for line in (session_line, binding_line):
            attrs = attributes(line)
            assert "secure" in attrs
            assert "httponly" in attrs
            assert attrs["path"] == "/"
            assert attrs["samesite"] == "Lax"
            assert "domain" not in attrs
        # Only the prefixed name is a session; the upstream sees neither, and other
        # cookies pass untouched.
        status, seen = await get_as(secure, f"theme=dark; {HOST_COOKIE}={ticket}; lang=en")
        assert status == 200
        assert seen is not None
        assert seen["cookie"] == "theme=dark; lang=en"
        assert seen["x-forwarded-user"] == "alice"
        status, _ = await get_as(secure, f"{PLAIN_COOKIE}={ticket}")
        assert status == 401
        status, seen = await get_as(secure, f"{PLAIN_COOKIE}={ticket}; x=1", path="/public/p")
        assert seen is not None
        assert seen["cookie"] == "x=1"  # a stray un-prefixed ticket never leaks either
        # Sign-out deletes it with the attributes a browser needs to accept the deletion.
        async with browser.get(f"{secure.url}/oauth2/sign_out", allow_redirects=False) as r:
            attrs = attributes(set_cookies(r.headers)[HOST_COOKIE])
        assert attrs["max-age"] == "0"
        assert "secure" in attrs
        assert attrs["path"] == "/"
        assert (await get_as(secure, f"{HOST_COOKIE}={ticket}"))[0] == 401


async def test_without_secure_or_with_a_domain_the_name_is_kept(
    plain: World, oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{plain.url}/oauth2/start", allow_redirects=False) as r:
            attrs = attributes(set_cookies(r.headers)[f"{PLAIN_COOKIE}_login"])
        assert "secure" not in attrs
        assert "domain" not in attrs
        async with gateway_world(
            tmp_path_factory.mktemp("domain"), issuer=oidc_provider.issuer,
            client=lambda port: ("unregistered", "unused"),
            session={"cookie": {"secure": True, "domain": "gw.test"}},
        ) as shared:
            async with client.get(f"{shared.url}/oauth2/start", allow_redirects=False,
                                  headers={"Host": "app.gw.test"}) as r:
                attrs = attributes(set_cookies(r.headers)[f"{PLAIN_COOKIE}_login"])
            # Reached as 127.0.0.1, outside the cookie domain: a login could never come back.
            async with client.get(f"{shared.url}/oauth2/start", allow_redirects=False) as r:
                assert r.status == 500
                assert "Set-Cookie" not in r.headers
        assert attrs["domain"] == "gw.test"
        assert "secure" in attrs


@pytest.mark.parametrize(
    ("cookie", "problem"),
    [
        ({"name": "__Host-sso", "secure": False}, "session.cookie.name"),
        ({"name": "__Secure-sso", "secure": False}, "session.cookie.name"),
        ({"name": "__Host-sso", "domain": "example.com"}, "session.cookie.domain"),
        ({"name": "__Host-sso"}, None),
        ({"name": "__Secure-sso", "domain": "example.com"}, None),
    ],
)
async def test_cookie_prefix_contradictions_are_config_errors(
    cookie: dict[str, Any], problem: str | None
) -> None:
    data = {"version": 1,
            "provider": {"issuer": "https://idp.example", "client_id": "c", "client_secret": "s"},
            "session": {"keys": [new_session_key()], "cookie": cookie},
            "routes": [{"name": "r", "upstream": "http://127.0.0.1:1"}]}
    if problem is None:
        config = parse_config(data, {})
        assert config.session.cookie.effective_name == cookie["name"]  # never prefixed twice
        return
    with pytest.raises(ConfigError) as info:
        parse_config(data, {})
    assert [p.path for p in info.value.problems] == [problem]


def _flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1:]


def bad_cookies(ticket: str) -> dict[str, str]:
    session_id, secret = ticket.split(".")
    return {
        "truncated": ticket[:-1],
        "truncated-id": ticket[1:],
        "secret-flipped": _flip(ticket, len(ticket) - 5),
        "id-flipped": _flip(ticket, 3),
        "secret-only": secret,
        "id-only": session_id,
        "extra-dot": f"{ticket}.x",
        "padded": ticket + "==",
        "empty": "",
        "garbage": "%00%0d%0a<script>",
        "non-ascii": "séssion\u2028",
        "long-4k": "A" * 4000,
        "other-secret": f"{session_id}.{'B' * 43}",
    }


@pytest.mark.parametrize("variant", list(bad_cookies("a" * 22 + "." + "b" * 43)))
@pytest.mark.parametrize("accept", ["application/json", HTML_ACCEPT])
async def test_bad_cookies_are_no_session_never_a_500(
    plain: World, plain_ticket: str, variant: str, accept: str
) -> None:
    value = bad_cookies(plain_ticket)[variant]
    mark = plain.mark()
    status, _ = await get_as(plain, f"{PLAIN_COOKIE}={value}", accept=accept)
    assert status == (401 if accept == "application/json" else 302)
    assert plain.seen_since(mark) == []


async def test_cookie_edge_cases_never_crash(plain: World, plain_ticket: str) -> None:
    good = f"{PLAIN_COOKIE}={plain_ticket}"
    assert (await get_as(plain, good))[0] == 200  # the control
    # Two session cookies (one planted): whichever is read, never a 500 and never a pass for
    # the garbage one.
    for header in (f"{PLAIN_COOKIE}=garbage; {good}", f"{good}; {PLAIN_COOKIE}=garbage"):
        status, seen = await get_as(plain, header)
        assert status in (200, 401)
        if seen is not None:
            assert seen["x-forwarded-user"] == "alice"
    # A cookie header far beyond max_header_bytes: 431 from the gateway, not a crash.
    status, _ = await get_as(plain, f"{PLAIN_COOKIE}={'A' * 40000}")
    assert status == 431


async def test_a_ticket_sealed_by_another_gateways_key_opens_nothing(
    plain: World, plain_ticket: str, oidc_provider: Any, redis_prefix: tuple[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Same Redis, same key prefix, another session key: the stored session is there, but
    it does not open, and the other gateway treats the request as signed out."""
    url, prefix = redis_prefix
    async with gateway_world(
        tmp_path_factory.mktemp("foreign"), issuer=oidc_provider.issuer,
        client=register_at(oidc_provider), store="redis", redis_url=url, key_prefix=prefix,
        session_key=new_session_key(),
    ) as foreign:
        mark = foreign.mark()
        assert (await get_as(foreign, f"{PLAIN_COOKIE}={plain_ticket}"))[0] == 401
        assert (await get_as(foreign, f"{PLAIN_COOKIE}={plain_ticket}",
                             accept=HTML_ACCEPT))[0] == 302
        assert foreign.seen_since(mark) == []
    assert (await get_as(plain, f"{PLAIN_COOKIE}={plain_ticket}"))[0] == 200  # still good


@pytest.mark.parametrize(
    "binding",
    ["", "A", "A" * 43, "A" * 5000, "%00", "\u00e9t\u00e9", "other-browser"],
    ids=["empty", "short", "wrong", "long", "nul", "non-ascii", "other-browser"],
)
async def test_a_broken_login_binding_fails_the_callback_cleanly(
    plain: World, binding: str
) -> None:
    async with new_browser() as browser, new_browser() as other:
        result = await browser_login(browser, f"{plain.url}/x", stop_before_callback=True)
        assert result.callback_url
        if binding == "other-browser":
            await browser_login(other, f"{plain.url}/y", stop_before_callback=True)
            binding = cookie_value(other, f"{PLAIN_COOKIE}_login") or ""
        headers = {"Accept": HTML_ACCEPT, "Cookie": f"{PLAIN_COOKIE}_login={binding}"}
        async with aiohttp.ClientSession() as client, client.get(
            URL(result.callback_url, encoded=True), headers=headers, allow_redirects=False
        ) as r:
            assert r.status == 400
            assert "another browser" in await r.text()
            assert PLAIN_COOKIE not in set_cookies(r.headers)
