"""Front-Channel Logout 1.0 at ``/oauth2/frontchannel_logout``, two real gateways sharing Redis.

The provider's logout page would load ``?iss=…&sid=…`` in an iframe, cross-site, so the
browser sends no session cookie (``SameSite=Lax``): the test calls the URL the way that iframe
does, without a cookie, with the ``sid`` the real oidc-provider put in its ID token. (The test
OP, oidc-provider 9, has no front-channel logout page of its own: the feature left it in v8.)

The ``sid`` is read from the ``id_token_hint`` the gateway sends to the provider's
``end_session_endpoint`` when a spare session of the same provider session signs out: the
provider's own ID token, verified with its JWKS.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from joserfc import jwt
from joserfc.jwk import KeySet

from gateway.endpoints import _csp_origin
from tests.support.gateway_proc import (
    GatewayProcess,
    free_port,
    gateway_config,
    new_session_key,
    start_gateway,
)
from tests.support.login import BROWSER_ACCEPT, browser_login, new_browser
from tests.support.upstream import running_upstream

JSON = {"Accept": "application/json"}
COOKIE = "_oidc_gateway"
# What a browser sends when the provider's logout page (another site) loads the URL in an
# iframe: Fetch Metadata, the page as Referer, and no cookie of ours (SameSite=Lax).
IFRAME_HEADERS = {"Accept": BROWSER_ACCEPT, "Sec-Fetch-Site": "cross-site",
                  "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}


@dataclass
class World:
    a: GatewayProcess
    b: GatewayProcess
    op: Any
    redis: aioredis.Redis
    prefix: str

    def logs(self) -> str:
        return self.a.logs() + self.b.logs()

    def frontchannel(self, gw: GatewayProcess, query: list[tuple[str, str]]) -> str:
        return f"{gw.url}/oauth2/frontchannel_logout?{urlencode(query)}"


@pytest.fixture
async def world(oidc_provider: Any, redis_target: Any, tmp_path: Path) -> AsyncIterator[World]:
    port_a, port_b = free_port(), free_port()
    client_id, secret = oidc_provider.register_client(
        [f"http://127.0.0.1:{p}/oauth2/callback" for p in (port_a, port_b)],
        # The provider puts `sid` in its ID tokens only for clients registered for
        # session-aware logout (oidc-provider: backchannel_logout_session_required; a provider
        # with front-channel logout: frontchannel_logout_session_required). Nothing in these
        # tests ends the provider's session, so it never calls this URI.
        backchannel_logout_uri=f"http://127.0.0.1:{port_a}/oauth2/backchannel_logout",
        backchannel_logout_session_required=True,
    )
    key = new_session_key()
    gateways: list[GatewayProcess] = []
    client = aioredis.Redis.from_url(redis_target.url, socket_timeout=2.0)
    try:
        async with running_upstream() as upstream:
            for port in (port_a, port_b):
                config = gateway_config(
                    port=port, issuer=oidc_provider.issuer, client_id=client_id,
                    client_secret=secret, upstream=upstream.url, store="redis",
                    redis_url=redis_target.url, key_prefix=redis_target.prefix,
                    session_key=key,
                )
                gateways.append(await start_gateway(config, directory=tmp_path))
            yield World(gateways[0], gateways[1], oidc_provider, client, redis_target.prefix)
    finally:
        for gw in gateways:
            gw.stop()
        await client.aclose()


def cookie_of(browser: aiohttp.ClientSession) -> str:
    return f"{COOKIE}=" + next(c.value for c in browser.cookie_jar if c.key == COOKIE)


async def log_in(browser: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    """Sign in on ``gw`` (reusing the browser's provider session) and return the new session
    cookie; the previous gateway cookie is dropped first, as a browser keeps one per host."""
    browser.cookie_jar.clear(lambda c: c.key == COOKIE)
    result = await browser_login(browser, f"{gw.url}/")
    assert result.status == 200, result.trace
    return cookie_of(browser)


async def status_of(url: str, cookie: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
        url, headers={**JSON, "Cookie": cookie}
    ) as r:
        return r.status


async def provider_sid(world: World, gw: GatewayProcess, spare_cookie: str) -> str:
    """Sign the spare session out and read ``sid`` from the ID token the gateway hands the
    provider as ``id_token_hint`` (verified with the provider's keys)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/oauth2/sign_out",
                            headers={"Accept": BROWSER_ACCEPT, "Cookie": spare_cookie},
                            allow_redirects=False) as r:
            assert r.status == 302, await r.text()
            location = r.headers["Location"]
        async with http.get(world.op.discovery()["jwks_uri"]) as r:
            keys = KeySet.import_key_set(json.loads(await r.read()))
    hint = parse_qs(urlsplit(location).query)["id_token_hint"][0]
    claims = jwt.decode(hint, keys).claims
    assert claims["iss"] == world.op.issuer
    sid = claims.get("sid")
    assert isinstance(sid, str), "the provider's ID token carries no sid"
    return sid


async def front(url: str, *, method: str = "GET") -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http, http.request(
        method, url, headers=IFRAME_HEADERS, allow_redirects=False
    ) as r:
        await r.read()
        return r


@pytest.mark.provider
@pytest.mark.redis
async def test_front_channel_logout_ends_every_session_of_that_sid_and_no_other(
    world: World,
) -> None:
    op = world.op
    async with new_browser() as browser, new_browser() as elsewhere:
        # One provider session, three gateway sessions: on A, on B, and a spare on A.
        cookie_a = await log_in(browser, world.a)
        cookie_b = await log_in(browser, world.b)
        sid = await provider_sid(world, world.a, await log_in(browser, world.a))
        # The same user in another browser: another provider session, another sid.
        cookie_other = await log_in(elsewhere, world.a)
    index = f"{world.prefix}x:sid:{sid}"
    assert await world.redis.exists(index) == 1  # what the gateway took from the ID token

    # Refused: 400 (405 for another method) and nothing ends.
    refused = [
        [],
        [("iss", op.issuer)],
        [("sid", sid)],
        [("iss", op.issuer + "/"), ("sid", sid)],
        [("iss", "https://evil.test"), ("sid", sid)],
        [("iss", ""), ("sid", sid)],
        [("iss", op.issuer), ("sid", "")],
        [("iss", op.issuer), ("iss", "https://evil.test"), ("sid", sid)],
        [("iss", op.issuer), ("sid", sid), ("sid", "other")],
    ]
    for query in refused:
        r = await front(world.frontchannel(world.a, query))
        assert r.status == 400, (query, r.status)
    r = await front(world.frontchannel(world.a, [("iss", op.issuer), ("sid", sid)]),
                    method="POST")
    assert r.status == 405
    for gw, cookie in ((world.a, cookie_a), (world.b, cookie_b), (world.a, cookie_other)):
        assert await status_of(f"{gw.url}/x", cookie) == 200

    # The provider's iframe: no cookie, the right iss and sid.
    url = world.frontchannel(world.a, [("iss", op.issuer), ("sid", sid)])
    r = await front(url)
    assert r.status == 200, world.logs()
    assert r.content_length == 0
    assert r.content_type == "text/html"
    assert "no-store" in r.headers["Cache-Control"]
    # Framable by the provider's pages, and by nobody else.
    assert "X-Frame-Options" not in r.headers
    csp = r.headers["Content-Security-Policy"]
    assert csp.partition("frame-ancestors ")[2] == op.issuer  # the provider's origin alone
    assert "Set-Cookie" not in r.headers

    # Both gateways refuse the sessions of that provider session; the other browser's stays.
    assert await status_of(f"{world.a.url}/x", cookie_a) == 401
    assert await status_of(f"{world.b.url}/x", cookie_b) == 401
    assert await status_of(f"{world.a.url}/x", cookie_other) == 200
    assert await world.redis.exists(index) == 0

    # The provider may load the page again (a reload, a retry): still 200, nothing else ends.
    assert (await front(url)).status == 200
    assert await status_of(f"{world.a.url}/x", cookie_other) == 200
    # The provider's session id is no more logged than the gateway's.
    assert sid not in world.logs()


@pytest.mark.provider
@pytest.mark.redis
async def test_an_unknown_sid_ends_nothing(world: World) -> None:
    async with new_browser() as browser:
        cookie = await log_in(browser, world.a)
    r = await front(world.frontchannel(world.b, [("iss", world.op.issuer),
                                                 ("sid", "not-a-session-of-anyone")]))
    assert r.status == 200
    assert await status_of(f"{world.a.url}/x", cookie) == 200


@pytest.mark.parametrize(("url", "source"), [
    # Keycloak-style issuers have a path; frame-ancestors names the origin only.
    ("https://idp.example.com/realms/corp", "https://idp.example.com"),
    ("https://IDP.example.com:443/x", "https://idp.example.com"),
    ("http://127.0.0.1:7400", "http://127.0.0.1:7400"),
    ("http://[::1]:8080/", "http://[::1]:8080"),
    # Nothing that could end the directive or add another one to the header.
    ("https://a;b.example/", None),
    ("https://a b.example/", None),
    ("javascript:alert(1)", None),
])
def test_the_provider_origin_as_a_frame_ancestors_source(url: str, source: str | None) -> None:
    assert _csp_origin(url) == source
