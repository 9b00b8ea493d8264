"""Pure tests of gateway.assertion: the signed identity assertion verified with joserfc from
the published JWKS and refused after tampering, its size within the header budget (a user in
500 groups), its keys, and key rotation with an injected clock."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey, KeySet

from gateway.assertion import (
    ASSERTION_HEADER,
    SKEW,
    AssertionKey,
    AssertionRequest,
    assertion_claims,
    encoded_size,
    generation,
    generation_start,
    jwks,
    load_key,
    new_key,
    plan_with_assertion,
    private_pem,
    published_generations,
    sign,
    slot_ttl,
)
from gateway.config import HeadersConfig, parse_config
from gateway.errors import ConfigError
from gateway.headers import DEFAULT_IDENTITY_RULES, identity_rules
from gateway.models import Identity

KEY = new_key()
OTHER = new_key()
NOW = 1_700_000_000.25
ALICE = Identity(sub="sub-alice", user="alice", email="alice@example.com", email_verified=True,
                 groups=("eng", "Zoë's team"), preferred_username="alice")
MANY = tuple(f"engineering-team-{i:03d}" for i in range(500))


def verify(token: str, keys: dict[str, Any], *, now: float = NOW,
           audience: str = "http://app.internal:8080") -> dict[str, Any]:
    """What an upstream does: the JWKS, ES256 only, then iss/aud/exp."""
    decoded = jwt.decode(token, KeySet.import_key_set(keys), algorithms=["ES256"])  # type: ignore[arg-type]
    registry = jwt.JWTClaimsRegistry(
        now=int(now), leeway=0,
        iss={"essential": True, "value": "https://gw.example.com"},
        aud={"essential": True, "value": audience},
        exp={"essential": True}, sub={"essential": True},
    )
    registry.validate(decoded.claims)
    return decoded.claims


def request(key: AssertionKey = KEY, **changes: Any) -> AssertionRequest:
    fields: dict[str, Any] = {"key": key, "issuer": "https://gw.example.com",
                              "audience": "http://app.internal:8080", "now": NOW,
                              "lifetime": 60.0, "jti": "jti-1"}
    fields.update(changes)
    return AssertionRequest(**fields)


def token_of(headers: tuple[tuple[str, str], ...]) -> str:
    return dict(headers)[ASSERTION_HEADER]


# ---------------------------------------------------------------------------------------------
# Verified from the JWKS, refused after tampering
# ---------------------------------------------------------------------------------------------


def test_the_assertion_verifies_against_the_published_keys() -> None:
    plan = plan_with_assertion(ALICE, None, DEFAULT_IDENTITY_RULES, request())
    assert plan.headers[-1][0] == ASSERTION_HEADER  # last, after the identity headers
    claims = verify(token_of(plan.headers), jwks([OTHER, KEY]))
    assert claims == {
        "iss": "https://gw.example.com",
        "aud": "http://app.internal:8080",
        "sub": "sub-alice",
        "iat": 1_700_000_000,
        "exp": 1_700_000_060,
        "jti": "jti-1",
        "email": "alice@example.com",
        "email_verified": True,
        "preferred_username": "alice",
        "groups": ["eng", "Zoë's team"],
    }
    header = json.loads(_b64(token_of(plan.headers).split(".")[0]))
    assert header == {"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _forge_payload(token: str, **changes: Any) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(_b64(payload))
    claims.update(changes)
    return ".".join([head, _b64e(json.dumps(claims).encode()), signature])


def _flip_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    raw = bytearray(_b64(signature))
    raw[10] ^= 0x01
    return ".".join([head, payload, _b64e(bytes(raw))])


def _unsigned(token: str) -> str:
    _, payload, _ = token.split(".")
    return ".".join([_b64e(b'{"alg":"none","typ":"JWT"}'), payload, ""])


def _resigned_by(token: str, key: AssertionKey) -> str:
    _, payload, _ = token.split(".")
    forged = json.loads(_b64(payload))
    forged["sub"] = "sub-admin"
    return sign(forged, key)


def _hs256_with_public_key(token: str) -> str:
    """Algorithm confusion: HMAC keyed with the public JWK's bytes."""
    import hashlib
    import hmac

    _, payload, _ = token.split(".")
    head = _b64e(json.dumps({"alg": "HS256", "kid": KEY.kid, "typ": "JWT"}).encode())
    secret = json.dumps(KEY.public_jwk()).encode()
    mac = hmac.new(secret, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{_b64e(mac)}"


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: _forge_payload(t, sub="sub-admin"),
        lambda t: _forge_payload(t, groups=["eng", "admins"]),
        lambda t: _forge_payload(t, exp=4_000_000_000),
        _flip_signature,
        _unsigned,
        lambda t: _resigned_by(t, OTHER),  # a key that is not published
        _hs256_with_public_key,
        lambda t: t.rsplit(".", 1)[0] + ".",
    ],
    ids=["sub", "groups", "exp", "signature", "alg-none", "other-key", "hs256", "no-signature"],
)
def test_a_tampered_assertion_is_refused(tamper: Any) -> None:
    token = token_of(plan_with_assertion(ALICE, None, DEFAULT_IDENTITY_RULES,
                                         request()).headers)
    verify(token, jwks([KEY]))  # the original passes
    with pytest.raises((JoseError, ValueError)):
        verify(tamper(token), jwks([KEY]))


def test_a_payload_change_is_a_bad_signature() -> None:
    token = token_of(plan_with_assertion(ALICE, None, DEFAULT_IDENTITY_RULES,
                                         request()).headers)
    with pytest.raises(BadSignatureError):
        verify(_forge_payload(token, sub="sub-admin"), jwks([KEY]))


@pytest.mark.parametrize(
    ("now", "audience", "ok"),
    [
        (NOW + 59, "http://app.internal:8080", True),
        (NOW + 61, "http://app.internal:8080", False),  # expired: one minute by default
        (NOW, "http://other-app:8080", False),  # minted for another app
    ],
)
def test_exp_and_aud_bind_the_assertion_to_one_app_for_one_minute(
    now: float, audience: str, ok: bool
) -> None:
    token = token_of(plan_with_assertion(ALICE, None, DEFAULT_IDENTITY_RULES,
                                         request()).headers)
    if ok:
        verify(token, jwks([KEY]), now=now, audience=audience)
    else:
        with pytest.raises(JoseError):
            verify(token, jwks([KEY]), now=now, audience=audience)


def test_no_assertion_without_a_signed_in_user() -> None:
    plan = plan_with_assertion(None, None, DEFAULT_IDENTITY_RULES, request())
    assert plan.headers == ()


def test_absent_identity_facts_are_left_out_of_the_claims() -> None:
    bare = Identity(sub="s", user="s")
    claims = assertion_claims(bare, (), issuer="i", audience="a", now=10.9, lifetime=0.5,
                              jti="j")
    assert claims == {"iss": "i", "aud": "a", "sub": "s", "iat": 10, "exp": 11, "jti": "j",
                      "groups": []}


# ---------------------------------------------------------------------------------------------
# Size and the header budget
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [(), ("eng",), ("Zoë", "山田", '"quoted"\\'), MANY])
def test_the_size_is_known_before_signing(groups: tuple[str, ...]) -> None:
    claims = assertion_claims(ALICE, groups, issuer="https://gw", audience="http://a",
                              now=NOW, lifetime=60, jti="x" * 22)
    assert encoded_size(claims, KEY) == len(sign(claims, KEY))


@pytest.mark.parametrize(
    "groups",
    [("eng",), ("Zoë", "山田", "😀"), ('say "hi"', "back\\slash", "tab\tin"), MANY[:50]],
)
def test_the_budget_counts_the_assertion_to_the_byte(groups: tuple[str, ...]) -> None:
    ident = Identity(sub="s\ud800", user="alice", email="\udcff@x", groups=groups)
    plan = plan_with_assertion(ident, None, DEFAULT_IDENTITY_RULES, request())
    assert plan.size == sum(len(n) + 4 + len(v.encode()) for n, v in plan.headers)
    claims = verify(token_of(plan.headers), jwks([KEY]))
    assert claims["sub"] == "s\ud800"  # a lone surrogate travels as JSON escapes, no 500
    assert claims["groups"] == [g for g in groups if g.isprintable()]


def test_a_user_in_500_groups_gets_headers_and_assertion_within_the_budget() -> None:
    ident = Identity(sub="sub-1", user="alice", email="alice@example.com", groups=MANY)
    plan = plan_with_assertion(ident, None, DEFAULT_IDENTITY_RULES, request())
    size = sum(len(n) + 4 + len(v.encode()) for n, v in plan.headers)
    assert size == plan.size
    assert 8192 - 200 < size <= 8192
    header_groups = dict(plan.headers)["X-Forwarded-Groups"].split(",")
    claims = verify(token_of(plan.headers), jwks([KEY]))
    # The header and the assertion carry the same groups: the first ones, whole.
    assert claims["groups"] == header_groups == list(MANY[: len(header_groups)])
    assert 0 < len(header_groups) < 500
    assert plan.trimmed == (f"X-Forwarded-Groups: {len(header_groups)} of 500 values kept",)


def test_the_assertion_groups_are_cut_even_when_no_header_sends_groups() -> None:
    ident = Identity(sub="sub-1", user="alice", groups=MANY, claims={"sub": "sub-1"})
    rules = identity_rules(HeadersConfig(send={"X-User-Id": "sub"}), groups_claim="groups")
    plan = plan_with_assertion(ident, None, rules, request())
    assert [n for n, _ in plan.headers] == ["X-User-Id", ASSERTION_HEADER]
    assert plan.size <= 8192
    groups = verify(token_of(plan.headers), jwks([KEY]))["groups"]
    assert groups == list(MANY[: len(groups)])
    assert plan.trimmed == (f"assertion: {len(groups)} of 500 values kept",)


def test_groups_filter_applies_to_the_assertion() -> None:
    ident = Identity(sub="sub-1", user="alice", groups=(*MANY, "wiki-admins"))
    rules = identity_rules(HeadersConfig(groups_filter="wiki-.*"), groups_claim="groups")
    plan = plan_with_assertion(ident, None, rules, request())
    assert verify(token_of(plan.headers), jwks([KEY]))["groups"] == ["wiki-admins"]
    assert plan.trimmed == ()


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def test_a_key_survives_its_pem_and_keeps_its_kid() -> None:
    again = load_key(private_pem(KEY))
    assert again.kid == KEY.kid
    assert again.private
    public = load_key(KEY.key.as_pem(private=False))
    assert not public.private
    assert public.kid == KEY.kid  # RFC 7638: the thumbprint of the public members
    with pytest.raises(ValueError, match="public key cannot sign"):
        sign({"sub": "x"}, public)
    with pytest.raises(ValueError, match="no private PEM"):
        private_pem(public)


def test_the_jwks_publishes_public_members_only_each_key_once() -> None:
    document = jwks([KEY, OTHER, load_key(private_pem(KEY))])
    assert [k["kid"] for k in document["keys"]] == [KEY.kid, OTHER.kid]
    for key in document["keys"]:
        assert set(key) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert key["alg"] == "ES256"
        assert key["use"] == "sig"


def test_keys_other_than_p256_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    pem = p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    with pytest.raises(ValueError, match="P-256"):
        load_key(pem)
    with pytest.raises(ValueError, match="not an EC key"):
        load_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    assert ECKey.generate_key("P-256").curve_name == "P-256"


# ---------------------------------------------------------------------------------------------
# Rotation of generated keys, with an injected clock
# ---------------------------------------------------------------------------------------------

HOUR = 3600.0
B = 10 * HOUR  # the moment slot 10 takes over from slot 9


@pytest.mark.parametrize(
    ("now", "published"),
    [
        (B - HOUR / 2, (9,)),
        (B - 2 * SKEW - 1, (9,)),
        (B - 2 * SKEW, (9, 10)),  # the next key is out before it signs
        (B - 1, (9, 10)),
        (B, (9, 10)),  # it signs now; the old one stays for its assertions
        (B + 60 + 2 * SKEW - 1, (9, 10)),
        (B + 60 + 2 * SKEW, (10,)),  # every assertion of slot 9 has expired
        (B + HOUR / 2, (10,)),
    ],
)
def test_published_slots_around_a_rotation(now: float, published: tuple[int, ...]) -> None:
    assert published_generations(now, rotate_every=HOUR, lifetime=60) == published


def test_every_assertion_verifies_during_its_whole_life_across_rotations() -> None:
    """Replicas whose clocks differ by up to SKEW sign; an app fetches the JWKS from any
    replica at any moment of the assertion's life: the signing slot is always published. And
    once every assertion a slot signed has expired, that slot's key is gone."""
    lifetime = 60.0
    offsets = (-SKEW, -SKEW / 2, 0.0, SKEW / 2, SKEW)
    t = B - 600.0
    while t < B + 600.0:  # 10 minutes either side of a rotation, every 5 s
        for signer in offsets:
            slot = generation(t + signer, HOUR)
            for age in (0.0, lifetime / 2, lifetime):
                for server in offsets:
                    now = t + age + server
                    assert slot in published_generations(now, rotate_every=HOUR,
                                                         lifetime=lifetime), (t, signer, age)
        t += 5.0
    last_signed = B + SKEW  # the slowest clock still signs with slot 9 until then
    gone = last_signed + lifetime + SKEW  # its last assertion expired on every clock
    for server in offsets:
        assert 9 not in published_generations(gone + server + SKEW, rotate_every=HOUR,
                                               lifetime=lifetime)


def test_a_slot_key_is_kept_until_it_leaves_the_jwks() -> None:
    made = B - 2 * SKEW  # slot 10's key is made when it is first published
    ttl = slot_ttl(10, made, rotate_every=HOUR, lifetime=60)
    last_published = generation_start(11, HOUR) + 60 + 2 * SKEW
    assert made + ttl > last_published
    assert ttl < 2 * HOUR


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _pem(private: Any, *, public: bool = False) -> str:
    if public:
        return str(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    return str(private.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode())


P256 = ec.generate_private_key(ec.SECP256R1())
SESSION_KEY = base64.b64encode(bytes(32)).decode()


def config_with(assertion: dict[str, Any]) -> Any:
    data = {
        "version": 1,
        "provider": {"issuer": "https://idp.example.com", "client_id": "gw",
                     "client_secret": "s"},
        "session": {"keys": [SESSION_KEY]},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:8080", "assertion": True}],
        "assertion": assertion,
    }
    return parse_config(data, {"OLD": ""})


@pytest.mark.parametrize(
    ("assertion", "expected"),
    [
        ({"key": "nope"}, "assertion.key: is not an EC P-256 private key in PEM"),
        ({"key": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))},
         "assertion.key: is not an EC P-256 private key"),
        ({"key": _pem(P256, public=True)}, "assertion.key: is not an EC P-256 private key"),
        ({"key": _pem(ec.generate_private_key(ec.SECP384R1()))},
         "assertion.key: is not an EC P-256 private key"),
        ({"key": _pem(P256), "key_file": "/k.pem"},
         "assertion.key_file: give the signing key once"),
        ({"published_keys": ["nope"]}, "assertion.published_keys[0]: is not an EC P-256 key"),
        ({"lifetime": "11m"}, "assertion.lifetime: must be at most 10m"),
        ({"rotate_every": "30m"}, "assertion.rotate_every: must be at least 1h"),
        ({"audience": ""}, "assertion.audience: must not be empty"),
    ],
)
def test_assertion_settings_that_cannot_work_are_refused(
    assertion: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(assertion)
    found = [str(p) for p in info.value.problems]
    assert any(p.startswith(expected) for p in found), found


def test_assertion_settings_that_work() -> None:
    config = config_with({"key": _pem(P256), "published_keys": [_pem(P256, public=True),
                                                                "${OLD:-}"]})
    assert len(config.assertion.published_keys) == 1  # an unset variable lists no key
    assert config.assertion.lifetime == 60.0
    assert config.routes[0].assertion is True
    assert load_key(config.assertion.key.get_secret_value()).private
