"""Authority confusion: one validated host decides the route and every URL the gateway builds.

Routes here are bound to hosts and no route serves "any host": ``app.test`` (``/public/``
public, ``/`` protected) and ``*.wild.test`` (public). ``public_url`` is unset, so the
redirect URI comes from the request's own (validated) Host, never from a header an untrusted
peer may set, and never for a host no route serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio

from tests.integration.attacks_common import (
    World,
    gateway_world,
    raw_exchange,
    request_bytes,
)

pytestmark = [pytest.mark.provider, pytest.mark.asyncio(loop_scope="module")]


def host_routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"name": "app-public", "match": {"host": "app.test", "path": "/public/"},
         "upstream": upstream, "auth": "public"},
        {"name": "app", "match": {"host": "app.test", "path": "/"}, "upstream": upstream},
        {"name": "wild", "match": {"host": "*.wild.test", "path": "/"}, "upstream": upstream,
         "auth": "public"},
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> AsyncIterator[World]:
    # The client is not registered: these tests read the authorization request the gateway
    # builds, they never complete a login.
    async with gateway_world(tmp_path_factory.mktemp("authority"), issuer=oidc_provider.issuer,
                             client=lambda port: ("authority-client", "unused"),
                             routes=host_routes) as w:
        yield w


async def send(world: World, target: str, headers: list[str], method: str = "GET"
               ) -> tuple[int | None, list[dict[str, Any]], dict[str, str]]:
    mark = world.mark()
    answer = await raw_exchange(world.port, request_bytes(
        method, target, [*headers, "Accept: application/json", "Connection: close"]))
    return answer.status, world.seen_since(mark), {k.lower(): v for k, v in answer.headers}


@pytest.mark.parametrize(
    ("host", "forwarded_host"),
    [("app.test", "app.test"), ("APP.Test", "APP.Test"), ("app.test.", "app.test."),
     ("app.test:8080", "app.test:8080"), ("a.wild.test", "a.wild.test"),
     ("x.y.wild.test", "x.y.wild.test")],
)
async def test_known_hosts_in_any_spelling_route_alike(
    world: World, host: str, forwarded_host: str
) -> None:
    path = "/x" if "wild" in host else "/public/x"
    status, seen, _ = await send(world, path, [f"Host: {host}"])
    assert status == 200
    [record] = seen
    assert record["raw_path"] == path
    got = {k.lower(): v for k, v in record["headers"]}
    assert got["host"] == forwarded_host
    assert got["x-forwarded-host"] == forwarded_host


@pytest.mark.parametrize(
    "headers",
    [
        ["Host: unknown.test"],
        ["Host: app.test.evil.test"],
        ["Host: evilapp.test"],
        ["Host: wild.test"],  # the wildcard's apex is not served
        ["Host: 127.0.0.1"],
        ["Host: [::1]:80"],
        # Routing uses Host only: X-Forwarded-Host from an untrusted peer changes nothing.
        ["Host: unknown.test", "X-Forwarded-Host: app.test"],
        ["Host: unknown.test", "X-Forwarded-Host: a.wild.test", "Forwarded: host=app.test"],
    ],
    ids=lambda h: " | ".join(h),
)
async def test_unknown_hosts_get_404_and_nothing_is_forwarded(
    world: World, headers: list[str]
) -> None:
    status, seen, _ = await send(world, "/public/x", headers)
    assert status == 404
    assert seen == []


async def test_x_forwarded_host_cannot_turn_a_protected_request_public(world: World) -> None:
    status, seen, _ = await send(world, "/secret", ["Host: app.test",
                                                    "X-Forwarded-Host: a.wild.test"])
    assert status == 401
    assert seen == []


@pytest.mark.parametrize(
    ("target", "headers", "status", "upstream_path"),
    [
        ("http://app.test/public/x", ["Host: app.test"], 200, "/public/x"),
        ("HTTP://APP.TEST/public/x?q=1", ["Host: app.test"], 200, "/public/x?q=1"),
        ("http://app.test/public/../secret", ["Host: app.test"], 401, None),
        ("http://evil.test/public/x", ["Host: app.test"], 400, None),
        ("http://app.test/public/x", ["Host: evil.test"], 400, None),
        ("http://a.wild.test/x", ["Host: app.test"], 400, None),
        ("http://user@app.test/public/x", ["Host: app.test"], 400, None),
        ("http://app.test:8080/public/x", ["Host: app.test"], 400, None),
        ("ftp://app.test/public/x", ["Host: app.test"], 400, None),
        # A path on app.test (protected there), never the authority evil.test:
        ("//evil.test/public/x", ["Host: app.test"], 401, None),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_absolute_form_targets_must_agree_with_host(
    world: World, target: str, headers: list[str], status: int, upstream_path: str | None
) -> None:
    got, seen, _ = await send(world, target, headers)
    assert got == status
    if upstream_path is None:
        assert seen == []
    else:
        [record] = seen
        assert record["raw_path"] == upstream_path
        assert {k.lower(): v for k, v in record["headers"]}["host"] == "app.test"


def _redirect_uri(location: str) -> str:
    return parse_qs(urlsplit(location).query)["redirect_uri"][0]


@pytest.mark.parametrize(
    ("headers", "redirect_uri"),
    [
        (["Host: app.test"], "http://app.test/oauth2/callback"),
        (["Host: app.test:8080"], "http://app.test:8080/oauth2/callback"),
        (["Host: b.wild.test"], "http://b.wild.test/oauth2/callback"),
        (["Host: app.test", "X-Forwarded-Host: evil.test", "X-Forwarded-Proto: https"],
         "http://app.test/oauth2/callback"),
    ],
    ids=["host", "host-port", "wildcard", "spoofed-forwarded-host"],
)
async def test_the_redirect_uri_comes_from_the_validated_host(
    world: World, headers: list[str], redirect_uri: str
) -> None:
    # "/secret" is protected on app.test (a login starts there too); *.wild.test is public.
    targets = ["/oauth2/start?rd=%2F"] + ([] if "wild" in headers[0] else ["/secret"])
    for target in targets:
        mark = world.mark()
        answer = await raw_exchange(world.port, request_bytes("GET", target, [
            *headers, "Accept: text/html", "Connection: close"]))
        assert answer.status == 302
        location = answer.header("Location") or ""
        assert _redirect_uri(location) == redirect_uri
        assert world.seen_since(mark) == []


@pytest.mark.parametrize("host", ["evil.test", "app.test.evil.test", "wild.test"])
async def test_login_endpoints_refuse_hosts_no_route_serves(world: World, host: str) -> None:
    """Without public_url, an unserved Host would otherwise become the redirect URI."""
    for target in ("/oauth2/start?rd=%2F", "/oauth2/callback?state=x&code=y",
                   "/oauth2/sign_out"):
        status, seen, headers = await send(world, target, [f"Host: {host}"])
        assert status == 404, target
        assert "location" not in headers
        assert seen == []


async def test_a_login_that_could_not_come_back_is_refused_not_looped(
    oidc_provider: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``public_url`` names 127.0.0.1; a browser that reached the gateway as ``localhost``
    would get its binding cookie on localhost and its callback on 127.0.0.1: that login can
    never finish. The gateway says so instead of sending the browser round in circles."""
    directory = tmp_path_factory.mktemp("reach")
    async with gateway_world(directory, issuer=oidc_provider.issuer,
                             client=lambda port: ("reach-client", "unused"),
                             server={"public_url": "http://127.0.0.1"}) as world:
        for host, status in (("localhost", 500), ("127.0.0.1", 302)):
            answer = await raw_exchange(world.port, request_bytes("GET", "/secret", [
                f"Host: {host}", "Accept: text/html", "Connection: close"]))
            assert answer.status == status, host
            if status == 500:
                assert answer.header("Location") is None
                assert answer.header("Set-Cookie") is None
                assert b"session.cookie.domain" in answer.body
