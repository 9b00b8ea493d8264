"""Open redirects: ``rd`` (start and sign-out) and the target saved at login.

Only paths on the gateway's own origin and http(s) URLs on hosts a route names are accepted;
everything else is a 400 before any redirect. Where the browser lands is judged with ada (the
WHATWG URL parser Node.js uses: it drops tabs and newlines, reads ``\\`` as ``/``, takes
``https:evil`` as ``https://evil/``), not with urllib's more forgiving reading.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from ada_url import URL

from tests.integration.attacks_common import (
    HTML_ACCEPT,
    World,
    default_routes,
    gateway_world,
    new_browser,
    register_at,
)
from tests.support.login import browser_login

pytestmark = [pytest.mark.provider, pytest.mark.asyncio(loop_scope="module")]

ALLOWED = ("apps.example", "x.corp.example")


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "apps", "match": {"host": "apps.example", "path": "/"}, "upstream": upstream},
        {"name": "corp", "match": {"host": "*.corp.example", "path": "/"}, "upstream": upstream},
        *default_routes(upstream),
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    async with gateway_world(tmp_path_factory.mktemp("redirects"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider), routes=routes) as w:
        yield w


def lands_on(location: str, base: str) -> str:
    """The host a browser on ``base`` goes to when told ``Location: location``."""
    return URL(location, base).hostname


BAD = [
    "//evil.test", "///evil.test", "////evil.test/x", "/\\evil.test", "\\\\evil.test",
    "\\/evil.test", "/%5Cevil.test", "/%5cevil.test", "/%2F%2Fevil.test", "/%2f/evil.test",
    "%2F%2Fevil.test", "/\t/evil.test", "/\n/evil.test", "/\r\n/evil.test", "\t//evil.test",
    " //evil.test", "/ /evil.test", "/%09/evil.test", "/%0d%0aSet-Cookie:%20x=1",
    "https:evil.test", "https:/evil.test", "https:\\\\evil.test", "http:/\\/evil.test",
    "https://apps.example@evil.test", "https://apps.example:443@evil.test",
    "https://user:pw@apps.example/", "https://evil.test\\@apps.example",
    "https://evil.test", "https://evil.test/https://apps.example",
    "https://apps.example.evil.test", "https://evilapps.example", "https://corp.example/",
    "https://evil.test#@apps.example", "https://evil.test?@apps.example",
    "https://evil.test%2f.apps.example", "https://evil.test\uff0f.apps.example",
    "https://\uff45vil.test", "https://apps.example\u3002evil.test",
    "https://apps.example\uff0f@evil.test", "http://127.0.0.1:1/", "http://[::1]/",
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", "javascript://apps.example/%0aalert(1)",
    "data:text/html,<script>alert(1)</script>", "vbscript:msgbox(1)", "file:///etc/passwd",
    "ftp://apps.example/", "ws://apps.example/", "//apps.example@evil.test",
    "evil.test", "evil.test/x", "@evil.test", ".evil.test",
]


@pytest.mark.parametrize("rd", BAD)
@pytest.mark.parametrize("endpoint", ["start", "sign_out"])
async def test_unsafe_redirect_targets_are_400(world: World, endpoint: str, rd: str) -> None:
    async with new_browser() as browser, browser.get(
        f"{world.url}/oauth2/{endpoint}?rd={quote(rd, safe='')}",
        headers={"Accept": HTML_ACCEPT}, allow_redirects=False,
    ) as r:
        assert r.status == 400
        assert "Location" not in r.headers
        assert r.headers["Cache-Control"] == "no-store"


GOOD = [
    ("/", "127.0.0.1"),
    ("/after?x=1&next=//evil.test", "127.0.0.1"),
    ("/@evil.test", "127.0.0.1"),
    ("/.//evil.test", "127.0.0.1"),  # browsers resolve it to the path "//evil.test" here
    ("/%2e%2e/%2e%2e//evil.test", "127.0.0.1"),
    ("/\uff0fevil.test", "127.0.0.1"),  # fullwidth solidus: a path character, not a slash
    ("/\u2044evil.test", "127.0.0.1"),  # fraction slash
    ("/\u2215evil.test", "127.0.0.1"),  # division slash
    ("https://apps.example/x?y=1", "apps.example"),
    ("HTTPS://APPS.EXAMPLE/", "apps.example"),
    ("http://x.corp.example:8443/p", "x.corp.example"),
    ("https://a.b.corp.example/", "a.b.corp.example"),
]


@pytest.mark.parametrize(("rd", "host"), GOOD)
async def test_accepted_redirect_targets_land_on_the_gateway_or_a_configured_host(
    world: World, rd: str, host: str
) -> None:
    """Sign-out without a session redirects straight to ``rd``: what is accepted is returned
    unchanged, and a browser following it stays on this gateway or a configured host."""
    base = f"{world.url}/oauth2/sign_out"
    async with new_browser() as browser, browser.get(
        f"{base}?rd={quote(rd, safe='')}", allow_redirects=False
    ) as r:
        assert r.status == 302
        location = r.headers["Location"]
    assert location == rd
    assert lands_on(location, base) == host
    if host == "127.0.0.1":
        assert URL(location, base).port == str(world.port)


async def _callback_location(world: World, browser: aiohttp.ClientSession, start: str
                             ) -> str:
    """Sign in from ``start`` and return where the gateway's callback sends the browser."""
    result = await browser_login(browser, start, stop_before_callback=True)
    assert result.callback_url, result.trace
    async with browser.get(result.callback_url, headers={"Accept": HTML_ACCEPT},
                           allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        assert r.headers["Cache-Control"] == "no-store"
        return r.headers["Location"]


@pytest.mark.parametrize(
    ("rd", "expected"),
    [("/after?x=1", "/after?x=1"), ("https://apps.example/x", "https://apps.example/x"),
     ("https://a.corp.example/y", "https://a.corp.example/y"), ("//evil.test", None)],
)
async def test_rd_is_where_the_login_returns(world: World, rd: str, expected: str | None
                                              ) -> None:
    async with new_browser() as browser:
        start = f"{world.url}/oauth2/start?rd={quote(rd, safe='')}"
        if expected is None:
            async with browser.get(start, allow_redirects=False) as r:
                assert r.status == 400
            return
        assert await _callback_location(world, browser, start) == expected


@pytest.mark.parametrize(
    ("path", "saved"),
    [
        ("//evil.test/x", "/evil.test/x"),
        ("/%2F%2Fevil.test", "/evil.test"),
        ("/.//evil.test", "/evil.test"),
        ("/x/..//evil.test?a=b", "/evil.test?a=b"),
        ("/x?rd=//evil.test", "/x?rd=//evil.test"),
    ],
)
async def test_the_saved_target_is_a_path_on_this_gateway(
    world: World, path: str, saved: str
) -> None:
    """A protected page asked for with a host-like path returns, after login, to that page
    on this gateway (normalised), never to another host."""
    async with new_browser() as browser:
        location = await _callback_location(world, browser, f"{world.url}{path}")
    assert location == saved
    assert lands_on(location, f"{world.url}/oauth2/callback") == "127.0.0.1"
    assert urlsplit(location).netloc == ""
