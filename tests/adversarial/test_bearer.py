"""Bearer access tokens for API clients (issue 8 item 7), end to end.

A real gateway process (Redis sessions) sits in front of the echo upstream and trusts the
adversarial provider, which mints the tokens: honest ones, and each lie an attacker (or a
confused client) would try. What a caller observes is asserted in full: the status, the
``WWW-Authenticate`` challenge (RFC 6750 §3), no cookie and no redirect, the upstream reached
or not, and what it was told. No test shares a token with another; the provider's script is
reset before each.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from joserfc.jwk import ECKey, RSAKey
from multidict import CIMultiDict

from tests.adversarial.provider import DROP, AdversarialProvider, TokenFailure, b64url
from tests.adversarial.world import World, running_lab

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.redis]

CLIENT_ID = "gateway-bearer"
CLIENT_SECRET = "bearer-client-secret:+/ " + "y" * 24
API = "https://api.test"
SESSION_COOKIE = "_oidc_gateway"


@dataclass(frozen=True)
class Keys:
    r1: RSAKey  # published from the start
    r2: RSAKey  # published later: the rotation
    r3: RSAKey  # never published: the attacker's
    e1: ECKey  # published P-256 key


@dataclass
class Api(World):
    keys: Keys


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: Any
    reached_upstream: bool

    @property
    def challenge(self) -> str:
        return self.headers.get("WWW-Authenticate", "")

    def seen(self) -> dict[str, str]:
        """What the upstream was told: its request headers (lower-cased names)."""
        assert self.reached_upstream, (self.status, self.body)
        return {k.lower(): v for k, v in self.body["headers"]}


def _routes(upstream: str) -> list[dict[str, Any]]:
    bearer = {"audiences": [API]}
    return [
        {
            "name": "api",
            "match": {"path": "/api/"},
            "upstream": upstream,
            "bearer": bearer,
            "allow": {"groups": ["eng"]},
        },
        {
            "name": "admin-api",
            "match": {"path": "/admin-api/"},
            "upstream": upstream,
            "bearer": bearer,
            "allow": {"groups": ["admins"]},
        },
        {
            "name": "cognito",
            "match": {"path": "/cognito/"},
            "upstream": upstream,
            "bearer": {**bearer, "required_claims": {"token_use": "access"}},
        },
        {
            "name": "opaque",
            "match": {"path": "/opaque/"},
            "upstream": upstream,
            "bearer": {**bearer, "introspection": True},
        },
        {
            "name": "passing",
            "match": {"path": "/passing/"},
            "upstream": upstream,
            "bearer": bearer,
            "pass_access_token": True,
        },
        {"name": "app", "match": {"path": "/"}, "upstream": upstream},
    ]


@pytest.fixture(scope="module")
def keys() -> Keys:
    def rsa(kid: str) -> RSAKey:
        return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})

    return Keys(
        rsa("r1"),
        rsa("r2"),
        rsa("r3"),
        ECKey.generate_key("P-256", parameters={"kid": "e1", "use": "sig"}),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api_world(
    peer_info: Any, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    def adjust(provider: AdversarialProvider, config: dict[str, Any]) -> None:
        config["routes"] = _routes(lab.upstream.url)

    async with (
        running_lab(peer_info, tmp_path_factory.mktemp("bearer")) as lab,
        # Short JWKS refetch: a rotation a test can wait for.
        lab.world("bearer", [keys.r1, keys.e1], adjust=adjust,
                  provider_extra={"jwks_refetch_interval": "1s"}) as w,
    ):
        yield Api(w.name, w.provider, w.gateway, w.upstream, w.redis, w.prefix, keys)


@pytest.fixture
def world(api_world: Api) -> Api:
    api_world.provider.reset()
    return api_world


async def call(
    world: Api,
    path: str,
    token: str | None = None,
    *,
    authorization: list[str] | None = None,
    accept: str = "application/json",
) -> Answer:
    """One API request; ``token`` becomes ``Authorization: Bearer``, ``authorization`` gives
    the header values verbatim (several for several headers)."""
    headers: CIMultiDict[str] = CIMultiDict({"Accept": accept})
    for value in (
        authorization
        if authorization is not None
        else ([f"Bearer {token}"] if token is not None else [])
    ):
        headers.add("Authorization", value)
    before = len(world.upstream.seen.requests)
    async with (
        aiohttp.ClientSession() as http,
        http.get(world.gateway.url + path, headers=headers, allow_redirects=False) as resp,
    ):
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        reached = len(world.upstream.seen.requests) > before
        return Answer(resp.status, CIMultiDict(resp.headers), body, reached)


async def assert_refused(
    world: Api, answer: Answer, *, says: str, status: int = 401, error: str = "invalid_token"
) -> None:
    """Refused the way RFC 6750 §3 says: the status, a Bearer challenge naming the error and
    why; no cookie, no redirect, no session, nothing forwarded."""
    assert answer.status == status, (answer.status, answer.body)
    challenge = answer.challenge
    assert challenge.startswith("Bearer "), challenge
    assert 'realm="oidc-gateway"' in challenge
    assert f'error="{error}"' in challenge, challenge
    assert says.lower() in challenge.lower(), challenge
    assert "Set-Cookie" not in answer.headers
    assert "Location" not in answer.headers
    assert not answer.reached_upstream
    assert await world.sessions() == 0


# ---------------------------------------------------------------------------------------------
# A good token
# ---------------------------------------------------------------------------------------------


async def test_valid_token_reaches_the_upstream_as_the_user(world: Api) -> None:
    answer = await call(world, "/api/orders", world.provider.access_token())
    assert answer.status == 200, answer.body
    seen = answer.seen()
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-forwarded-email"] == "alice@example.test"
    assert seen["x-forwarded-groups"] == "eng"
    # The token authenticated the request to the gateway; the app does not get it.
    assert "authorization" not in seen
    assert "x-forwarded-access-token" not in seen
    # No session, no cookie: an API call leaves nothing behind.
    assert "Set-Cookie" not in answer.headers
    assert await world.sessions() == 0


async def test_lowercase_scheme_and_ec_key_are_accepted(world: Api) -> None:
    # RFC 9110 §11.1: the auth scheme is case-insensitive.
    token = world.provider.access_token(key=world.keys.e1)
    answer = await call(world, "/api/x", authorization=[f"bearer {token}"])
    assert answer.status == 200, answer.body
    assert answer.seen()["x-forwarded-user"] == "alice"


async def test_plain_jwt_typ_and_audience_lists_are_accepted(world: Api) -> None:
    # Keycloak and Entra send typ JWT; Auth0 sends several audiences, ours among them.
    token = world.provider.access_token(
        {"aud": ["https://userinfo.test", API]}, header={"typ": "JWT"}
    )
    answer = await call(world, "/api/x", token)
    assert answer.status == 200, answer.body


async def test_pass_access_token_forwards_the_bearer_token(world: Api) -> None:
    token = world.provider.access_token()
    answer = await call(world, "/passing/x", token)
    assert answer.status == 200, answer.body
    seen = answer.seen()
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["x-forwarded-access-token"] == token


async def test_token_and_user_in_logs_never_the_token(world: Api) -> None:
    token = world.provider.access_token({"jti": "log-check"})
    assert (await call(world, "/api/logged", token)).status == 200
    await asyncio.sleep(0.2)  # the access line is written after the answer
    logs = world.gateway.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    access = [
        e for e in lines if e.get("logger") == "gateway.access" and e.get("path") == "/api/logged"
    ]
    assert access, logs[-2000:]
    assert access[-1]["auth"] == "bearer"
    assert access[-1]["user"] == "alice"
    for issued in world.provider.issued:
        assert issued not in logs


async def _requests_metric(world: Api, decision: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(world.gateway.url + "/metrics") as r:
        text = await r.text()
    prefix = f'oidc_gateway_requests_total{{decision="{decision}",route="api",'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def test_metrics_count_tokens_as_decisions(world: Api) -> None:
    allowed = await _requests_metric(world, "allowed")
    refused = await _requests_metric(world, "unauthenticated_401")
    assert (await call(world, "/api/m", world.provider.access_token())).status == 200
    expired = world.provider.access_token({"exp": lambda now: now - 600})
    assert (await call(world, "/api/m", expired)).status == 401
    assert await _requests_metric(world, "allowed") == allowed + 1
    assert await _requests_metric(world, "unauthenticated_401") == refused + 1


# ---------------------------------------------------------------------------------------------
# Tokens that must not pass
# ---------------------------------------------------------------------------------------------


async def test_expired_token(world: Api) -> None:
    token = world.provider.access_token({"exp": lambda now: now - 600, "iat": lambda n: n - 900})
    await assert_refused(world, await call(world, "/api/x", token), says="expired")


async def test_token_without_exp(world: Api) -> None:
    token = world.provider.access_token({"exp": DROP})
    await assert_refused(world, await call(world, "/api/x", token), says="no expiry")


async def test_token_not_valid_yet(world: Api) -> None:
    token = world.provider.access_token({"nbf": lambda now: now + 600})
    await assert_refused(world, await call(world, "/api/x", token), says="not valid yet")


async def test_wrong_audience(world: Api) -> None:
    token = world.provider.access_token(audience="https://other-api.test")
    await assert_refused(world, await call(world, "/api/x", token), says="another audience")


async def test_gateway_client_id_is_not_an_api_audience(world: Api) -> None:
    # An ID token (aud: the gateway's client id) replayed as an access token.
    token = world.provider.access_token({"aud": CLIENT_ID})
    await assert_refused(world, await call(world, "/api/x", token), says="another audience")


async def test_wrong_issuer(world: Api) -> None:
    token = world.provider.access_token({"iss": "https://evil.test"})
    await assert_refused(world, await call(world, "/api/x", token), says="issuer")


async def test_alg_none(world: Api) -> None:
    header = b64url(json.dumps({"alg": "none", "typ": "at+jwt"}).encode())
    valid = world.provider.access_token()
    payload = valid.split(".")[1]
    await assert_refused(
        world, await call(world, "/api/x", f"{header}.{payload}."), says="unsigned"
    )


async def test_hs256_signed_with_the_public_key(world: Api) -> None:
    # Algorithm confusion: the RSA public key's PEM used as an HMAC secret.
    # Signed by hand: joserfc (rightly) refuses to make an HMAC key of a public key.
    pem = world.keys.r1.as_pem(private=False)
    payload = world.provider.access_token().split(".")[1]
    header = b64url(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": "r1"}).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(mac)}"
    await assert_refused(world, await call(world, "/api/x", token), says="HS256")


async def test_tampered_payload(world: Api) -> None:
    head, _, signature = world.provider.access_token().split(".")
    forged = b64url(
        json.dumps(
            {
                "iss": world.provider.issuer,
                "sub": "mallory",
                "aud": API,
                "exp": 2**31,
                "groups": ["eng", "admins"],
            }
        ).encode()
    )
    answer = await call(world, "/admin-api/x", f"{head}.{forged}.{signature}")
    await assert_refused(world, answer, says="signature")


async def test_signed_by_an_unpublished_key(world: Api) -> None:
    token = world.provider.access_token(key=world.keys.r3, header={"kid": "r1"})
    await assert_refused(world, await call(world, "/api/x", token), says="signature")


async def test_sender_constrained_token(world: Api) -> None:
    # A DPoP-bound token without its proof is not a bearer token.
    token = world.provider.access_token(
        {"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}
    )
    await assert_refused(world, await call(world, "/api/x", token), says="cnf")


async def test_other_token_type(world: Api) -> None:
    token = world.provider.access_token(header={"typ": "logout+jwt"})
    await assert_refused(world, await call(world, "/api/x", token), says="typ")


async def test_unknown_kid_then_rotation(world: Api) -> None:
    provider, r2 = world.provider, world.keys.r2
    before = provider.calls["jwks"]
    token = provider.access_token(key=r2)
    # Not published yet: one JWKS refetch, then refused.
    await assert_refused(world, await call(world, "/api/x", token), says="JWKS does not list")
    assert provider.calls["jwks"] - before == 1
    # A flood of unknown kids within jwks_refetch_interval costs no further JWKS fetch.
    for _ in range(5):
        assert (await call(world, "/api/x", token)).status == 401
    assert provider.calls["jwks"] - before == 1
    # The provider rotates: once the interval has passed, the new key is fetched and used.
    provider.published.append(r2)
    try:
        await asyncio.sleep(1.1)
        answer = await call(world, "/api/x", provider.access_token(key=r2))
        assert answer.status == 200, answer.body
        assert provider.calls["jwks"] - before == 2
        # Known now: no more fetches.
        assert (await call(world, "/api/x", provider.access_token(key=r2))).status == 200
        assert provider.calls["jwks"] - before == 2
    finally:
        provider.published.remove(r2)


async def test_valid_token_on_a_route_without_bearer_is_not_a_login(world: Api) -> None:
    # Only routes with bearer: accept tokens; elsewhere it is the usual 401 for API clients.
    answer = await call(world, "/elsewhere", world.provider.access_token())
    assert answer.status == 401
    assert answer.challenge == 'Bearer realm="oidc-gateway"'
    assert not answer.reached_upstream


# ---------------------------------------------------------------------------------------------
# Cognito's token_use, the policy, no token at all
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("token_use", "status"), [("access", 200), ("id", 401), (DROP, 401)])
async def test_required_claim_token_use(world: Api, token_use: object, status: int) -> None:
    token = world.provider.access_token({"token_use": token_use})
    answer = await call(world, "/cognito/x", token)
    if status == 200:
        assert answer.status == 200, answer.body
        assert answer.seen()["x-forwarded-user"] == "alice"
    else:
        await assert_refused(world, answer, says="token_use")


async def test_policy_deny_is_403(world: Api) -> None:
    # A good token for a user the route's allow rules do not admit (alice is not in admins).
    answer = await call(world, "/admin-api/x", world.provider.access_token())
    await assert_refused(
        world, answer, status=403, error="insufficient_scope", says="signed in as alice"
    )


async def test_groups_from_the_token_decide(world: Api) -> None:
    token = world.provider.access_token({"groups": ["admins"]})
    answer = await call(world, "/admin-api/x", token)
    assert answer.status == 200, answer.body
    assert answer.seen()["x-forwarded-groups"] == "admins"


async def test_no_token_api_client_gets_a_bearer_challenge(world: Api) -> None:
    answer = await call(world, "/api/x")
    assert answer.status == 401
    assert answer.challenge == 'Bearer realm="oidc-gateway"'
    assert "login_url" in answer.body
    assert not answer.reached_upstream


async def test_no_token_browser_is_sent_to_sign_in(world: Api) -> None:
    answer = await call(world, "/api/x", accept="text/html")
    assert answer.status == 302
    assert answer.headers["Location"].startswith(world.provider.issuer + "/authorize")


# ---------------------------------------------------------------------------------------------
# Malformed Authorization headers (RFC 6750 §2.1, §3.1: invalid_request, 400)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (["Bearer"], "empty"),
        (["Bearer "], "empty"),
        (["Bearer a.b.c d.e.f"], "single token"),
        (["Bearer a,b"], "single token"),
        (["Bearer TOKEN", "Bearer TOKEN"], "more than one"),
        (["Basic dXNlcjpwdw==", "Bearer TOKEN"], "more than one"),
    ],
    ids=["bare-scheme", "empty", "two-tokens", "comma", "two-headers", "basic-and-bearer"],
)
async def test_malformed_authorization(world: Api, values: list[str], says: str) -> None:
    token = world.provider.access_token()
    sent = [v.replace("TOKEN", token) for v in values]
    answer = await call(world, "/api/x", authorization=sent)
    await assert_refused(world, answer, status=400, error="invalid_request", says=says)


# ---------------------------------------------------------------------------------------------
# Opaque tokens: introspection (RFC 7662)
# ---------------------------------------------------------------------------------------------


async def test_introspection_active_then_cached(world: Api) -> None:
    provider = world.provider
    token = provider.opaque_token()
    before = provider.calls["introspect"]
    first = await call(world, "/opaque/a", token)
    assert first.status == 200, first.body
    assert first.seen()["x-forwarded-user"] == "alice"
    second = await call(world, "/opaque/b", token)
    assert second.status == 200, second.body
    # The second answer came from the gateway's cache: one introspection in all.
    assert provider.calls["introspect"] - before == 1


async def test_introspection_inactive_is_refused_and_not_cached(world: Api) -> None:
    provider = world.provider
    token = provider.opaque_token({"active": False})
    before = provider.calls["introspect"]
    await assert_refused(world, await call(world, "/opaque/x", token), says="not active")
    await assert_refused(world, await call(world, "/opaque/x", token), says="not active")
    assert provider.calls["introspect"] - before == 2


async def test_introspection_wrong_audience(world: Api) -> None:
    token = world.provider.opaque_token({"aud": "https://other-api.test"})
    await assert_refused(world, await call(world, "/opaque/x", token), says="another audience")


async def test_introspection_without_audience(world: Api) -> None:
    token = world.provider.opaque_token({"aud": DROP})
    await assert_refused(world, await call(world, "/opaque/x", token), says="no audience")


async def test_introspection_refresh_token_is_not_an_access_token(world: Api) -> None:
    token = world.provider.opaque_token({"token_type": "refresh_token"})
    await assert_refused(world, await call(world, "/opaque/x", token), says="token_type")


async def test_cached_answer_never_outlives_the_token(world: Api) -> None:
    provider = world.provider
    token = provider.opaque_token({"exp": lambda now: now + 2})
    before = provider.calls["introspect"]
    assert (await call(world, "/opaque/x", token)).status == 200
    await asyncio.sleep(2.2)
    # Past exp: the cache does not answer, the provider is asked and the token refused.
    provider.introspection[token]["active"] = False
    await assert_refused(world, await call(world, "/opaque/x", token), says="not active")
    assert provider.calls["introspect"] - before == 2


@pytest.mark.parametrize(
    "failure",
    [
        TokenFailure(500, b"oops", "text/plain"),
        TokenFailure(200, b"<html>", "text/html"),
        TokenFailure(401, b'{"error": "invalid_client"}'),
    ],
    ids=["500", "not-json", "client-refused"],
)
async def test_introspection_failing_fails_closed(world: Api, failure: TokenFailure) -> None:
    world.provider.script.introspection_failure = failure
    answer = await call(world, "/opaque/x", world.provider.opaque_token())
    assert answer.status == 503, answer.body
    assert answer.body["error"] == "introspection_unavailable"
    assert not answer.reached_upstream
    assert "Set-Cookie" not in answer.headers


async def test_introspection_hanging_fails_closed(world: Api) -> None:
    world.provider.script.introspection_hang = True
    answer = await call(world, "/opaque/x", world.provider.opaque_token())
    assert answer.status == 503, answer.body
    assert not answer.reached_upstream


async def test_opaque_token_on_a_route_without_introspection(world: Api) -> None:
    before = world.provider.calls["introspect"]
    token = world.provider.opaque_token()
    await assert_refused(world, await call(world, "/api/x", token), says="not a JWT")
    assert world.provider.calls["introspect"] == before


async def test_jwt_on_an_introspecting_route_is_checked_locally(world: Api) -> None:
    before = world.provider.calls["introspect"]
    assert (await call(world, "/opaque/x", world.provider.access_token())).status == 200
    expired = world.provider.access_token({"exp": lambda now: now - 600})
    await assert_refused(world, await call(world, "/opaque/x", expired), says="expired")
    assert world.provider.calls["introspect"] == before
