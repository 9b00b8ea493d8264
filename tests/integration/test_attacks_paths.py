"""Path confusion: the path the gateway authorises is the path the upstream receives.

The gateway decodes the request path once, resolves dot-segments, collapses ``//``, judges
that path, and forwards exactly that path re-encoded (the echo upstream records the raw path
it got). What could be read two ways is a 400: backslashes, control bytes and NUL (raw or
encoded), malformed or overlong UTF-8, ``..;`` segments, and ``;parameters`` that would move
the request to another route once a servlet container drops them.

Routes: ``/public/`` public, ``/admin`` for the group ``admins``, ``/`` for anyone signed in.
Anonymous requests try to escape ``/public/``; bob (signed in, not in ``admins``) tries to
reach ``/admin``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_asyncio

from tests.integration.attacks_common import (
    World,
    cookie_value,
    gateway_world,
    new_browser,
    raw_exchange,
    register_at,
    request_bytes,
)
from tests.support.login import browser_login

pytestmark = [pytest.mark.provider, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    async with gateway_world(tmp_path_factory.mktemp("paths"), issuer=oidc_provider.issuer,
                             client=register_at(oidc_provider)) as w:
        yield w


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bob_cookie(world: World) -> str:
    async with new_browser() as browser:
        result = await browser_login(browser, f"{world.url}/", username="bob",
                                     password="builder")  # the test OP's bob
        assert result.status == 200
        value = cookie_value(browser, "_oidc_gateway")
    assert value
    return f"_oidc_gateway={value}"


async def send(world: World, target: bytes | str, cookie: str | None = None
               ) -> tuple[int | None, list[dict[str, Any]]]:
    mark = world.mark()
    headers = ["Host: gw.test", "Accept: application/json", "Connection: close"]
    if cookie:
        headers.append(f"Cookie: {cookie}")
    answer = await raw_exchange(world.port, request_bytes("GET", target, headers))
    return answer.status, world.seen_since(mark)


# (raw target, the raw path the upstream must receive) for requests that stay in /public/.
FORWARDED = [
    ("/public/./x", "/public/x"),
    ("/public//x", "/public/x"),
    ("//public/x", "/public/x"),
    ("/%2fpublic/x", "/public/x"),
    ("/public/a%2Fb", "/public/a/b"),
    ("/public/x/..", "/public/"),
    ("/public/%2E/x", "/public/x"),
    ("/public/%252e%252e/admin", "/public/%252e%252e/admin"),  # literal "%2e%2e", not ".."
    ("/public/%2525", "/public/%2525"),
    ("/public/a%3Fb", "/public/a%3Fb"),  # an encoded "?" stays data
    ("/public/a%23b", "/public/a%23b"),  # an encoded "#" stays data
    ("/public/x#frag", "/public/x"),  # a fragment is never sent on
    ("/public/caf%C3%A9", "/public/caf%C3%A9"),
    ("/public/%7euser", "/public/~user"),
    ("/public/a;b=c", "/public/a;b=c"),  # ;params that change no route are data
    ("/PUBLIC/../public/x", "/public/x"),
]


@pytest.mark.parametrize(("target", "upstream_path"), FORWARDED,
                         ids=[str(t) for t, _ in FORWARDED])
async def test_the_upstream_receives_the_path_that_was_authorised(
    world: World, target: str | bytes, upstream_path: str
) -> None:
    status, seen = await send(world, target)
    assert status == 200
    [record] = seen
    assert record["raw_path"] == upstream_path
    # Decoded once (as any upstream does) it is still inside the public prefix.
    assert unquote(record["raw_path"]).startswith("/public/")
    assert record["query"] == ""


# Anonymous escapes from /public/: each ends as a protected request (401) or a 400.
ESCAPES = [
    ("/public/../admin", 401),
    ("/public/%2e%2e/admin", 401),
    ("/public/%2E%2e/admin", 401),  # mixed-case encoding
    ("/public/.%2e/admin", 401),
    ("/public/%2e./admin", 401),
    ("/public/%2e%2e%2fadmin", 401),
    ("/public%2f..%2fadmin", 401),
    ("/public/..%2Fadmin", 401),
    ("/public/%2e%2e%2f%2e%2e%2fsecret", 401),
    ("/./public/../admin", 401),
    ("/public//../admin", 401),
    ("/public;x/../app", 401),
    ("/public/..%5cadmin", 400),  # encoded backslash
    ("/public/..%5Cadmin", 400),
    ("/public\\..\\admin", 400),  # raw backslash
    ("/public/..;/admin", 400),  # Tomcat's "..;" is ".."
    ("/public/%2e%2e;/admin", 400),
    ("/public/.;x=1/admin", 400),
    ("/public/x%00", 400),  # NUL
    ("/public/x%00.html/../../admin", 400),
    ("/public/x%0d%0aX-Injected:%201", 400),  # CR LF
    ("/public/%09", 400),
    ("/public/%7f", 400),
    ("/public/%c2%85", 400),  # C1 control (NEL) as UTF-8
    ("/public/%c0%ae%c0%ae/admin", 400),  # overlong UTF-8 for "."
    ("/public/..%c0%afadmin", 400),  # overlong UTF-8 for "/"
    ("/public/%e0%80%ae%e0%80%ae/admin", 400),
    ("/public/%ff", 400),  # not UTF-8
    ("/public/%u002e%u002e/admin", 400),  # IIS-style %u escapes are malformed here
    ("/public/%2", 400),
    ("/public/%zz", 400),
    (b"/public/\xc0\xae\xc0\xae/admin", 400),  # raw overlong bytes
    (b"/public/\x00/admin", 400),  # raw NUL (refused by the parser)
    (b"/public/\x01", 400),
    ("/public/caf\u00e9".encode(), 400),  # raw (unencoded) UTF-8: refused by the parser
]


@pytest.mark.parametrize(("target", "status"), ESCAPES, ids=[str(t) for t, _ in ESCAPES])
async def test_anonymous_path_tricks_never_leave_the_public_prefix(
    world: World, target: str | bytes, status: int
) -> None:
    got, seen = await send(world, target)
    assert got == status
    assert seen == []


# bob is signed in but not in "admins": every spelling of /admin is a 403 or a 400.
ADMIN = [
    ("/admin", 403),
    ("/admin/", 403),
    ("/admin/x", 403),
    ("/%61dmin", 403),  # encoded letter
    ("/adm%69n/x", 403),
    ("/admin%2f", 403),
    ("/app/../admin", 403),
    ("/app/%2e%2e/admin", 403),
    ("//admin", 403),
    ("/./admin", 403),
    ("/admin/./x", 403),
    ("/admin;jsessionid=1", 400),  # a servlet container would serve /admin
    ("/admin;/x", 400),
    ("/admin%3bx/y", 400),  # an encoded ";" decodes to a parameter delimiter
    ("/app/..;/admin", 400),
    ("/admin%00", 400),
    ("/admin\\", 400),
    ("/admin%5c", 400),
]


@pytest.mark.parametrize(("target", "status"), ADMIN, ids=[t for t, _ in ADMIN])
async def test_a_signed_in_user_cannot_reach_a_route_policy_denies(
    world: World, bob_cookie: str, target: str, status: int
) -> None:
    got, seen = await send(world, target, bob_cookie)
    assert got == status
    assert seen == []


async def test_path_controls_bob_reaches_his_own_pages(world: World, bob_cookie: str) -> None:
    """The positive control: bob's requests that do not name /admin are forwarded, with the
    path he asked for, ;parameters included where they change nothing."""
    for target, upstream in (("/app/x", "/app/x"), ("/administrator", "/administrator"),
                             ("/app;v=1/x", "/app;v=1/x"), ("/adminx/../app", "/app")):
        status, seen = await send(world, target, bob_cookie)
        assert status == 200, target
        [record] = seen
        assert record["raw_path"] == upstream
        assert ("X-Forwarded-User", "bob") in [tuple(h) for h in record["headers"]]
