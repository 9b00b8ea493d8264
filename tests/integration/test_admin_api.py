"""The session admin API on its own address, with two gateways sharing one Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway_proc import free_port, gateway_config, new_session_key, start_gateway
from tests.support.login import browser_login, new_browser
from tests.support.upstream import running_upstream

pytestmark = [pytest.mark.provider, pytest.mark.redis]

TOKEN = "admin-token-0123456789abcdef"
JSON = {"Accept": "application/json"}


async def test_admin_lists_and_revokes_sessions_on_both_gateways(
    oidc_provider: Any, redis_target: Any, tmp_path: Path
) -> None:
    port_a, port_b, admin_port = free_port(), free_port(), free_port()
    client_id, secret = oidc_provider.register_client(
        [f"http://127.0.0.1:{p}/oauth2/callback" for p in (port_a, port_b)])
    key = new_session_key()
    gateways = []
    async with running_upstream() as upstream:
        try:
            for port, admin in ((port_a, {"listen": f"127.0.0.1:{admin_port}",
                                          "token": "${ADMIN_TOKEN}"}), (port_b, None)):
                config = gateway_config(
                    port=port, issuer=oidc_provider.issuer, client_id=client_id,
                    client_secret=secret, upstream=upstream.url, store="redis",
                    redis_url=redis_target.url, key_prefix=redis_target.prefix,
                    session_key=key)
                if admin:
                    config["admin"] = admin
                gateways.append(await start_gateway(config, directory=tmp_path,
                                                    env={"ADMIN_TOKEN": TOKEN}))
            gw_a, gw_b = gateways
            cookies = []
            for gw, agent in ((gw_a, "browser-one"), (gw_b, "browser-two")):
                async with new_browser() as browser:
                    result = await browser_login(browser, f"{gw.url}/",
                                                 headers={"User-Agent": agent})
                    assert result.status == 200
                    cookies.append("_oidc_gateway=" + next(
                        c.value for c in browser.cookie_jar if c.key == "_oidc_gateway"))
            admin_url = f"http://127.0.0.1:{admin_port}"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with aiohttp.ClientSession() as http:
                # Wrong or missing token: 401, nothing listed or revoked.
                for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                                {"Authorization": f"Basic {TOKEN}"}):
                    async with http.get(f"{admin_url}/sessions?user=alice",
                                        headers=headers) as r:
                        assert r.status == 401
                    async with http.delete(f"{admin_url}/sessions?user=alice",
                                           headers=headers) as r:
                        assert r.status == 401
                # The main listener has no admin API.
                async with http.get(f"{gw_a.url}/sessions?user=alice", headers=JSON) as r:
                    assert r.status != 200 or "sessions" not in await r.text()

                async with http.get(f"{admin_url}/sessions?user=alice", headers=auth) as r:
                    assert r.status == 200
                    listed = await r.json()
                    text = await r.text()
                sessions = listed["sessions"]
                assert len(sessions) == 2
                assert {s["user_agent"] for s in sessions} == {"browser-one", "browser-two"}
                assert all(s["client_ip"] == "127.0.0.1" for s in sessions)
                assert all(s["created"] and s["last_seen"] for s in sessions)
                # Never a token, cookie or session id.
                for cookie in cookies:
                    assert cookie.split("=", 1)[1].split(".")[0] not in text
                assert "token" not in text

                # Revoke one by its id hash: that browser is out, on both gateways.
                one = next(s for s in sessions if s["user_agent"] == "browser-one")
                async with http.delete(f"{admin_url}/sessions/{one['id']}", headers=auth) as r:
                    assert r.status == 200
                for gw in (gw_a, gw_b):
                    async with http.get(f"{gw.url}/x",
                                        headers={**JSON, "Cookie": cookies[0]}) as r:
                        assert r.status == 401
                    async with http.get(f"{gw.url}/x",
                                        headers={**JSON, "Cookie": cookies[1]}) as r:
                        assert r.status == 200
                async with http.delete(f"{admin_url}/sessions/{one['id']}", headers=auth) as r:
                    assert r.status == 404

                # Revoke all of alice's: both gateways refuse on the next request.
                async with http.delete(f"{admin_url}/sessions?user=alice", headers=auth) as r:
                    assert r.status == 200
                    assert (await r.json())["revoked"] == 1
                for gw in (gw_a, gw_b):
                    async with http.get(f"{gw.url}/x",
                                        headers={**JSON, "Cookie": cookies[1]}) as r:
                        assert r.status == 401
                async with http.get(f"{admin_url}/sessions?user=alice", headers=auth) as r:
                    assert (await r.json())["sessions"] == []
        finally:
            for gw in gateways:
                gw.stop()
