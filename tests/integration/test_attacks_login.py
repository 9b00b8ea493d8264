"""Attacks on the login flow and sign-out, against the real test OP.

Login CSRF (a callback completed in another browser), state reuse and expiry, authorization
code replay and injection (PKCE), session fixation, logout CSRF (a cross-site request gets a
confirmation page, same-site links and forms sign out), and ``Cache-Control: no-store`` on
every redirect and every answer that carries or reveals a session.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from multidict import CIMultiDictProxy
from yarl import URL

from tests.integration.attacks_common import (
    HTML_ACCEPT,
    World,
    cookie_value,
    gateway_world,
    new_browser,
    register_at,
)
from tests.support.login import browser_login
from tests.support.peers import RedisTarget, redis_command

pytestmark = [pytest.mark.provider, pytest.mark.asyncio(loop_scope="module")]

COOKIE = "_oidc_gateway"
LOGIN_COOKIE = "_oidc_gateway_login"
HTML = {"Accept": HTML_ACCEPT}
JSON = {"Accept": "application/json"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    async with gateway_world(tmp_path_factory.mktemp("login"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider)) as w:
        yield w


async def status_with(world: World, cookie: str | None, path: str = "/whoami"
                      ) -> tuple[int, str | None]:
    """(status, X-Forwarded-User the upstream saw) for a request carrying only ``cookie``."""
    headers = {**JSON, **({"Cookie": f"{COOKIE}={cookie}"} if cookie else {})}
    async with aiohttp.ClientSession() as client, client.get(
        f"{world.url}{path}", headers=headers, allow_redirects=False
    ) as r:
        if r.status != 200:
            return r.status, None
        seen = {k.lower(): v for k, v in (await r.json())["headers"]}
        return r.status, seen.get("x-forwarded-user")


async def callback_answer(browser: aiohttp.ClientSession, url: str
                          ) -> tuple[int, CIMultiDictProxy[str], str]:
    async with browser.get(URL(url, encoded=True), headers=HTML, allow_redirects=False) as r:
        return r.status, r.headers, await r.text()


def sets_session(headers: CIMultiDictProxy[str]) -> bool:
    return any(v.startswith(f"{COOKIE}=") and not v.startswith(f"{COOKIE}=;")
               for v in headers.getall("Set-Cookie", []))


# ---------------------------------------------------------------------------------------------
# state: bound to the browser, single use, expiring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attacker_has_own_login", [False, True])
async def test_a_callback_completed_in_another_browser_signs_nobody_in(
    world: World, attacker_has_own_login: bool
) -> None:
    """Login CSRF: the attacker signs in at the provider and hands the victim the callback
    URL (or the reverse). Without the browser's binding cookie it is refused."""
    mark = world.mark()
    async with new_browser() as owner, new_browser() as other:
        result = await browser_login(owner, f"{world.url}/mine", stop_before_callback=True)
        assert result.callback_url
        if attacker_has_own_login:  # the other browser has a binding cookie of its own
            await browser_login(other, f"{world.url}/theirs", stop_before_callback=True)
            assert cookie_value(other, LOGIN_COOKIE)
        status, headers, text = await callback_answer(other, result.callback_url)
        assert status == 400
        assert "another browser" in text
        assert not sets_session(headers)
        assert cookie_value(other, COOKIE) is None
        # The state was used up by that attempt: single use, even when it failed.
        status, headers, _ = await callback_answer(owner, result.callback_url)
        assert status == 400
        assert cookie_value(owner, COOKIE) is None
    assert world.seen_since(mark) == []


async def test_a_callback_is_single_use(world: World) -> None:
    async with new_browser() as browser:
        result = await browser_login(browser, f"{world.url}/once", stop_before_callback=True)
        assert result.callback_url
        status, headers, _ = await callback_answer(browser, result.callback_url)
        assert status == 302
        assert sets_session(headers)
        first = cookie_value(browser, COOKIE)
        for _ in range(2):
            status, headers, text = await callback_answer(browser, result.callback_url)
            assert status == 400
            assert "expired or was already completed" in text
            assert not sets_session(headers)
        assert cookie_value(browser, COOKIE) == first  # the good session is untouched
    assert (await status_with(world, first))[0] == 200


@pytest.mark.parametrize(
    "query",
    [{}, {"state": ""}, {"state": "forged"}, {"state": "x" * 5000},
     {"state": "a\r\nb"}, {"code": "c", "iss": "http://evil.test"}],
    ids=["none", "empty", "forged", "huge", "crlf", "no-state"],
)
async def test_a_callback_without_a_known_state_is_refused(
    world: World, query: dict[str, str]
) -> None:
    async with new_browser() as browser:
        await browser_login(browser, f"{world.url}/x", stop_before_callback=True)
        url = f"{world.url}/oauth2/callback?{urlencode({'code': 'whatever', **query})}"
        status, headers, text = await callback_answer(browser, url)
    assert status == 400
    assert not sets_session(headers)
    assert "Traceback" not in text


async def test_an_expired_login_state_is_refused(
    oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with gateway_world(tmp_path_factory.mktemp("expiry"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider),
                             session={"login_timeout": "1s"}) as short, new_browser() as browser:
        result = await browser_login(browser, f"{short.url}/late", stop_before_callback=True)
        assert result.callback_url
        await asyncio.sleep(1.2)  # the attack is lateness: let login_timeout pass
        status, headers, text = await callback_answer(browser, result.callback_url)
        assert status == 400
        assert "expired" in text
        assert not sets_session(headers)
        # The control: a prompt login on the same gateway succeeds.
        assert (await browser_login(browser, f"{short.url}/prompt")).status == 200


async def test_a_long_return_url_is_kept_in_the_store_and_used_once(world: World) -> None:
    """A dashboard URL over 1 KB would make the provider's URL too long: its login state is
    stored and the provider gets a short reference; the browser still lands on the whole URL,
    and the reference works once."""
    path = "/dash?" + urlencode({"view": "x" * 1400, "q": "a b&c"})
    async with new_browser() as browser:
        result = await browser_login(browser, f"{world.url}{path}", stop_before_callback=True)
        assert result.callback_url
        state = _query(result.callback_url)["state"]
        assert state.startswith("r.")
        assert len(state) < 64
        status, headers, _ = await callback_answer(browser, result.callback_url)
        assert status == 302
        assert headers["Location"] == path
        assert sets_session(headers)
        status, headers, text = await callback_answer(browser, result.callback_url)
        assert status == 400
        assert "expired or was already completed" in text
        assert not sets_session(headers)
    async with new_browser() as browser:  # the whole walk, as a browser does it
        answer = await browser_login(browser, f"{world.url}{path}")
        assert answer.status == 200
        assert answer.url == f"{world.url}{path}"


async def test_a_short_return_url_travels_sealed_in_the_state(world: World) -> None:
    """The usual login: nothing readable of it in the URL the provider (and the browser's
    history) sees: not the page to return to, not the PKCE verifier."""
    async with new_browser() as browser:
        result = await browser_login(browser, f"{world.url}/wiki/Secret_Plans?rev=7",
                                     stop_before_callback=True)
        assert result.callback_url
        state = _query(result.callback_url)["state"]
        assert not state.startswith("r.")
        assert 43 <= len(state) <= 1536
        for readable in ("Secret", "wiki", "rev"):
            assert readable not in state
        status, headers, _ = await callback_answer(browser, result.callback_url)
        assert status == 302
        assert headers["Location"] == "/wiki/Secret_Plans?rev=7"


@pytest.mark.redis
async def test_redirects_to_the_provider_write_nothing_to_the_store(
    oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory, redis_target: RedisTarget
) -> None:
    """An anonymous flood of navigations fills no Redis memory: a sign-in writes to the store
    only when it comes back (its single-use mark and the session)."""
    def keys() -> list[str]:
        reply = redis_command(redis_target.port, "KEYS", f"{redis_target.prefix}*")
        return [line for line in reply.decode().split("\r\n")
                if line.startswith(redis_target.prefix)]

    async with gateway_world(
        tmp_path_factory.mktemp("nostore"), issuer=oidc_provider.issuer,
        client=register_at(oidc_provider), store="redis", redis_url=redis_target.url,
        key_prefix=redis_target.prefix,
    ) as redis_world, new_browser() as anon:
        for i in range(100):
            async with anon.get(f"{redis_world.url}/page/{i}", headers=HTML,
                                allow_redirects=False) as r:
                assert r.status == 302
        assert keys() == []
        async with new_browser() as browser:
            assert (await browser_login(browser, f"{redis_world.url}/x")).status == 200
        stored = [k.removeprefix(redis_target.prefix) for k in keys()]
        (mark,) = [k for k in stored if k.startswith("l:used:")]
        # Kept while the state could be used (10 minutes), by replicas up to 60 s behind too.
        ttl = int(redis_command(redis_target.port, "TTL",
                                redis_target.prefix + mark).decode().strip(":\r\n"))
        assert 600 < ttl <= 660
        assert len([k for k in stored if k.startswith("s:")]) == 1
        assert not [k for k in stored if k.startswith("l:") and not k.startswith("l:used:")]


# ---------------------------------------------------------------------------------------------
# authorization codes: replay and injection
# ---------------------------------------------------------------------------------------------


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def test_a_used_code_replayed_with_a_fresh_state_signs_nobody_in(world: World) -> None:
    async with new_browser() as browser:
        result = await browser_login(browser, f"{world.url}/first", stop_before_callback=True)
        assert result.callback_url
        used = _query(result.callback_url)
        status, _, _ = await callback_answer(browser, result.callback_url)
        assert status == 302
    async with new_browser() as replayer:
        # A fresh login gives the replayer a valid state and binding of its own...
        fresh = await browser_login(replayer, f"{world.url}/second", stop_before_callback=True)
        assert fresh.callback_url
        state = _query(fresh.callback_url)["state"]
        # ...but the code was redeemed already: the provider refuses it, no session is made.
        url = f"{world.url}/oauth2/callback?{urlencode({**used, 'state': state})}"
        status, headers, text = await callback_answer(replayer, url)
        assert status in (400, 401, 502)
        assert not sets_session(headers)
        assert "Sign-in failed" in text
        assert cookie_value(replayer, COOKIE) is None


async def test_a_code_injected_into_another_browsers_login_fails_pkce(world: World) -> None:
    """The victim's unused code, pasted into the attacker's own login: the state and binding
    match, but the code was issued for the victim's PKCE challenge, so the provider refuses
    the attacker's verifier."""
    mark = world.mark()
    async with new_browser() as victim, new_browser() as attacker:
        stolen = await browser_login(victim, f"{world.url}/v", stop_before_callback=True)
        own = await browser_login(attacker, f"{world.url}/a", stop_before_callback=True)
        assert stolen.callback_url
        assert own.callback_url
        injected = {**_query(own.callback_url), "code": _query(stolen.callback_url)["code"]}
        url = f"{world.url}/oauth2/callback?{urlencode(injected)}"
        status, headers, text = await callback_answer(attacker, url)
        assert status in (400, 401, 502)
        assert "Sign-in failed" in text
        assert not sets_session(headers)
        assert cookie_value(attacker, COOKIE) is None
    assert world.seen_since(mark) == []


# ---------------------------------------------------------------------------------------------
# session fixation
# ---------------------------------------------------------------------------------------------


async def test_a_planted_cookie_never_survives_login(world: World) -> None:
    planted = f"{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"
    async with new_browser() as bob_browser:
        await browser_login(bob_browser, f"{world.url}/", username="bob",
                            password="builder")  # the test OP's bob
        bobs = cookie_value(bob_browser, COOKIE)
    assert bobs
    assert await status_with(world, bobs) == (200, "bob")
    for fixed in (planted, bobs):
        async with new_browser() as browser:
            browser.cookie_jar.update_cookies({COOKIE: fixed}, URL(world.url))
            # The victim signs in (start forces a login even with a session cookie).
            result = await browser_login(browser, f"{world.url}/oauth2/start?rd=%2Fme")
            assert result.status == 200
            fresh = cookie_value(browser, COOKIE)
            assert fresh
            assert fresh != fixed
            assert fresh.split(".")[0] != fixed.split(".")[0]  # a new session id
            assert await status_with(world, fresh) == (200, "alice")
        # The planted ticket opens nothing, not even bob's old session: it was ended.
        assert (await status_with(world, fixed))[0] == 401


async def test_every_login_gets_a_ticket_of_its_own(world: World) -> None:
    """Logins one after another and at once: each session cookie has its own id and secret
    and opens its own session (a login's ticket is made ahead, after the login before it)."""

    async def login() -> str:
        async with new_browser() as browser:
            result = await browser_login(browser, f"{world.url}/")
            assert result.status == 200
            value = cookie_value(browser, COOKIE)
            assert value
            return value

    tickets = [await login() for _ in range(3)]
    tickets += await asyncio.gather(*(login() for _ in range(3)))
    assert len({t.split(".")[0] for t in tickets}) == len(tickets)
    assert len({t.split(".")[1] for t in tickets}) == len(tickets)
    for ticket in tickets:
        assert await status_with(world, ticket) == (200, "alice")


# ---------------------------------------------------------------------------------------------
# sign-out: logout CSRF
# ---------------------------------------------------------------------------------------------


async def signed_in(world: World) -> tuple[aiohttp.ClientSession, str]:
    browser = new_browser()
    await browser_login(browser, f"{world.url}/")
    value = cookie_value(browser, COOKIE)
    assert value
    return browser, value


CROSS_SITE = [
    ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
    ("POST", {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.test"}),
    ("GET", {"Sec-Fetch-Site": "CROSS-SITE"}),
    ("GET", {"Sec-Fetch-Site": "something-new"}),  # an unknown value is not trusted
    ("POST", {"Origin": "https://evil.test"}),  # an older browser: no Fetch Metadata
    ("POST", {"Origin": "null"}),  # sandboxed frames, data: URLs
    ("POST", {"Origin": "http://127.0.0.1:1"}),  # same host, another port: another origin
    ("GET", {"Referer": "https://evil.test/page"}),
]


@pytest.mark.parametrize(("method", "headers"), CROSS_SITE,
                         ids=[f"{m}-{'-'.join(h.values())}" for m, h in CROSS_SITE])
async def test_a_cross_site_sign_out_asks_first(
    world: World, method: str, headers: dict[str, str]
) -> None:
    browser, cookie = await signed_in(world)
    async with browser:
        async with browser.request(method, f"{world.url}/oauth2/sign_out?rd=%2Fbye",
                                   headers={**HTML, **headers}, allow_redirects=False) as r:
            assert r.status == 200
            text = await r.text()
            assert "Sign out?" in text
            assert 'href="/oauth2/sign_out?rd=%2Fbye"' in text
            assert r.headers["Cache-Control"] == "no-store"
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "Set-Cookie" not in r.headers
        assert cookie_value(browser, COOKIE) == cookie
        assert await status_with(world, cookie) == (200, "alice")  # still signed in
        # The button on that page is a same-origin navigation: it signs out.
        async with browser.get(f"{world.url}/oauth2/sign_out?rd=%2Fbye", allow_redirects=False,
                               headers={**HTML, "Sec-Fetch-Site": "same-origin"}) as r:
            assert r.status == 302
        assert (await status_with(world, cookie))[0] == 401


SAME_SITE = [
    ("GET", {"Sec-Fetch-Site": "same-origin"}),
    ("POST", {"Sec-Fetch-Site": "same-origin", "Origin": "{origin}"}),
    ("GET", {"Sec-Fetch-Site": "same-site"}),
    ("GET", {"Sec-Fetch-Site": "none"}),  # typed in the address bar, a bookmark
    ("POST", {"Origin": "{origin}"}),
    ("GET", {"Referer": "{origin}/some/page"}),
    ("GET", {}),  # a script or an old browser sending nothing to judge by
    ("POST", {}),
]


@pytest.mark.parametrize(("method", "headers"), SAME_SITE,
                         ids=[f"{m}-{'-'.join(h.values()) or 'none'}" for m, h in SAME_SITE])
async def test_a_same_site_sign_out_signs_out(
    world: World, oidc_provider: Any, method: str, headers: dict[str, str]
) -> None:
    browser, cookie = await signed_in(world)
    sent = {k: v.format(origin=world.url) for k, v in headers.items()}
    async with browser:
        async with browser.request(method, f"{world.url}/oauth2/sign_out",
                                   headers={**HTML, **sent}, allow_redirects=False) as r:
            assert r.status == 302  # to the provider's end_session_endpoint
            assert r.headers["Location"].startswith(oidc_provider.endpoint("end_session"))
            assert r.headers["Cache-Control"] == "no-store"
            removal = [v for v in r.headers.getall("Set-Cookie") if v.startswith(f"{COOKIE}=")]
            assert removal
            assert "Max-Age=0" in removal[0]
        assert cookie_value(browser, COOKIE) is None
    assert (await status_with(world, cookie))[0] == 401


# ---------------------------------------------------------------------------------------------
# Cache-Control: no-store
# ---------------------------------------------------------------------------------------------


async def test_every_redirect_and_auth_answer_is_no_store(world: World) -> None:
    seen: list[tuple[str, int, str | None]] = []

    async def record(browser: aiohttp.ClientSession, method: str, url: str,
                     headers: dict[str, str]) -> aiohttp.ClientResponse:
        async with browser.request(method, URL(url, encoded=True), headers=headers,
                                   allow_redirects=False) as r:
            await r.read()
            seen.append((f"{method} {url.replace(world.url, '')}", r.status,
                         r.headers.get("Cache-Control")))
            return r

    async with new_browser() as browser:
        await record(browser, "GET", f"{world.url}/page", HTML)  # 302 to the provider
        await record(browser, "GET", f"{world.url}/api", JSON)  # 401 JSON
        await record(browser, "POST", f"{world.url}/form", HTML)  # 401: POST never redirects
        await record(browser, "GET", f"{world.url}/oauth2/start?rd=%2Fx", HTML)
        await record(browser, "GET", f"{world.url}/oauth2/start?rd=%2F%2Fevil", HTML)  # 400
        await record(browser, "GET", f"{world.url}/oauth2/userinfo", JSON)  # 401
        await record(browser, "GET", f"{world.url}/oauth2/callback?state=x&code=y", HTML)
        result = await browser_login(browser, f"{world.url}/done", stop_before_callback=True)
        assert result.callback_url
        r = await record(browser, "GET", result.callback_url, HTML)
        assert r.headers["Referrer-Policy"] == "no-referrer"
        await record(browser, "GET", f"{world.url}/oauth2/userinfo", JSON)  # 200
        await record(browser, "GET", f"{world.url}/oauth2/sign_out", {
            **HTML, "Sec-Fetch-Site": "cross-site"})  # the confirmation page
        await record(browser, "GET", f"{world.url}/oauth2/sign_out", HTML)  # 302
        await record(browser, "GET", f"{world.url}/oauth2/sign_out", HTML)  # 200 page
    async with new_browser() as bob:
        await browser_login(bob, f"{world.url}/", username="bob",
                            password="builder")  # the test OP's bob
        await record(bob, "GET", f"{world.url}/admin", HTML)  # 403 page
    statuses = sorted({status for _, status, _ in seen})
    assert statuses == [200, 302, 400, 401, 403]
    assert [s for s in seen if s[2] != "no-store"] == []
