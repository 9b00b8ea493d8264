"""The OpenID Connect Basic RP certification cases (and their neighbours), end to end.

Each case drives a real gateway process through a real login against the adversarial
provider (``provider.py``), which tells one lie per case: a token for another audience, a
forged or missing signature, a userinfo ``sub`` of somebody else, a mix-up ``iss``, a broken
token endpoint... Test ids starting with ``rp-`` are the names of the OpenID Foundation's
conformance tests; the others are neighbours of them that real gateways got wrong.

A rejection is asserted in full by :func:`~tests.adversarial.world.assert_rejected` (error page,
no session, no cookie, nothing forwarded, no redirect loop); an acceptance by
:func:`~tests.adversarial.world.assert_accepted`. Gateways are started once per provider
configuration (discovery and the initial JWKS are read at start-up) and shared by the tests of
that configuration; each test resets the provider's script to honest first.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from joserfc.jwk import ECKey, RSAKey

from tests.adversarial.provider import DROP, SUB, Script, TokenFailure, b64url
from tests.adversarial.world import (
    CLIENT_ID,
    CLIENT_SECRET,
    Lab,
    Walk,
    World,
    assert_accepted,
    assert_rejected,
    new_browser,
    running_lab,
    sign_in,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.redis]

# ---------------------------------------------------------------------------------------------
# Keys, worlds and the two verdicts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    r1: RSAKey  # published by most providers
    r2: RSAKey  # a second published key; the rotation target
    r3: RSAKey  # never published: the attacker's
    e1: ECKey  # published P-256 key
    e2: ECKey  # never published


@pytest.fixture(scope="module")
def keys() -> Keys:
    def rsa(kid: str) -> RSAKey:
        return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})

    def ec(kid: str) -> ECKey:
        return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig"})

    return Keys(rsa("r1"), rsa("r2"), rsa("r3"), ec("e1"), ec("e2"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(peer_info: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    async with running_lab(peer_info, tmp_path_factory.mktemp("adversarial")) as lab:
        yield lab


# The main provider announces HS256 and none besides RS256/ES256 (a gateway that trusts
# discovery for its algorithm list would accept them) and supports RFC 9207.
MAIN_ALGS = ("RS256", "ES256", "HS256", "none")
# Entries of a JWKS that must be skipped, not crash the gateway or stop it loading the rest.
JUNK_KEYS: list[Any] = [
    {"kty": "RSA", "kid": "bad-n", "use": "sig", "n": "***not base64***", "e": "AQAB"},
    {"kty": "EC", "kid": "bad-curve", "use": "sig", "crv": "P-999", "x": "AAAA", "y": "AAAA"},
    {"kty": "EC", "kid": "no-coordinates", "crv": "P-256"},
    {"kty": "oct", "kid": "symmetric", "k": b64url(b"a shared secret must never verify")},
    {"kty": "NOPE", "kid": "alien"},
    {"kid": "no-kty"},
    {},
    "not a key",
    42,
    None,
    [],
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def main_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    async with lab.world("main", [keys.r1, keys.e1], algs=MAIN_ALGS) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def post_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    async with lab.world("post", [keys.r1], gateway_auth="client_secret_post",
                         client_auth="client_secret_post") as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def no_iss_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    async with lab.world("no-iss", [keys.r1], iss_parameter_supported=False) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def single_key_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    async with lab.world("single-key", [keys.r1], strip_kids=True) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def many_keys_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    # The encryption key is a valid RSA key: only its "use" says it must not verify anything.
    enc = {**keys.r3.as_dict(private=False), "kid": "enc-key", "use": "enc"}
    # A valid key with a non-string kid: skipped rather than matched by str(kid).
    numeric_kid = {**keys.r3.as_dict(private=False), "kid": 7}
    async with lab.world("many-keys", [keys.r1, keys.r2, keys.e1],
                         junk_keys=[*JUNK_KEYS, enc, numeric_kid]) as world:
        yield world


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rotation_world(lab: Lab, keys: Keys) -> AsyncIterator[World]:
    async with lab.world("rotation", [keys.r1]) as world:
        yield world


def _fresh(world: World) -> World:
    world.provider.reset()
    return world


@pytest.fixture
def main(main_world: World) -> World:
    return _fresh(main_world)


@pytest.fixture
def post(post_world: World) -> World:
    return _fresh(post_world)


@pytest.fixture
def no_iss(no_iss_world: World) -> World:
    return _fresh(no_iss_world)


@pytest.fixture
def single_key(single_key_world: World) -> World:
    return _fresh(single_key_world)


@pytest.fixture
def many_keys(many_keys_world: World) -> World:
    return _fresh(many_keys_world)


@pytest.fixture
def rotation(rotation_world: World) -> World:
    return _fresh(rotation_world)


async def rejected(world: World, *, status: int, says: str) -> Walk:
    """Sign in through ``world`` and assert the gateway refused, completely."""
    async with new_browser() as browser:
        before = await world.snapshot()
        walk = await sign_in(world, browser)
        await assert_rejected(world, browser, walk, before, status=status, says=says)
    return walk


async def accepted(world: World) -> dict[str, str]:
    """Sign in through ``world`` and assert it worked; the headers the upstream received."""
    async with new_browser() as browser:
        before = await world.snapshot()
        walk = await sign_in(world, browser)
        return await assert_accepted(world, browser, walk, before)


def hs256_signer(secret: bytes) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    """Sign with HMAC-SHA256 under ``secret`` (written out: no library refuses a PEM here)."""

    def sign(header: dict[str, Any], claims: dict[str, Any]) -> str:
        head = {k: v for k, v in header.items() if k != "kid"} | {"alg": "HS256"}
        signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(claims).encode())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    return sign


# ---------------------------------------------------------------------------------------------
# Authorization code flow and client authentication
# ---------------------------------------------------------------------------------------------


async def test_rp_response_type_code(main: World) -> None:
    """rp-response_type-code: a code flow request with state, nonce and PKCE S256, whose code
    is redeemed at the token endpoint with the verifier and the same redirect URI."""
    await accepted(main)
    auth = main.provider.last_authorize
    assert auth["response_type"] == "code"
    assert auth["client_id"] == CLIENT_ID
    assert auth["redirect_uri"] == f"{main.gateway.url}/oauth2/callback"
    assert "openid" in auth["scope"].split()
    assert len(auth["state"]) >= 43
    assert len(auth["nonce"]) >= 43
    assert auth["code_challenge_method"] == "S256"
    assert "response_mode" not in auth  # the default (query) for code
    form = main.provider.last_token_form
    assert form["grant_type"] == "authorization_code"
    assert form["redirect_uri"] == auth["redirect_uri"]
    assert len(form["code_verifier"]) >= 43


async def test_rp_token_endpoint_client_secret_basic(main: World) -> None:
    """rp-token_endpoint-client_secret_basic: HTTP Basic with the form-urlencoded id and
    secret (RFC 6749 §2.3.1; the secret has ':', '+', ' ', '%'), nothing in the form."""
    await accepted(main)
    assert main.provider.last_token_auth == "client_secret_basic"
    assert "client_secret" not in main.provider.last_token_form


async def test_rp_token_endpoint_client_secret_post(post: World) -> None:
    """rp-token_endpoint-client_secret_post: id and secret in the form, no Authorization."""
    await accepted(post)
    assert post.provider.last_token_auth == "client_secret_post"
    assert post.provider.last_token_form["client_id"] == CLIENT_ID
    assert post.provider.last_token_form["client_secret"] == CLIENT_SECRET


@pytest.mark.parametrize(("world_name", "required"), [
    pytest.param("main", "client_secret_post", id="basic-sent-post-required"),
    pytest.param("post", "client_secret_basic", id="post-sent-basic-required"),
])
async def test_client_authentication_refused_by_provider(
    world_name: str, required: str, main: World, post: World
) -> None:
    # Both worlds as arguments, not request.getfixturevalue(): an async module fixture first
    # set up from inside a running test cannot start (pytest-asyncio's runner is busy), and
    # with -n 2 this test may be the first on its worker to need the post world.
    world = {"main": main, "post": post}[world_name]
    world.provider.script = Script(client_auth=required)  # type: ignore[arg-type]
    await rejected(world, status=401, says="invalid_client")


# ---------------------------------------------------------------------------------------------
# ID token claims (OIDC Core §3.1.3.7)
# ---------------------------------------------------------------------------------------------

CLAIM_REJECTIONS = [
    pytest.param({"aud": "someone-else"}, "audience", id="rp-id_token-aud-wrong"),
    pytest.param({"aud": DROP}, "audience", id="rp-id_token-aud-missing"),
    pytest.param({"aud": [CLIENT_ID, "untrusted-client"], "azp": CLIENT_ID}, "untrusted",
                 id="rp-id_token-aud-extra-untrusted"),
    pytest.param({"aud": []}, "audience", id="aud-empty-list"),
    pytest.param({"aud": 42}, "audience", id="aud-not-a-string"),
    pytest.param({"azp": "someone-else"}, "azp", id="azp-another-party"),
    pytest.param({"iat": DROP}, "issue time", id="rp-id_token-iat-missing"),
    pytest.param({"iat": lambda now: now + 3600}, "future", id="rp-id_token-iat-in-the-future"),
    pytest.param({"iat": "yesterday"}, "issue time", id="iat-not-a-number"),
    # rp-id_token-sub-missing and an empty sub: a provider configuration error (502), in
    # test_provider_claims.py::test_an_id_token_without_sub_is_a_provider_configuration_error.
    pytest.param({"sub": "s" * 256}, "255", id="sub-longer-than-255"),
    pytest.param({"iss": "https://evil.example"}, "another issuer",
                 id="rp-id_token-issuer-mismatch"),
    pytest.param({"iss": DROP}, "another issuer", id="iss-missing"),
    pytest.param({"exp": lambda now: now - 3600, "iat": lambda now: now - 7200}, "expired",
                 id="expired"),
    # authlib's default leeway is 120 s; ours is 60 s (security note 3).
    pytest.param({"exp": lambda now: now - 90}, "expired", id="expired-90s-ago-beyond-leeway"),
    pytest.param({"exp": DROP}, "expiry", id="exp-missing"),
    pytest.param({"exp": "never"}, "expiry", id="exp-not-a-number"),
    pytest.param({"nbf": lambda now: now + 3600}, "not valid yet", id="nbf-in-the-future"),
    pytest.param({"nonce": "forged-nonce"}, "nonce", id="rp-nonce-invalid"),
    pytest.param({"nonce": DROP}, "nonce", id="nonce-missing"),
]


@pytest.mark.parametrize(("claims", "says"), CLAIM_REJECTIONS)
async def test_id_token_claims_rejected(main: World, claims: dict[str, Any], says: str) -> None:
    main.provider.script = Script(claims=claims)
    await rejected(main, status=401, says=says)


@pytest.mark.parametrize("claims", [
    pytest.param({"aud": [CLIENT_ID]}, id="aud-as-one-element-list"),
    pytest.param({"exp": lambda now: now - 20}, id="expired-20s-ago-within-leeway"),
    pytest.param({"iat": lambda now: now + 20}, id="iat-20s-ahead-within-leeway"),
    pytest.param({"azp": CLIENT_ID}, id="azp-is-us"),
])
async def test_id_token_claims_accepted(main: World, claims: dict[str, Any]) -> None:
    main.provider.script = Script(claims=claims)
    await accepted(main)


# ---------------------------------------------------------------------------------------------
# Signatures and algorithms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_ec", [
    pytest.param(False, id="rp-id_token-sig-rs256"),
    pytest.param(True, id="rp-id_token-sig-es256"),
])
async def test_signed_id_token_accepted(main: World, keys: Keys, use_ec: bool) -> None:
    main.provider.script = Script(key=keys.e1 if use_ec else keys.r1)
    await accepted(main)


def _jwe(header: dict[str, Any], claims: dict[str, Any]) -> str:
    head = b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"}).encode())
    return ".".join([head, "a2V5", "aXY", "Y2lwaGVydGV4dA", "dGFn"])


SIGNATURE_REJECTIONS: list[Any] = [
    pytest.param(lambda k: Script(key=k.r1, signature="corrupt"), "signature is invalid",
                 id="rp-id_token-bad-sig-rs256"),
    pytest.param(lambda k: Script(key=k.e1, signature="corrupt"), "signature is invalid",
                 id="rp-id_token-bad-sig-es256"),
    # Discovery announces "none": it must make no difference.
    pytest.param(lambda k: Script(signature="none"), "unsigned", id="rp-id_token-sig-none"),
    pytest.param(lambda k: Script(signature="none", header={"alg": "None"}), "unsigned",
                 id="sig-none-capitalised"),
    pytest.param(lambda k: Script(key=k.r3, header={"kid": "r1"}), "signature is invalid",
                 id="forged-rs256-claiming-a-published-kid"),
    pytest.param(lambda k: Script(key=k.e2, header={"kid": "e1"}), "signature is invalid",
                 id="forged-es256-claiming-a-published-kid"),
    pytest.param(lambda k: Script(key=k.e1, header={"kid": "r1"}), "cannot be used",
                 id="es256-naming-the-rsa-key"),
    pytest.param(lambda k: Script(key=k.r1, header={"alg": "RS512"}), "not allowed",
                 id="alg-the-provider-does-not-announce"),
    # Discovery announces HS256, the config does not allow it (security note 2).
    pytest.param(lambda k: Script(sign=hs256_signer(CLIENT_SECRET.encode())), "not allowed",
                 id="hs256-with-the-client-secret"),
    # The classic algorithm confusion: HMAC keyed with the provider's public key.
    pytest.param(lambda k: Script(sign=hs256_signer(k.r1.as_pem(private=False))), "not allowed",
                 id="hs256-keyed-with-the-public-key"),
    pytest.param(lambda k: Script(key=k.r3), "does not list", id="unknown-kid"),
    pytest.param(lambda k: Script(sign=_jwe), "encrypted", id="encrypted-id-token"),
    pytest.param(lambda k: Script(sign=lambda h, c: "not-a-jwt"), "well-formed",
                 id="id-token-not-a-jwt"),
    pytest.param(lambda k: Script(header={"crit": ["exp"]}), "crit", id="crit-header"),
    # Keys named by the token itself are never trusted (CVE-2018-0114 and its kin): only the
    # provider's JWKS counts.
    pytest.param(lambda k: Script(key=k.r3, header={"kid": DROP,
                                                    "jwk": k.r3.as_dict(private=False)}),
                 "signature is invalid", id="embedded-jwk-header"),
    pytest.param(lambda k: Script(key=k.r3, header={"kid": DROP,
                                                    "jku": "https://evil.example/jwks"}),
                 "signature is invalid", id="jku-header"),
    pytest.param(lambda k: Script(sign=_strip_signature),
                 "signature is invalid", id="signature-stripped"),
]


def _strip_signature(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with a valid header and claims and an empty signature part."""
    head = b64url(json.dumps(header).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}."


@pytest.mark.parametrize(("script", "says"), SIGNATURE_REJECTIONS)
async def test_id_token_signature_rejected(
    main: World, keys: Keys, script: Callable[[Keys], Script], says: str
) -> None:
    main.provider.script = script(keys)
    await rejected(main, status=401, says=says)


# ---------------------------------------------------------------------------------------------
# Key selection: kid absent, several keys, unparseable keys, rotation
# ---------------------------------------------------------------------------------------------


async def test_rp_id_token_kid_absent_single_jwks(single_key: World) -> None:
    """rp-id_token-kid-absent-single-jwks: no kid anywhere, one key: use it."""
    single_key.provider.script = Script(header={"kid": DROP})
    await accepted(single_key)


async def test_kid_absent_single_jwks_forged(single_key: World, keys: Keys) -> None:
    single_key.provider.script = Script(key=keys.r3, header={"kid": DROP})
    await rejected(single_key, status=401, says="signature is invalid")


@pytest.mark.parametrize("key_name", ["r1", "r2", "e1"])
async def test_rp_id_token_kid_absent_multiple_jwks_tries_every_key(
    many_keys: World, keys: Keys, key_name: str
) -> None:
    """rp-id_token-kid-absent-multiple-jwks: we try every key that fits the algorithm."""
    many_keys.provider.script = Script(key=getattr(keys, key_name), header={"kid": DROP})
    await accepted(many_keys)


@pytest.mark.parametrize("key_name", ["r3", "e2"])
async def test_kid_absent_multiple_jwks_forged(
    many_keys: World, keys: Keys, key_name: str
) -> None:
    many_keys.provider.script = Script(key=getattr(keys, key_name), header={"kid": DROP})
    await rejected(many_keys, status=401, says="signature is invalid")


async def test_unparseable_keys_in_the_jwks_are_ignored(many_keys: World, keys: Keys) -> None:
    """The gateway loaded a JWKS full of junk (it is ready) and verifies with the good keys."""
    many_keys.provider.script = Script(key=keys.r2)
    await accepted(many_keys)


@pytest.mark.parametrize(("script", "says"), [
    pytest.param(lambda k: Script(key=k.r3, header={"kid": "enc-key"}), "does not list",
                 id="kid-of-an-encryption-key"),
    pytest.param(lambda k: Script(key=k.r3, header={"kid": "bad-n"}), "does not list",
                 id="kid-of-an-unparseable-key"),
    pytest.param(lambda k: Script(key=k.r3, header={"kid": 7}), "kid is not a string",
                 id="kid-not-a-string"),
    pytest.param(lambda k: Script(sign=hs256_signer(b"a shared secret must never verify")),
                 "not allowed", id="hs256-with-a-symmetric-jwks-key"),
])
async def test_junk_keys_never_verify(
    many_keys: World, keys: Keys, script: Callable[[Keys], Script], says: str
) -> None:
    many_keys.provider.script = script(keys)
    await rejected(many_keys, status=401, says=says)


async def test_rp_key_rotation_op_sign_key(rotation: World, keys: Keys) -> None:
    """rp-key-rotation-op-sign-key: a new key with a new kid is fetched once and accepted;
    unknown kids after that do not make the gateway refetch (throttled, security note 4)."""
    provider = rotation.provider
    start = await rotation.snapshot()
    await accepted(rotation)
    assert rotation.calls_since(start, "jwks") == 0

    # The provider rotates: only r2 is published and signs.
    provider.published = [keys.r2]
    provider.signing_key = keys.r2
    await accepted(rotation)
    assert rotation.calls_since(start, "jwks") == 1
    await accepted(rotation)
    assert rotation.calls_since(start, "jwks") == 1

    # A flood of tokens with unknown kids, in parallel: no refetch within the interval.
    provider.script = Script(key=keys.r3)
    await asyncio.gather(*(rejected(rotation, status=401, says="does not list")
                           for _ in range(6)))
    # The retired key is now unknown too.
    provider.script = Script(key=keys.r1)
    await rejected(rotation, status=401, says="does not list")
    assert rotation.calls_since(start, "jwks") == 1


# ---------------------------------------------------------------------------------------------
# Userinfo
# ---------------------------------------------------------------------------------------------


async def test_rp_scope_userinfo_claims(main: World) -> None:
    """rp-scope-userinfo-claims: claims only userinfo has reach the upstream as headers."""
    main.provider.script = Script(userinfo={"email": "alice.userinfo@example.test",
                                            "groups": ["eng", "ops"]})
    headers = await accepted(main)
    assert "email" in main.provider.last_authorize["scope"].split()
    assert main.provider.calls["userinfo"] > 0
    assert headers["x-forwarded-email"] == "alice.userinfo@example.test"
    assert headers["x-forwarded-groups"] == "eng,ops"
    assert headers["x-forwarded-preferred-username"] == "alice"


USERINFO_REJECTIONS = [
    pytest.param(Script(userinfo={"sub": "mallory"}), 401, "userinfo sub",
                 id="rp-userinfo-bad-sub-claim"),
    pytest.param(Script(userinfo={"sub": DROP}), 401, "userinfo sub", id="userinfo-sub-missing"),
    pytest.param(Script(userinfo={"sub": SUB.upper()}), 401, "userinfo sub",
                 id="userinfo-sub-differs-in-case"),
    pytest.param(Script(userinfo_failure=TokenFailure(500, b"oops", "text/plain")), 502,
                 "HTTP 500", id="userinfo-500"),
    pytest.param(Script(userinfo_failure=TokenFailure(200, b"<html>hi</html>", "text/html")),
                 502, "JSON object", id="userinfo-garbage"),
    pytest.param(Script(userinfo_failure=TokenFailure(200, b'["sub"]')), 502, "JSON object",
                 id="userinfo-json-array"),
]


@pytest.mark.parametrize(("script", "status", "says"), USERINFO_REJECTIONS)
async def test_userinfo_rejected(main: World, script: Script, status: int, says: str) -> None:
    main.provider.script = script
    await rejected(main, status=status, says=says)


# ---------------------------------------------------------------------------------------------
# The authorization response: error=..., RFC 9207 iss
# ---------------------------------------------------------------------------------------------

AUTHORIZATION_REJECTIONS = [
    pytest.param(Script(authorize_error="access_denied"), 401, "access_denied",
                 id="error-access_denied"),
    pytest.param(Script(authorize_error="login_required"), 401, "login_required",
                 id="error-login_required"),
    pytest.param(Script(authorize_error="consent_required"), 401, "consent_required",
                 id="error-consent_required"),
    pytest.param(Script(authorize_error="unauthorized_client"), 401, "client registration",
                 id="error-unauthorized_client"),
    pytest.param(Script(authorize_error="invalid_scope",
                        authorize_error_description="scope groups unknown"), 401,
                 "scope groups unknown", id="error-invalid_scope-with-description"),
    pytest.param(Script(authorize_error="server_error"), 502, "server_error",
                 id="error-server_error"),
    pytest.param(Script(authorize_error="temporarily_unavailable"), 502,
                 "temporarily_unavailable", id="error-temporarily_unavailable"),
    pytest.param(Script(authorize_iss=None), 400, "lacks the iss",
                 id="rfc9207-iss-missing-when-announced"),
    pytest.param(Script(authorize_iss="https://other-idp.example"), 400, "comes from issuer",
                 id="rfc9207-iss-wrong"),
    pytest.param(Script(authorize_error="access_denied", authorize_iss="https://other.example"),
                 400, "comes from issuer", id="rfc9207-iss-wrong-on-an-error"),
    pytest.param(Script(authorize_omit_code=True), 400, "no authorization code",
                 id="neither-code-nor-error"),
]


@pytest.mark.parametrize(("script", "status", "says"), AUTHORIZATION_REJECTIONS)
async def test_authorization_response_rejected(
    main: World, script: Script, status: int, says: str
) -> None:
    main.provider.script = script
    before = main.provider.calls["token"]
    await rejected(main, status=status, says=says)
    assert main.provider.calls["token"] == before, "a refused answer reached the token endpoint"


async def test_error_description_is_shown_escaped(main: World) -> None:
    """The provider's error text is repeated to the user as text: no markup, no header break."""
    main.provider.script = Script(
        authorize_error="access_denied",
        authorize_error_description='<script>alert(1)</script>\r\nSet-Cookie: x=1 "quoted"',
    )
    walk = await rejected(main, status=401, says="access_denied")
    assert "<script>" not in walk.text
    assert "&lt;script&gt;" in walk.text
    assert not any(c.startswith("x=") for c in walk.headers.getall("Set-Cookie", []))


@pytest.mark.parametrize("iss", [
    pytest.param(None, id="rfc9207-not-announced-iss-absent"),
    pytest.param("issuer", id="rfc9207-not-announced-iss-correct"),
])
async def test_iss_parameter_optional_when_not_announced(no_iss: World, iss: str | None) -> None:
    no_iss.provider.script = Script(authorize_iss=iss)
    await accepted(no_iss)


async def test_iss_parameter_checked_when_present_though_not_announced(no_iss: World) -> None:
    no_iss.provider.script = Script(authorize_iss="https://other-idp.example")
    await rejected(no_iss, status=400, says="comes from issuer")


# ---------------------------------------------------------------------------------------------
# The token endpoint misbehaving
# ---------------------------------------------------------------------------------------------

TOKEN_ENDPOINT_REJECTIONS = [
    pytest.param(Script(token_failure=TokenFailure(
        400, b'{"error":"invalid_grant","error_description":"code expired"}')), 401,
        "invalid_grant", id="token-400-invalid_grant"),
    pytest.param(Script(token_failure=TokenFailure(401, b'{"error":"invalid_client"}')), 401,
                 "invalid_client", id="token-401-invalid_client"),
    pytest.param(Script(token_failure=TokenFailure(403, b"<h1>Forbidden</h1>", "text/html")),
                 502, "HTTP 403", id="token-403-html"),
    pytest.param(Script(token_failure=TokenFailure(500, b'{"error":"server_error"}')), 502,
                 "HTTP 500", id="token-500"),
    pytest.param(Script(token_failure=TokenFailure(503, b"<h1>Down</h1>", "text/html")), 502,
                 "HTTP 503", id="token-503-html"),
    pytest.param(Script(token_failure=TokenFailure(200, b"<html>Welcome to nginx</html>",
                                                   "text/html")),
                 502, "not JSON", id="token-200-garbage"),
    pytest.param(Script(token_failure=TokenFailure(200, b'["access_token"]')), 502, "not JSON",
                 id="token-200-json-array"),
    pytest.param(Script(token_failure=TokenFailure(200, b"x" * (2 * 1024 * 1024),
                                                   "text/plain")),
                 502, "more than", id="token-200-two-megabytes"),
    pytest.param(Script(token_response={"id_token": DROP}), 502, "no id_token",
                 id="token-without-id_token"),
    pytest.param(Script(token_response={"access_token": DROP}), 502, "access_token",
                 id="token-without-access_token"),
    pytest.param(Script(token_response={"token_type": "mac"}), 502, "not Bearer",
                 id="token-type-not-bearer"),
    pytest.param(Script(token_response={"expires_in": "soon"}), 502, "expires_in",
                 id="token-expires_in-not-a-number"),
    pytest.param(Script(token_mode="drop"), 502, "cannot be reached", id="token-connection-drop"),
    pytest.param(Script(token_mode="timeout"), 504, "did not answer", id="token-timeout"),
]


@pytest.mark.parametrize(("script", "status", "says"), TOKEN_ENDPOINT_REJECTIONS)
async def test_token_endpoint_failure_rejected(
    main: World, script: Script, status: int, says: str
) -> None:
    main.provider.script = script
    await rejected(main, status=status, says=says)


# ---------------------------------------------------------------------------------------------
# Nothing secret in the logs
# ---------------------------------------------------------------------------------------------


def _json_or_none(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def test_gateway_logs_carry_no_code_token_or_secret(main: World) -> None:
    """After logins that succeed and fail, the gateway's log holds none of the codes, tokens,
    state, nonce, PKCE verifier or client secret it handled (DEVELOPERS rule, note on logs)."""
    await accepted(main)
    handled = [main.provider.last_authorize["state"], main.provider.last_authorize["nonce"],
               main.provider.last_token_form["code_verifier"]]
    main.provider.script = Script(signature="corrupt")
    await rejected(main, status=401, says="signature is invalid")
    main.provider.script = Script(userinfo={"sub": "mallory"})
    await rejected(main, status=401, says="userinfo sub")
    logs = main.gateway.logs()
    # The log is there and has the login line: who, and the session as a short hash only.
    logins = [line for line in map(_json_or_none, logs.splitlines())
              if line is not None and line.get("msg") == "login"]
    assert logins
    assert all(line["user"] and len(line["session"]) == 12 for line in logins), logins
    secrets_seen = [*main.provider.issued, *handled, CLIENT_SECRET]
    assert len(main.provider.issued) >= 7
    leaked = [i for i, value in enumerate(secrets_seen) if value in logs]
    assert not leaked, f"{len(leaked)} secret value(s) found in the gateway log"
