"""The test peers are real: Redis answers, the OP speaks OpenID Connect, the browser logs in.

These tests use a tiny relying party written here (authorization code + PKCE, client secret at
the token endpoint, userinfo, RP-initiated logout) instead of the gateway, so a failure here
points at the test infrastructure, not at the gateway.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support.login import browser_login, browser_sign_out, new_browser
from tests.support.peers import (
    OidcProvider,
    OidcProviderFactory,
    PeerError,
    RedisServerFactory,
    RedisTarget,
    free_port,
    http_json,
)

SCOPE = "openid email profile groups offline_access"
PREFIXES_SEEN = "test-peers:prefixes-seen"  # outside any test's prefix on purpose


def _redis(url: str) -> Redis:
    # Fail at once when the server is down: no retries, short timeouts.
    return Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0,
                          retry=Retry(NoBackoff(), 0))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: the OP's signature is not what these tests are about."""
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return claims


def _basic(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: form-urlencode id and secret before base64.
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# ---------------------------------------------------------------------------------------------
# A minimal relying party
# ---------------------------------------------------------------------------------------------


@dataclass
class RelyingParty:
    provider: OidcProvider
    port: int
    auth_method: str = "client_secret_basic"
    client_id: str = ""
    client_secret: str = ""
    pending: dict[str, str] = field(default_factory=dict)  # state -> PKCE verifier
    callbacks: list[dict[str, list[str]]] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redirect_uri(self) -> str:
        return f"{self.origin}/callback"

    async def start(self, request: web.Request) -> web.StreamResponse:
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(48)
        self.pending[state] = verifier
        query = urlencode({
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "scope": SCOPE,
            "state": state,
            "nonce": secrets.token_urlsafe(32),
            "code_challenge": _b64url(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
        })
        raise web.HTTPFound(f"{self.provider.endpoint('authorization')}?{query}")

    async def callback(self, request: web.Request) -> web.StreamResponse:
        params = parse_qs(request.query_string)
        self.callbacks.append(params)
        verifier = self.pending.pop(params["state"][0])
        form = {"grant_type": "authorization_code", "code": params["code"][0],
                "redirect_uri": self.redirect_uri, "code_verifier": verifier}
        headers = {"Accept": "application/json"}
        if self.auth_method == "client_secret_basic":
            headers["Authorization"] = _basic(self.client_id, self.client_secret)
        else:
            form |= {"client_id": self.client_id, "client_secret": self.client_secret}
        http: aiohttp.ClientSession = request.app[HTTP]
        async with http.post(self.provider.endpoint("token"), data=form, headers=headers) as r:
            tokens: dict[str, Any] = await r.json()
            assert r.status == 200, tokens
        async with http.get(self.provider.endpoint("userinfo"),
                            headers={"Authorization": f"Bearer {tokens['access_token']}"}) as r:
            assert r.status == 200
            userinfo = await r.json()
        return web.json_response({"tokens": tokens, "userinfo": userinfo,
                                  "id_claims": _jwt_claims(tokens["id_token"])})

    async def logout(self, request: web.Request) -> web.StreamResponse:
        query = urlencode({"id_token_hint": request.query["id_token_hint"],
                           "post_logout_redirect_uri": f"{self.origin}/", "state": "bye"})
        raise web.HTTPFound(f"{self.provider.endpoint('end_session')}?{query}")

    async def home(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="home", content_type="text/html")


HTTP = web.AppKey("http", aiohttp.ClientSession)


@asynccontextmanager
async def relying_party(
    provider: OidcProvider, auth_method: str = "client_secret_basic", *,
    access_token_ttl: int | None = None, id_token_ttl: int | None = None,
) -> AsyncIterator[RelyingParty]:
    rp = RelyingParty(provider, free_port(), auth_method)
    rp.client_id, rp.client_secret = provider.register_client(
        [rp.redirect_uri], auth_method=auth_method, access_token_ttl=access_token_ttl,
        id_token_ttl=id_token_ttl)

    async def http_client(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            app[HTTP] = http
            yield

    app = web.Application()
    app.cleanup_ctx.append(http_client)
    app.router.add_get("/start", rp.start)
    app.router.add_get("/callback", rp.callback)
    app.router.add_get("/logout", rp.logout)
    app.router.add_get("/", rp.home)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", rp.port).start()
        yield rp
    finally:
        await runner.cleanup()


def _login_json(text: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text)
    return data


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("run", [1, 2])
async def test_shared_redis_answers_and_each_test_has_its_own_prefix(
    redis_target: RedisTarget, redis_url: str, redis_key_prefix: str, run: int
) -> None:
    assert redis_url == redis_target.url
    assert redis_key_prefix == redis_target.prefix
    assert redis_target.port != 6379  # never the machine's shared Redis
    assert redis_target.url == f"redis://127.0.0.1:{redis_target.port}/0"
    client = _redis(redis_target.url)
    try:
        assert await client.ping() is True
        # Both parametrized runs add their prefix: each must be new.
        assert await client.sadd(PREFIXES_SEEN, redis_target.prefix) == 1
        await client.set(redis_target.key("k"), str(run))
        assert await client.get(redis_target.key("k")) == str(run).encode()
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_server_factory_stop_fails_connections_and_start_brings_data_back(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory()  # persist=True by default
    assert server.running
    assert server.ping()
    async with _redis(server.url) as client:
        await client.set("survivor", "yes")
        server.stop()
        assert not server.running
        with pytest.raises(RedisConnectionError):
            await client.ping()
    server.start()  # same port, same URL, data saved at stop() loaded again
    async with _redis(server.url) as client:
        assert await client.get("survivor") == b"yes"
        await client.set("lost", "in the crash")
    server.kill()  # a crash: nothing written since the last stop() is kept
    server.start()
    async with _redis(server.url) as client:
        assert await client.get("survivor") == b"yes"
        assert await client.get("lost") is None


@pytest.mark.redis
async def test_redis_server_factory_without_persistence_and_with_password(
    redis_server_factory: RedisServerFactory,
) -> None:
    server = redis_server_factory(persist=False, password="pw-" + secrets.token_hex(4))
    assert server.password
    assert f":{server.password}@" in server.url
    async with _redis(server.url) as client:
        await client.set("gone", "soon")
    server.restart()
    async with _redis(server.url) as client:
        assert await client.get("gone") is None
    async with _redis(f"redis://127.0.0.1:{server.port}/0") as anonymous:
        with pytest.raises(AuthenticationError):
            await anonymous.get("x")


# ---------------------------------------------------------------------------------------------
# The OP
# ---------------------------------------------------------------------------------------------


@pytest.mark.provider
def test_discovery_document(oidc_provider: OidcProvider) -> None:
    doc = oidc_provider.discovery()
    issuer = oidc_provider.issuer
    assert issuer.startswith("http://127.0.0.1:")
    assert doc["issuer"] == issuer
    for name, path in (("authorization", "/auth"), ("token", "/token"), ("userinfo", "/me"),
                       ("end_session", "/session/end"), ("registration", "/reg"),
                       ("revocation", "/token/revocation"),
                       ("introspection", "/token/introspection")):
        assert doc[f"{name}_endpoint"] == issuer + path
    assert doc["jwks_uri"] == issuer + "/jwks"
    assert doc["authorization_response_iss_parameter_supported"] is True  # RFC 9207
    assert doc["code_challenge_methods_supported"] == ["S256"]
    scopes = set(doc["scopes_supported"])
    assert {"openid", "email", "profile", "groups", "offline_access"} <= scopes
    assert {"client_secret_basic", "client_secret_post"} <= set(
        doc["token_endpoint_auth_methods_supported"])
    assert {"sub", "email", "groups", "preferred_username", "name"} <= set(doc["claims_supported"])


@pytest.mark.provider
@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_registered_client_authenticates_at_the_token_endpoint(
    oidc_provider: OidcProvider, auth_method: str
) -> None:
    port = free_port()
    client_id, secret = oidc_provider.register_client(
        [f"http://127.0.0.1:{port}/oauth2/callback"], auth_method=auth_method)
    assert client_id
    assert len(secret) >= 32
    token = oidc_provider.endpoint("token")

    def exchange(client_secret: str) -> tuple[int, Any]:
        form = {"grant_type": "authorization_code", "code": "not-a-code",
                "redirect_uri": f"http://127.0.0.1:{port}/oauth2/callback"}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if auth_method == "client_secret_basic":
            headers["Authorization"] = _basic(client_id, client_secret)
        else:
            form |= {"client_id": client_id, "client_secret": client_secret}
        return _post_form(token, form, headers)

    status, answer = exchange("wrong-" + secret)
    assert (status, answer["error"]) == (401, "invalid_client")
    status, answer = exchange(secret)  # the client is known and authenticated: only the code is bad
    assert (status, answer["error"]) == (400, "invalid_grant")


def _post_form(url: str, form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
    try:
        conn.request("POST", parts.path, body=urlencode(form), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.provider
def test_registration_rejects_bad_lifetimes(oidc_provider: OidcProvider) -> None:
    with pytest.raises(PeerError, match="invalid_client_metadata"):
        oidc_provider.register_client(["http://127.0.0.1:1/cb"], access_token_ttl=-1)
    status, _ = http_json("GET", oidc_provider.issuer + "/healthz")
    assert status == 200


# ---------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------


@pytest.mark.provider
@pytest.mark.parametrize(("auth_method", "user", "password", "claims"), [
    ("client_secret_basic", "alice", "wonderland",
     {"sub": "alice", "email": "alice@example.com", "groups": ["eng", "admins"],
      "preferred_username": "alice", "name": "Alice Example"}),
    ("client_secret_post", "bob", "builder",
     {"sub": "bob", "email": "bob@example.org", "groups": ["sales"],
      "preferred_username": "bob", "name": "Bob Example"}),
])
async def test_browser_login_through_a_relying_party(
    oidc_provider: OidcProvider, auth_method: str, user: str, password: str,
    claims: dict[str, Any],
) -> None:
    async with relying_party(oidc_provider, auth_method) as rp, new_browser() as browser:
        result = await browser_login(browser, f"{rp.origin}/start", username=user,
                                     password=password)
        assert result.status == 200, result.text
        data = _login_json(result.text)
    # The walk: RP → OP /auth → login form → consent form → RP callback.
    assert result.trace[0] == ("GET", f"{rp.origin}/start", 302)
    auth = urlsplit(result.trace[1][1])
    assert f"{auth.scheme}://{auth.netloc}{auth.path}" == oidc_provider.endpoint("authorization")
    assert parse_qs(auth.query)["code_challenge_method"] == ["S256"]
    methods = [(m, urlsplit(u).path.rsplit("/", 1)[-1]) for m, u, _ in result.trace]
    assert ("POST", "login") in methods
    assert ("POST", "confirm") in methods
    assert result.provider_origin == oidc_provider.issuer
    assert result.url.startswith(f"{rp.origin}/callback?")
    assert result.callback_url == result.url
    # RFC 9207: the authorization response names the issuer.
    assert rp.callbacks[0]["iss"] == [oidc_provider.issuer]
    tokens = data["tokens"]
    assert tokens["token_type"] == "Bearer"
    assert tokens["refresh_token"]  # always issued to clients allowed the grant
    assert tokens["expires_in"] == 3600
    for key, value in claims.items():
        assert data["id_claims"][key] == value
        assert data["userinfo"][key] == value
    assert data["id_claims"]["aud"] == rp.client_id


@pytest.mark.provider
async def test_browser_login_stops_before_the_callback_and_per_client_lifetimes(
    oidc_provider: OidcProvider,
) -> None:
    async with relying_party(oidc_provider, access_token_ttl=7, id_token_ttl=9) as rp, \
            new_browser() as browser:
        first = await browser_login(browser, f"{rp.origin}/start", stop_before_callback=True)
        assert first.status in (302, 303)
        assert first.callback_url
        assert first.callback_url == first.next_url
        assert first.callback_url.startswith(rp.redirect_uri + "?")
        assert "code" in parse_qs(urlsplit(first.callback_url).query)
        assert rp.callbacks == []  # not requested
        # Signed in at the OP now: a second login needs no form.
        second = await browser_login(browser, f"{rp.origin}/start")
        assert second.status == 200, second.text
        assert not any(method == "POST" for method, _, _ in second.trace)
        data = _login_json(second.text)
    assert data["tokens"]["expires_in"] == 7
    assert data["id_claims"]["exp"] - data["id_claims"]["iat"] == 9
    # The refresh token works, and the new tokens keep the client's lifetimes.
    status, refreshed = _post_form(
        oidc_provider.endpoint("token"),
        {"grant_type": "refresh_token", "refresh_token": data["tokens"]["refresh_token"]},
        {"Authorization": _basic(rp.client_id, rp.client_secret),
         "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, refreshed
    assert refreshed["expires_in"] == 7
    assert refreshed["access_token"] != data["tokens"]["access_token"]
    assert _jwt_claims(refreshed["id_token"])["sub"] == "alice"


@pytest.mark.provider
async def test_wrong_password_ends_on_the_provider_with_401(oidc_provider: OidcProvider) -> None:
    async with relying_party(oidc_provider) as rp, new_browser() as browser:
        result = await browser_login(browser, f"{rp.origin}/start", password="not-it")
    assert result.status == 401
    assert result.url.startswith(oidc_provider.issuer + "/interaction/")
    assert "wrong password" in result.text
    assert result.callback_url is None


@pytest.mark.provider
async def test_rp_initiated_logout_at_the_provider(oidc_provider: OidcProvider) -> None:
    async with relying_party(oidc_provider) as rp, new_browser() as browser:
        login = await browser_login(browser, f"{rp.origin}/start")
        id_token = _login_json(login.text)["tokens"]["id_token"]
        out = await browser_sign_out(browser, f"{rp.origin}/logout?id_token_hint={id_token}")
        assert out.next_url == f"{rp.origin}/?state=bye"
        assert out.provider_origin == oidc_provider.issuer
        assert any(urlsplit(u).path.startswith("/session/end") for _, u, _ in out.trace)
        # Signed out at the OP: the next login shows the login form again.
        again = await browser_login(browser, f"{rp.origin}/start")
        assert again.status == 200
        assert any(method == "POST" and u.endswith("/login") for method, u, _ in again.trace)


@pytest.mark.provider
async def test_private_provider_with_short_token_lifetime(
    oidc_provider_factory: OidcProviderFactory, oidc_provider: OidcProvider,
) -> None:
    private = oidc_provider_factory(OP_ACCESS_TOKEN_TTL=3, OP_ID_TOKEN_TTL=4)
    assert private.issuer != oidc_provider.issuer
    async with relying_party(private) as rp, new_browser() as browser:
        result = await browser_login(browser, f"{rp.origin}/start")
        data = _login_json(result.text)
    assert data["tokens"]["expires_in"] == 3
    assert data["id_claims"]["exp"] - data["id_claims"]["iat"] == 4
    private.stop()
    with pytest.raises(ConnectionRefusedError):
        http_json("GET", private.issuer + "/healthz", timeout=1)


def test_peer_fixtures_mark_their_tests(request: pytest.FixtureRequest,
                                        redis_target: RedisTarget,
                                        oidc_provider: OidcProvider) -> None:
    """No explicit markers here: using the fixtures is enough for ``-m``."""
    assert request.node.get_closest_marker("redis") is not None
    assert request.node.get_closest_marker("provider") is not None

