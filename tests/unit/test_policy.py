"""Pure tests of gateway.policy: each allow rule kind, its edge cases, and the reasons given."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import RouteConfig
from gateway.models import Identity
from gateway.policy import evaluate


def route(allow: dict[str, Any] | None, name: str = "wiki") -> RouteConfig:
    data: dict[str, Any] = {"name": name, "upstream": "http://127.0.0.1:8080"}
    if allow is not None:
        data["allow"] = allow
    return RouteConfig.model_validate(data)


def person(**fields: Any) -> Identity:
    fields.setdefault("sub", "sub-1")
    fields.setdefault("user", "bob")
    return Identity(**fields)


CASES: list[tuple[str, dict[str, Any] | None, dict[str, Any], bool, str]] = [
    # (case id, allow, identity fields, allowed, expected reason text)
    ("no allow", None, {}, True, "signed in; route has no allow rules"),
    # users: user or sub, exact
    ("users: user", {"users": ["alice", "bob"]}, {}, True, "allowed by users: bob"),
    ("users: sub", {"users": ["sub-1"]}, {"user": "carol"}, True, "allowed by users: sub-1"),
    ("users: case", {"users": ["Bob"]}, {}, False, "denied"),
    ("users: none", {"users": ["alice"]}, {}, False, "denied"),
    # emails: case-insensitive, verified or unknown
    (
        "emails: match",
        {"emails": ["Bob@Example.com"]},
        {"email": "bob@example.COM", "email_verified": True},
        True,
        "allowed by emails: bob@example.com",
    ),
    (
        "emails: verified unknown",
        {"emails": ["bob@example.com"]},
        {"email": "bob@example.com"},
        True,
        "allowed by emails",
    ),
    (
        "emails: unverified",
        {"emails": ["bob@example.com"]},
        {"email": "bob@example.com", "email_verified": False},
        False,
        "email not verified",
    ),
    ("emails: no email", {"emails": ["bob@example.com"]}, {}, False, "denied"),
    (
        "emails: other",
        {"emails": ["bob@example.com"]},
        {"email": "bob@example.org"},
        False,
        "denied",
    ),
    (
        "emails: exact only",
        {"emails": ["bob@example.com"]},
        {"email": "xbob@example.com"},
        False,
        "denied",
    ),
    # email_domains: one "@", exact domain, no subdomains
    (
        "domains: match",
        {"email_domains": ["Example.com"]},
        {"email": "bob@EXAMPLE.com", "email_verified": True},
        True,
        "allowed by email_domains: example.com",
    ),
    (
        "domains: subdomain",
        {"email_domains": ["example.com"]},
        {"email": "bob@sub.example.com"},
        False,
        "denied",
    ),
    (
        "domains: suffix",
        {"email_domains": ["example.com"]},
        {"email": "bob@evilexample.com"},
        False,
        "denied",
    ),
    (
        "domains: longer",
        {"email_domains": ["example.com"]},
        {"email": "bob@example.com.evil.test"},
        False,
        "denied",
    ),
    (
        "domains: two @",
        {"email_domains": ["example.com"]},
        {"email": "bob@evil.test@example.com"},
        False,
        "denied",
    ),
    (
        "domains: two @ reversed",
        {"email_domains": ["example.com"]},
        {"email": "bob@example.com@evil.test"},
        False,
        "denied",
    ),
    (
        "domains: empty local",
        {"email_domains": ["example.com"]},
        {"email": "@example.com"},
        False,
        "denied",
    ),
    (
        "domains: no @",
        {"email_domains": ["example.com"]},
        {"email": "example.com"},
        False,
        "denied",
    ),
    (
        "domains: unverified",
        {"email_domains": ["example.com"]},
        {"email": "bob@example.com", "email_verified": False},
        False,
        "email not verified",
    ),
    # groups: any shared group, exact
    (
        "groups: match",
        {"groups": ["eng", "ops"]},
        {"groups": ("sales", "ops")},
        True,
        "allowed by groups: ops",
    ),
    ("groups: case", {"groups": ["eng"]}, {"groups": ("Eng",)}, False, "denied"),
    ("groups: none", {"groups": ["eng"]}, {}, False, "denied"),
    ("groups: substring", {"groups": ["eng"]}, {"groups": ("engineering",)}, False, "denied"),
    # claims: no coercion, lists, missing claims
    (
        "claims: string",
        {"claims": {"dept": ["r&d"]}},
        {"claims": {"dept": "r&d"}},
        True,
        "allowed by claims: dept='r&d'",
    ),
    (
        "claims: list claim",
        {"claims": {"roles": ["admin"]}},
        {"claims": {"roles": ["user", "admin"]}},
        True,
        "allowed by claims: roles='admin'",
    ),
    (
        "claims: list claim no match",
        {"claims": {"roles": ["admin"]}},
        {"claims": {"roles": ["user"]}},
        False,
        "denied",
    ),
    (
        "claims: bool",
        {"claims": {"admin": [True]}},
        {"claims": {"admin": True}},
        True,
        "allowed by claims: admin=True",
    ),
    (
        "claims: 'true' is not True",
        {"claims": {"admin": [True]}},
        {"claims": {"admin": "true"}},
        False,
        "denied",
    ),
    (
        "claims: 1 is not True",
        {"claims": {"admin": [True]}},
        {"claims": {"admin": 1}},
        False,
        "denied",
    ),
    (
        "claims: True is not 1",
        {"claims": {"level": [1]}},
        {"claims": {"level": True}},
        False,
        "denied",
    ),
    (
        "claims: int",
        {"claims": {"level": [1]}},
        {"claims": {"level": 1}},
        True,
        "allowed by claims: level=1",
    ),
    (
        "claims: 1.0 is not 1",
        {"claims": {"level": [1]}},
        {"claims": {"level": 1.0}},
        False,
        "denied",
    ),
    (
        "claims: '1' is not 1",
        {"claims": {"level": [1]}},
        {"claims": {"level": "1"}},
        False,
        "denied",
    ),
    ("claims: missing", {"claims": {"x": ["a"]}}, {"claims": {}}, False, "denied"),
    ("claims: null", {"claims": {"x": ["a"]}}, {"claims": {"x": None}}, False, "denied"),
    ("claims: object", {"claims": {"x": ["a"]}}, {"claims": {"x": {"a": 1}}}, False, "denied"),
    ("claims: nested list", {"claims": {"x": ["a"]}}, {"claims": {"x": [["a"]]}}, False, "denied"),
    (
        "claims: unhashable member skipped",
        {"claims": {"x": ["a"]}},
        {"claims": {"x": [{"a": 1}, "a"]}},
        True,
        "allowed by claims: x='a'",
    ),
    ("claims: other claim name", {"claims": {"x": ["a"]}}, {"claims": {"y": "a"}}, False, "denied"),
    # any one rule admits
    ("any rule: users", {"groups": ["eng"], "users": ["bob"]}, {}, True, "allowed by users: bob"),
    (
        "any rule: domain",
        {"groups": ["eng"], "email_domains": ["example.com"]},
        {"email": "bob@example.com"},
        True,
        "allowed by email_domains: example.com",
    ),
    (
        "any rule: none",
        {"groups": ["eng"], "email_domains": ["example.com"], "claims": {"x": ["a"]}},
        {"email": "bob@example.org", "groups": ("ops",)},
        False,
        "denied",
    ),
]


@pytest.mark.parametrize(
    ("allow", "fields", "allowed", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_evaluate(
    allow: dict[str, Any] | None, fields: dict[str, Any], allowed: bool, reason: str
) -> None:
    decision = evaluate(route(allow), person(**fields))
    assert decision.allowed is allowed
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("allow", "fields", "allowed", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES if not case[3]],
)
def test_every_denial_names_route_and_user(
    allow: dict[str, Any] | None, fields: dict[str, Any], allowed: bool, reason: str
) -> None:
    decision = evaluate(route(allow, name="wiki"), person(**fields))
    assert not decision.allowed
    assert decision.reason.startswith('denied: no allow rule of route "wiki" matches user "')
    assert '"bob"' in decision.reason or '"carol"' in decision.reason


def test_denial_reason_is_safe_to_log() -> None:
    identity = person(user="bob\nINFO forged line" + "x" * 500, claims={"token": "secret"})
    decision = evaluate(route({"users": ["alice"]}), identity)
    assert not decision.allowed
    assert "\n" not in decision.reason
    assert len(decision.reason) < 250
    assert "secret" not in decision.reason


def test_compiled_rules_follow_the_route_object() -> None:
    first = route({"users": ["bob"]})
    second = route({"users": ["alice"]})
    for _ in range(2):  # the second round is served from the cache
        assert evaluate(first, person()).allowed
        assert not evaluate(second, person()).allowed
