"""Route policy in the live gateway: a real gateway process, the real oidc-provider, an echo app.

What the unit tests of gateway.policy cannot show: that the running gateway judges with the
client address it believes and the request's method, that deny wins over a signed-in user's
allow, that ``auth: optional`` forwards anonymous and signed-in visitors alike (identity headers
only for the latter), that ``unauthenticated`` forces the 401 or the redirect, that
``default_policy`` covers routes without rules, and that the deciding rule reaches the log.
Users at the test OP: alice (alice@example.com, groups eng and admins), bob (bob@example.org,
group sales).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_proc import GatewayProcess, free_port, gateway_config, start_gateway
from tests.support.login import browser_login
from tests.support.upstream import Upstream, running_upstream

pytestmark = [pytest.mark.provider]

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "opt", "match": {"path": "/opt/"}, "upstream": upstream, "auth": "optional"},
        {"name": "api", "match": {"path": "/api/"}, "upstream": upstream,
         "unauthenticated": 401, "allow": [{"groups": ["eng"]}]},
        {"name": "redir", "match": {"path": "/redir/"}, "upstream": upstream,
         "unauthenticated": "redirect"},
        # The gateway sees loopback clients: 127.0.0.1 is outside 10/8 and inside 127/8.
        {"name": "office", "match": {"path": "/office/"}, "upstream": upstream,
         "allow": [{"groups": ["eng"], "networks": ["10.0.0.0/8"]}]},
        {"name": "local", "match": {"path": "/local/"}, "upstream": upstream,
         "allow": [{"groups": ["eng"], "networks": ["127.0.0.0/8", "::1"]}]},
        {"name": "writes", "match": {"path": "/writes/"}, "upstream": upstream,
         "allow": [{"groups": ["eng"]}], "deny": [{"methods": ["DELETE"]}]},
        # No rules: default_policy decides.
        {"name": "app", "match": {"path": "/"}, "upstream": upstream},
    ]


@dataclass
class World:
    gw: GatewayProcess
    upstream: Upstream
    issuer: str


@pytest.fixture
async def world(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[World]:
    async with running_upstream() as upstream:
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        client_id, secret = oidc_provider.register_client(
            redirect_uris=[f"{origin}/oauth2/callback"], post_logout_redirect_uris=[f"{origin}/"]
        )
        config = gateway_config(port=port, issuer=oidc_provider.issuer, client_id=client_id,
                                client_secret=secret, upstream=upstream.url,
                                routes=routes(upstream.url))
        config["default_policy"] = {"allow": [{"email_domains": ["example.com"]}]}
        gw = await start_gateway(config, directory=tmp_path)
        try:
            yield World(gw, upstream, oidc_provider.issuer)
        finally:
            gw.stop()


def new_browser() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for IP hosts, like a browser does for 127.0.0.1.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def headers_of(text: str) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(text)["headers"]}


async def test_without_a_session(world: World) -> None:
    gw, upstream = world.gw, world.upstream
    async with aiohttp.ClientSession() as client:
        # optional: forwarded, and no identity header survives, not even a forged one.
        async with client.get(f"{gw.url}/opt/page", headers={**HTML, "X-Forwarded-User": "root"},
                              allow_redirects=False) as r:
            assert r.status == 200
            seen = headers_of(await r.text())
        assert "x-forwarded-user" not in seen
        # unauthenticated: 401 answers even a browser navigation with JSON, never a redirect.
        async with client.get(f"{gw.url}/api/items", headers=HTML,
                              allow_redirects=False) as r:
            assert r.status == 401
            body = await r.json()
        assert body["error"] == "unauthenticated"
        assert body["login_url"].startswith(f"{gw.url}/oauth2/start?rd=")
        # unauthenticated: redirect sends even a script's POST to the provider.
        async with client.post(f"{gw.url}/redir/form", data=b"a=1",
                               headers={"Accept": "application/json",
                                        "X-Requested-With": "XMLHttpRequest"},
                               allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"].startswith(world.issuer)
    assert [r["path"] for r in upstream.seen.requests] == ["/opt/page"]


async def test_signed_in_rules_use_the_client_address_and_method(world: World) -> None:
    gw, upstream = world.gw, world.upstream
    async with new_browser() as alice:
        # default_policy admits alice@example.com on the route without rules.
        result = await browser_login(alice, f"{gw.url}/app/home")
        assert result.status == 200, result.text
        assert headers_of(result.text)["x-forwarded-user"] == "alice"

        async def status(method: str, path: str) -> tuple[int, str]:
            async with alice.request(method, gw.url + path, headers=HTML,
                                     allow_redirects=False) as r:
                return r.status, await r.text()

        code, _ = await status("GET", "/office/x")
        assert code == 403  # eng, but 127.0.0.1 is not in 10.0.0.0/8
        code, _ = await status("GET", "/local/x")
        assert code == 200
        code, _ = await status("GET", "/writes/x")
        assert code == 200
        code, page = await status("DELETE", "/writes/x")
        assert code == 403  # deny wins over allow
        assert "Access denied" in page
        code, _ = await status("GET", "/api/items")
        assert code == 200
        code, text = await status("GET", "/opt/page")
        assert code == 200
        seen = headers_of(text)
        assert seen["x-forwarded-user"] == "alice"
        assert seen["x-forwarded-groups"] == "eng,admins"
    paths = [(r["method"], r["path"]) for r in upstream.seen.requests]
    assert ("GET", "/office/x") not in paths
    assert ("DELETE", "/writes/x") not in paths
    # The log names the rule that refused, for the operator.
    denials = [json.loads(line) for line in gw.logs().splitlines()
               if '"access denied"' in line]
    assert {(d["route"], d["rule"]) for d in denials} == {("office", "-"), ("writes", "deny[0]")}


async def test_default_policy_refuses_who_it_does_not_admit(world: World) -> None:
    gw, upstream = world.gw, world.upstream
    async with new_browser() as bob:
        result = await browser_login(bob, f"{gw.url}/app/home", username="bob",
                                     password="builder")
        assert result.status == 403  # bob@example.org: default_policy admits example.com
        # An optional route lets bob through, with his identity.
        async with bob.get(f"{gw.url}/opt/page", headers=HTML) as r:
            assert r.status == 200
            assert headers_of(await r.text())["x-forwarded-user"] == "bob"
    assert all(r["path"] != "/app/home" for r in upstream.seen.requests)
