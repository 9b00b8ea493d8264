"""Token refresh driven by expiry, exactly once, against the real oidc-provider.

Each test runs a private OP (short-lived access tokens, refresh tokens rotated on every use)
and two gateway processes sharing one Redis, the way a real deployment scales out.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_proc import (
    GatewayProcess,
    free_port,
    gateway_config,
    new_session_key,
    start_gateway,
)
from tests.support.login import browser_login, new_browser
from tests.support.peers import http_json
from tests.support.upstream import running_upstream

pytestmark = [pytest.mark.provider, pytest.mark.redis]

ACCESS_TTL = 6  # seconds the OP's access tokens live
REFRESH_BEFORE = 3  # the gateways refresh this long before expiry
JSON = {"Accept": "application/json"}


@dataclass
class Pair:
    a: GatewayProcess
    b: GatewayProcess
    op: Any

    def refresh_calls(self) -> int:
        status, doc = http_json("GET", f"{self.op.issuer}/_test/counts")
        assert status == 200
        return int(doc["token"].get("refresh_token", 0))

    def logs(self) -> str:
        return self.a.logs() + self.b.logs()


@pytest.fixture
async def pair(
    oidc_provider_factory: Any, redis_target: Any, tmp_path: Path
) -> AsyncIterator[Pair]:
    op = oidc_provider_factory(OP_ROTATE_REFRESH="always")
    port_a, port_b = free_port(), free_port()
    client_id, secret = op.register_client(
        [f"http://127.0.0.1:{p}/oauth2/callback" for p in (port_a, port_b)],
        access_token_ttl=ACCESS_TTL,
    )
    key = new_session_key()
    gateways: list[GatewayProcess] = []
    async with running_upstream() as upstream:
        try:
            for port in (port_a, port_b):
                config = gateway_config(
                    port=port, issuer=op.issuer, client_id=client_id, client_secret=secret,
                    upstream=upstream.url, store="redis", redis_url=redis_target.url,
                    key_prefix=redis_target.prefix, session_key=key,
                    session_extra={"refresh_before": f"{REFRESH_BEFORE}s"},
                )
                gateways.append(await start_gateway(config, directory=tmp_path))
            yield Pair(gateways[0], gateways[1], op)
        finally:
            for gw in gateways:
                gw.stop()


async def login(pair: Pair) -> tuple[str, float]:
    """Sign alice in on gateway A; the Cookie header and when the access token expires."""
    async with new_browser() as browser:
        started = time.time()
        result = await browser_login(browser, f"{pair.a.url}/")
        assert result.status == 200, result.text
        value = next(c.value for c in browser.cookie_jar if c.key == "_oidc_gateway")
    return f"_oidc_gateway={value}", started + ACCESS_TTL


async def wait_until(deadline: float) -> None:
    # The one thing to wait for here is the clock itself: the token must come due.
    delay = deadline - time.time()
    assert delay < 2 * ACCESS_TTL  # bounded
    if delay > 0:
        await asyncio.sleep(delay)


async def burst(pair: Pair, cookie: str, n: int = 20) -> list[tuple[int, str]]:
    """``n`` requests of one session at once, half through each gateway."""
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> tuple[int, str]:
            gw = pair.a if i % 2 == 0 else pair.b
            async with http.get(f"{gw.url}/app/{i}", headers={**JSON, "Cookie": cookie},
                                timeout=aiohttp.ClientTimeout(total=15)) as r:
                return r.status, await r.text()

        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_twenty_parallel_requests_at_expiry_refresh_once_across_two_gateways(
    pair: Pair,
) -> None:
    cookie, expires = await login(pair)
    assert pair.refresh_calls() == 0
    # Round 1: the access token comes due (within refresh_before of expiring).
    await wait_until(expires - REFRESH_BEFORE + 0.5)
    answers = await burst(pair, cookie)
    assert [s for s, _ in answers] == [200] * 20, (answers, pair.logs())
    assert all(json.loads(t)["headers"] for _, t in answers)
    round_one = pair.refresh_calls()
    print(f"token-endpoint refresh calls for 20 parallel requests: {round_one}")
    assert round_one == 1, pair.logs()

    # Round 2: the rotated refresh token was kept (the old one is now invalid at the OP):
    # the next expiry refreshes once more and nobody is signed out.
    await wait_until(time.time() + ACCESS_TTL - REFRESH_BEFORE + 0.5)
    answers = await burst(pair, cookie)
    assert [s for s, _ in answers] == [200] * 20, (answers, pair.logs())
    assert pair.refresh_calls() == 2, pair.logs()
    async with aiohttp.ClientSession() as http, http.get(
        f"{pair.b.url}/oauth2/userinfo", headers={"Cookie": cookie}
    ) as r:
        assert r.status == 200
        assert (await r.json())["user"] == "alice"


async def test_provider_down_keeps_the_session_and_a_refused_refresh_ends_it(pair: Pair) -> None:
    cookie, expires = await login(pair)
    pair.op.stop()
    await wait_until(expires - REFRESH_BEFORE + 0.5)
    async with aiohttp.ClientSession() as http:
        # Refresh due, provider unreachable, token still valid: served, session kept.
        async with http.get(f"{pair.a.url}/still", headers={**JSON, "Cookie": cookie}) as r:
            assert r.status == 200, pair.logs()
        # A restarted test OP has forgotten the client and every grant: the refresh is
        # refused (an RFC 6749 error), which ends the session everywhere.
        pair.op.start()
        async with http.get(f"{pair.b.url}/gone", headers={**JSON, "Cookie": cookie}) as r:
            assert r.status == 401, pair.logs()
        async with http.get(f"{pair.a.url}/gone", headers={**JSON, "Cookie": cookie}) as r:
            assert r.status == 401
