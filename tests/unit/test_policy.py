"""Pure tests of gateway.policy: allow and deny lists, each condition, the one-mapping form,
default_policy, fail-closed facts, the decision's rule and reason, and the policy keys' config
errors (with their key paths, as `oidc-gateway check` prints them)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import Config, PolicyConfig, RouteConfig, parse_config
from gateway.errors import ConfigError
from gateway.models import Identity
from gateway.policy import NO_RULES_REASON, authorize, client_address, evaluate, login_style

Rules = list[dict[str, Any]]


def route(
    allow: Rules | dict[str, Any] | None = None,
    deny: Rules | None = None,
    *,
    name: str = "wiki",
    **extra: Any,
) -> RouteConfig:
    data: dict[str, Any] = {"name": name, "upstream": "http://127.0.0.1:8080", **extra}
    if allow is not None:
        data["allow"] = allow
    if deny is not None:
        data["deny"] = deny
    return RouteConfig.model_validate(data)


def policy(allow: Rules | None = None, deny: Rules | None = None) -> PolicyConfig:
    data: dict[str, Any] = {}
    if allow is not None:
        data["allow"] = allow
    if deny is not None:
        data["deny"] = deny
    return PolicyConfig.model_validate(data)


def person(**fields: Any) -> Identity:
    fields.setdefault("sub", "sub-1")
    fields.setdefault("user", "bob")
    return Identity(**fields)


@dataclass(frozen=True)
class Case:
    """One request judged: the route's rules, who, the request's facts, and the answer."""

    id: str
    allow: Rules | dict[str, Any] | None
    deny: Rules | None
    who: dict[str, Any]
    allowed: bool
    rule: str | None  # str(Decision.rule), None when no rule decided
    reason: str  # a substring of Decision.reason
    method: str | None = "GET"
    ip: str | None = "198.51.100.7"
    default: dict[str, Rules] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


KC = {"realm_access": {"roles": ["offline_access", "wiki-editor"]}}

CASES = [
    # ---------------------------------------------------------------- no rules at all
    Case("no rules", None, None, {}, True, None, NO_RULES_REASON),
    # ---------------------------------------------------------------- list form: any rule admits
    Case("one rule", [{"groups": ["eng"]}], None, {"groups": ("eng",)}, True, "allow[0]",
         'allowed by allow[0] of route "wiki": groups: eng'),
    Case("second rule admits", [{"groups": ["eng"]}, {"users": ["bob"]}], None, {}, True,
         "allow[1]", "users: bob"),
    Case("first matching rule reported", [{"users": ["bob"]}, {"groups": ["eng"]}], None,
         {"groups": ("eng",)}, True, "allow[0]", "users: bob"),
    Case("no rule matches", [{"groups": ["eng"]}, {"users": ["alice"]}], None,
         {"groups": ("ops",)}, False, None,
         'denied: no allow rule of route "wiki" matches user "bob"'),
    # ---------------------------------------------------------------- combined: all must hold
    Case("combined: both hold", [{"groups": ["eng"], "email_domains": ["example.com"]}], None,
         {"groups": ("eng",), "email": "bob@example.com"}, True, "allow[0]",
         "email_domains: example.com, groups: eng"),
    Case("combined: group missing", [{"groups": ["eng"], "email_domains": ["example.com"]}],
         None, {"email": "bob@example.com"}, False, None, "denied"),
    Case("combined: domain wrong", [{"groups": ["eng"], "email_domains": ["example.com"]}],
         None, {"groups": ("eng",), "email": "bob@example.org"}, False, None, "denied"),
    Case("combined: user and network", [{"users": ["bob"], "networks": ["10.0.0.0/8"]}], None,
         {}, True, "allow[0]", "networks: 10.1.2.3 in 10.0.0.0/8", ip="10.1.2.3"),
    Case("combined: user, wrong network", [{"users": ["bob"], "networks": ["10.0.0.0/8"]}],
         None, {}, False, None, "denied"),
    Case("combined: two claims both match",
         [{"claims": {"realm_access.roles": ["wiki-editor"], "dept": ["eng"]}}], None,
         {"claims": {**KC, "dept": "eng"}}, True, "allow[0]",
         "claims: realm_access.roles='wiki-editor', dept='eng'"),
    Case("combined: one claim of two", [{"claims": {"realm_access.roles": ["wiki-editor"],
                                                    "dept": ["eng"]}}], None,
         {"claims": {**KC, "dept": "sales"}}, False, None, "denied"),
    # ---------------------------------------------------------------- deny wins
    Case("deny wins over allow", [{"groups": ["eng"]}], [{"groups": ["suspended"]}],
         {"groups": ("eng", "suspended")}, False, "deny[0]",
         'denied by deny[0] of route "wiki": groups: suspended'),
    Case("deny wins over users", [{"users": ["bob"]}], [{"users": ["bob"]}], {}, False,
         "deny[0]", "users: bob"),
    Case("second deny rule", [{"users": ["bob"]}], [{"users": ["eve"]}, {"groups": ["x"]}],
         {"groups": ("x",)}, False, "deny[1]", "groups: x"),
    Case("deny not matching, allow admits", [{"users": ["bob"]}], [{"groups": ["suspended"]}],
         {"groups": ("eng",)}, True, "allow[0]", "users: bob"),
    Case("deny only: others pass", None, [{"users": ["eve"]}], {}, True, None,
         'no deny rule of route "wiki" matches'),
    Case("deny only: denied user", None, [{"users": ["eve"]}], {"user": "eve"}, False,
         "deny[0]", "users: eve"),
    Case("deny combined: needs both", [{"users": ["bob"]}],
         [{"methods": ["DELETE"], "groups": ["partners"]}], {"groups": ("partners",)}, True,
         "allow[0]", "users: bob"),
    Case("deny combined: both hold", [{"users": ["bob"]}],
         [{"methods": ["DELETE"], "groups": ["partners"]}], {"groups": ("partners",)}, False,
         "deny[0]", "groups: partners, methods: DELETE", method="DELETE"),
    Case("deny wins over the mapping form", {"groups": ["eng"]}, [{"groups": ["eng"]}],
         {"groups": ("eng",)}, False, "deny[0]", "groups: eng"),
    # ---------------------------------------------------------------- nested claims
    Case("nested claim in list", [{"claims": {"realm_access.roles": ["wiki-editor"]}}], None,
         {"claims": KC}, True, "allow[0]", "realm_access.roles='wiki-editor'"),
    Case("nested claim no member", [{"claims": {"realm_access.roles": ["admin"]}}], None,
         {"claims": KC}, False, None, "denied"),
    Case("nested claim missing parent", [{"claims": {"realm_access.roles": ["admin"]}}], None,
         {"claims": {}}, False, None, "denied"),
    Case("nested claim parent not an object", [{"claims": {"realm_access.roles": ["x"]}}],
         None, {"claims": {"realm_access": ["roles", "x"]}}, False, None, "denied"),
    Case("nested claim three deep", [{"claims": {"a.b.c": [7]}}], None,
         {"claims": {"a": {"b": {"c": 7}}}}, True, "allow[0]", "a.b.c=7"),
    Case("bracketed key with a dot",
         [{"claims": {'resource_access["my.app"].roles': ["reader"]}}], None,
         {"claims": {"resource_access": {"my.app": {"roles": ["reader"]}}}}, True, "allow[0]",
         "reader"),
    Case("dotted path is not a literal key", [{"claims": {"my.app": ["x"]}}], None,
         {"claims": {"my.app": "x"}}, False, None, "denied"),
    Case("bracketed literal top-level key", [{"claims": {'["my.app"]': ["x"]}}], None,
         {"claims": {"my.app": "x"}}, True, "allow[0]", "x"),
    Case("namespaced claim", [{"claims": {'["https://example.com/roles"]': ["admin"]}}], None,
         {"claims": {"https://example.com/roles": ["admin"]}}, True, "allow[0]", "admin"),
    Case("claim: 'true' is not true", [{"claims": {"admin": [True]}}], None,
         {"claims": {"admin": "true"}}, False, None, "denied"),
    Case("claim: 1 is not true", [{"claims": {"admin": [True]}}], None,
         {"claims": {"admin": 1}}, False, None, "denied"),
    Case("claim: nested object is no value", [{"claims": {"a": ["x"]}}], None,
         {"claims": {"a": {"x": 1}}}, False, None, "denied"),
    # ---------------------------------------------------------------- networks (CIDR)
    Case("cidr v4 match", [{"networks": ["10.0.0.0/8"]}], None, {}, True, "allow[0]",
         "networks: 10.200.3.4 in 10.0.0.0/8", ip="10.200.3.4"),
    Case("cidr v4 outside", [{"networks": ["10.0.0.0/8"]}], None, {}, False, None, "denied",
         ip="11.0.0.1"),
    Case("cidr single address", [{"networks": ["192.0.2.10"]}], None, {}, True, "allow[0]",
         "192.0.2.10/32", ip="192.0.2.10"),
    Case("cidr v6 match", [{"networks": ["2001:db8::/32"]}], None, {}, True, "allow[0]",
         "2001:db8::1 in 2001:db8::/32", ip="2001:db8::1"),
    Case("cidr v6 rule, v4 client", [{"networks": ["::/0"]}], None, {}, False, None, "denied",
         ip="10.0.0.1"),
    Case("v4-mapped v6 client", [{"networks": ["10.0.0.0/8"]}], None, {}, True, "allow[0]",
         "10.1.2.3 in 10.0.0.0/8", ip="::ffff:10.1.2.3"),
    Case("second network of a rule", [{"networks": ["10.0.0.0/8", "192.168.0.0/16"]}], None,
         {}, True, "allow[0]", "192.168.0.0/16", ip="192.168.4.4"),
    Case("client unknown: allow never", [{"networks": ["0.0.0.0/0", "::/0"]}], None, {},
         False, None, "denied", ip=None),
    Case("client garbage: allow never", [{"networks": ["0.0.0.0/0"]}], None, {}, False, None,
         "denied", ip="not-an-ip"),
    Case("client unknown: deny always", [{"users": ["bob"]}], [{"networks": ["10.0.0.0/8"]}],
         {}, False, "deny[0]", "client address unknown", ip=""),
    Case("deny network match", [{"users": ["bob"]}], [{"networks": ["192.0.2.0/24"]}], {},
         False, "deny[0]", "192.0.2.1 in 192.0.2.0/24", ip="192.0.2.1"),
    Case("deny network elsewhere", [{"users": ["bob"]}], [{"networks": ["192.0.2.0/24"]}],
         {}, True, "allow[0]", "users: bob"),
    # ---------------------------------------------------------------- methods
    Case("method listed", [{"methods": ["GET", "POST"]}], None, {}, True, "allow[0]",
         "methods: POST", method="POST"),
    Case("method not listed", [{"methods": ["GET"]}], None, {}, False, None, "denied",
         method="POST"),
    Case("GET includes HEAD", [{"methods": ["GET"]}], None, {}, True, "allow[0]",
         "methods: HEAD", method="HEAD"),
    Case("HEAD does not include GET", [{"methods": ["HEAD"]}], None, {}, False, None,
         "denied", method="GET"),
    Case("method case", [{"methods": ["get"]}], None, {}, True, "allow[0]", "methods: GET",
         method="get"),
    Case("deny GET denies HEAD", [{"users": ["bob"]}], [{"methods": ["GET"]}], {}, False,
         "deny[0]", "methods: HEAD", method="HEAD"),
    Case("method unknown: allow never", [{"methods": ["GET"]}], None, {}, False, None,
         "denied", method=None),
    Case("method unknown: deny always", [{"users": ["bob"]}], [{"methods": ["DELETE"]}], {},
         False, "deny[0]", "method unknown", method=None),
    # ---------------------------------------------------------------- e-mail and case
    Case("email case-insensitive", [{"emails": ["Bob@Example.COM"]}], None,
         {"email": "bob@example.com", "email_verified": True}, True, "allow[0]",
         "emails: bob@example.com"),
    Case("domain case-insensitive", [{"email_domains": ["Example.com"]}], None,
         {"email": "Bob@EXAMPLE.com"}, True, "allow[0]", "email_domains: example.com"),
    Case("email verified unknown admits", [{"emails": ["bob@example.com"]}], None,
         {"email": "bob@example.com"}, True, "allow[0]", "emails"),
    Case("email unverified never admits", [{"emails": ["bob@example.com"]}], None,
         {"email": "bob@example.com", "email_verified": False}, False, None,
         "email not verified, email rules skipped"),
    Case("domain unverified never admits", [{"email_domains": ["example.com"]}], None,
         {"email": "bob@example.com", "email_verified": False}, False, None,
         "email not verified"),
    Case("unverified still denied", [{"users": ["bob"]}], [{"emails": ["bob@example.com"]}],
         {"email": "bob@example.com", "email_verified": False}, False, "deny[0]",
         "emails: bob@example.com"),
    Case("unverified domain still denied", [{"users": ["bob"]}],
         [{"email_domains": ["contractor.example"]}],
         {"email": "bob@contractor.example", "email_verified": False}, False, "deny[0]",
         "email_domains: contractor.example"),
    Case("two @ never match a domain", [{"email_domains": ["example.com"]}], None,
         {"email": "bob@evil.test@example.com"}, False, None, "denied"),
    Case("two @ never match a deny domain", [{"users": ["bob"]}],
         [{"email_domains": ["example.com"]}], {"email": "bob@evil.test@example.com"}, True,
         "allow[0]", "users: bob"),
    Case("subdomain is another domain", [{"email_domains": ["example.com"]}], None,
         {"email": "bob@sub.example.com"}, False, None, "denied"),
    Case("no email, email rule", [{"emails": ["bob@example.com"]}], None, {}, False, None,
         "denied"),
    Case("users: sub", [{"users": ["sub-1"]}], None, {"user": "carol"}, True, "allow[0]",
         "users: sub-1 (sub)"),
    Case("users: case-sensitive", [{"users": ["Bob"]}], None, {}, False, None, "denied"),
    Case("groups: case-sensitive", [{"groups": ["eng"]}], None, {"groups": ("Eng",)}, False,
         None, "denied"),
    # ---------------------------------------------------------------- default_policy
    Case("default allow", None, None, {"groups": ("staff",)}, True, "default_policy.allow[0]",
         'allowed by default_policy.allow[0] of default_policy (route "wiki" has no rules',
         default={"allow": [{"groups": ["staff"]}]}),
    Case("default allow, no match", None, None, {"groups": ("eng",)}, False, None,
         "no allow rule of default_policy", default={"allow": [{"groups": ["staff"]}]}),
    Case("default deny wins", None, None, {"groups": ("staff", "suspended")}, False,
         "default_policy.deny[0]", "groups: suspended",
         default={"allow": [{"groups": ["staff"]}], "deny": [{"groups": ["suspended"]}]}),
    Case("default deny only", None, None, {}, True, None, "no deny rule of default_policy",
         default={"deny": [{"users": ["eve"]}]}),
    Case("route allow replaces default", [{"users": ["bob"]}], None, {}, True, "allow[0]",
         'of route "wiki"', default={"allow": [{"groups": ["staff"]}]}),
    Case("route deny replaces default allow", None, [{"users": ["eve"]}], {}, True, None,
         'no deny rule of route "wiki"', default={"allow": [{"groups": ["staff"]}]}),
    Case("route rules: default deny not merged", [{"users": ["bob"]}], None, {}, True,
         "allow[0]", "users: bob", default={"deny": [{"users": ["bob"]}]}),
    # ---------------------------------------------------------------- the one-mapping form
    Case("mapping: any value admits", {"groups": ["eng"], "users": ["alice"]}, None,
         {"groups": ("eng",)}, True, "allow", 'allowed by allow of route "wiki": groups: eng'),
    Case("mapping: users", {"groups": ["eng"], "users": ["bob"]}, None, {}, True, "allow",
         "users: bob"),
    Case("mapping: domain", {"groups": ["eng"], "email_domains": ["example.com"]}, None,
         {"email": "bob@example.com"}, True, "allow", "email_domains: example.com"),
    Case("mapping: none", {"groups": ["eng"], "claims": {"x": ["a"]}}, None,
         {"groups": ("ops",)}, False, None, 'no allow rule of route "wiki" matches user "bob"'),
    Case("mapping: claim names are literal", {"claims": {"a.b": ["x"]}}, None,
         {"claims": {"a.b": "x"}}, True, "allow", "a.b='x'"),
    Case("mapping: claim names do not walk", {"claims": {"a.b": ["x"]}}, None,
         {"claims": {"a": {"b": "x"}}}, False, None, "denied"),
    Case("mapping: unverified email", {"emails": ["bob@example.com"]}, None,
         {"email": "bob@example.com", "email_verified": False}, False, None, "not verified"),
    Case("mapping: claims any-of", {"claims": {"a": ["1"], "b": ["2"]}}, None,
         {"claims": {"b": "2"}}, True, "allow", "b='2'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_evaluate(case: Case) -> None:
    r = route(case.allow, case.deny, **case.extra)
    default = policy(**case.default) if case.default is not None else None
    decision = evaluate(
        r, person(**case.who), method=case.method, client_ip=case.ip, default_policy=default
    )
    assert decision.allowed is case.allowed, decision.reason
    assert (str(decision.rule) if decision.rule else None) == case.rule
    assert case.reason in decision.reason


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_the_rule_names_its_list_index_and_source() -> None:
    default = policy(deny=[{"users": ["x"]}, {"groups": ["suspended"]}])
    decision = evaluate(route(), person(groups=("suspended",)), method="GET",
                        client_ip="10.0.0.1", default_policy=default)
    assert decision.rule is not None
    assert (decision.rule.kind, decision.rule.index, decision.rule.source) == (
        "deny", 1, "default_policy")
    mapping = evaluate(route({"users": ["bob"]}), person(), method="GET", client_ip=None,
                       default_policy=None)
    assert mapping.rule is not None
    assert (mapping.rule.kind, mapping.rule.index, mapping.rule.source) == ("allow", None, "route")


def test_denial_reason_is_safe_to_log() -> None:
    identity = person(user="bob\nINFO forged line" + "x" * 500, claims={"token": "secret"})
    decision = evaluate(route([{"users": ["alice"]}]), identity, method="GET",
                        client_ip="10.0.0.1", default_policy=None)
    assert not decision.allowed
    assert "\n" not in decision.reason
    assert len(decision.reason) < 250
    assert "secret" not in decision.reason


def test_compiled_rules_follow_the_route_and_default_objects() -> None:
    first = route([{"users": ["bob"]}])
    second = route([{"users": ["alice"]}])
    bare = route()
    staff = policy(allow=[{"groups": ["staff"]}])
    anyone = policy(deny=[{"users": ["eve"]}])
    for _ in range(2):  # the second round is served from the cache
        assert evaluate(first, person(), method="GET", client_ip=None, default_policy=None).allowed
        assert not evaluate(second, person(), method="GET", client_ip=None,
                            default_policy=None).allowed
        # The same route object under another default_policy is judged afresh.
        assert not evaluate(bare, person(), method="GET", client_ip=None,
                            default_policy=staff).allowed
        assert evaluate(bare, person(), method="GET", client_ip=None,
                        default_policy=anyone).allowed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("", None),
        (None, None),
        ("10.1.2.3:8080", None),
        ("example.com", None),
    ],
)
def test_client_address(text: str | None, expected: str | None) -> None:
    address = client_address(text)
    assert (str(address) if address else None) == expected


# ---------------------------------------------------------------------------------------------
# authorize: the whole outcome on a route, as the live gateway and explain act on it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "signed_in", "forward", "login_needed", "identity_sent", "decided"),
    [
        ("public", False, True, False, False, False),
        ("public", True, True, False, False, False),  # public routes never send identity
        ("optional", False, True, False, False, False),
        ("optional", True, True, False, True, False),
        ("required", False, False, True, False, False),
        ("required", True, True, False, True, True),
    ],
)
def test_authorize(
    auth: str, signed_in: bool, forward: bool, login_needed: bool, identity_sent: bool,
    decided: bool,
) -> None:
    r = route(auth=auth)
    who = person() if signed_in else None
    access = authorize(r, who, method="GET", client_ip="10.0.0.1", default_policy=None)
    assert access.forward is forward
    assert access.login_needed is login_needed
    assert (access.identity is not None) is identity_sent
    assert (access.decision is not None) is decided


def test_authorize_denied_sends_no_identity() -> None:
    access = authorize(route([{"users": ["alice"]}]), person(), method="GET",
                       client_ip="10.0.0.1", default_policy=None)
    assert not access.forward
    assert not access.login_needed
    assert access.identity is None
    assert access.decision is not None
    assert not access.decision.allowed


def test_authorize_does_not_apply_default_policy_to_optional_routes() -> None:
    nobody = policy(deny=[{"users": ["bob"]}])
    access = authorize(route(auth="optional"), person(), method="GET", client_ip=None,
                       default_policy=nobody)
    assert access.forward
    assert access.identity is not None


@pytest.mark.parametrize(
    ("unauthenticated", "navigation", "style"),
    [
        (None, True, "redirect"),
        (None, False, "401"),
        ("auto", True, "redirect"),
        ("redirect", False, "redirect"),
        ("redirect", True, "redirect"),
        ("401", True, "401"),
        (401, True, "401"),  # YAML reads an unquoted 401 as a number
        ("401", False, "401"),
    ],
)
def test_login_style(unauthenticated: object, navigation: bool, style: str) -> None:
    extra: dict[str, Any] = {} if unauthenticated is None else {"unauthenticated": unauthenticated}
    assert login_style(route(**extra), navigation=navigation) == style


# ---------------------------------------------------------------------------------------------
# Config errors of the policy keys, each with its key path
# ---------------------------------------------------------------------------------------------

KEY = base64.b64encode(bytes(range(32))).decode()


def config(route_fields: dict[str, Any], **top: Any) -> Config:
    data: dict[str, Any] = {
        "version": 1,
        "provider": {"issuer": "https://idp.example.com", "client_id": "gw",
                     "client_secret": "s"},
        "session": {"keys": [KEY]},
        "routes": [
            {"name": "static", "upstream": "http://127.0.0.1:8080", "auth": "public",
             "match": {"path": "/static/"}},
            {"name": "wiki", "upstream": "http://127.0.0.1:8080", **route_fields},
        ],
        **top,
    }
    return parse_config(data, {})


def problems(route_fields: dict[str, Any], **top: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(route_fields, **top)
    return [str(p) for p in info.value.problems]


NEVER = "lists no value, so this condition could never hold; list at least one, or remove the key"
CLAIM_PATH = (
    "is not a claim path: join names of letters, digits, _ and - with dots "
    '(realm_access.roles); write any other name in brackets and double quotes '
    '(resource_access["my.app"].roles, ["https://example.com/roles"])'
)


@pytest.mark.parametrize(
    ("fields", "top", "expected"),
    [
        ({"allow": []}, {},
         "routes[1].allow: lists no rule; list at least one, or remove the key"),
        ({"deny": []}, {},
         "routes[1].deny: lists no rule; list at least one, or remove the key"),
        ({"allow": None}, {},
         "routes[1].allow: is empty; list rules under it, or remove the key"),
        ({"deny": None}, {},
         "routes[1].deny: is empty; list rules under it, or remove the key"),
        ({"allow": [{}]}, {},
         "routes[1].allow[0]: names no condition; give at least one of users, emails, "
         "email_domains, groups, claims, networks, methods"),
        ({"allow": [{"users": ["a"]}, {"groups": []}]}, {}, f"routes[1].allow[1].groups: {NEVER}"),
        ({"deny": [{"networks": []}]}, {}, f"routes[1].deny[0].networks: {NEVER}"),
        ({"allow": [{"claims": {}}]}, {}, f"routes[1].allow[0].claims: {NEVER}"),
        ({"allow": [{"claims": {"roles": []}}]}, {},
         "routes[1].allow[0].claims: 'roles' lists no value, so it could never match; "
         "list at least one"),
        ({"allow": [{"claims": {"realm_access..roles": ["x"]}}]}, {},
         f"routes[1].allow[0].claims: 'realm_access..roles' {CLAIM_PATH}"),
        ({"allow": [{"claims": {"https://example.com/roles": ["x"]}}]}, {},
         f"routes[1].allow[0].claims: 'https://example.com/roles' {CLAIM_PATH}"),
        ({"allow": [{"claims": {"a[my.app]": ["x"]}}]}, {},
         f"routes[1].allow[0].claims: 'a[my.app]' {CLAIM_PATH}"),
        ({"allow": [{"claims": {"roles": [1.5]}}]}, {},
         "routes[1].allow[0].claims.roles[0]: must be a string, a whole number or true/false"),
        ({"allow": [{"groups": [""]}]}, {}, "routes[1].allow[0].groups[0]: must not be empty"),
        ({"allow": [{"groups": None}]}, {}, "routes[1].allow[0].groups: must be a list"),
        ({"allow": [{"grups": ["eng"]}]}, {}, "routes[1].allow[0].grups: unknown key"),
        ({"allow": [{"networks": ["10.0.0.300/8"]}]}, {},
         "routes[1].allow[0].networks[0]: '10.0.0.300/8' is not an IP address or CIDR"),
        ({"allow": [{"methods": ["FETCH"]}]}, {},
         "routes[1].allow[0].methods: 'FETCH' is not an HTTP method"),
        ({"allow": [{"emails": ["bob"]}]}, {},
         "routes[1].allow[0].emails: 'bob' is not an e-mail address (one @, text on both sides)"),
        ({"allow": [{"email_domains": ["@example.com"]}]}, {},
         "routes[1].allow[0].email_domains: '@example.com' must be a bare domain such as "
         "example.com"),
        ({"allow": "eng"}, {},
         "routes[1].allow: must be a list of rules, or one mapping (any listed value admits)"),
        ({"allow": {"groups": ["eng"], "networks": ["10.0.0.0/8"]}}, {},
         "routes[1].allow.networks: unknown key"),
        ({"match": {"methods": ["GET"]}, "allow": [{"users": ["a"]}, {"methods": ["POST"]}]},
         {}, "routes[1]: allow[1].methods: lists none of the methods this route matches "
         "(GET, HEAD), so the rule can never match"),
        ({"match": {"methods": ["GET"]}, "deny": [{"methods": ["DELETE"]}]}, {},
         "routes[1]: deny[0].methods: lists none of the methods this route matches "
         "(GET, HEAD), so the rule can never match"),
        ({"auth": "public", "deny": [{"users": ["eve"]}]}, {},
         "routes[1]: a public route admits everyone; remove deny or set auth: required"),
        ({"auth": "optional", "allow": [{"users": ["a"]}]}, {},
         "routes[1]: an optional route admits everyone (identity headers only for those "
         "signed in); remove allow or set auth: required"),
        ({"auth": "public", "unauthenticated": 401}, {},
         "routes[1]: unauthenticated has no effect on an auth: public route, which never asks "
         "anyone to sign in; remove it"),
        ({"unauthenticated": "json"}, {},
         "routes[1].unauthenticated: must be one of 'auto', 'redirect' or '401'"),
        ({"auth": "sometimes"}, {},
         "routes[1].auth: must be one of 'required', 'public' or 'optional'"),
        ({}, {"default_policy": {}},
         "default_policy: names neither allow nor deny; give one, or remove default_policy"),
        ({}, {"default_policy": None},
         "default_policy: is empty; list allow and/or deny rules under it, or remove the key"),
        ({}, {"default_policy": {"deny": [{"users": []}]}},
         f"default_policy.deny[0].users: {NEVER}"),
        ({}, {"default_policy": {"allow": {"groups": ["eng"]}}},
         "default_policy.allow: must be a list"),
    ],
)
def test_policy_config_problems(
    fields: dict[str, Any], top: dict[str, Any], expected: str
) -> None:
    assert problems(fields, **top) == [expected]


def test_every_policy_problem_is_reported_at_once() -> None:
    found = problems({"allow": [{"groups": []}, {"methods": ["FETCH"]}],
                      "deny": [{"emails": ["x"]}]})
    assert found == [
        f"routes[1].allow[0].groups: {NEVER}",
        "routes[1].allow[1].methods: 'FETCH' is not an HTTP method",
        "routes[1].deny[0].emails: 'x' is not an e-mail address (one @, text on both sides)",
    ]


def test_rules_are_kept_as_written() -> None:
    loaded = config(
        {"allow": [{"claims": {'resource_access["my.app"].roles': ["r", 1, True]},
                    "methods": ["get"], "networks": ["10.1.2.3/8"],
                    "email_domains": ["Example.COM"]}],
         "unauthenticated": 401},
        default_policy={"deny": [{"users": ["eve"]}]},
    )
    wiki = loaded.routes[1]
    assert wiki.unauthenticated == "401"
    assert isinstance(wiki.allow, tuple)
    rule = wiki.allow[0]
    assert rule.methods == ("GET",)
    assert [str(n) for n in rule.networks] == ["10.0.0.0/8"]
    assert rule.email_domains == ("example.com",)
    # Types are kept: the policy never coerces "true" to True.
    assert [type(v) for v in rule.claims['resource_access["my.app"].roles']] == [str, int, bool]
    assert loaded.default_policy is not None
    assert loaded.default_policy.allow is None
