"""Claims the provider sends, turned into headers: never injected, never rewritten into
someone else, never a 500. Plus the ID token ``nonce`` (no replay) and the PKCE verifier
(it goes to the provider's token endpoint and nowhere else).

The provider is :class:`MiniProvider`: it signs in whoever the test describes, with any claim
values (CR/LF, NUL, line separators, lone surrogates, very long, a group named
``eng,admins``). Identity headers are sent exactly as the provider wrote them or not at all:
a user name that cannot be refuses the login; an e-mail or group that cannot is left out.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from tests.integration.attacks_common import (
    CLIENT_ID,
    CLIENT_SECRET,
    HTML_ACCEPT,
    MiniProvider,
    World,
    cookie_value,
    echoed_headers,
    gateway_world,
    new_browser,
)
from tests.support.login import BrowserResult, browser_login

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

COOKIE = "_oidc_gateway"
_subjects = itertools.count()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider() -> AsyncIterator[MiniProvider]:
    op = MiniProvider()
    await op.start()
    try:
        yield op
    finally:
        await op.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(provider: MiniProvider, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    async with gateway_world(tmp_path_factory.mktemp("claims"), issuer=provider.issuer,
                             client=lambda port: (CLIENT_ID, CLIENT_SECRET)) as w:
        yield w


async def sign_in(world: World, provider: MiniProvider, browser: aiohttp.ClientSession,
                  **claims: Any) -> BrowserResult:
    provider.claims = {"sub": f"sub-{next(_subjects)}", **claims}
    return await browser_login(browser, f"{world.url}/app/landing")


async def get(browser: aiohttp.ClientSession, url: str) -> tuple[int, list[tuple[str, str]]]:
    async with browser.get(url, headers={"Accept": "application/json"},
                           allow_redirects=False) as r:
        if r.status != 200:
            return r.status, []
        return r.status, echoed_headers(await r.json())


def named(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


UNSAFE_USERS = {
    "crlf-injection": "alice\r\nX-Injected: 1",
    "trailing-newline": "alice\n",
    "leading-space": " alice",
    "trailing-space": "alice ",
    "nul": "al\x00ice",
    "tab": "al\tice",
    "line-separator": "alice\u2028",
    "c1-nel": "alice\x85",
    "no-break-space": "alice\u00a0",
    "lone-surrogate": "alice\ud800",
    "too-long": "a" * 1025,
}


@pytest.mark.parametrize("user", list(UNSAFE_USERS.values()), ids=list(UNSAFE_USERS))
async def test_a_user_name_that_cannot_be_sent_exactly_refuses_the_login(
    world: World, provider: MiniProvider, user: str
) -> None:
    """Cleaning would turn ``alice\\n`` into ``alice``: another account. So: no session."""
    mark = world.mark()
    async with new_browser() as browser:
        result = await sign_in(world, provider, browser, preferred_username=user)
        assert result.status == 401
        assert "Sign-in failed" in result.text
        assert "cannot pass it on" in result.text
        assert cookie_value(browser, COOKIE) is None
    assert world.seen_since(mark) == []


@pytest.mark.parametrize(
    ("claims", "email", "groups"),
    [({"name": "\ud800"}, [], []),
     ({"email": "z\udfff@example.com"}, [], []),
     ({"email": "zoe@example.com", "groups": ["eng", "\ud800"]}, ["zoe@example.com"], ["eng"])],
    ids=["name", "email", "group"],
)
async def test_claims_that_are_not_text_never_crash_and_never_reach_a_header(
    world: World, provider: MiniProvider, claims: dict[str, Any], email: list[str],
    groups: list[str],
) -> None:
    """Lone surrogates are valid JSON escapes but have no UTF-8 form: the session still
    stores, and such values are left out of the headers (aiohttp would raise on them)."""
    async with new_browser() as browser:
        result = await sign_in(world, provider, browser, preferred_username="zoe", **claims)
        assert result.status == 200
        status, seen = await get(browser, f"{world.url}/app/x")
    assert status == 200
    assert named(seen, "X-Forwarded-User") == ["zoe"]
    assert named(seen, "X-Forwarded-Email") == email
    assert named(seen, "X-Forwarded-Groups") == ([",".join(groups)] if groups else [])


@pytest.mark.parametrize(
    ("groups", "admin_status", "header"),
    [
        (["admins"], 200, ["admins"]),  # the control
        (["eng,admins"], 403, []),
        (["eng,admins", "ops"], 403, ["ops"]),
        (["eng", " admins"], 403, ["eng"]),
        (["admins\n"], 403, []),
        (["admins\r\nX-Injected: 1"], 403, []),
        (["admins\x00", "admins\u2028", "admins\x85"], 403, []),
        (["ADMINS", "Admins"], 403, ["ADMINS,Admins"]),
        (["eng", "g" * 1025], 403, ["eng"]),
        ([f"group-{i:03d}-{'x' * 20}" for i in range(150)], 403,
         [",".join(f"group-{i:03d}-{'x' * 20}" for i in range(150))]),
        (["\u00e9quipe", "\u5c71\u7530"], 403, ["\u00e9quipe,\u5c71\u7530"]),
    ],
    ids=["admins", "comma", "comma-and-ops", "space", "newline", "crlf", "controls",
         "case", "long-group", "150-groups", "non-ascii"],
)
async def test_groups_never_grant_more_than_they_say(
    world: World, provider: MiniProvider, groups: list[str], admin_status: int,
    header: list[str],
) -> None:
    async with new_browser() as browser:
        result = await sign_in(world, provider, browser, preferred_username="gina",
                               groups=groups)
        assert result.status == 200
        status, _ = await get(browser, f"{world.url}/admin/panel")
        assert status == admin_status
        status, seen = await get(browser, f"{world.url}/app/x")
        assert status == 200
    assert named(seen, "X-Forwarded-Groups") == header
    assert named(seen, "X-Injected") == []
    assert named(seen, "X-Forwarded-User") == ["gina"]


async def test_unsafe_email_and_preferred_username_are_left_out(
    world: World, provider: MiniProvider
) -> None:
    """The user name is the claim ``preferred_username`` by default; with the user name taken
    from a safe claim, unsafe secondary values are dropped, never cleaned into another."""
    async with new_browser() as browser:
        result = await sign_in(world, provider, browser, preferred_username="zoe",
                               email="zoe@example.com\r\nX-Injected: 1")
        assert result.status == 200
        status, seen = await get(browser, f"{world.url}/app/x")
    assert status == 200
    assert named(seen, "X-Forwarded-User") == ["zoe"]
    assert named(seen, "X-Forwarded-Email") == []
    assert named(seen, "X-Injected") == []


@pytest.mark.parametrize(
    "user", ["Zo\u00eb \u5c71\u7530", "o'brien", "a" * 1024, "user@example.com", "=?utf-8?q?x?="]
)
async def test_unusual_but_exact_user_names_pass_byte_for_byte(
    world: World, provider: MiniProvider, user: str
) -> None:
    async with new_browser() as browser:
        result = await sign_in(world, provider, browser, preferred_username=user)
        assert result.status == 200
        status, seen = await get(browser, f"{world.url}/app/x")
    assert status == 200
    assert named(seen, "X-Forwarded-User") == [user]  # UTF-8 on the wire, decoded alike
    assert named(seen, "X-Forwarded-Preferred-Username") == [user]


async def test_a_replayed_id_token_fails_the_nonce_check(
    world: World, provider: MiniProvider
) -> None:
    async with new_browser() as first:
        assert (await sign_in(world, provider, first, preferred_username="nina")).status == 200
    old = provider.issued[-1]  # valid signature, right issuer and audience, old nonce
    mark = world.mark()
    async with new_browser() as second:
        provider.next_id_token = old
        result = await browser_login(second, f"{world.url}/app/again")
        assert provider.next_id_token is None  # the provider did hand the old token out
        assert result.status == 401
        assert "Sign-in failed" in result.text
        assert cookie_value(second, COOKIE) is None
    assert world.seen_since(mark) == []


async def test_the_pkce_verifier_never_leaves_the_gateway_except_to_the_token_endpoint(
    world: World, provider: MiniProvider
) -> None:
    """The browser sees the challenge (S256) only; the verifier goes to the provider's token
    endpoint, back channel, and appears in no redirect, cookie, page or upstream request."""
    provider.claims = {"sub": "pkce-sub", "preferred_username": "pia"}
    authorize_before = len(provider.authorize_requests)
    seen_by_browser: list[str] = []
    async with new_browser() as browser:
        url = f"{world.url}/app/pkce"
        for _ in range(4):  # page → provider → callback → page
            async with browser.get(URL(url, encoded=True), allow_redirects=False,
                                   headers={"Accept": HTML_ACCEPT}) as r:
                seen_by_browser.append(str(r.url))
                seen_by_browser += [f"{k}: {v}" for k, v in r.headers.items()]
                seen_by_browser.append(await r.text())
                if r.status != 302:
                    break
                url = str(URL(url).join(URL(r.headers["Location"], encoded=True)))
        assert r.status == 200
    [authorize] = provider.authorize_requests[authorize_before:]
    assert authorize["code_challenge_method"] == "S256"
    assert "code_verifier" not in authorize
    token = provider.token_requests[-1]
    verifier = token["code_verifier"]
    assert len(verifier) >= 43  # RFC 7636 4.1: at least 256 bits of entropy, base64url
    everything = "\n".join(seen_by_browser)
    assert verifier not in everything
    assert authorize["code_challenge"] in everything  # the check above can see values
