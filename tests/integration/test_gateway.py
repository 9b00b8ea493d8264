"""The gateway end to end: a real gateway process, the real oidc-provider, a real Redis.

Each test starts its own gateway (``python -m gateway run``) with a client registered for it at
the shared test provider, in front of an upstream app that echoes what it received.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from yarl import URL

from tests.support.gateway_proc import free_port, gateway_config
from tests.support.login import browser_login
from tests.support.world import GatewayWorld, open_world

pytestmark = [pytest.mark.provider]

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


class Env(GatewayWorld):
    """One test's world: an upstream, a registered client and a way to start gateways."""

    def client_for(self, port: int, auth_method: str = "client_secret_basic") -> tuple[str, str]:
        return self.register(port, auth_method=auth_method)

    def config(self, port: int, **kwargs: Any) -> dict[str, Any]:
        return self.base_config(port, **kwargs)


@pytest.fixture
async def env(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[Env]:
    async with open_world(Env, oidc_provider, tmp_path) as world:
        yield world


def new_browser() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for IP hosts, like a browser does for 127.0.0.1.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def echoed(text: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text)
    data["h"] = {k.lower(): v for k, v in data["headers"]}
    return data


def gateway_cookie(browser: aiohttp.ClientSession, name: str = "_oidc_gateway") -> str | None:
    for cookie in browser.cookie_jar:
        if cookie.key == name:
            return cookie.value
    return None


# ---------------------------------------------------------------------------------------------
# Login and identity headers
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_browser_login_lands_on_the_page_asked_for_with_identity_headers(
    env: Env, redis_target: Any, auth_method: str
) -> None:
    port = free_port()
    gw = await env.start(env.config(port, store="redis", redis_url=redis_target.url,
                                    key_prefix=redis_target.prefix,
                                    token_endpoint_auth=auth_method))
    async with new_browser() as browser:
        result = await browser_login(browser, f"{gw.url}/wiki/page?x=1&y=%2F")
        assert result.status == 200, result.text
        seen = echoed(result.text)
    # Landed back on exactly the URL asked for.
    assert seen["path"] == "/wiki/page"
    assert seen["query"] == "x=1&y=%2F"
    h = seen["h"]
    assert h["x-forwarded-user"] == "alice"
    assert h["x-forwarded-email"] == "alice@example.com"
    assert h["x-forwarded-groups"] == "eng,admins"
    assert h["x-forwarded-preferred-username"] == "alice"
    assert "x-forwarded-access-token" not in h
    # The gateway's own cookies never reach the app.
    assert "_oidc_gateway" not in h.get("cookie", "")
    # The first hop went to the provider with state, nonce and PKCE S256.
    first = result.trace[1]
    auth = urlsplit(first[1])
    assert auth.geturl().startswith(env.provider.issuer)
    q = parse_qs(auth.query)
    assert q["code_challenge_method"] == ["S256"]
    assert len(q["state"][0]) >= 32
    assert len(q["nonce"][0]) >= 32
    assert q["response_type"] == ["code"]


async def test_api_request_without_session_gets_401_json_with_login_url(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/api/items", headers={"Accept": "application/json"},
                              allow_redirects=False) as r:
            assert r.status == 401
            body = await r.json()
        async with client.post(f"{gw.url}/form", headers=HTML, data=b"a=1",
                               allow_redirects=False) as r:
            assert r.status == 401
    assert body["error"] == "unauthenticated"
    assert body["login_url"].startswith(f"{gw.url}/oauth2/start?rd=")
    assert env.upstream.seen.requests == []


async def test_browser_navigation_without_session_redirects_to_provider(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{gw.url}/x", headers=HTML, allow_redirects=False) as r,
    ):
        assert r.status == 302
        location = r.headers["Location"]
    assert location.startswith(env.provider.issuer)
    assert env.upstream.seen.requests == []


async def test_policy_denies_with_403_page_and_admits_the_right_group(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as bob:
        result = await browser_login(bob, f"{gw.url}/admin/panel", username="bob",
                                     password="builder")
        assert result.status == 403
        assert "Access denied" in result.text
        assert "Traceback" not in result.text
    assert all(r["path"] != "/admin/panel" for r in env.upstream.seen.requests)
    async with new_browser() as alice:
        result = await browser_login(alice, f"{gw.url}/admin/panel")
        assert result.status == 200
        assert echoed(result.text)["path"] == "/admin/panel"


async def test_dot_segments_cannot_dodge_a_protected_route(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as bob:
        result = await browser_login(bob, f"{gw.url}/home", username="bob",
                                     password="builder")
        assert result.status == 200
        for evil in ("/public/../admin/panel", "/public/%2e%2e/admin/panel",
                     "/public/%2E%2E/admin/panel", "//admin/panel"):
            async with bob.get(URL(gw.url + evil, encoded=True),
                               headers=HTML, allow_redirects=False) as r:
                assert r.status == 403, evil
    assert all(r["path"] != "/admin/panel" for r in env.upstream.seen.requests)


async def test_public_route_forwards_without_identity_and_strips_spoofed_headers(
    env: Env,
) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    spoof = {"X-Forwarded-User": "root", "X_Forwarded_Email": "root@example.com",
             "x-forwarded-groups": "admins", "Remote-User": "root",
             "X-Auth-Request-User": "root", "Connection": "X-Forwarded-For"}
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{gw.url}/public/style.css", headers=spoof) as r,
    ):
        assert r.status == 200
        h = echoed(await r.text())["h"]
    for name in ("x-forwarded-user", "x_forwarded_email", "x-forwarded-groups", "remote-user",
                 "x-auth-request-user"):
        assert name not in h
    assert h["x-forwarded-for"] == "127.0.0.1"


async def test_spoofed_identity_headers_are_replaced_for_signed_in_users(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as browser:
        await browser_login(browser, f"{gw.url}/")
        async with browser.get(f"{gw.url}/me", headers={
            **HTML, "X-Forwarded-User": "root", "X_FORWARDED_USER": "root",
            "X-Forwarded-Groups": "root"}) as r:
            h = echoed(await r.text())["h"]
    assert h["x-forwarded-user"] == "alice"
    assert "x_forwarded_user" not in h
    assert h["x-forwarded-groups"] == "eng,admins"


async def test_userinfo_endpoint(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as browser:
        async with browser.get(f"{gw.url}/oauth2/userinfo") as r:
            assert r.status == 401
        await browser_login(browser, f"{gw.url}/")
        async with browser.get(f"{gw.url}/oauth2/userinfo") as r:
            assert r.status == 200
            info = await r.json()
    assert info == {"user": "alice", "email": "alice@example.com",
                    "groups": ["eng", "admins"], "preferred_username": "alice"}


async def test_session_cookie_flags_and_a_new_session_id_at_every_login(env: Env) -> None:
    port = free_port()
    config = env.config(port)
    gw = await env.start(config)
    async with new_browser() as browser:
        result = await browser_login(browser, f"{gw.url}/")
        assert result.status == 200
        first = gateway_cookie(browser)
        # Log in again in the same browser: the old session id must not live on.
        async with browser.get(f"{gw.url}/oauth2/start?rd=%2Fagain", headers=HTML,
                               allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Cache-Control"] == "no-store"
        result = await browser_login(browser, f"{gw.url}/oauth2/start?rd=%2Fagain",
                                     stop_before_callback=True)
        assert result.callback_url
        async with browser.get(result.callback_url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/again"
            set_cookies = r.headers.getall("Set-Cookie")
        second = gateway_cookie(browser)
    assert first
    assert second
    assert first.split(".")[0] != second.split(".")[0]
    callback = [h for h in set_cookies if h.startswith("_oidc_gateway=")]
    assert len(callback) == 1
    flags = {part.strip().split("=")[0].lower() for part in callback[0].split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= flags
    assert "samesite=lax" in callback[0].lower()
    assert "path=/;" in callback[0].lower() + ";"
    assert "domain" not in flags
    assert "secure" not in flags  # this test config says cookie.secure: false (plain http)
    async with aiohttp.ClientSession() as client:
        headers = {"Cookie": f"_oidc_gateway={first}", "Accept": "application/json"}
        async with client.get(f"{gw.url}/x", headers=headers, allow_redirects=False) as r:
            assert r.status == 401


async def test_idle_session_ends_server_side(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port, session_extra={"idle_timeout": "2s"}))
    api = {"Accept": "application/json"}
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{gw.url}/")).status == 200
        # Activity keeps it alive past the idle timeout...
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            async with browser.get(f"{gw.url}/busy", headers=api, allow_redirects=False) as r:
                assert r.status == 200
            await asyncio.sleep(0.3)
        # ...and silence ends it.
        await asyncio.sleep(2.5)
        async with browser.get(f"{gw.url}/idle", headers=api, allow_redirects=False) as r:
            assert r.status == 401


# ---------------------------------------------------------------------------------------------
# Login state: single use, bound to the browser, parallel tabs
# ---------------------------------------------------------------------------------------------


async def _start_login(browser: aiohttp.ClientSession, url: str) -> str:
    async with browser.get(url, headers=HTML, allow_redirects=False) as r:
        assert r.status == 302
        return r.headers["Location"]


async def test_parallel_logins_in_two_tabs_both_succeed(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as browser:
        first = await browser_login(browser, f"{gw.url}/tab-one", stop_before_callback=True)
        second = await browser_login(browser, f"{gw.url}/tab-two", stop_before_callback=True)
        assert first.callback_url
        assert second.callback_url
        for callback, path in ((second.callback_url, "/tab-two"), (first.callback_url, "/tab-one")):
            async with browser.get(callback, headers=HTML, allow_redirects=False) as r:
                assert r.status == 302, await r.text()
                assert r.headers["Location"] == path
                assert r.headers["Referrer-Policy"] == "no-referrer"


async def test_callback_is_single_use_and_bound_to_the_browser(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as browser, new_browser() as attacker:
        result = await browser_login(browser, f"{gw.url}/x", stop_before_callback=True)
        assert result.callback_url
        # Another browser cannot complete it...
        async with attacker.get(result.callback_url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 400
            assert gateway_cookie(attacker) is None
        # ...and that attempt used it up: the state is single use.
        async with browser.get(result.callback_url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 400
            text = await r.text()
            assert "Start again" in text or "Try again" in text
        assert gateway_cookie(browser) is None
        # A fresh login in the right browser works, and replaying its callback fails.
        result = await browser_login(browser, f"{gw.url}/y", stop_before_callback=True)
        assert result.callback_url
        async with browser.get(result.callback_url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 302
        async with browser.get(result.callback_url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 400


async def test_provider_error_on_callback_shows_error_page_and_no_session(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with new_browser() as browser:
        location = await _start_login(browser, f"{gw.url}/wanted")
        state = parse_qs(urlsplit(location).query)["state"][0]
        iss = quote(env.provider.issuer, safe="")
        url = f"{gw.url}/oauth2/callback?error=access_denied&state={state}&iss={iss}"
        async with browser.get(url, headers=HTML, allow_redirects=False) as r:
            assert r.status == 401
            text = await r.text()
        assert gateway_cookie(browser) is None
    assert "Sign-in failed" in text
    assert "access_denied" in text
    assert "/oauth2/start?rd=%2Fwanted" in text  # the "try again" link
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------------
# Sign-out and expiry
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_sign_out_deletes_the_session_and_logs_out_at_the_provider(
    env: Env, redis_target: Any
) -> None:
    port = free_port()
    gw = await env.start(env.config(port, store="redis", redis_url=redis_target.url,
                                    key_prefix=redis_target.prefix))
    async with new_browser() as browser:
        await browser_login(browser, f"{gw.url}/")
        cookie = gateway_cookie(browser)
        assert cookie
        async with browser.get(f"{gw.url}/oauth2/sign_out", allow_redirects=False) as r:
            assert r.status == 302
            location = r.headers["Location"]
        end = urlsplit(location)
        assert location.startswith(env.provider.issuer)
        q = parse_qs(end.query)
        assert "id_token_hint" in q
        assert q["post_logout_redirect_uri"] == [f"{gw.url}/"]
        assert gateway_cookie(browser) is None
        # The old cookie, replayed, opens nothing: the session is gone server-side.
        replay_headers = {"Cookie": f"_oidc_gateway={cookie}", "Accept": "application/json"}
        async with (
            aiohttp.ClientSession() as replay,
            replay.get(f"{gw.url}/x", headers=replay_headers, allow_redirects=False) as r,
        ):
            assert r.status == 401


async def test_session_ends_at_its_lifetime(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port, session_extra={"lifetime": "3s"}))
    async with new_browser() as browser:
        result = await browser_login(browser, f"{gw.url}/")
        assert result.status == 200
        deadline = time.monotonic() + 15
        status = 200
        while status == 200 and time.monotonic() < deadline:
            async with browser.get(f"{gw.url}/x", headers={"Accept": "application/json"},
                                   allow_redirects=False) as r:
                status = r.status
            if status == 200:
                await asyncio.sleep(0.25)
        assert status == 401


# ---------------------------------------------------------------------------------------------
# Redis: restart survival, shared sessions, fail closed
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_session_survives_restart_and_is_shared_by_two_gateways(
    env: Env, redis_target: Any
) -> None:
    port_a, port_b = free_port(), free_port()
    client = env.client_for(port_a)
    key = gateway_config(port=0, issuer="", client_id="", client_secret="", upstream="")[
        "session"]["keys"][0]
    common = {"store": "redis", "redis_url": redis_target.url, "key_prefix": redis_target.prefix,
              "session_key": key, "client": client}
    gw_a = await env.start(env.config(port_a, **common))
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{gw_a.url}/")).status == 200
        cookie = f"_oidc_gateway={gateway_cookie(browser)}"
    gw_b = await env.start(env.config(port_b, **common))
    headers = {"Cookie": cookie, "Accept": "application/json"}
    async with aiohttp.ClientSession() as client_http:
        async with client_http.get(f"{gw_b.url}/on-b", headers=headers) as r:
            assert r.status == 200
            assert echoed(await r.text())["h"]["x-forwarded-user"] == "alice"
        assert gw_a.stop() == 0  # graceful on SIGTERM
        gw_a2 = await env.start(gw_a_config := env.config(port_a, **common))
        assert gw_a_config["server"]["listen"].endswith(str(port_a))
        async with client_http.get(f"{gw_a2.url}/after-restart", headers=headers) as r:
            assert r.status == 200
            assert echoed(await r.text())["h"]["x-forwarded-user"] == "alice"


@pytest.mark.redis
async def test_redis_down_means_503_never_a_pass(env: Env, redis_server_factory: Any) -> None:
    server = redis_server_factory()
    port = free_port()
    gw = await env.start(env.config(port, store="redis", redis_url=server.url))
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{gw.url}/")).status == 200
        before = len(env.upstream.seen.requests)
        server.stop()
        started = time.monotonic()
        async with browser.get(f"{gw.url}/secret", headers=HTML, allow_redirects=False) as r:
            assert r.status == 503
            text = await r.text()
        assert time.monotonic() - started < 5
        assert "Temporarily unavailable" in text
        assert "Traceback" not in text
        async with browser.get(f"{gw.url}/ready") as r:
            assert r.status == 503
        assert len(env.upstream.seen.requests) == before
        server.start()
        async with browser.get(f"{gw.url}/secret", headers=HTML, allow_redirects=False) as r:
            # Redis is back with its data (it saved on stop): the same session works again.
            assert r.status == 200


async def test_redis_down_stops_new_sign_ins_within_half_a_second(
    env: Env, redis_server_factory: Any
) -> None:
    # A sign-in's store check is reused for half a second and, while sign-ins come, renewed
    # in the background: a store that stops answering must stop new sign-ins (503, not a
    # redirect to a provider whose callback could not finish) once that half second is over.
    server = redis_server_factory()
    port = free_port()
    gw = await env.start(env.config(port, store="redis", redis_url=server.url))
    async with new_browser() as browser:
        assert (await browser_login(browser, f"{gw.url}/")).status == 200
    server.stop()
    await asyncio.sleep(0.6)
    for status in (503, 302):  # down, then back
        async with (
            new_browser() as browser,
            browser.get(f"{gw.url}/next", headers=HTML, allow_redirects=False) as r,
        ):
            assert r.status == status
        if status == 503:
            server.start()


# ---------------------------------------------------------------------------------------------
# Provider and upstream failures
# ---------------------------------------------------------------------------------------------


async def test_provider_unreachable_at_start_keeps_serving_with_ready_false(env: Env) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    config = env.config(port)
    config["provider"]["issuer"] = dead
    gw = await env.start(config, wait_ready=False)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/ready") as r:
            assert r.status == 503
            assert (await r.json())["provider"] is False
        async with client.get(f"{gw.url}/public/x") as r:
            assert r.status == 200  # public routes still work
        async with client.get(f"{gw.url}/private", headers=HTML, allow_redirects=False) as r:
            assert r.status == 503
            assert "Traceback" not in await r.text()


async def test_upstream_down_is_502_and_slow_upstream_is_504(env: Env) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    routes = [
        {"name": "dead", "match": {"path": "/dead"}, "upstream": dead, "auth": "public"},
        {"name": "slow", "match": {"path": "/slow"}, "upstream": env.upstream.url,
         "auth": "public", "timeout": "0.5s"},
    ]
    gw = await env.start(env.config(port, routes=routes))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/dead", headers=HTML) as r:
            assert r.status == 502
            assert "not answering" in await r.text()
        async with client.get(f"{gw.url}/slow?delay=3", headers=HTML) as r:
            assert r.status == 504
        async with client.get(f"{gw.url}/nowhere", headers=HTML) as r:
            assert r.status == 404  # no route: nothing forwarded


# ---------------------------------------------------------------------------------------------
# Bodies and websockets
# ---------------------------------------------------------------------------------------------


def peak_rss_kib(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


async def test_large_bodies_stream_both_ways_untouched_and_never_sit_in_memory(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    size = 100 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    async with new_browser() as browser:
        await browser_login(browser, f"{gw.url}/")
        baseline = peak_rss_kib(gw.proc.pid)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(size // len(block)):
                yield block

        expected = hashlib.sha256(block * (size // len(block))).hexdigest()
        async with browser.post(f"{gw.url}/upload", data=chunks(), headers=HTML) as r:
            assert r.status == 200
            up = await r.json()
        assert up["size"] == size
        assert up["sha256"] == expected
        async with browser.get(f"{gw.url}/download?size={size}", headers=HTML) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(size)
            received = 0
            async for part in r.content.iter_chunked(1024 * 1024):
                received += len(part)
        assert received == size
        # 200 MB went through; the gateway's peak memory grew by far less than one body.
        grown_mib = (peak_rss_kib(gw.proc.pid) - baseline) / 1024
        assert grown_mib < 32, f"gateway peak RSS grew by {grown_mib:.0f} MiB"
        # Gzip request bodies pass byte for byte (no decompression on the way).
        packed = gzip.compress(b"hello " * 1000)
        async with browser.post(f"{gw.url}/upload", data=packed,
                                headers={**HTML, "Content-Encoding": "gzip"}) as r:
            up = await r.json()
        assert up == {"size": len(packed), "sha256": hashlib.sha256(packed).hexdigest(),
                      "content_encoding": "gzip"}


async def test_websocket_is_proxied_after_auth(env: Env) -> None:
    port = free_port()
    gw = await env.start(env.config(port))
    async with aiohttp.ClientSession() as anonymous:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await anonymous.ws_connect(f"{gw.url}/ws")
        assert info.value.status == 401
    async with new_browser() as browser:
        await browser_login(browser, f"{gw.url}/")
        async with browser.ws_connect(f"{gw.url}/ws") as ws:
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=5) == "alice:hi"
            await ws.send_bytes(b"abc")
            assert await ws.receive_bytes(timeout=5) == b"cba"

