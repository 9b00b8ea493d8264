"""Back-Channel Logout 1.0 from the real oidc-provider, across two gateways sharing Redis.

The provider's ``backchannel_logout_uri`` is a small relay in the test that keeps a copy of
each logout token and passes it to gateway A, so the test can replay a real token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.errors import OIDCError
from gateway.oidc import BACKCHANNEL_LOGOUT_EVENT, parse_jwks, validate_logout_token
from tests.support.gateway_proc import (
    GatewayProcess,
    free_port,
    gateway_config,
    new_session_key,
    start_gateway,
)
from tests.support.login import browser_login, browser_sign_out, new_browser
from tests.support.upstream import running_upstream

JSON = {"Accept": "application/json"}
ISS = "https://op.test"
CLIENT = "gw"


# ---------------------------------------------------------------------------------------------
# The logout token checks, pure (a local key stands in for the provider's)
# ---------------------------------------------------------------------------------------------

KEY = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256"})
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256"})
KEYS = parse_jwks(json.dumps({"keys": [KEY.as_dict(private=False)]}).encode())
NOW = 1_700_000_000.0


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "aud": CLIENT, "iat": int(NOW), "jti": "j-1",
                            "sid": "s-1", "sub": "alice",
                            "events": {BACKCHANNEL_LOGOUT_EVENT: {}}}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], key: RSAKey = KEY) -> str:
    return jwt.encode({"alg": "RS256", "kid": "k1", "typ": "logout+jwt"}, payload, key)


def check(token: str) -> Any:
    return validate_logout_token(token, keys=KEYS, issuer=ISS, client_id=CLIENT,
                                 algorithms=("RS256",), leeway=60, now=NOW)


def test_a_well_formed_logout_token_names_its_sid_sub_and_jti() -> None:
    got = check(sign(claims()))
    assert (got.sid, got.sub, got.jti) == ("s-1", "alice", "j-1")
    assert check(sign(claims(sid=None))).sid is None  # sub alone is enough


@pytest.mark.parametrize(("name", "token"), [
    ("bad signature", sign(claims(), OTHER_KEY)),
    ("wrong aud", sign(claims(aud="other-client"))),
    ("extra aud", sign(claims(aud=[CLIENT, "other"]))),
    ("wrong iss", sign(claims(iss="https://evil.test"))),
    ("with nonce", sign(claims(nonce="n"))),
    ("missing event", sign(claims(events=None))),
    ("other event", sign(claims(events={"http://example.com/other": {}}))),
    ("no sid nor sub", sign(claims(sid=None, sub=None))),
    ("no jti", sign(claims(jti=None))),
    ("no iat", sign(claims(iat=None))),
    ("iat in the future", sign(claims(iat=int(NOW) + 3600))),
    ("stale", sign(claims(iat=int(NOW) - 3600))),
    ("expired", sign(claims(exp=int(NOW) - 120))),
    ("not a JWT", "x.y.z"),
])
def test_invalid_logout_tokens_are_refused(name: str, token: str) -> None:
    with pytest.raises(OIDCError) as info:
        check(token)
    assert info.value.status_hint == 400, name


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@dataclass
class World:
    a: GatewayProcess
    b: GatewayProcess
    op: Any
    client_id: str
    relayed: list[tuple[str, int]] = field(default_factory=list)  # (logout_token, status)

    def logs(self) -> str:
        return self.a.logs() + self.b.logs()


@pytest.fixture
async def world(
    oidc_provider_factory: Any, redis_target: Any, tmp_path: Path
) -> AsyncIterator[World]:
    op = oidc_provider_factory()
    port_a, port_b = free_port(), free_port()
    state: dict[str, World] = {}

    async def relay(request: web.Request) -> web.Response:
        form = await request.post()
        token = str(form.get("logout_token", ""))
        async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{port_a}/oauth2/backchannel_logout",
            data={"logout_token": token},
        ) as r:
            state["w"].relayed.append((token, r.status))
            return web.Response(status=r.status)

    app = web.Application()
    app.router.add_post("/bcl", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    relay_port = runner.addresses[0][1]
    client_id, secret = op.register_client(
        [f"http://127.0.0.1:{p}/oauth2/callback" for p in (port_a, port_b)],
        backchannel_logout_uri=f"http://127.0.0.1:{relay_port}/bcl",
        backchannel_logout_session_required=True,
    )
    key = new_session_key()
    gateways: list[GatewayProcess] = []
    try:
        async with running_upstream() as upstream:
            for port in (port_a, port_b):
                config = gateway_config(
                    port=port, issuer=op.issuer, client_id=client_id, client_secret=secret,
                    upstream=upstream.url, store="redis", redis_url=redis_target.url,
                    key_prefix=redis_target.prefix, session_key=key,
                )
                gateways.append(await start_gateway(config, directory=tmp_path))
            state["w"] = World(gateways[0], gateways[1], op, client_id)
            yield state["w"]
    finally:
        for gw in gateways:
            gw.stop()
        await runner.cleanup()


async def status_of(url: str, cookie: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
        url, headers={**JSON, "Cookie": cookie}
    ) as r:
        return r.status


async def post_logout_token(gw: GatewayProcess, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.post(
        f"{gw.url}/oauth2/backchannel_logout", data={"logout_token": token}
    ) as r:
        return r.status


def cookie_of(browser: aiohttp.ClientSession) -> str:
    return "_oidc_gateway=" + next(c.value for c in browser.cookie_jar
                                   if c.key == "_oidc_gateway")


@pytest.mark.provider
@pytest.mark.redis
async def test_ending_the_provider_session_ends_it_on_both_gateways(world: World) -> None:
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{world.a.url}/")).status == 200
        cookie_a = cookie_of(browser)
        # The same browser on gateway B, without A's cookie (a browser's jar would keep the
        # two apart by host): the provider's session is reused, so the same sid.
        browser.cookie_jar.clear(lambda c: c.key == "_oidc_gateway")
        assert (await browser_login(browser, f"{world.b.url}/")).status == 200
        cookie_b = cookie_of(browser)
        assert cookie_a != cookie_b
        assert await status_of(f"{world.a.url}/x", cookie_a) == 200
        assert await status_of(f"{world.b.url}/x", cookie_b) == 200

        # Forged logout tokens, signed with a key of our own under the provider's key id,
        # change nothing: 400, and both sessions still work.
        jwks = json.loads(await (await browser.get(world.op.discovery()["jwks_uri"])).read())
        kid = jwks["keys"][0]["kid"]
        forger = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256"})
        base = {"iss": world.op.issuer, "aud": world.client_id, "iat": int(time.time()),
                "sub": "alice", "jti": uuid.uuid4().hex,
                "events": {BACKCHANNEL_LOGOUT_EVENT: {}}}
        for forged in (base, {**base, "aud": "other"}, {**base, "nonce": "n"},
                       {k: v for k, v in base.items() if k != "events"}):
            token = jwt.encode({"alg": "RS256", "kid": kid}, forged, forger)
            assert await post_logout_token(world.a, token) == 400
        assert await post_logout_token(world.a, "not-a-token") == 400
        assert await status_of(f"{world.a.url}/x", cookie_a) == 200
        assert await status_of(f"{world.b.url}/x", cookie_b) == 200

        # End the session at the provider itself (its end_session endpoint, "sign out of
        # everything"): it POSTs a logout token to the back-channel URI.
        end = world.op.discovery()["end_session_endpoint"]
        out = await browser_sign_out(browser, f"{end}?client_id={world.client_id}",
                                     provider_origin=world.op.issuer)
        assert out.status == 200, out.trace
        assert "signed out" in out.text
    assert [status for _, status in world.relayed] == [200], world.logs()
    assert await status_of(f"{world.a.url}/x", cookie_a) == 401
    assert await status_of(f"{world.b.url}/x", cookie_b) == 401

    # The real token, replayed, is refused.
    assert await post_logout_token(world.b, world.relayed[0][0]) == 400
