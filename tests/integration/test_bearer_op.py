"""Bearer tokens from the real oidc-provider (tests/op), through a real gateway process.

The test OP issues RFC 9068 JWT access tokens for a resource named with RFC 8707's
``resource`` parameter (``features.resourceIndicators``), and opaque ones for ``urn:opaque:``
resources, which the gateway introspects (RFC 7662) with its own client credentials. Tokens
come from the client credentials grant (a machine client) and from alice's authorization code
grant (a user), obtained the way an API client would, not through the gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
import pytest_asyncio

from gateway.oidc import basic_authorization
from tests.support.gateway_proc import GatewayProcess, free_port, gateway_config, start_gateway
from tests.support.login import browser_login, new_browser
from tests.support.upstream import Upstream, running_upstream

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.provider]

API = "https://api.test/"
OPAQUE_API = "urn:opaque:api"
CALLBACK = "http://127.0.0.1:9/api-client/callback"  # never requested: the code is read off it


@dataclass
class World:
    op: Any
    gateway: GatewayProcess
    upstream: Upstream
    client: tuple[str, str]  # the API client: client credentials and authorization code

    async def token(self, grant: dict[str, str]) -> dict[str, Any]:
        client_id, secret = self.client
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                self.op.endpoint("token"),
                data=grant,
                headers={"Authorization": basic_authorization(client_id, secret)},
            ) as resp,
        ):
            body = await resp.json(content_type=None)
            assert resp.status == 200, body
            return dict(body)

    async def machine_token(self, resource: str) -> str:
        answer = await self.token(
            {"grant_type": "client_credentials", "resource": resource, "scope": "api:read"}
        )
        return str(answer["access_token"])

    async def user_token(self, resource: str) -> str:
        """Alice signs in at the OP for the API client; the code is redeemed for ``resource``."""
        query = urlencode(
            {
                "client_id": self.client[0],
                "response_type": "code",
                "redirect_uri": CALLBACK,
                "scope": "openid api:read",
                "resource": resource,
                "state": "s",
                "nonce": "n",
            }
        )
        async with new_browser() as browser:
            walk = await browser_login(
                browser,
                f"{self.op.endpoint('authorization')}?{query}",
                stop_before_callback=True,
                provider_origin=self.op.issuer,
            )
        assert walk.callback_url is not None, walk.trace
        code = parse_qs(urlsplit(walk.callback_url).query)["code"][0]
        answer = await self.token(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": CALLBACK,
                "resource": resource,
            }
        )
        return str(answer["access_token"])

    async def call(self, path: str, token: str) -> tuple[int, dict[str, str], Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                self.gateway.url + path,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                allow_redirects=False,
            ) as resp,
        ):
            text = await resp.text()
            body = json.loads(text) if text.startswith("{") else text
            return resp.status, dict(resp.headers), body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    port = free_port()
    gateway_client = oidc_provider.register_client([f"http://127.0.0.1:{port}/oauth2/callback"])
    api_client = oidc_provider.register_client(
        [CALLBACK], grant_types=["authorization_code", "client_credentials"]
    )
    async with running_upstream() as upstream:
        routes: list[dict[str, Any]] = [
            {
                "name": "machines",
                "match": {"path": "/machines/"},
                "upstream": upstream.url,
                "bearer": {"audiences": [API]},
            },
            {
                "name": "alice-only",
                "match": {"path": "/alice/"},
                "upstream": upstream.url,
                "bearer": {"audiences": [API]},
                "allow": [{"users": ["alice"]}],
            },
            {
                "name": "bob-only",
                "match": {"path": "/bob/"},
                "upstream": upstream.url,
                "bearer": {"audiences": [API]},
                "allow": [{"users": ["bob"]}],
            },
            {
                "name": "opaque",
                "match": {"path": "/opaque/"},
                "upstream": upstream.url,
                "bearer": {"audiences": [OPAQUE_API], "introspection": True},
            },
            {"name": "app", "match": {"path": "/"}, "upstream": upstream.url},
        ]
        config = gateway_config(
            port=port,
            issuer=oidc_provider.issuer,
            client_id=gateway_client[0],
            client_secret=gateway_client[1],
            upstream=upstream.url,
            routes=routes,
        )
        gateway = await start_gateway(config, directory=tmp_path_factory.mktemp("bearer-op"))
        try:
            yield World(oidc_provider, gateway, upstream, api_client)
        finally:
            gateway.stop()


def _seen(body: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in body["headers"]}


async def test_client_credentials_jwt_is_accepted(world: World) -> None:
    token = await world.machine_token(API)
    assert token.count(".") == 2  # a JWT, not an opaque token
    status, headers, body = await world.call("/machines/report", token)
    assert status == 200, body
    seen = _seen(body)
    # RFC 9068: a client credentials token's sub is the client.
    assert seen["x-forwarded-user"] == world.client[0]
    assert "authorization" not in seen
    assert "Set-Cookie" not in headers


async def test_token_for_another_resource_is_refused(world: World) -> None:
    token = await world.machine_token("https://other-api.test/")
    before = len(world.upstream.seen.requests)
    status, headers, body = await world.call("/machines/report", token)
    assert status == 401, body
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert "another audience" in headers["WWW-Authenticate"]
    assert len(world.upstream.seen.requests) == before


async def test_user_token_gets_the_same_policy_as_a_browser(world: World) -> None:
    token = await world.user_token(API)
    status, _, body = await world.call("/alice/inbox", token)
    assert status == 200, body
    assert _seen(body)["x-forwarded-user"] == "alice"
    status, headers, body = await world.call("/bob/inbox", token)
    assert status == 403, body
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]


async def test_opaque_token_is_introspected(world: World) -> None:
    token = await world.user_token(OPAQUE_API)
    assert "." not in token  # opaque
    status, _, body = await world.call("/opaque/x", token)
    assert status == 200, body
    assert _seen(body)["x-forwarded-user"] == "alice"
    # The JWT for the other API is not accepted on this one.
    status, _, _ = await world.call("/opaque/x", await world.user_token(API))
    assert status == 401


async def test_revoked_opaque_token_is_refused(world: World) -> None:
    token = await world.user_token(OPAQUE_API)
    client_id, secret = world.client
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            world.op.endpoint("revocation"),
            data={"token": token},
            headers={"Authorization": basic_authorization(client_id, secret)},
        ) as resp,
    ):
        assert resp.status == 200
    status, headers, _ = await world.call("/opaque/y", token)
    assert status == 401
    assert "not active" in headers["WWW-Authenticate"]


async def test_browser_sign_in_still_works_on_a_bearer_route(world: World) -> None:
    async with new_browser() as browser:
        result = await browser_login(browser, world.gateway.url + "/alice/page")
        assert result.status == 200, result.text[:500]
        assert _seen(json.loads(result.text))["x-forwarded-user"] == "alice"


async def test_gateway_logs_never_hold_tokens(world: World) -> None:
    token = await world.machine_token(API)
    assert (await world.call("/machines/log", token))[0] == 200
    assert token not in world.gateway.logs()
    assert token.split(".")[2] not in world.gateway.logs()
