"""gateway.idp against a small in-process OpenID provider (aiohttp on a free loopback port).

The provider serves discovery, a JWKS whose keys a test can rotate, a token endpoint that checks
client authentication and PKCE (or misbehaves on request: 400, 500, garbage, slow), and userinfo.
It counts requests, so the JWKS refetch throttle (security note 4) can be measured.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jws
from joserfc.jwk import Key, RSAKey

from gateway.config import ProviderConfig
from gateway.errors import OIDCError, ProviderUnavailable, UnknownSigningKey
from gateway.idp import IdentityProvider
from gateway.models import LoginState, TokenSet
from gateway.oidc import code_challenge
from gateway.upstream_client import UpstreamClient
from tests.support.peers import free_port

CLIENT_ID = "gateway"
CLIENT_SECRET = "s3cret:with+odd %chars"
REDIRECT_URI = "https://apps.test/oauth2/callback"
WAIT = 5.0  # upper bound for anything a test waits for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Grant:
    nonce: str
    challenge: str
    claims: dict[str, Any] = field(default_factory=dict)


class FakeProvider:
    """A minimal OpenID provider whose behaviour each test can change."""

    def __init__(self, clock: FakeClock, signing_key: Key) -> None:
        self.clock = clock
        self.issuer = ""  # known once the server listens
        self.published: list[Key] = [signing_key]
        self.signing_key = signing_key
        self.signing_alg = "RS256"
        self.algs = ["RS256", "ES256"]
        self.discovery_issuer: str | None = None  # override to test a mismatch
        self.discovery_status = 200
        self.token_endpoint: str | None = None  # override to point somewhere dead
        self.token_mode = "ok"
        self.userinfo_mode = "ok"
        self.userinfo_claims: dict[str, Any] = {}
        self.grants: dict[str, Grant] = {}
        self.counts: dict[str, int] = {"discovery": 0, "jwks": 0, "token": 0, "userinfo": 0}
        self.last_token_form: dict[str, str] = {}
        self.last_basic: tuple[str, str] | None = None
        self.refresh_response: dict[str, Any] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_post("/token", self.token)
        app.router.add_get("/userinfo", self.userinfo)
        return app

    # -------------------------------------------------------------- helpers for tests

    def id_token(
        self,
        key: Key | None = None,
        *,
        kid: str | None = None,
        alg: str | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.signing_key
        now = self.clock.now
        body = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": "user-1",
            "iat": now,
            "exp": now + 300,
            **claims,
        }
        header = {"alg": alg or self.signing_alg, "kid": kid or key.kid}
        return jws.serialize_compact(header, json.dumps(body).encode(), key)

    def grant(self, login: LoginState, code: str = "the-code", **claims: Any) -> str:
        self.grants[code] = Grant(login.nonce, code_challenge(login.code_verifier), claims)
        return code

    # -------------------------------------------------------------- endpoints

    async def discovery(self, request: web.Request) -> web.Response:
        self.counts["discovery"] += 1
        if self.discovery_status != 200:
            return web.Response(status=self.discovery_status, text="down for maintenance")
        return web.json_response(
            {
                "issuer": self.discovery_issuer or self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": self.token_endpoint or f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "userinfo_endpoint": f"{self.issuer}/userinfo",
                "end_session_endpoint": f"{self.issuer}/logout",
                "id_token_signing_alg_values_supported": self.algs,
                "code_challenge_methods_supported": ["S256"],
                "authorization_response_iss_parameter_supported": True,
            }
        )

    async def jwks(self, request: web.Request) -> web.Response:
        self.counts["jwks"] += 1
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.published]})

    async def token(self, request: web.Request) -> web.Response:
        self.counts["token"] += 1
        form = dict(await request.post())
        self.last_token_form = {k: str(v) for k, v in form.items()}
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            raw = base64.b64decode(auth[6:]).decode()
            user, _, password = raw.partition(":")
            self.last_basic = (unquote_plus(user), unquote_plus(password))
        if form.get("grant_type") == "refresh_token":
            return web.json_response(self.refresh_response)
        mode = self.token_mode
        if mode == "400":
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Code not valid\r\n"}, status=400
            )
        if mode == "500":
            return web.json_response({"error": "server_error"}, status=500)
        if mode == "garbage":
            return web.Response(
                text="<html><body>Welcome to nginx!</body></html>", content_type="text/html"
            )
        if mode == "slow":
            await asyncio.sleep(WAIT)
        if self.last_basic != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = self.grants.pop(str(form.get("code")), None)
        if grant is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = str(form.get("code_verifier", ""))
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        if challenge != grant.challenge:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "PKCE verification failed"},
                status=400,
            )
        return web.json_response(
            {
                "access_token": "access-" + secrets.token_urlsafe(8),
                "token_type": "Bearer",
                "expires_in": 300,
                "refresh_token": "refresh-1",
                "id_token": self.id_token(nonce=grant.nonce, **grant.claims),
            }
        )

    async def userinfo(self, request: web.Request) -> web.Response:
        self.counts["userinfo"] += 1
        if not request.headers.get("Authorization", "").startswith("Bearer access-"):
            return web.json_response({"error": "invalid_token"}, status=401)
        if self.userinfo_mode == "500":
            return web.Response(status=500, text="oops")
        return web.json_response({"sub": "user-1", **self.userinfo_claims})


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key1() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})


@pytest.fixture(scope="module")
def key2() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k2", "use": "sig"})


@pytest.fixture(scope="module")
def forger() -> RSAKey:
    return RSAKey.generate_key(2048)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(clock: FakeClock, key1: RSAKey) -> FakeProvider:
    return FakeProvider(clock, key1)


@pytest.fixture
async def server(provider: FakeProvider) -> AsyncIterator[TestServer]:
    srv = TestServer(provider.app(), host="127.0.0.1")
    await srv.start_server()
    provider.issuer = str(srv.make_url("")).rstrip("/")
    yield srv
    await srv.close()


@pytest.fixture
async def http() -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient()
    try:
        yield client
    finally:
        client.close()


def make_config(issuer: str, **changes: Any) -> ProviderConfig:
    values: dict[str, Any] = {
        "issuer": issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "timeout": 2.0,
        "jwks_refetch_interval": 30.0,
    }
    values.update(changes)
    return ProviderConfig.model_validate(values)


@pytest.fixture
def idp(
    server: TestServer, provider: FakeProvider, http: UpstreamClient, clock: FakeClock
) -> IdentityProvider:
    return IdentityProvider(make_config(provider.issuer), http, clock=clock)


def login_state(clock: FakeClock) -> LoginState:
    return LoginState(
        state="st-" + secrets.token_urlsafe(8),
        nonce="n-" + secrets.token_urlsafe(8),
        code_verifier=secrets.token_urlsafe(32),
        target="/",
        created_at=clock.now,
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


async def test_load_discovery_and_jwks(idp: IdentityProvider, provider: FakeProvider) -> None:
    assert not idp.ready
    with pytest.raises(ProviderUnavailable):
        _ = idp.metadata
    meta = await idp.load()
    assert idp.ready
    assert meta.issuer == provider.issuer
    assert idp.metadata.token_endpoint == f"{provider.issuer}/token"
    assert idp.keys.kids == {"k1"}
    # config.algorithms ∩ the provider's announced ones, in config order.
    assert idp.algorithms == ("RS256", "ES256")
    assert provider.counts == {"discovery": 1, "jwks": 1, "token": 0, "userinfo": 0}


async def test_load_refuses_discovery_issuer_mismatch(
    idp: IdentityProvider, provider: FakeProvider
) -> None:
    provider.discovery_issuer = "https://evil.example.com"
    with pytest.raises(ProviderUnavailable, match="openid-configuration") as info:
        await idp.load()
    assert "evil.example.com" in info.value.message
    assert not idp.ready


async def test_load_reports_http_status(idp: IdentityProvider, provider: FakeProvider) -> None:
    provider.discovery_status = 503
    with pytest.raises(ProviderUnavailable, match="HTTP 503"):
        await idp.load()


async def test_load_refuses_when_no_common_algorithm(
    server: TestServer, provider: FakeProvider, http: UpstreamClient, clock: FakeClock
) -> None:
    provider.algs = ["HS256", "none"]
    idp = IdentityProvider(make_config(provider.issuer), http, clock=clock)
    with pytest.raises(ProviderUnavailable, match=r"provider\.algorithms"):
        await idp.load()


async def test_load_refuses_jwks_without_usable_key(
    idp: IdentityProvider, provider: FakeProvider
) -> None:
    provider.published = []
    with pytest.raises(ProviderUnavailable, match="no key usable"):
        await idp.load()


async def test_provider_down_then_up(
    http: UpstreamClient, clock: FakeClock, key1: RSAKey
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    idp = IdentityProvider(
        make_config(issuer, timeout=1.0), http, clock=clock, backoff_initial=0.01, backoff_max=0.05
    )
    with pytest.raises(ProviderUnavailable, match=f"127.0.0.1:{port}") as info:
        await idp.load()
    assert "cannot be reached" in info.value.message

    loader = asyncio.create_task(idp.run_loader())
    try:
        await asyncio.sleep(0.1)  # a few failed attempts
        assert not idp.ready
        assert not loader.done()
        provider = FakeProvider(clock, key1)
        provider.issuer = issuer
        srv = TestServer(provider.app(), host="127.0.0.1", port=port)
        await srv.start_server()
        try:
            await asyncio.wait_for(loader, WAIT)
            assert idp.ready
            assert idp.metadata.issuer == issuer
            assert provider.counts["discovery"] == 1
        finally:
            await srv.close()
    finally:
        loader.cancel()


# ---------------------------------------------------------------------------------------------
# ID tokens and the JWKS cache
# ---------------------------------------------------------------------------------------------


async def test_validate_id_token(idp: IdentityProvider, provider: FakeProvider) -> None:
    await idp.load()
    claims = await idp.validate_id_token(provider.id_token(nonce="n1"), nonce="n1")
    assert claims["sub"] == "user-1"
    with pytest.raises(OIDCError, match="nonce"):
        await idp.validate_id_token(provider.id_token(nonce="n1"), nonce="n2")


async def test_key_rotation_refetches_once(
    idp: IdentityProvider, provider: FakeProvider, key1: RSAKey, key2: RSAKey
) -> None:
    await idp.load()
    provider.published = [key1, key2]
    provider.signing_key = key2
    claims = await idp.validate_id_token(provider.id_token(), nonce=None)
    assert claims["sub"] == "user-1"
    assert provider.counts["jwks"] == 2
    assert idp.keys.kids == {"k1", "k2"}
    # Known now: no further fetch.
    await idp.validate_id_token(provider.id_token(), nonce=None)
    assert provider.counts["jwks"] == 2


async def test_flood_of_unknown_kids_is_one_refetch(
    idp: IdentityProvider, provider: FakeProvider, forger: RSAKey, clock: FakeClock
) -> None:
    await idp.load()
    tokens = [provider.id_token(forger, kid=secrets.token_hex(8)) for _ in range(50)]

    async def attempt(token: str) -> BaseException | None:
        try:
            await idp.validate_id_token(token, nonce=None)
        except OIDCError as exc:
            return exc
        return None

    results = await asyncio.gather(*(attempt(t) for t in tokens))
    assert all(isinstance(r, UnknownSigningKey) for r in results)
    assert provider.counts["jwks"] == 2  # the load, plus at most one refetch

    # Sequential forgeries within the interval: still no fetch.
    clock.now += 10
    for token in tokens[:10]:
        with pytest.raises(UnknownSigningKey):
            await idp.validate_id_token(token, nonce=None)
    assert provider.counts["jwks"] == 2

    # After the interval, one more refetch is allowed (a real rotation must be seen).
    clock.now += 30
    with pytest.raises(UnknownSigningKey):
        await idp.validate_id_token(tokens[0], nonce=None)
    assert provider.counts["jwks"] == 3


async def test_rotation_after_throttled_refetch_seen_after_interval(
    idp: IdentityProvider,
    provider: FakeProvider,
    forger: RSAKey,
    key2: RSAKey,
    clock: FakeClock,
) -> None:
    await idp.load()
    with pytest.raises(UnknownSigningKey):
        await idp.validate_id_token(provider.id_token(forger, kid="junk"), nonce=None)
    provider.published = [key2]
    provider.signing_key = key2
    with pytest.raises(UnknownSigningKey):  # throttled: the refetch budget was spent
        await idp.validate_id_token(provider.id_token(), nonce=None)
    clock.now += 31
    assert (await idp.validate_id_token(provider.id_token(), nonce=None))["sub"] == "user-1"


# ---------------------------------------------------------------------------------------------
# Code exchange and login
# ---------------------------------------------------------------------------------------------


async def test_complete_login(
    idp: IdentityProvider, provider: FakeProvider, clock: FakeClock
) -> None:
    await idp.load()
    login = login_state(clock)
    code = provider.grant(login, preferred_username="jane", email="jane@example.com")
    provider.userinfo_claims = {"groups": ["eng"], "email_verified": True}
    query = {"code": code, "state": login.state, "iss": provider.issuer}
    identity, tokens, claims = await idp.complete_login(query, login, redirect_uri=REDIRECT_URI)
    assert identity.sub == "user-1"
    assert identity.user == "jane"
    assert identity.email == "jane@example.com"
    assert identity.groups == ("eng",)
    assert identity.email_verified is True
    assert tokens.refresh_token == "refresh-1"
    assert tokens.expires_at == clock.now + 300
    assert claims["nonce"] == login.nonce
    # Client authentication arrived intact (form-encoded basic, security note 11) and PKCE
    # and redirect_uri were sent.
    assert provider.last_basic == (CLIENT_ID, CLIENT_SECRET)
    assert provider.last_token_form["redirect_uri"] == REDIRECT_URI
    assert provider.last_token_form["grant_type"] == "authorization_code"
    assert "client_secret" not in provider.last_token_form
    assert provider.counts["userinfo"] == 1


async def test_complete_login_rejects_state_mismatch(
    idp: IdentityProvider, provider: FakeProvider, clock: FakeClock
) -> None:
    await idp.load()
    login = login_state(clock)
    code = provider.grant(login)
    query = {"code": code, "state": "other", "iss": provider.issuer}
    with pytest.raises(OIDCError) as info:
        await idp.complete_login(query, login, redirect_uri=REDIRECT_URI)
    assert info.value.status_hint == 400
    assert provider.counts["token"] == 0


async def test_complete_login_rejects_wrong_pkce_verifier(
    idp: IdentityProvider, provider: FakeProvider, clock: FakeClock
) -> None:
    await idp.load()
    login = login_state(clock)
    code = provider.grant(login)
    tampered = LoginState(
        login.state, login.nonce, "another-verifier-" + "x" * 30, "/", login.created_at
    )
    query = {"code": code, "state": login.state, "iss": provider.issuer}
    with pytest.raises(OIDCError, match="PKCE") as info:
        await idp.complete_login(query, tampered, redirect_uri=REDIRECT_URI)
    assert info.value.reason == "token_error"


async def test_complete_login_userinfo_sub_mismatch(
    idp: IdentityProvider, provider: FakeProvider, clock: FakeClock
) -> None:
    await idp.load()
    login = login_state(clock)
    code = provider.grant(login)
    provider.userinfo_claims = {"sub": "someone-else"}
    query = {"code": code, "state": login.state, "iss": provider.issuer}
    with pytest.raises(OIDCError, match="userinfo sub does not match"):
        await idp.complete_login(query, login, redirect_uri=REDIRECT_URI)


async def test_userinfo_failure_is_502(idp: IdentityProvider, provider: FakeProvider) -> None:
    await idp.load()
    provider.userinfo_mode = "500"
    with pytest.raises(OIDCError) as info:
        await idp.userinfo("access-x")
    assert info.value.status_hint == 502
    assert info.value.reason == "userinfo_error"


async def test_userinfo_disabled(
    server: TestServer, provider: FakeProvider, http: UpstreamClient, clock: FakeClock
) -> None:
    idp = IdentityProvider(make_config(provider.issuer, userinfo=False), http, clock=clock)
    await idp.load()
    assert await idp.userinfo("access-x") is None
    assert provider.counts["userinfo"] == 0


@pytest.mark.parametrize(
    ("mode", "reason", "status"),
    [
        ("400", "token_error", 401),
        ("500", "provider_error", 502),
        ("garbage", "provider_error", 502),
    ],
)
async def test_token_endpoint_failures(
    idp: IdentityProvider, provider: FakeProvider, mode: str, reason: str, status: int
) -> None:
    await idp.load()
    provider.token_mode = mode
    with pytest.raises(OIDCError) as info:
        await idp.exchange_code("c", redirect_uri=REDIRECT_URI, code_verifier="v")
    assert info.value.reason == reason
    assert info.value.status_hint == status
    assert "\r" not in info.value.message


async def test_token_endpoint_timeout(
    server: TestServer, provider: FakeProvider, http: UpstreamClient, clock: FakeClock
) -> None:
    idp = IdentityProvider(make_config(provider.issuer, timeout=0.2), http, clock=clock)
    await idp.load()
    provider.token_mode = "slow"
    with pytest.raises(OIDCError) as info:
        await asyncio.wait_for(
            idp.exchange_code("c", redirect_uri=REDIRECT_URI, code_verifier="v"), WAIT
        )
    assert info.value.reason == "provider_timeout"
    assert info.value.status_hint == 504


async def test_token_endpoint_unreachable(idp: IdentityProvider, provider: FakeProvider) -> None:
    provider.token_endpoint = f"http://127.0.0.1:{free_port()}/token"
    await idp.load()
    with pytest.raises(OIDCError) as info:
        await idp.exchange_code("c", redirect_uri=REDIRECT_URI, code_verifier="v")
    assert info.value.reason == "provider_unreachable"
    assert info.value.status_hint == 502


async def test_client_secret_post(
    server: TestServer, provider: FakeProvider, http: UpstreamClient, clock: FakeClock
) -> None:
    idp = IdentityProvider(
        make_config(provider.issuer, token_endpoint_auth="client_secret_post"), http, clock=clock
    )
    await idp.load()
    provider.token_mode = "400"
    with pytest.raises(OIDCError):
        await idp.exchange_code("c", redirect_uri=REDIRECT_URI, code_verifier="v")
    assert provider.last_token_form["client_id"] == CLIENT_ID
    assert provider.last_token_form["client_secret"] == CLIENT_SECRET
    assert provider.last_basic is None


async def test_refresh_keeps_old_tokens_when_not_reissued(
    idp: IdentityProvider, provider: FakeProvider, clock: FakeClock
) -> None:
    await idp.load()
    provider.refresh_response = {
        "access_token": "access-2",
        "token_type": "bearer",
        "expires_in": 60,
    }
    old = TokenSet(id_token="old-id", access_token="access-1", refresh_token="refresh-1")
    fresh = await idp.refresh(old, sub="user-1")
    assert provider.last_token_form == {"grant_type": "refresh_token", "refresh_token": "refresh-1"}
    assert fresh.id_token == "old-id"
    assert fresh.refresh_token == "refresh-1"
    assert fresh.access_token == "access-2"
    assert fresh.expires_at == clock.now + 60


async def test_refresh_validates_new_id_token(
    idp: IdentityProvider, provider: FakeProvider
) -> None:
    await idp.load()
    old = TokenSet(id_token="old-id", access_token="access-1", refresh_token="refresh-1")
    provider.refresh_response = {
        "access_token": "access-2",
        "token_type": "Bearer",
        "refresh_token": "refresh-2",
        "id_token": provider.id_token(),
    }
    fresh = await idp.refresh(old, sub="user-1")
    assert fresh.refresh_token == "refresh-2"
    assert fresh.id_token != "old-id"
    provider.refresh_response = {
        "access_token": "access-3",
        "token_type": "Bearer",
        "id_token": provider.id_token(sub="user-2"),
    }
    with pytest.raises(OIDCError, match="another subject"):
        await idp.refresh(old, sub="user-1")
    with pytest.raises(OIDCError) as info:
        await idp.refresh(TokenSet(id_token="x"), sub="user-1")
    assert info.value.reason == "refresh_unavailable"


async def test_end_session_url(idp: IdentityProvider, provider: FakeProvider) -> None:
    assert idp.end_session_url(id_token_hint="idt", post_logout_redirect_uri=None) is None
    await idp.load()
    url = idp.end_session_url(id_token_hint="idt", post_logout_redirect_uri="https://a/bye")
    assert url is not None
    assert url.startswith(f"{provider.issuer}/logout?id_token_hint=idt&client_id=gateway")
    assert url.endswith("post_logout_redirect_uri=https%3A%2F%2Fa%2Fbye")


async def test_authorization_url(
    idp: IdentityProvider, provider: FakeProvider, clock: FakeClock
) -> None:
    await idp.load()
    login = login_state(clock)
    url = idp.authorization_url(login, REDIRECT_URI)
    assert url.startswith(f"{provider.issuer}/authorize?response_type=code&client_id=gateway")
    assert f"state={login.state}" in url
    assert "code_challenge_method=S256" in url
    assert "scope=openid+email+profile" in url
