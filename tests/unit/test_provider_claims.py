"""Pure tests of claims that are not where or what a gateway expects: claim paths in
``provider.claims``, type coercion that never fails open, groups from several sources and
their state (ok, truncated, unavailable, invalid), the login access token's validation,
e-mail and domain verification, and what the policy makes of each state."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import OctKey, RSAKey

from gateway.cli import main
from gateway.config import ClaimsConfig, RouteConfig, claim_at, parse_config
from gateway.errors import ConfigError, OIDCError, UnknownSigningKey
from gateway.models import Identity, Session, TokenSet
from gateway.oidc import (
    KeySet,
    access_token_claims_for_login,
    coerce_groups,
    groups_overage,
    identity_from_claims,
    with_groups,
)
from gateway.policy import evaluate
from gateway.sessions import SessionInvalid, dump_session, load_session

ISSUER = "https://idp.example.com/realms/corp"
CLIENT_ID = "gateway"
NOW = 1_700_000_000.0
KEY = base64.b64encode(bytes(range(32))).decode()


def config_problems(claims: dict[str, Any]) -> list[str]:
    data: dict[str, Any] = {
        "version": 1,
        "provider": {
            "issuer": ISSUER,
            "client_id": CLIENT_ID,
            "client_secret": "s",
            "claims": claims,
        },
        "session": {"keys": [KEY]},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:8080"}],
    }
    try:
        parse_config(data, {})
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


# ---------------------------------------------------------------------------------------------
# Claim paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [
        {"groups": 'resource_access["my.app"].roles'},
        {"groups": '["https://example.com/roles"]'},
        {"groups": '["cognito:groups"]', "user": '["cognito:username"]'},
        {"email_verified": "xms_edov", "hosted_domain": "hd"},
        {"email": "mail", "user": "upn"},
    ],
)
def test_claim_paths_that_load(claims: dict[str, Any]) -> None:
    assert config_problems(claims) == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("groups", "cognito:groups"),
        ("groups", "https://example.com/roles"),
        ("user", "a..b"),
        ("email", ""),
        ("email_verified", 'x["unterminated'),
        ("hosted_domain", "h d"),
    ],
)
def test_claim_paths_that_cannot_mean_anything_name_their_key(key: str, value: str) -> None:
    found = config_problems({key: value})
    assert len(found) == 1, found
    assert found[0].startswith(f"provider.claims.{key}: "), found
    assert "is not a claim path" in found[0]


@pytest.mark.parametrize(
    ("path", "claims", "expected"),
    [
        (("a", "b"), {"a": {"b": 1}}, 1),
        (("a.b",), {"a.b": 2, "a": {"b": 1}}, 2),
        (("a", "b"), {"a.b": 2}, None),
        (("a", "b"), {"a": [{"b": 1}]}, None),
        (("a",), {}, None),
    ],
)
def test_claim_at_walks_objects_only(
    path: tuple[str, ...], claims: dict[str, Any], expected: object
) -> None:
    assert claim_at(claims, path) == expected


def test_identity_reads_literal_and_nested_paths() -> None:
    cfg = ClaimsConfig(
        user='["cognito:username"]',
        email='["https://x.test/mail"]',
        groups='resource_access["my.app"].roles',
    )
    ident = identity_from_claims(
        {
            "sub": "s",
            "cognito:username": "alice",
            "https://x.test/mail": "a@x.test",
            "resource_access": {"my.app": {"roles": ["editor"]}},
            # Split at the dot, the same words are another claim: never read.
            "my": {"app": {"roles": ["admin"]}},
        },
        userinfo=None,
        claims=cfg,
    )
    assert (ident.user, ident.email, ident.groups) == ("alice", "a@x.test", ("editor",))


# ---------------------------------------------------------------------------------------------
# Coercion
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cap", "groups", "state"),
    [
        ("eng", None, ("eng",), "ok"),
        ("", None, (), "ok"),
        (["eng", "ops", "eng", ""], None, ("eng", "ops"), "ok"),
        ([], None, (), "ok"),
        (["eng", None], None, (), "invalid"),
        ([None], None, (), "invalid"),
        (["eng", 1], None, (), "invalid"),
        (["eng", True], None, (), "invalid"),
        (["eng", ["ops"]], None, (), "invalid"),
        (None, None, (), "invalid"),
        (7, None, (), "invalid"),
        ({"eng": True}, None, (), "invalid"),
        ([f"g{i}" for i in range(100)], 100, tuple(f"g{i}" for i in range(100)), "truncated"),
        ([f"g{i}" for i in range(99)], 100, tuple(f"g{i}" for i in range(99)), "ok"),
        (["g"] * 100, 100, ("g",), "truncated"),  # counted as sent, not after dedup
    ],
)
def test_groups_coercion_table(
    value: Any, cap: int | None, groups: tuple[str, ...], state: str
) -> None:
    assert coerce_groups(value, cap=cap) == (groups, state)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        ("true", True),
        (" TRUE ", True),
        (False, False),
        ("false", False),
        ("0", False),
        ("1", False),
        (0, False),
        (1, False),
        ("yes", False),
        ([], False),
        (None, None),
    ],
)
def test_email_verified_coercion(value: Any, expected: bool | None) -> None:
    ident = identity_from_claims(
        {"sub": "s", "email": "a@x.test", "email_verified": value},
        userinfo=None,
        claims=ClaimsConfig(),
    )
    assert ident.email_verified is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), ("true", True), (False, False), ("false", False), (None, False)],
)
def test_a_configured_verification_claim_absent_means_unverified(
    value: Any, expected: bool
) -> None:
    """Entra: with email_verified pointed at xms_edov, an ID token without it (the optional
    claim not configured) must not count as verified."""
    claims: dict[str, Any] = {"sub": "s", "email": "a@x.test", "email_verified": True}
    if value is not None:
        claims["xms_edov"] = value
    ident = identity_from_claims(
        claims, userinfo=None, claims=ClaimsConfig(email_verified="xms_edov")
    )
    assert ident.email_verified is expected


@pytest.mark.parametrize(
    ("hd", "email", "expected"),
    [
        ("example.com", "a@example.com", True),
        ("Example.COM", "a@EXAMPLE.com", True),
        (None, "a@example.com", False),
        ("other.com", "a@example.com", False),
        (5, "a@example.com", False),
        ("example.com", None, False),
    ],
)
def test_hosted_domain(hd: Any, email: str | None, expected: bool) -> None:
    claims: dict[str, Any] = {"sub": "s"}
    if hd is not None:
        claims["hd"] = hd
    if email is not None:
        claims["email"] = email
    ident = identity_from_claims(claims, userinfo=None, claims=ClaimsConfig(hosted_domain="hd"))
    assert ident.domain_verified is expected
    plain = identity_from_claims(claims, userinfo=None, claims=ClaimsConfig())
    assert plain.domain_verified is None


# ---------------------------------------------------------------------------------------------
# Sources, overage and the missing sub
# ---------------------------------------------------------------------------------------------


def test_groups_are_the_union_of_the_listed_sources() -> None:
    cfg = ClaimsConfig(groups_from=("id_token", "userinfo", "access_token"))
    ident = identity_from_claims(
        {"sub": "s", "groups": ["a"]},
        userinfo={"sub": "s", "groups": ["b", "a"]},
        claims=cfg,
        access_claims={"groups": "c"},
    )
    assert (ident.groups, ident.groups_state) == (("a", "b", "c"), "ok")


def test_unlisted_sources_are_not_read() -> None:
    cfg = ClaimsConfig(groups_from=("access_token",))
    ident = identity_from_claims(
        {"sub": "s", "groups": ["admins"]},
        userinfo=None,
        claims=cfg,
        access_claims={"groups": ["eng"]},
    )
    assert ident.groups == ("eng",)


def test_an_unvalidated_access_token_makes_groups_unavailable() -> None:
    cfg = ClaimsConfig(groups_from=("id_token", "access_token"))
    ident = identity_from_claims(
        {"sub": "s", "groups": ["eng"]}, userinfo=None, claims=cfg, access_claims=None
    )
    assert (ident.groups, ident.groups_state) == ((), "unavailable")


def test_one_broken_source_spoils_the_union() -> None:
    ident = identity_from_claims(
        {"sub": "s", "groups": ["eng"]},
        userinfo={"sub": "s", "groups": ["ops", None]},
        claims=ClaimsConfig(),
    )
    assert (ident.groups, ident.groups_state) == ((), "invalid")


@pytest.mark.parametrize(
    ("claims", "overage"),
    [
        ({"_claim_names": {"groups": "src1"}, "_claim_sources": {"src1": {}}}, True),
        ({"hasgroups": True}, True),
        ({"hasgroups": "true"}, False),
        ({"_claim_names": {"roles": "src1"}}, False),
        ({"_claim_names": "groups"}, False),
        ({}, False),
    ],
)
def test_overage_detection(claims: dict[str, Any], overage: bool) -> None:
    assert groups_overage(claims) is overage
    ident = identity_from_claims({"sub": "s", **claims}, userinfo=None, claims=ClaimsConfig())
    assert ident.groups_state == ("unavailable" if overage else "ok")


def test_overage_resolved_groups_are_complete() -> None:
    ident = identity_from_claims(
        {"sub": "s", "hasgroups": True}, userinfo=None, claims=ClaimsConfig(groups_cap=2)
    )
    resolved = with_groups(ident, ["a", "b", "c", "a"])
    assert (resolved.groups, resolved.groups_state) == (("a", "b", "c"), "ok")


@pytest.mark.parametrize("sub", [None, 5, "", ["s"]])
def test_a_missing_sub_is_a_provider_configuration_error(sub: Any) -> None:
    claims = {} if sub is None else {"sub": sub}
    with pytest.raises(OIDCError, match="sign-in service is misconfigured") as info:
        identity_from_claims(claims, userinfo=None, claims=ClaimsConfig())
    assert info.value.status_hint == 502


# ---------------------------------------------------------------------------------------------
# The login's access token
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})


def access_token(
    key: Any, claims: dict[str, Any], alg: str = "RS256", kid: str | None = "k1"
) -> str:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return jws.serialize_compact(header, json.dumps(claims).encode(), key, algorithms=[alg])


def good(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "other-id",
        "aud": "account",
        "azp": CLIENT_ID,
        "iat": NOW - 10,
        "exp": NOW + 300,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def check(token: str, rsa_key: RSAKey) -> dict[str, Any]:
    return access_token_claims_for_login(
        token,
        keys=KeySet([("k1", rsa_key)]),
        issuer=ISSUER,
        client_id=CLIENT_ID,
        algorithms=("RS256", "HS256"),
        leeway=60,
        now=NOW,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"azp": None, "client_id": CLIENT_ID},
        {"azp": None, "cid": CLIENT_ID},
        {"azp": None, "aud": ["api", CLIENT_ID]},
        {"exp": NOW - 30},
        {"nbf": NOW + 30},
    ],
    ids=[
        "keycloak",
        "rfc9068-client_id",
        "okta-cid",
        "aud-only",
        "exp-within-leeway",
        "nbf-within-leeway",
    ],
)
def test_access_token_accepted(rsa_key: RSAKey, changes: dict[str, Any]) -> None:
    claims = good(**changes)
    assert check(access_token(rsa_key, claims), rsa_key) == claims


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"iss": "https://evil.test"}, "another issuer"),
        ({"iss": None}, "another issuer"),
        ({"azp": "other"}, "another client"),
        ({"client_id": "other"}, "another client"),
        ({"azp": None, "aud": "account"}, "neither this client"),
        ({"azp": None, "aud": None}, "neither this client"),
        ({"exp": None}, "no valid expiry"),
        ({"exp": "soon"}, "no valid expiry"),
        ({"exp": NOW - 61}, "expired"),
        ({"nbf": NOW + 3600}, "nbf"),
        ({"iat": NOW + 3600}, "iat"),
    ],
)
def test_access_token_refused(rsa_key: RSAKey, changes: dict[str, Any], says: str) -> None:
    with pytest.raises(OIDCError, match=says) as info:
        check(access_token(rsa_key, good(**changes)), rsa_key)
    assert info.value.reason == "access_token_invalid"


def test_access_token_forms_refused(rsa_key: RSAKey) -> None:
    other = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    refused = {
        "opaque": "2YotnFZFEjr1zCsicMWpAA",
        "forged": access_token(other, good()),
        "hmac-with-anything": access_token(OctKey.import_key(b"k" * 32), good(), alg="HS256"),
        "jwe": "a.b.c.d.e",
    }
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(good()).encode()).rstrip(b"=").decode()
    refused["alg-none"] = f"{unsigned}.{body}."
    for name, token in refused.items():
        with pytest.raises(OIDCError) as info:
            check(token, rsa_key)
        assert info.value.reason == "access_token_invalid", name
    with pytest.raises(UnknownSigningKey):
        check(access_token(rsa_key, good(), kid="rotated"), rsa_key)


# ---------------------------------------------------------------------------------------------
# The policy and the groups state
# ---------------------------------------------------------------------------------------------


def route(
    allow: list[dict[str, Any]] | None = None, deny: list[dict[str, Any]] | None = None
) -> RouteConfig:
    data: dict[str, Any] = {"name": "r", "upstream": "http://127.0.0.1:8080"}
    if allow is not None:
        data["allow"] = allow
    if deny is not None:
        data["deny"] = deny
    return RouteConfig.model_validate(data)


def decide(r: RouteConfig, groups_claim: str = "groups", **who: Any) -> tuple[bool, str]:
    who.setdefault("sub", "s")
    who.setdefault("user", "bob")
    decision = evaluate(
        r,
        Identity(**who),
        method="GET",
        client_ip="192.0.2.1",
        default_policy=None,
        groups_claim=groups_claim,
    )
    return decision.allowed, decision.reason


ALLOW_ENG = route(allow=[{"groups": ["eng"]}])
DENY_CONTRACTORS = route(deny=[{"groups": ["contractors"]}])
DENY_CONTRACTORS_OR_IP = route(deny=[{"groups": ["contractors"], "networks": ["10.0.0.0/8"]}])
ALLOW_ENG_OR_USER = route(allow=[{"groups": ["eng"]}, {"users": ["bob"]}])


@pytest.mark.parametrize(
    ("r", "groups", "state", "allowed", "says"),
    [
        (ALLOW_ENG, ("eng",), "ok", True, "groups: eng"),
        (ALLOW_ENG, ("eng",), "truncated", True, "groups: eng"),
        (ALLOW_ENG, ("eng",), "unavailable", False, "group membership unavailable"),
        (ALLOW_ENG, ("eng",), "invalid", False, "not a list of names"),
        (DENY_CONTRACTORS, ("eng",), "ok", True, "no deny rule"),
        (DENY_CONTRACTORS, ("eng",), "truncated", False, "possibly truncated"),
        (DENY_CONTRACTORS, ("contractors",), "truncated", False, "groups: contractors"),
        (DENY_CONTRACTORS, (), "unavailable", False, "group membership unavailable"),
        (DENY_CONTRACTORS, (), "invalid", False, "group membership unavailable"),
        # The deny rule's other condition still has to hold.
        (DENY_CONTRACTORS_OR_IP, (), "unavailable", True, "no deny rule"),
        # A rule that does not mention groups still admits.
        (ALLOW_ENG_OR_USER, (), "unavailable", True, "users: bob"),
    ],
)
def test_groups_state_in_policy(
    r: RouteConfig, groups: tuple[str, ...], state: str, allowed: bool, says: str
) -> None:
    got, reason = decide(r, groups=groups, groups_state=state)
    assert got is allowed, reason
    assert says in reason


def test_claim_rules_on_the_groups_claim_fail_closed_too() -> None:
    claims = {"realm_access": {"roles": ["eng"]}}
    allow = route(allow=[{"claims": {"realm_access.roles": ["eng"]}}])
    deny = route(deny=[{"claims": {"realm_access.roles": ["contractors"]}}])
    path = "realm_access.roles"
    assert decide(allow, path, claims=claims)[0] is True
    assert decide(allow, path, claims=claims, groups_state="unavailable")[0] is False
    assert decide(deny, path, claims=claims)[0] is True
    assert decide(deny, path, claims=claims, groups_state="invalid") == (
        False,
        'denied by deny[0] of route "r": claims: realm_access.roles: group membership '
        "unavailable (the provider's groups claim is not a list of names)",
    )
    # A claim that is not the groups claim is unaffected.
    assert decide(allow, "groups", claims=claims, groups_state="unavailable")[0] is True


@pytest.mark.parametrize(
    ("domain_verified", "allowed"), [(None, True), (True, True), (False, False)]
)
def test_domain_rules_need_the_hosted_domain(domain_verified: bool | None, allowed: bool) -> None:
    r = route(allow=[{"email_domains": ["example.com"]}])
    got, reason = decide(
        r, email="a@example.com", email_verified=True, domain_verified=domain_verified
    )
    assert got is allowed
    if not allowed:
        assert "hosted domain" in reason
    # An exact address rule does not depend on hd; a deny on the domain still refuses.
    assert (
        decide(
            route(allow=[{"emails": ["a@example.com"]}]),
            email="a@example.com",
            email_verified=True,
            domain_verified=domain_verified,
        )[0]
        is True
    )
    assert (
        decide(
            route(deny=[{"email_domains": ["example.com"]}]),
            email="a@example.com",
            domain_verified=domain_verified,
        )[0]
        is False
    )


# ---------------------------------------------------------------------------------------------
# Sessions: the state is kept, and sessions sealed before it existed still load
# ---------------------------------------------------------------------------------------------


def session(identity: Identity) -> Session:
    return Session(
        identity=identity,
        tokens=TokenSet(id_token="i"),
        created_at=NOW,
        last_seen=NOW,
        expires_at=NOW + 3600,
        issuer=ISSUER,
    )


@pytest.mark.parametrize("state", ["ok", "truncated", "unavailable", "invalid"])
def test_groups_state_survives_the_store(state: Any) -> None:
    ident = Identity(sub="s", user="u", groups_state=state, domain_verified=False)
    assert load_session(dump_session(session(ident))).identity == ident


def test_a_session_sealed_before_the_state_existed_loads_as_complete() -> None:
    data = json.loads(dump_session(session(Identity(sub="s", user="u", groups=("eng",)))))
    del data["identity"]["groups_state"], data["identity"]["domain_verified"]
    ident = load_session(json.dumps(data).encode()).identity
    assert (ident.groups, ident.groups_state, ident.domain_verified) == (("eng",), "ok", None)


@pytest.mark.parametrize(
    ("name", "value"),
    [("groups_state", "complete"), ("groups_state", None), ("domain_verified", "yes")],
)
def test_a_session_with_a_bad_state_is_refused(name: str, value: Any) -> None:
    data = json.loads(dump_session(session(Identity(sub="s", user="u"))))
    data["identity"][name] = value
    with pytest.raises(SessionInvalid, match=name):
        load_session(json.dumps(data).encode())


# ---------------------------------------------------------------------------------------------
# `oidc-gateway explain` says why
# ---------------------------------------------------------------------------------------------

EXPLAIN_CONFIG = {
    "version": 1,
    "provider": {
        "issuer": ISSUER,
        "client_id": CLIENT_ID,
        "client_secret": "s",
        "claims": {"groups": '["cognito:groups"]', "groups_cap": 3},
    },
    "session": {"keys": [KEY]},
    "routes": [
        {
            "name": "app",
            "upstream": "http://127.0.0.1:8080",
            "allow": [{"groups": ["eng"]}],
            "deny": [{"groups": ["contractors"]}],
        }
    ],
}


@pytest.mark.parametrize(
    ("groups", "status", "says"),
    [
        (["eng"], 0, "groups eng)"),
        (["eng", None], 1, "group membership unavailable (the provider's groups claim"),
        (["eng", "a", "b"], 1, "group membership possibly truncated"),
        ("eng", 0, "allowed by allow[0]"),
    ],
)
def test_explain_shows_the_groups_state(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], groups: Any, status: int, says: str
) -> None:
    config = tmp_path / "gateway.json"
    config.write_text(json.dumps(EXPLAIN_CONFIG))
    claims = json.dumps({"sub": "u1", "cognito:groups": groups})
    assert main(["explain", "-c", str(config), "GET", "http://x/", "--claims", claims]) == status
    assert says in capsys.readouterr().out
