"""Pure tests of gateway.oidc: discovery, the authorization request, token and callback parsing,
ID token validation step by step (OIDC Core §3.1.3.7) and the identity built from claims.

Keys are generated here with joserfc; tokens are signed by a helper that takes any claims and
header, so each rejection test changes exactly one thing in an otherwise valid token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import pytest
from joserfc import jws
from joserfc.jwk import ECKey, Key, OctKey, RSAKey

from gateway.config import ClaimsConfig
from gateway.errors import OIDCError, UnknownSigningKey
from gateway.models import LoginState
from gateway.oidc import (
    HttpRequestSpec,
    KeySet,
    ProviderMetadata,
    authorization_url,
    code_challenge,
    discovery_url,
    end_session_url,
    identity_from_claims,
    json_object,
    needs_refresh,
    new_login_state,
    parse_callback,
    parse_discovery,
    parse_jwks,
    parse_token_response,
    refresh_request,
    states_match,
    token_request,
    validate_id_token,
)

ISSUER = "https://idp.example.com/realms/corp"
CLIENT_ID = "gateway"
CLIENT_SECRET = "a-client-secret-of-decent-length"
NOW = 1_750_000_000.0
LEEWAY = 60.0
NONCE = "n-0S6_WzA2Mj"
ALGS = ("RS256", "ES256", "PS256")

META = ProviderMetadata(
    issuer=ISSUER,
    authorization_endpoint=f"{ISSUER}/protocol/openid-connect/auth",
    token_endpoint=f"{ISSUER}/protocol/openid-connect/token",
    jwks_uri=f"{ISSUER}/protocol/openid-connect/certs",
    userinfo_endpoint=f"{ISSUER}/protocol/openid-connect/userinfo",
    end_session_endpoint=f"{ISSUER}/protocol/openid-connect/logout",
    id_token_signing_alg_values_supported=("RS256", "ES256"),
    code_challenge_methods_supported=("S256",),
    authorization_response_iss_parameter_supported=True,
)


# ---------------------------------------------------------------------------------------------
# Keys and token signing helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"})


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-1", "use": "sig"})


@pytest.fixture(scope="module")
def other_rsa_key() -> RSAKey:
    """A different RSA key that claims the same kid as rsa_key: a forger's key."""
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"})


def jwks_of(*keys: Key, extra: list[Any] | None = None) -> bytes:
    return json.dumps({"keys": [k.as_dict(private=False) for k in keys] + (extra or [])}).encode()


@pytest.fixture(scope="module")
def keyset(rsa_key: RSAKey, ec_key: ECKey) -> KeySet:
    return parse_jwks(jwks_of(rsa_key, ec_key))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def good_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "248289761001",
        "aud": CLIENT_ID,
        "exp": NOW + 300,
        "iat": NOW - 10,
        "nonce": NONCE,
        "email": "jane@example.com",
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not _DROP}


_DROP: Any = object()


def sign(
    claims: dict[str, Any],
    key: Key,
    *,
    alg: str = "RS256",
    kid: str | object | None = "from-key",
    header: dict[str, Any] | None = None,
) -> str:
    hdr: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid == "from-key":
        if key.kid is not None:
            hdr["kid"] = key.kid
    elif kid is not None:
        hdr["kid"] = kid
    hdr.update(header or {})
    return jws.serialize_compact(hdr, json.dumps(claims).encode(), key, algorithms=[alg])


def unsigned(claims: dict[str, Any], kid: str = "rsa-1") -> str:
    header = b64(json.dumps({"alg": "none", "kid": kid}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


def validate(token: str, keys: KeySet, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "keys": keys,
        "issuer": ISSUER,
        "client_id": CLIENT_ID,
        "nonce": NONCE,
        "algorithms": ALGS,
        "leeway": LEEWAY,
        "now": NOW,
    }
    kwargs.update(overrides)
    return validate_id_token(token, **kwargs)


def rejected(token: str, keys: KeySet, match: str, **overrides: Any) -> OIDCError:
    with pytest.raises(OIDCError, match=match) as info:
        validate(token, keys, **overrides)
    assert type(info.value) is OIDCError  # not UnknownSigningKey: no refetch for these
    assert info.value.reason == "id_token_invalid"
    assert info.value.status_hint == 401
    return info.value


# ---------------------------------------------------------------------------------------------
# ID token: accepted
# ---------------------------------------------------------------------------------------------


def test_accepts_good_rs256_token(rsa_key: RSAKey, keyset: KeySet) -> None:
    claims = validate(sign(good_claims(), rsa_key), keyset)
    assert claims["sub"] == "248289761001"
    assert claims["email"] == "jane@example.com"


def test_accepts_good_es256_token(ec_key: ECKey, keyset: KeySet) -> None:
    claims = validate(sign(good_claims(), ec_key, alg="ES256"), keyset)
    assert claims["sub"] == "248289761001"


def test_accepts_ps256_with_rsa_key(rsa_key: RSAKey, keyset: KeySet) -> None:
    assert validate(sign(good_claims(), rsa_key, alg="PS256"), keyset)["iss"] == ISSUER


def test_accepts_audience_as_single_element_list(rsa_key: RSAKey, keyset: KeySet) -> None:
    assert validate(sign(good_claims(aud=[CLIENT_ID]), rsa_key), keyset)["aud"] == [CLIENT_ID]


def test_accepts_matching_azp(rsa_key: RSAKey, keyset: KeySet) -> None:
    assert validate(sign(good_claims(azp=CLIENT_ID), rsa_key), keyset)["azp"] == CLIENT_ID


def test_nonce_not_checked_when_not_expected(rsa_key: RSAKey, keyset: KeySet) -> None:
    # Refresh (OIDC Core §12.2): no nonce was sent, so none is demanded.
    assert validate(sign(good_claims(nonce=_DROP), rsa_key), keyset, nonce=None)


# ---------------------------------------------------------------------------------------------
# ID token: signature and algorithm (steps 6-8)
# ---------------------------------------------------------------------------------------------


def test_rejects_signature_by_another_key_with_same_kid(
    other_rsa_key: RSAKey, keyset: KeySet
) -> None:
    rejected(sign(good_claims(), other_rsa_key), keyset, "signature is invalid")


def test_rejects_tampered_payload(rsa_key: RSAKey, keyset: KeySet) -> None:
    header, _, signature = sign(good_claims(), rsa_key).split(".")
    forged = b64(json.dumps(good_claims(sub="admin")).encode())
    rejected(f"{header}.{forged}.{signature}", keyset, "signature is invalid")


@pytest.mark.parametrize("algorithms", [ALGS, (*ALGS, "none"), ("none",)])
def test_rejects_alg_none_whatever_the_allowed_list(
    keyset: KeySet, algorithms: tuple[str, ...]
) -> None:
    rejected(unsigned(good_claims()), keyset, "unsigned", algorithms=algorithms)


def test_rejects_alg_none_spelled_differently(keyset: KeySet) -> None:
    header = b64(json.dumps({"alg": "None", "kid": "rsa-1"}).encode())
    token = f"{header}.{b64(json.dumps(good_claims()).encode())}."
    rejected(token, keyset, "unsigned", algorithms=(*ALGS, "None"))


def test_rejects_hs256_signed_with_client_secret_when_not_allowed(keyset: KeySet) -> None:
    token = sign(good_claims(), OctKey.import_key(CLIENT_SECRET), alg="HS256", kid=None)
    rejected(token, keyset, "HS256, which is not allowed", client_secret=CLIENT_SECRET)


def test_rejects_hs256_signed_with_public_key_bytes(rsa_key: RSAKey, keyset: KeySet) -> None:
    # The classic RS/HS confusion: HMAC keyed with the provider's public key.
    # joserfc refuses to build such a key, so the MAC is computed by hand.
    pem = rsa_key.as_pem(private=False)
    signing_input = (
        b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
        + "."
        + b64(json.dumps(good_claims()).encode())
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(mac)}"
    rejected(token, keyset, "not allowed")
    rejected(
        token, keyset, "signature is invalid", algorithms=("HS256",), client_secret=CLIENT_SECRET
    )


def test_accepts_hs256_only_when_listed_explicitly(keyset: KeySet) -> None:
    token = sign(good_claims(), OctKey.import_key(CLIENT_SECRET), alg="HS256", kid=None)
    claims = validate(token, keyset, algorithms=("HS256",), client_secret=CLIENT_SECRET)
    assert claims["sub"] == "248289761001"
    # ... and still fails with the wrong secret.
    rejected(
        token,
        keyset,
        "signature is invalid",
        algorithms=("HS256",),
        client_secret="another-secret-of-decent-len",
    )


def test_rejects_algorithm_outside_allowed_list(ec_key: ECKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(), ec_key, alg="ES256"), keyset, "not allowed", algorithms=("RS256",))


def test_rejects_key_of_wrong_type_for_alg(ec_key: ECKey, keyset: KeySet) -> None:
    # Signed with the EC key but claims RS256 with the EC key's kid.
    token = sign(good_claims(), ec_key, alg="ES256")
    _header, payload, signature = token.split(".")
    swapped = b64(json.dumps({"alg": "RS256", "kid": "ec-1"}).encode())
    rejected(f"{swapped}.{payload}.{signature}", keyset, "cannot be used with RS256")


def test_unknown_kid_raises_unknown_signing_key(keyset: KeySet) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "rotated-2"})
    with pytest.raises(UnknownSigningKey):
        validate(sign(good_claims(), key), keyset)


def test_kid_absent_with_one_key_is_accepted(rsa_key: RSAKey) -> None:
    only = parse_jwks(jwks_of(rsa_key))
    assert validate(sign(good_claims(), rsa_key, kid=None), only)["sub"]


def test_kid_absent_with_several_keys_tries_each(rsa_key: RSAKey, ec_key: ECKey) -> None:
    other = RSAKey.generate_key(2048, parameters={"kid": "rsa-0"})
    several = parse_jwks(jwks_of(other, ec_key, rsa_key))
    assert validate(sign(good_claims(), rsa_key, kid=None), several)["sub"]
    stranger = RSAKey.generate_key(2048)
    rejected(sign(good_claims(), stranger, kid=None), several, "signature is invalid")


def test_kid_absent_and_no_key_for_alg_is_unknown_key(ec_key: ECKey, rsa_key: RSAKey) -> None:
    only_rsa = parse_jwks(jwks_of(rsa_key))
    with pytest.raises(UnknownSigningKey):
        validate(sign(good_claims(), ec_key, alg="ES256", kid=None), only_rsa)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "....",
        "a.b.c.d.e",
        "eyJhbGciOiJSUzI1NiJ9.!!!.sig",
        b64(b"[1,2]") + ".e30.sig",
        b64(b'{"alg": 5}') + ".e30.sig",
        b64(b'{"alg":"RS256","kid":7}') + ".e30.sig",
        "\u00e9t\u00e9.b.c",
    ],
)
def test_malformed_tokens_are_clean_errors(token: str, keyset: KeySet) -> None:
    with pytest.raises(OIDCError) as info:
        validate(token, keyset)
    assert info.value.reason == "id_token_invalid"


def test_payload_not_an_object(rsa_key: RSAKey, keyset: KeySet) -> None:
    token = jws.serialize_compact({"alg": "RS256", "kid": "rsa-1"}, b"[1, 2]", rsa_key)
    rejected(token, keyset, "not a JSON object")


def test_rejects_crit_header(rsa_key: RSAKey, keyset: KeySet) -> None:
    token = sign(good_claims(), rsa_key, header={"crit": ["kid"]})
    with pytest.raises(OIDCError) as info:
        validate(token, keyset)
    assert info.value.reason == "id_token_invalid"


# ---------------------------------------------------------------------------------------------
# ID token: claims (steps 2-5, 9-11, 13, and sub)
# ---------------------------------------------------------------------------------------------


def test_rejects_wrong_issuer(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(iss="https://evil.example.com"), rsa_key), keyset, "another issuer")
    rejected(sign(good_claims(iss=ISSUER + "/"), rsa_key), keyset, "another issuer")
    rejected(sign(good_claims(iss=_DROP), rsa_key), keyset, "another issuer")


def test_rejects_audience_of_another_client(rsa_key: RSAKey, keyset: KeySet) -> None:
    token = sign(good_claims(aud="other-client", azp=CLIENT_ID), rsa_key)
    rejected(token, keyset, "audience does not contain this client")


@pytest.mark.parametrize("aud", [_DROP, None, [], "", 5, [5]])
def test_rejects_missing_or_malformed_audience(rsa_key: RSAKey, keyset: KeySet, aud: Any) -> None:
    rejected(sign(good_claims(aud=aud), rsa_key), keyset, "audience")


def test_rejects_extra_untrusted_audience(rsa_key: RSAKey, keyset: KeySet) -> None:
    token = sign(good_claims(aud=[CLIENT_ID, "untrusted"], azp=CLIENT_ID), rsa_key)
    rejected(token, keyset, "other, untrusted clients")


def test_rejects_azp_mismatch(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(azp="other-client"), rsa_key), keyset, "another party")


def test_rejects_expired_token(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(exp=NOW - LEEWAY - 1), rsa_key), keyset, "expired")


def test_accepts_expired_token_within_leeway(rsa_key: RSAKey, keyset: KeySet) -> None:
    assert validate(sign(good_claims(exp=NOW - LEEWAY + 5), rsa_key), keyset)


def test_leeway_is_the_one_given(rsa_key: RSAKey, keyset: KeySet) -> None:
    token = sign(good_claims(exp=NOW - 30), rsa_key)
    assert validate(token, keyset, leeway=60)
    rejected(token, keyset, "expired", leeway=0)


@pytest.mark.parametrize("exp", [_DROP, None, "9999999999", True, float("inf")])
def test_rejects_missing_or_malformed_exp(rsa_key: RSAKey, keyset: KeySet, exp: Any) -> None:
    # float("inf") is written as Infinity, which Python's JSON decoder reads back as inf.
    rejected(sign(good_claims(exp=exp), rsa_key), keyset, "expiry")


def test_rejects_missing_iat(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(iat=_DROP), rsa_key), keyset, "issue time")
    rejected(sign(good_claims(iat="yesterday"), rsa_key), keyset, "issue time")


def test_rejects_iat_in_the_future(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(iat=NOW + LEEWAY + 5), rsa_key), keyset, "future")
    assert validate(sign(good_claims(iat=NOW + LEEWAY - 5), rsa_key), keyset)


def test_rejects_nbf_in_the_future(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(nbf=NOW + LEEWAY + 5), rsa_key), keyset, "not valid yet")


def test_rejects_nonce_mismatch(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(nonce="another-nonce"), rsa_key), keyset, "nonce does not match")


def test_rejects_nonce_missing(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(nonce=_DROP), rsa_key), keyset, "no nonce")
    rejected(sign(good_claims(nonce=42), rsa_key), keyset, "no nonce")


def test_max_age_requires_recent_auth_time(rsa_key: RSAKey, keyset: KeySet) -> None:
    rejected(sign(good_claims(), rsa_key), keyset, "auth_time", max_age=300)
    old = sign(good_claims(auth_time=NOW - 1000), rsa_key)
    rejected(old, keyset, "older than max_age", max_age=300)
    assert validate(sign(good_claims(auth_time=NOW - 100), rsa_key), keyset, max_age=300)


@pytest.mark.parametrize("sub", [_DROP, 12345, "", None, ["a"]])
def test_rejects_missing_sub_as_a_provider_problem(
    rsa_key: RSAKey, keyset: KeySet, sub: Any
) -> None:
    """A validated token without a usable sub is the provider's configuration at fault:
    502, and a message saying where to look, never a session."""
    message = r"no subject \(sub\)\. The sign-in service is misconfigured"
    with pytest.raises(OIDCError, match=message) as info:
        validate(sign(good_claims(sub=sub), rsa_key), keyset)
    assert info.value.reason == "id_token_invalid"
    assert info.value.status_hint == 502


def test_sub_length_limit(rsa_key: RSAKey, keyset: KeySet) -> None:
    assert validate(sign(good_claims(sub="s" * 255), rsa_key), keyset)["sub"] == "s" * 255
    rejected(sign(good_claims(sub="s" * 256), rsa_key), keyset, "255 ASCII")
    rejected(sign(good_claims(sub="us\u00e9r"), rsa_key), keyset, "255 ASCII")


# ---------------------------------------------------------------------------------------------
# JWKS parsing
# ---------------------------------------------------------------------------------------------


def test_parse_jwks_ignores_junk_keys(rsa_key: RSAKey, ec_key: ECKey) -> None:
    junk: list[Any] = [
        "not a key",
        42,
        None,
        {},
        {"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"},
        {"kty": "EC", "kid": "no-curve", "x": "AAAA"},
        {"kty": "oct", "kid": "symmetric", "k": b64(b"0123456789abcdef")},
        {"kty": "PQC", "kid": "future"},
        {**rsa_key.as_dict(private=False), "kid": "enc-key", "use": "enc"},
        {**rsa_key.as_dict(private=False), "kid": "ops", "key_ops": ["encrypt"]},
        {**rsa_key.as_dict(private=False), "kid": 17},
    ]
    keys = parse_jwks(jwks_of(rsa_key, ec_key, extra=junk))
    assert keys.kids == {"rsa-1", "ec-1"}
    assert len(keys) == 2


def test_parse_jwks_keeps_only_public_part_of_a_private_key(rsa_key: RSAKey) -> None:
    body = json.dumps({"keys": [rsa_key.as_dict(private=True)]}).encode()
    keys = parse_jwks(body)
    assert len(keys) == 1
    assert not keys.keys[0].is_private


@pytest.mark.parametrize(
    "body", [b"", b"<html>", b"[]", b'{"keys": {}}', b'{"nokeys": []}', b"\xff\xfe"]
)
def test_parse_jwks_rejects_non_jwks(body: bytes) -> None:
    with pytest.raises(OIDCError) as info:
        parse_jwks(body)
    assert info.value.reason == "jwks_invalid"


def test_parse_jwks_empty_list_is_an_empty_keyset() -> None:
    keys = parse_jwks(b'{"keys": []}')
    assert not keys
    assert not keys.usable_for("RS256")


def test_key_declared_for_another_alg_is_not_used(rsa_key: RSAKey) -> None:
    keys = parse_jwks(
        json.dumps({"keys": [{**rsa_key.as_dict(private=False), "alg": "RS512"}]}).encode()
    )
    rejected(sign(good_claims(), rsa_key), keys, "cannot be used with RS256")


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


def discovery_doc(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "issuer": ISSUER,
        "authorization_endpoint": META.authorization_endpoint,
        "token_endpoint": META.token_endpoint,
        "jwks_uri": META.jwks_uri,
        "userinfo_endpoint": META.userinfo_endpoint,
        "end_session_endpoint": META.end_session_endpoint,
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "none"],
        "code_challenge_methods_supported": ["plain", "S256"],
        "authorization_response_iss_parameter_supported": True,
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP}).encode()


def test_discovery_url() -> None:
    assert discovery_url(ISSUER) == ISSUER + "/.well-known/openid-configuration"
    assert discovery_url("https://idp.test/") == "https://idp.test/.well-known/openid-configuration"


def test_parse_discovery() -> None:
    meta = parse_discovery(discovery_doc(), expected_issuer=ISSUER)
    assert meta.issuer == ISSUER
    assert meta.token_endpoint == META.token_endpoint
    assert meta.id_token_signing_alg_values_supported == ("RS256", "ES256", "none")
    assert meta.token_endpoint_auth_methods_supported == ("client_secret_basic",)
    assert meta.authorization_response_iss_parameter_supported is True


def test_parse_discovery_defaults_for_optional_fields() -> None:
    meta = parse_discovery(
        discovery_doc(
            userinfo_endpoint=_DROP,
            end_session_endpoint=_DROP,
            id_token_signing_alg_values_supported=_DROP,
            code_challenge_methods_supported=_DROP,
            authorization_response_iss_parameter_supported="yes",
        ),
        expected_issuer=ISSUER,
    )
    assert meta.userinfo_endpoint is None
    assert meta.end_session_endpoint is None
    assert meta.id_token_signing_alg_values_supported == ("RS256",)
    assert meta.authorization_response_iss_parameter_supported is False


@pytest.mark.parametrize(
    # One trailing slash more (Auth0) is the only accepted difference: tests/unit/test_presets.py.
    "issuer",
    ["https://evil.example.com", ISSUER + "//", ISSUER.upper(), None, 5],
)
def test_parse_discovery_issuer_must_match_exactly(issuer: Any) -> None:
    with pytest.raises(OIDCError) as info:
        parse_discovery(discovery_doc(issuer=issuer), expected_issuer=ISSUER)
    assert info.value.reason == "discovery_invalid"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>not json</html>",
        b"[]",
        discovery_doc(token_endpoint=_DROP),
        discovery_doc(jwks_uri="file:///etc/passwd"),
        discovery_doc(authorization_endpoint="javascript:alert(1)"),
        discovery_doc(authorization_endpoint=5),
        discovery_doc(end_session_endpoint="not a url"),
        discovery_doc(id_token_signing_alg_values_supported="RS256"),
    ],
)
def test_parse_discovery_rejects_garbage(body: bytes) -> None:
    with pytest.raises(OIDCError) as info:
        parse_discovery(body, expected_issuer=ISSUER)
    assert info.value.reason == "discovery_invalid"


# ---------------------------------------------------------------------------------------------
# Authorization request
# ---------------------------------------------------------------------------------------------


def counter_bytes() -> Callable[[int], bytes]:
    seq: Iterator[int] = iter(range(1, 1000))

    def token_bytes(n: int) -> bytes:
        return bytes([next(seq)]) * n

    return token_bytes


def test_new_login_state() -> None:
    login = new_login_state(target="/app?x=1", now=NOW, token_bytes=counter_bytes())
    assert login.state == b64(b"\x01" * 32)
    assert login.nonce == b64(b"\x02" * 32)
    assert login.code_verifier == b64(b"\x03" * 32)
    assert len(login.code_verifier) >= 43
    assert login.target == "/app?x=1"
    assert login.created_at == NOW


def test_pkce_challenge_is_b64url_sha256_of_verifier() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"  # RFC 7636 Appendix B
    assert code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    digest = hashlib.sha256(verifier.encode()).digest()
    assert code_challenge(verifier) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_authorization_url() -> None:
    login = new_login_state(target="/", now=NOW, token_bytes=counter_bytes())
    url = authorization_url(
        META,
        client_id=CLIENT_ID,
        redirect_uri="https://apps.test/cb",
        scopes=("openid", "email"),
        login=login,
    )
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == META.authorization_endpoint
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": "https://apps.test/cb",
        "scope": "openid email",
        "state": login.state,
        "nonce": login.nonce,
        "code_challenge": code_challenge(login.code_verifier),
        "code_challenge_method": "S256",
    }


def test_authorization_url_keeps_existing_query() -> None:
    meta = replace(META, authorization_endpoint="https://b2c.test/authorize?p=b2c_1_signin")
    login = new_login_state(target="/", now=NOW, token_bytes=counter_bytes())
    url = authorization_url(
        meta, client_id=CLIENT_ID, redirect_uri="https://a/cb", scopes=("openid",), login=login
    )
    q = parse_qs(urlsplit(url).query)
    assert q["p"] == ["b2c_1_signin"]
    assert q["response_type"] == ["code"]


@pytest.mark.parametrize(
    ("endpoint", "extra"),
    [
        ("https://op.test/authorize", ()),
        ("https://b2c.test/authorize?p=b2c_1_signin&x=a+b", ()),
        ("https://op.test/authorize", (("access_type", "offline"), ("acr_values", "a b&c=d"))),
    ],
)
def test_authorization_url_is_byte_for_byte_what_urlencode_gives(
    endpoint: str, extra: tuple[tuple[str, str], ...]
) -> None:
    """The prebuilt parts (made once per provider and callback) change nothing on the wire."""
    meta = replace(META, authorization_endpoint=endpoint)
    login = new_login_state(target="/", now=NOW, token_bytes=counter_bytes())
    url = authorization_url(meta, client_id="id with space&amp", redirect_uri="https://a/c b",
                            scopes=("openid", "email"), login=login, extra=extra)
    parts = urlsplit(endpoint)
    expected = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([
        *parse_qsl(parts.query, keep_blank_values=True),
        ("response_type", "code"), ("client_id", "id with space&amp"),
        ("redirect_uri", "https://a/c b"), ("scope", "openid email"), ("state", login.state),
        ("nonce", login.nonce), ("code_challenge", code_challenge(login.code_verifier)),
        ("code_challenge_method", "S256"), *extra]), ""))
    assert url == expected


def test_states_match() -> None:
    assert states_match("abc", "abc")
    assert not states_match("abc", "abd")
    assert not states_match("abc", "")
    assert not states_match("\u00e9", "e")


# ---------------------------------------------------------------------------------------------
# Callback (authorization response)
# ---------------------------------------------------------------------------------------------


def test_callback_returns_code() -> None:
    assert parse_callback({"code": "c0de", "state": "s", "iss": ISSUER}, meta=META) == "c0de"


def test_callback_without_iss_when_not_announced() -> None:
    meta = replace(META, authorization_response_iss_parameter_supported=False)
    assert parse_callback({"code": "c0de", "state": "s"}, meta=meta) == "c0de"


def test_callback_error_access_denied() -> None:
    with pytest.raises(OIDCError, match="access_denied") as info:
        parse_callback(
            {
                "error": "access_denied",
                "error_description": "User said no\r\n<b>",
                "state": "s",
                "iss": ISSUER,
            },
            meta=META,
        )
    assert info.value.reason == "provider_denied"
    assert info.value.status_hint == 401
    assert "\r" not in info.value.message
    assert "\n" not in info.value.message


def test_callback_error_server_error() -> None:
    with pytest.raises(OIDCError) as info:
        parse_callback({"error": "temporarily_unavailable", "iss": ISSUER}, meta=META)
    assert info.value.reason == "provider_error"
    assert info.value.status_hint == 502


def test_callback_iss_mismatch_when_announced() -> None:
    with pytest.raises(OIDCError, match="RFC 9207") as info:
        parse_callback({"code": "c", "iss": "https://evil.example.com"}, meta=META)
    assert info.value.reason == "callback_issuer_mismatch"


def test_callback_iss_missing_when_announced() -> None:
    with pytest.raises(OIDCError, match="RFC 9207") as info:
        parse_callback({"code": "c", "state": "s"}, meta=META)
    assert info.value.reason == "callback_issuer_mismatch"


def test_callback_iss_mismatch_when_not_announced() -> None:
    meta = replace(META, authorization_response_iss_parameter_supported=False)
    with pytest.raises(OIDCError, match="RFC 9207"):
        parse_callback({"code": "c", "iss": "https://evil.example.com"}, meta=meta)


def test_callback_iss_checked_on_error_responses_too() -> None:
    with pytest.raises(OIDCError) as info:
        parse_callback({"error": "access_denied", "iss": "https://evil.test"}, meta=META)
    assert info.value.reason == "callback_issuer_mismatch"


@pytest.mark.parametrize(
    "query", [{"iss": ISSUER}, {"iss": ISSUER, "code": ""}, {"iss": ISSUER, "code": "x" * 5000}]
)
def test_callback_missing_or_silly_code(query: dict[str, str]) -> None:
    with pytest.raises(OIDCError) as info:
        parse_callback(query, meta=META)
    assert info.value.status_hint == 400
    assert info.value.reason == "callback_invalid"


# ---------------------------------------------------------------------------------------------
# Token endpoint requests and responses
# ---------------------------------------------------------------------------------------------

TRICKY_ID = "my:client+id%20 x"
TRICKY_SECRET = "p@ss:w%rd+ &=/é"


def test_client_secret_basic_form_encodes_id_and_secret() -> None:
    spec = token_request(
        META,
        code="c",
        redirect_uri="https://a/cb",
        code_verifier="v",
        client_id=TRICKY_ID,
        client_secret=TRICKY_SECRET,
        auth_method="client_secret_basic",
    )
    headers = dict(spec.headers)
    scheme, _, value = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    decoded = base64.b64decode(value).decode()
    raw_id, sep, raw_secret = decoded.partition(":")
    assert sep == ":"
    assert ":" not in raw_id
    assert " " not in raw_id
    assert " " not in raw_secret
    assert unquote_plus(raw_id) == TRICKY_ID
    assert unquote_plus(raw_secret) == TRICKY_SECRET
    form = dict(spec.form)
    assert "client_secret" not in form
    assert "client_id" not in form


def test_client_secret_post() -> None:
    spec = token_request(
        META,
        code="c",
        redirect_uri="https://a/cb",
        code_verifier="v",
        client_id=TRICKY_ID,
        client_secret=TRICKY_SECRET,
        auth_method="client_secret_post",
    )
    assert "Authorization" not in dict(spec.headers)
    body = parse_qs(spec.body().decode())
    assert body["client_id"] == [TRICKY_ID]
    assert body["client_secret"] == [TRICKY_SECRET]


def test_token_request_form() -> None:
    spec = token_request(
        META,
        code="the-code",
        redirect_uri="https://a/cb",
        code_verifier="verifier",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_basic",
    )
    assert spec.method == "POST"
    assert spec.url == META.token_endpoint
    assert dict(spec.form) == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": "https://a/cb",
        "code_verifier": "verifier",
    }
    assert dict(spec.headers)["Content-Type"] == "application/x-www-form-urlencoded"
    assert CLIENT_SECRET not in repr(spec)
    assert "Basic" not in repr(spec)


def test_token_request_rejects_unknown_auth_method() -> None:
    with pytest.raises(ValueError, match="auth method"):
        token_request(
            META,
            code="c",
            redirect_uri="r",
            code_verifier="v",
            client_id="i",
            client_secret="s",
            auth_method="private_key_jwt",
        )


def test_refresh_request() -> None:
    spec = refresh_request(
        META,
        refresh_token="rt",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_post",
        scopes=("openid", "email"),
    )
    assert isinstance(spec, HttpRequestSpec)
    assert dict(spec.form) == {
        "grant_type": "refresh_token",
        "refresh_token": "rt",
        "scope": "openid email",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    plain = refresh_request(
        META,
        refresh_token="rt",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_basic",
    )
    assert "scope" not in dict(plain.form)


def token_body(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "access_token": "at",
        "token_type": "Bearer",
        "id_token": "idt",
        "refresh_token": "rt",
        "expires_in": 300,
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP}).encode()


def test_token_response_ok() -> None:
    tokens = parse_token_response(200, token_body(token_type="bearer"), now=NOW)
    assert tokens.id_token == "idt"
    assert tokens.access_token == "at"
    assert tokens.refresh_token == "rt"
    assert tokens.token_type == "Bearer"
    assert tokens.expires_at == NOW + 300


def test_token_response_optional_fields() -> None:
    tokens = parse_token_response(200, token_body(refresh_token=_DROP, expires_in=_DROP), now=NOW)
    assert tokens.refresh_token is None
    assert tokens.expires_at is None
    assert parse_token_response(200, token_body(expires_in="60"), now=NOW).expires_at == NOW + 60


def test_token_response_refresh_without_id_token() -> None:
    tokens = parse_token_response(200, token_body(id_token=_DROP), now=NOW, require_id_token=False)
    assert tokens.id_token == ""


@pytest.mark.parametrize(
    ("status", "body", "reason", "hint"),
    [
        (
            400,
            b'{"error": "invalid_grant", "error_description": "Code expired"}',
            "token_error",
            401,
        ),
        (401, b'{"error": "invalid_client"}', "token_error", 401),
        (400, b"<html>Bad Request</html>", "provider_error", 502),
        (500, b'{"error": "server_error"}', "provider_error", 502),
        (503, b"", "provider_error", 502),
        (302, b"", "provider_error", 502),
        (200, b"<html><body>Welcome to nginx</body></html>", "provider_error", 502),
        (200, b"[]", "provider_error", 502),
        (200, token_body(id_token=_DROP), "provider_error", 502),
        (200, token_body(id_token=""), "provider_error", 502),
        (200, token_body(id_token=5), "provider_error", 502),
        (200, token_body(access_token=_DROP), "provider_error", 502),
        (200, token_body(token_type="mac"), "provider_error", 502),
        (200, token_body(token_type=_DROP), "provider_error", 502),
        (200, token_body(expires_in="soon"), "provider_error", 502),
        (200, token_body(expires_in=-5), "provider_error", 502),
        (200, token_body(refresh_token=7), "provider_error", 502),
    ],
)
def test_token_response_errors(status: int, body: bytes, reason: str, hint: int) -> None:
    with pytest.raises(OIDCError) as info:
        parse_token_response(status, body, now=NOW)
    assert info.value.reason == reason
    assert info.value.status_hint == hint


def test_token_error_names_code_and_sanitises_description() -> None:
    junk = "x\r\nSet-Cookie: evil=1\x00" + "A" * 1000
    body = json.dumps({"error": "invalid_grant", "error_description": junk}).encode()
    with pytest.raises(OIDCError) as info:
        parse_token_response(400, body, now=NOW)
    message = info.value.message
    assert "invalid_grant" in message
    assert "\r" not in message
    assert "\n" not in message
    assert "\x00" not in message
    assert len(message) < 400


def test_needs_refresh() -> None:
    from gateway.models import TokenSet

    tokens = TokenSet(id_token="i", access_token="a", refresh_token="r", expires_at=NOW + 30)
    assert needs_refresh(tokens, now=NOW, margin=60)
    assert not needs_refresh(tokens, now=NOW, margin=10)
    assert not needs_refresh(replace(tokens, refresh_token=None), now=NOW)
    assert not needs_refresh(replace(tokens, expires_at=None), now=NOW)


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------

CLAIMS = ClaimsConfig()


def test_identity_from_id_token_only() -> None:
    ident = identity_from_claims(
        {
            "sub": "u1",
            "preferred_username": "jane",
            "email": "j@example.com",
            "email_verified": True,
            "groups": ["eng", "ops"],
        },
        userinfo=None,
        claims=CLAIMS,
    )
    assert ident.sub == "u1"
    assert ident.user == "jane"
    assert ident.preferred_username == "jane"
    assert ident.email == "j@example.com"
    assert ident.email_verified is True
    assert ident.groups == ("eng", "ops")


def test_identity_user_falls_back_to_sub() -> None:
    ident = identity_from_claims({"sub": "u1"}, userinfo=None, claims=CLAIMS)
    assert ident.user == "u1"
    assert ident.email is None
    assert ident.email_verified is None
    assert ident.groups == ()
    assert (
        identity_from_claims(
            {"sub": "u1", "preferred_username": 5}, userinfo=None, claims=CLAIMS
        ).user
        == "u1"
    )


def test_identity_configured_claim_names() -> None:
    claims = ClaimsConfig(user="email", email="mail", groups="realm_access.roles")
    ident = identity_from_claims(
        {
            "sub": "u1",
            "email": "j@x.test",
            "mail": "m@x.test",
            "realm_access": {"roles": ["admin"]},
        },
        userinfo=None,
        claims=claims,
    )
    assert ident.user == "j@x.test"
    assert ident.email == "m@x.test"
    assert ident.groups == ("admin",)


def test_identity_userinfo_merges_but_cannot_override_token_claims() -> None:
    ident = identity_from_claims(
        {"sub": "u1", "iss": ISSUER, "aud": CLIENT_ID, "sid": "s1", "email": "old@x.test"},
        userinfo={
            "sub": "u1",
            "iss": "https://evil",
            "aud": "other",
            "sid": "s2",
            "email": "new@x.test",
            "groups": "solo",
        },
        claims=CLAIMS,
    )
    assert ident.email == "new@x.test"
    assert ident.groups == ("solo",)
    assert ident.claims["iss"] == ISSUER
    assert ident.claims["aud"] == CLIENT_ID
    assert ident.claims["sid"] == "s1"


@pytest.mark.parametrize("ui_sub", ["u2", None, 1, ""])
def test_identity_userinfo_sub_mismatch(ui_sub: Any) -> None:
    userinfo = {"sub": ui_sub} if ui_sub is not None else {}
    with pytest.raises(OIDCError, match="userinfo sub does not match") as info:
        identity_from_claims({"sub": "u1"}, userinfo=userinfo, claims=CLAIMS)
    assert info.value.status_hint == 401


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("True", True),
        ("false", False),
        ("yes", False),
        (1, False),
        (0, False),
        ([], False),
        ({}, False),
    ],
)
def test_identity_email_verified_fails_closed(value: Any, expected: bool) -> None:
    ident = identity_from_claims(
        {"sub": "u1", "email_verified": value}, userinfo=None, claims=CLAIMS
    )
    assert ident.email_verified is expected


@pytest.mark.parametrize(
    ("value", "expected", "state"),
    [
        ("eng", ("eng",), "ok"),
        (["a", "b", "", "a"], ("a", "b"), "ok"),
        # Never a silently shortened list: the dropped member may be the one a deny names.
        (["a", 1, None, "b", "", "a", {"x": 1}], (), "invalid"),
        (["a", None], (), "invalid"),
        (5, (), "invalid"),
        ({"eng": True}, (), "invalid"),
        (None, (), "invalid"),
    ],
)
def test_identity_groups_coercion(value: Any, expected: tuple[str, ...], state: str) -> None:
    ident = identity_from_claims({"sub": "u1", "groups": value}, userinfo=None, claims=CLAIMS)
    assert ident.groups == expected
    assert ident.groups_state == state


def test_identity_email_must_be_a_string() -> None:
    ident = identity_from_claims({"sub": "u1", "email": ["a@b"]}, userinfo=None, claims=CLAIMS)
    assert ident.email is None


# ---------------------------------------------------------------------------------------------
# Logout
# ---------------------------------------------------------------------------------------------


def test_end_session_url() -> None:
    url = end_session_url(
        META, id_token_hint="idt", post_logout_redirect_uri="https://a/bye", client_id=CLIENT_ID
    )
    assert url is not None
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == META.end_session_endpoint
    assert parse_qs(parts.query) == {
        "id_token_hint": ["idt"],
        "client_id": [CLIENT_ID],
        "post_logout_redirect_uri": ["https://a/bye"],
    }


def test_end_session_url_none_without_endpoint() -> None:
    meta = replace(META, end_session_endpoint=None)
    assert (
        end_session_url(
            meta, id_token_hint="idt", post_logout_redirect_uri=None, client_id=CLIENT_ID
        )
        is None
    )


def test_login_state_type_is_the_shared_model() -> None:
    login = new_login_state(target="/", now=NOW, token_bytes=counter_bytes())
    assert isinstance(login, LoginState)


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1]", b'"text"', b"null", b"\xff\xfe{}", b"{"])
def test_an_answer_that_is_no_json_object_is_none(body: bytes) -> None:
    assert json_object(body) is None


def test_an_answer_that_is_a_json_object_is_that_object() -> None:
    assert json_object(bytearray(b'{"active": true, "n": [1]}')) == {"active": True, "n": [1]}
