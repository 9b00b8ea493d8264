"""The signed identity assertion and configurable identity headers, for real.

Real gateway processes in front of the echo upstream, the real oidc-provider login, a real
Redis: the assertion the app receives is verified with joserfc against the JWKS fetched over
HTTP from the gateway, tampering is refused, the README's example runs as written, replicas
sharing Redis sign with one key (SET NX), and rotation keeps old keys published (with an
injected clock, against memory and Redis).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from gateway.assertion import SKEW, AssertionKey, generation_start, load_key
from gateway.assertion_keys import AssertionKeys
from gateway.config import Config, parse_config
from gateway.errors import SessionStoreError
from tests.support.gateway_proc import (
    free_port,
    new_session_key,
    spawn_gateway,
)
from tests.support.login import browser_login
from tests.support.world import GatewayWorld, open_world

README = Path(__file__).resolve().parents[2] / "README.md"
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
ASSERTION = "x-gateway-assertion"


class World(GatewayWorld):
    def client(self, *ports: int) -> tuple[str, str]:
        return self.register(*ports)

    def config(self, port: int, *, client: tuple[str, str] | None = None,
               **kwargs: Any) -> dict[str, Any]:
        return self.base_config(port, client=client, **kwargs)


@pytest.fixture
async def world(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(World, oidc_provider, tmp_path) as w:
        yield w


def other_origin(url: str) -> str:
    """The echo upstream under another origin (localhost for 127.0.0.1): another audience."""
    return url.replace("127.0.0.1", "localhost")


def signed_routes(upstream: str, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "public", "match": {"path": "/public/"}, "upstream": upstream,
         "auth": "public"},
        {"name": "signed", "match": {"path": "/signed/"}, "upstream": upstream,
         "assertion": True, **extra},
        {"name": "other-app", "match": {"path": "/other/"}, "upstream": other_origin(upstream),
         "assertion": True},
        {"name": "plain", "match": {"path": "/"}, "upstream": upstream},
    ]


def new_browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def received(text: str) -> dict[str, list[str]]:
    """The headers the echo upstream saw, by lower-case name."""
    out: dict[str, list[str]] = {}
    for name, value in json.loads(text)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def fetch(browser: aiohttp.ClientSession, url: str,
                headers: dict[str, str] | None = None) -> dict[str, list[str]]:
    async with browser.get(url, headers={**HTML, **(headers or {})},
                           allow_redirects=False) as r:
        assert r.status == 200, await r.text()
        return received(await r.text())


async def jwks_over_http(url: str) -> tuple[dict[str, Any], aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json(content_type=None), r


def verify(token: str, keys: dict[str, Any], *, iss: str, aud: str) -> dict[str, Any]:
    """What an upstream does: the gateway's JWKS, ES256 only, then iss, aud and exp."""
    decoded = jwt.decode(token, KeySet.import_key_set(keys),  # type: ignore[arg-type]
                         algorithms=["ES256"])
    jwt.JWTClaimsRegistry(iss={"essential": True, "value": iss},
                          aud={"essential": True, "value": aud},
                          exp={"essential": True}).validate(decoded.claims)
    return decoded.claims


def tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = [*claims["groups"], "root"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return ".".join([head, forged, signature])


def kid_of(token: str) -> str:
    head = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


# ---------------------------------------------------------------------------------------------
# A real login, a real gateway, the JWKS over HTTP
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_the_assertion_of_a_real_login_verifies_against_the_published_jwks(
    world: World, redis_target: Any
) -> None:
    port = free_port()
    gw = await world.start(world.config(
        port, store="redis", redis_url=redis_target.url, key_prefix=redis_target.prefix,
        routes=signed_routes(world.upstream.url)))
    async with new_browser() as browser:
        login = await browser_login(browser, f"{gw.url}/signed/page")
        assert login.status == 200, login.text
        first = received(login.text)
        # A client's own copy never reaches the app, on any route.
        again = await fetch(browser, f"{gw.url}/signed/x", {"X-Gateway-Assertion": "forged"})
        other = await fetch(browser, f"{gw.url}/other/x")
        plain = await fetch(browser, f"{gw.url}/plain", {"X_Gateway_Assertion": "forged"})
    async with aiohttp.ClientSession() as anonymous, anonymous.get(
        f"{gw.url}/public/x", headers={"X-Gateway-Assertion": "forged"}
    ) as r:
        public = received(await r.text())

    keys, answer = await jwks_over_http(f"{gw.url}/oauth2/jwks.json")
    assert answer.headers["Content-Type"].startswith("application/jwk-set+json")
    assert answer.headers["Cache-Control"] == "public, max-age=60"
    well_known, _ = await jwks_over_http(f"{gw.url}/.well-known/jwks.json")
    assert well_known == keys
    assert all("d" not in key for key in keys["keys"])  # never the private part

    token = first[ASSERTION][0]
    claims = verify(token, keys, iss=gw.url, aud=world.upstream.url)
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["preferred_username"] == "alice"
    assert claims["groups"] == ["eng", "admins"]
    assert claims["exp"] - claims["iat"] == 60
    # The built-in identity headers are still there, and agree.
    assert first["x-forwarded-user"] == ["alice"]
    assert first["x-forwarded-groups"] == ["eng,admins"]

    assert len(again[ASSERTION]) == 1
    second = verify(again[ASSERTION][0], keys, iss=gw.url, aud=world.upstream.url)
    assert second["jti"] != claims["jti"]  # a new assertion for every request
    # Another upstream origin is another audience: the app at 127.0.0.1 refuses it.
    verify(other[ASSERTION][0], keys, iss=gw.url, aud=other_origin(world.upstream.url))
    with pytest.raises(JoseError):
        verify(other[ASSERTION][0], keys, iss=gw.url, aud=world.upstream.url)
    # Routes without assertion: true send none, and drop the client's.
    assert ASSERTION not in plain
    assert ASSERTION not in public
    # Tampered: refused.
    with pytest.raises(JoseError):
        verify(tampered(token), keys, iss=gw.url, aud=world.upstream.url)


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    marker = text.index("<!-- assertion-example")
    found = re.search(r"```python\n(.*?)```", text[marker:], flags=re.S)
    assert found is not None, "the README lost its assertion example"
    return found.group(1)


def test_the_readme_example_is_about_ten_lines() -> None:
    code = [line for line in readme_example().splitlines() if line.strip()]
    assert len(code) <= 12
    assert any(line.startswith("GATEWAY = ") for line in code)
    assert any(line.startswith("APP = ") for line in code)


async def test_the_readme_example_verifies_a_real_assertion_and_refuses_forgeries(
    world: World,
) -> None:
    port = free_port()
    gw = await world.start(world.config(port, routes=signed_routes(world.upstream.url)))
    async with new_browser() as browser:
        login = await browser_login(browser, f"{gw.url}/signed/page")
        assert login.status == 200, login.text
        token = received(login.text)[ASSERTION][0]
        other = (await fetch(browser, f"{gw.url}/other/x"))[ASSERTION][0]

    code = readme_example()
    code = re.sub(r"^GATEWAY = .*$", f"GATEWAY = {gw.url!r}", code, count=1, flags=re.M)
    code = re.sub(r"^APP = .*$", f"APP = {world.upstream.url!r}", code, count=1, flags=re.M)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    verify_assertion: Callable[[str], dict[str, Any]] = namespace["verify_assertion"]

    claims = await asyncio.to_thread(verify_assertion, token)  # it fetches the JWKS itself
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["eng", "admins"]
    for forged in (tampered(token), other, token[:-4] + "AAAA"):
        with pytest.raises(JoseError):
            await asyncio.to_thread(verify_assertion, forged)


# ---------------------------------------------------------------------------------------------
# Replicas, configured keys, configured headers
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_gateways_sharing_redis_sign_with_one_key_and_publish_it(
    world: World, redis_target: Any
) -> None:
    ports = (free_port(), free_port())
    client = world.client(*ports)
    key = new_session_key()
    configs = [world.config(p, client=client, store="redis", redis_url=redis_target.url,
                            key_prefix=redis_target.prefix, session_key=key,
                            routes=signed_routes(world.upstream.url)) for p in ports]
    # Started together: both ask Redis for the key at once; SET NX lets one win.
    gw1, gw2 = await asyncio.gather(*(world.start(c) for c in configs))
    async with new_browser() as browser:
        login = await browser_login(browser, f"{gw1.url}/signed/a")
        assert login.status == 200, login.text
        token1 = received(login.text)[ASSERTION][0]
        # The same session (shared Redis, host-only cookie for 127.0.0.1) at the other one.
        token2 = (await fetch(browser, f"{gw2.url}/signed/b"))[ASSERTION][0]
    assert kid_of(token1) == kid_of(token2)
    keys1, _ = await jwks_over_http(f"{gw1.url}/oauth2/jwks.json")
    keys2, _ = await jwks_over_http(f"{gw2.url}/oauth2/jwks.json")
    assert keys1 == keys2
    # Each gateway's assertion verifies with the other's JWKS.
    verify(token1, keys2, iss=gw1.url, aud=world.upstream.url)
    verify(token2, keys1, iss=gw2.url, aud=world.upstream.url)


def pem(key: ec.EllipticCurvePrivateKey, *, public: bool = False) -> str:
    if public:
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


async def test_a_configured_key_signs_and_configured_headers_reach_the_app(
    world: World, tmp_path: Path
) -> None:
    mine, old = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "assertion.pem"
    key_file.write_text(pem(mine))
    port = free_port()
    upstream = world.upstream.url
    config = world.config(port, routes=[
        {"name": "public", "match": {"path": "/public/"}, "upstream": upstream,
         "auth": "public"},
        {"name": "api", "match": {"path": "/api/"}, "upstream": upstream, "assertion": True,
         "allow": [{"groups": ["eng"]}],
         "headers": {"groups_filter": "policy"}},
    ])
    config["headers"] = {
        "send": {"X-User-Id": "sub", "X-User-Name": "name", "X-Groups": "groups",
                 "X-Missing": "department"},
        "required": ["X-User-Id"],
        "separator": ";",
    }
    config["assertion"] = {"key_file": str(key_file), "published_keys": ["${OLD_KEY}"],
                           "audience": "urn:example:api", "lifetime": "30s"}
    gw = await world.start(config, env={"OLD_KEY": pem(old, public=True)})

    async with new_browser() as browser:
        login = await browser_login(browser, f"{gw.url}/api/items",
                                    headers={"X-User-Id": "root"})
        assert login.status == 200, login.text
        seen = await fetch(browser, f"{gw.url}/api/items",
                           {"x_user_id": "root", "X-Groups": "admins"})
    async with aiohttp.ClientSession() as anonymous, anonymous.get(
        f"{gw.url}/public/x", headers={"X-User-Id": "root", "X-User-Name": "Root"}
    ) as r:
        public = received(await r.text())

    # Exactly the configured headers, each once; the client's copies are gone.
    assert seen["x-user-id"] == ["alice"]
    assert seen["x-user-name"] == ["Alice Example"]
    assert seen["x-groups"] == ["eng"]  # groups_filter: policy: the route names eng only
    assert "x-missing" not in seen  # optional, and alice has no department claim
    assert "x-forwarded-user" not in seen  # send replaces the built-in headers
    assert "x-user-id" not in public
    assert "x-user-name" not in public

    keys, _ = await jwks_over_http(f"{gw.url}/.well-known/jwks.json")
    ours = load_key(pem(mine))
    assert [k["kid"] for k in keys["keys"]] == [ours.kid, load_key(pem(old, public=True)).kid]
    token = seen[ASSERTION][0]
    assert kid_of(token) == ours.kid
    claims = verify(token, keys, iss=gw.url, aud="urn:example:api")
    assert claims["exp"] - claims["iat"] == 30
    assert claims["groups"] == ["eng"]


async def test_an_unreadable_key_file_stops_the_gateway_naming_the_key(
    world: World, tmp_path: Path
) -> None:
    port = free_port()
    config = world.config(port, routes=signed_routes(world.upstream.url))
    config["assertion"] = {"key_file": str(tmp_path / "missing.pem")}
    gw = spawn_gateway(config, directory=tmp_path)
    world.gateways.append(gw)
    code = await asyncio.to_thread(gw.proc.wait, 20)
    assert code != 0
    assert "assertion.key_file" in gw.logs()
    assert "cannot be read" in gw.logs()


async def test_without_assertion_routes_the_well_known_path_stays_the_apps(
    world: World,
) -> None:
    port = free_port()
    gw = await world.start(world.config(port))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/oauth2/jwks.json") as r:
            assert r.status == 404
        async with new_browser() as browser:
            login = await browser_login(browser, f"{gw.url}/.well-known/jwks.json")
            assert login.status == 200, login.text
            assert json.loads(login.text)["path"] == "/.well-known/jwks.json"  # the echo app


# ---------------------------------------------------------------------------------------------
# The key adapter: replicas agree through Redis; rotation with an injected clock
# ---------------------------------------------------------------------------------------------

HOUR = 3600.0
KEY_A = new_session_key()


def keys_config(store: str, redis: Any | None = None, **assertion: Any) -> Config:
    session: dict[str, Any] = {"store": store, "keys": [KEY_A]}
    if redis is not None:
        session.update(redis_url=redis.url, key_prefix=redis.prefix)
    return parse_config({
        "version": 1,
        "provider": {"issuer": "https://idp.example.com", "client_id": "c",
                     "client_secret": "s"},
        "session": session,
        "routes": [{"name": "a", "upstream": "http://127.0.0.1:9", "assertion": True}],
        "assertion": {"rotate_every": "1h", "lifetime": "60s", **assertion},
    }, {})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def opened(config: Config, clock: Callable[[], float]) -> AssertionKeys:
    keys = AssertionKeys.open(config, clock=clock)
    assert keys is not None
    return keys


@pytest.mark.redis
async def test_replicas_asking_at_once_agree_on_one_key_through_redis(redis_target: Any) -> None:
    clock = Clock(1000 * HOUR + 10)
    replicas = [opened(keys_config("redis", redis_target), clock) for _ in range(6)]
    try:
        signing = await asyncio.gather(*(r.signing_key() for r in replicas))
        assert len({k.kid for k in signing}) == 1
        late = opened(keys_config("redis", redis_target), clock)
        replicas.append(late)
        assert (await late.signing_key()).kid == signing[0].kid  # read, not made again
        published = [[k.kid for k in await r.published()] for r in replicas]
        assert all(p == published[0] for p in published)
    finally:
        for r in replicas:
            await r.close()


def kids(keys: list[AssertionKey]) -> list[str]:
    return [k.kid for k in keys]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_rotation_publishes_the_next_key_early_and_the_old_one_until_expiry(
    store: str, request: pytest.FixtureRequest
) -> None:
    redis = request.getfixturevalue("redis_target") if store == "redis" else None
    boundary = generation_start(2000, HOUR)
    clock = Clock(boundary - HOUR / 2)
    keys = opened(keys_config(store, redis), clock)
    other_replica = opened(keys_config(store, redis), clock) if store == "redis" else keys
    try:
        old = await keys.signing_key()
        assert kids(await keys.published()) == [old.kid]

        clock.now = boundary - 2 * SKEW  # the next key is published before it signs
        published = kids(await keys.published())
        assert published[0] == old.kid
        assert len(published) == 2
        new_kid = published[1]
        assert (await keys.signing_key()).kid == old.kid

        clock.now = boundary  # the new key signs, on every replica
        assert (await keys.signing_key()).kid == new_kid
        assert (await other_replica.signing_key()).kid == new_kid
        assert kids(await keys.published()) == [old.kid, new_kid]

        clock.now = boundary + 60 + 2 * SKEW - 1  # the old key's last assertions still live
        assert old.kid in kids(await other_replica.published())
        clock.now = boundary + 60 + 2 * SKEW  # ... and now they have all expired
        assert kids(await other_replica.published()) == [new_kid]
    finally:
        await keys.close()
        if other_replica is not keys:
            await other_replica.close()


@pytest.mark.redis
async def test_a_key_sealed_under_other_session_keys_is_refused_not_used(
    redis_target: Any,
) -> None:
    clock = Clock(3000 * HOUR + 5)
    first = opened(keys_config("redis", redis_target), clock)
    try:
        await first.signing_key()
        # Someone overwrote the slot with bytes sealed under another key: fail closed (503).
        client = aioredis.Redis.from_url(redis_target.url)
        try:
            slot_keys = await client.keys(f"{redis_target.prefix}assertion:*")
            assert slot_keys
            for name in slot_keys:
                await client.set(name, b"\x01" + bytes(60))
        finally:
            await client.aclose()
        fresh = opened(keys_config("redis", redis_target), clock)
        try:
            with pytest.raises(SessionStoreError, match="does not open"):
                await fresh.signing_key()
        finally:
            await fresh.close()
    finally:
        await first.close()


@dataclass
class DeadRedis:
    url: str
    prefix: str = "x:"


async def test_a_dead_redis_means_no_assertion_rather_than_an_unshared_key() -> None:
    dead = DeadRedis(f"redis://127.0.0.1:{free_port()}/0")
    keys = opened(keys_config("redis", dead), Clock(4000 * HOUR))
    try:
        with pytest.raises(SessionStoreError):
            await keys.signing_key()
    finally:
        await keys.close()

