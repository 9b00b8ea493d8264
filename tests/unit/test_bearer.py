"""The pure core of bearer tokens (gateway.bearer) and the ``routes[].bearer`` config.

Plain sync tests: tokens are signed here with joserfc, time is an argument.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import RSAKey

from gateway.bearer import (
    IntrospectionCache,
    Requirements,
    bearer_token,
    check_introspection,
    identity_from_token,
    introspection_request,
    is_jwt,
    parse_introspection,
    requirements,
    token_hash,
    validate_access_token,
)
from gateway.config import ClaimsConfig, parse_config
from gateway.errors import BearerTokenError, ConfigError, OIDCError, UnknownSigningKey
from gateway.explain import explain, render
from gateway.oidc import KeySet

NOW = 1_800_000_000.0
ISSUER = "https://idp.test"
API = "https://api.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k2", "use": "sig"})
KEYS = KeySet([("k1", RSAKey.import_key(KEY.as_dict(private=False)))])
SESSION_KEY = base64.b64encode(bytes(32)).decode()


def need(**changes: Any) -> Requirements:
    base: dict[str, Any] = {
        "issuers": frozenset({ISSUER}),
        "audiences": frozenset({API}),
        "algorithms": ("RS256",),
        "required_claims": {},
        "leeway": 60.0,
        "introspection": False,
        "cache_for": 300.0,
    }
    return Requirements(**{**base, **changes})


def token(
    claims: dict[str, Any] | None = None, *, key: RSAKey = KEY, header: dict[str, Any] | None = None
) -> str:
    payload = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": API,
        "iat": NOW,
        "exp": NOW + 300,
        "preferred_username": "alice",
        "groups": ["eng"],
    }
    for name, value in (claims or {}).items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    protected = {"alg": "RS256", "typ": "at+jwt", "kid": key.kid, **(header or {})}
    return jws.serialize_compact(protected, json.dumps(payload).encode(), key)


# ---------------------------------------------------------------------------------------------
# Authorization header
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        (["Basic dXNlcjpwdw=="], None),
        (["Bearer abc.def.ghi"], "abc.def.ghi"),
        (["bearer abc"], "abc"),
        (["BEARER abc=="], "abc=="),
        (["Bearer  abc  "], "abc"),
        (["Bearer a-b_c~d+e/f"], "a-b_c~d+e/f"),
    ],
)
def test_bearer_token_accepts(values: list[str], expected: str | None) -> None:
    assert bearer_token(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        ["Bearer"],
        ["Bearer "],
        ["Bearer a b"],
        ["Bearer a,b"],
        ["Bearer a=b"],
        ["Bearer ab\u00e9"],
        ["Bearer a", "Bearer a"],
        ["Bearer a", "Basic Zm9vOmJhcg=="],
    ],
)
def test_bearer_token_refuses_malformed(values: list[str]) -> None:
    with pytest.raises(BearerTokenError) as caught:
        bearer_token(values)
    assert caught.value.status_hint == 400
    assert caught.value.error == "invalid_request"


def test_challenge_is_a_valid_quoted_string() -> None:
    exc = BearerTokenError('bad "token"\r\nX-Injected: 1 \\ end')
    challenge = exc.challenge
    assert challenge.startswith('Bearer realm="oidc-gateway", error="invalid_token", ')
    description = challenge.split('error_description="', 1)[1]
    assert description.endswith('"')
    inner = description[:-1]
    for bad in ('"', "\\", "\r", "\n"):
        assert bad not in inner


def test_token_shape_and_hash() -> None:
    assert is_jwt(token())
    assert not is_jwt("opaque-token_value")
    assert token_hash("t") != token_hash("u")
    assert len(token_hash("t")) == 64


# ---------------------------------------------------------------------------------------------
# JWT access tokens
# ---------------------------------------------------------------------------------------------


def test_valid_token_gives_the_login_identity() -> None:
    claims = validate_access_token(token(), keys=KEYS, need=need(), now=NOW)
    identity = identity_from_token(claims, ClaimsConfig())
    assert identity.sub == "alice"
    assert identity.user == "alice"
    assert identity.groups == ("eng",)


@pytest.mark.parametrize(
    ("claims", "header", "says"),
    [
        ({"exp": NOW - 61}, None, "expired"),
        ({"exp": None}, None, "no expiry"),
        ({"exp": "later"}, None, "not a number"),
        ({"nbf": NOW + 61}, None, "not valid yet"),
        ({"iat": NOW + 61}, None, "not valid yet"),
        ({"aud": "https://other.test"}, None, "another audience"),
        ({"aud": [1, API]}, None, "no audience"),
        ({"aud": None}, None, "no audience"),
        ({"iss": "https://evil.test"}, None, "issuer"),
        ({"iss": None}, None, "issuer"),
        ({"sub": None}, None, "no subject"),
        ({"sub": "x" * 256}, None, "255"),
        ({"cnf": {"jkt": "abc"}}, None, "cnf"),
        ({}, {"typ": "logout+jwt"}, "typ"),
    ],
)
def test_jwt_refused(claims: dict[str, Any], header: dict[str, Any] | None, says: str) -> None:
    with pytest.raises(BearerTokenError) as caught:
        validate_access_token(token(claims, header=header), keys=KEYS, need=need(), now=NOW)
    assert caught.value.status_hint == 401
    assert says in caught.value.message
    assert "ID token" not in caught.value.message


def test_leeway_is_applied() -> None:
    assert validate_access_token(token({"exp": NOW - 30}), keys=KEYS, need=need(), now=NOW)


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "application/at+JWT", None])
def test_access_token_types(typ: str | None) -> None:
    header = {"typ": typ} if typ else {}
    t = (
        token(header=header)
        if typ
        else jws.serialize_compact(
            {"alg": "RS256", "kid": "k1"},
            json.dumps({"iss": ISSUER, "sub": "a", "aud": API, "exp": NOW + 9}).encode(),
            KEY,
        )
    )
    assert validate_access_token(t, keys=KEYS, need=need(), now=NOW)["iss"] == ISSUER


def test_unknown_kid_asks_for_a_refetch() -> None:
    with pytest.raises(UnknownSigningKey):
        validate_access_token(token(key=OTHER), keys=KEYS, need=need(), now=NOW)


def test_algorithm_not_pinned() -> None:
    with pytest.raises(BearerTokenError, match="not allowed"):
        validate_access_token(token(), keys=KEYS, need=need(algorithms=("ES256",)), now=NOW)


@pytest.mark.parametrize(
    ("value", "ok"), [("access", True), ("id", False), (None, False), (["access"], False)]
)
def test_required_claims(value: object, ok: bool) -> None:
    rules = need(required_claims={"token_use": ("access",)})
    t = token({"token_use": value} if value is not None else {})
    if ok:
        assert validate_access_token(t, keys=KEYS, need=rules, now=NOW)["token_use"] == "access"
    else:
        with pytest.raises(BearerTokenError, match="token_use"):
            validate_access_token(t, keys=KEYS, need=rules, now=NOW)


# ---------------------------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------------------------


def answer(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "active": True,
        "sub": "alice",
        "aud": API,
        "exp": NOW + 100,
        "token_type": "Bearer",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def test_introspection_request_authenticates_like_the_token_endpoint() -> None:
    basic = introspection_request(
        "https://idp.test/introspect",
        "tok",
        client_id="a b",
        client_secret="s:+",
        auth_method="client_secret_basic",
    )
    assert (
        dict(basic.headers)["Authorization"] == "Basic " + base64.b64encode(b"a+b:s%3A%2B").decode()
    )
    assert ("token", "tok") in basic.form
    assert "client_secret" not in dict(basic.form)
    post = introspection_request(
        "https://idp.test/introspect",
        "tok",
        client_id="a",
        client_secret="s",
        auth_method="client_secret_post",
    )
    assert dict(post.form)["client_secret"] == "s"
    assert "Authorization" not in dict(post.headers)
    assert "tok" not in repr(post)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b"{}"),
        (401, b'{"error":"invalid_client"}'),
        (200, b"nope"),
        (200, b"[]"),
        (200, b'{"active": "true"}'),
        (200, b'{"sub": "alice"}'),
    ],
)
def test_introspection_failures_fail_closed(status: int, body: bytes) -> None:
    with pytest.raises(OIDCError) as caught:
        parse_introspection(status, body)
    assert caught.value.status_hint == 503
    assert caught.value.reason == "introspection_unavailable"


def test_introspection_inactive_and_active() -> None:
    assert parse_introspection(200, b'{"active": false, "sub": "x"}') is None
    doc = parse_introspection(200, json.dumps(answer()).encode())
    assert check_introspection(doc, need=need(), now=NOW)["sub"] == "alice"
    with pytest.raises(BearerTokenError, match="not active"):
        check_introspection(None, need=need(), now=NOW)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"aud": None}, "no audience"),
        ({"aud": "https://other.test"}, "another audience"),
        ({"iss": "https://evil.test"}, "issuer"),
        ({"exp": NOW - 61}, "expired"),
        ({"token_type": "refresh_token"}, "token_type"),
        ({"token_type": "DPoP"}, "token_type"),
        ({"sub": None}, "no subject"),
    ],
)
def test_introspection_refused(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(BearerTokenError, match=says):
        check_introspection(answer(**changes), need=need(), now=NOW)


def test_introspection_iss_is_optional() -> None:
    assert check_introspection(answer(iss=None), need=need(), now=NOW)["sub"] == "alice"
    assert check_introspection(answer(iss=ISSUER), need=need(), now=NOW)["sub"] == "alice"


def test_cache_never_outlives_exp_or_cache_for() -> None:
    cache = IntrospectionCache()
    cache.put("a", answer(exp=NOW + 10), now=NOW, cache_for=300)
    assert cache.get("a", now=NOW + 9.9) is not None
    assert cache.get("a", now=NOW + 10) is None
    cache.put("b", answer(exp=NOW + 1000), now=NOW, cache_for=30)
    assert cache.get("b", now=NOW + 29) is not None
    assert cache.get("b", now=NOW + 30) is None


def test_cache_skips_answers_without_exp_and_when_off() -> None:
    cache = IntrospectionCache()
    cache.put("a", answer(exp=None), now=NOW, cache_for=300)
    cache.put("b", answer(), now=NOW, cache_for=0)
    cache.put("c", answer(exp=NOW - 1), now=NOW, cache_for=300)
    assert len(cache) == 0


def test_cache_is_bounded() -> None:
    cache = IntrospectionCache(size=3)
    cache.put("old", answer(exp=NOW + 5), now=NOW, cache_for=300)
    for name in ("a", "b", "c"):
        cache.put(name, answer(), now=NOW + 6, cache_for=300)
    # The expired entry went first; then the oldest live one.
    assert len(cache) == 3
    cache.put("d", answer(), now=NOW + 6, cache_for=300)
    assert len(cache) == 3
    assert cache.get("a", now=NOW + 6) is None
    assert cache.get("d", now=NOW + 6) is not None


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def config(bearer: Any, **route: Any) -> Any:
    return parse_config(
        {
            "version": 1,
            "provider": {
                "issuer": ISSUER,
                "client_id": "gw",
                "client_secret": "s",
                "algorithms": ["RS256", "HS256"],
            },
            "session": {"store": "memory", "keys": [SESSION_KEY]},
            "routes": [
                {"name": "api", "upstream": "http://127.0.0.1:1", "bearer": bearer, **route}
            ],
        },
        {},
    )


def problems(bearer: Any, **route: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        config(bearer, **route)
    return str(caught.value)


def test_defaults_come_from_the_provider() -> None:
    cfg = config({"audiences": [API]})
    rules = requirements(cfg.routes[0].bearer, cfg.provider)
    assert rules.issuers == {ISSUER}
    assert rules.algorithms == ("RS256",)  # never HMAC, even when the provider allows it
    assert rules.leeway == 60.0
    assert not rules.introspection


def test_config_values_are_kept() -> None:
    cfg = config(
        {
            "audiences": [API, "urn:x"],
            "issuers": ["https://a.test"],
            "algorithms": ["ES256"],
            "required_claims": {"token_use": "access", "scp": ["a", "b"]},
            "introspection": True,
            "introspection_cache": "1m",
        },
        auth="optional",
    )
    rules = requirements(cfg.routes[0].bearer, cfg.provider)
    assert rules.audiences == {API, "urn:x"}
    assert rules.issuers == {"https://a.test"}
    assert rules.required_claims == {"token_use": ("access",), "scp": ("a", "b")}
    assert rules.introspection
    assert rules.cache_for == 60.0


@pytest.mark.parametrize(
    ("bearer", "route", "says"),
    [
        ({}, {}, "routes[0].bearer.audiences: required key is missing"),
        ({"audiences": []}, {}, "routes[0].bearer.audiences: must list at least one"),
        ({"audiences": [""]}, {}, "routes[0].bearer.audiences[0]: must be a non-empty"),
        ({"audiences": [API], "algorithms": ["none"]}, {}, "routes[0].bearer.algorithms"),
        ({"audiences": [API], "algorithms": ["HS256"]}, {}, "HS256 is refused"),
        ({"audiences": [API], "algorithms": ["XX1"]}, {}, "unknown algorithm"),
        ({"audiences": [API], "required_claims": {"token_use": []}}, {}, "token_use"),
        ({"audiences": [API], "introspect": True}, {}, "routes[0].bearer.introspect"),
        ({"audiences": [API]}, {"auth": "public"}, "routes[0].bearer: a public route"),
    ],
)
def test_config_errors_name_the_key(bearer: Any, route: dict[str, Any], says: str) -> None:
    assert says.lower() in problems(bearer, **route).lower()


def test_explain_shows_what_a_bearer_route_accepts() -> None:
    cfg = config(
        {
            "audiences": [API, "urn:x"],
            "required_claims": {"token_use": "access"},
            "introspection": True,
        },
    )
    text = render(
        explain(cfg, method="GET", url="https://any.test/x", identity=None, client_ip=None)
    )
    line = next(ln for ln in text.splitlines() if ln.startswith("bearer:"))
    assert f"aud {API} or urn:x" in line
    assert f"iss {ISSUER}" not in line  # the default is named, not guessed
    assert "iss provider.issuer" in line
    assert "token_use access" in line
    assert "opaque tokens introspected" in line
