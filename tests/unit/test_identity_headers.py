"""Pure tests of configurable identity headers (``headers:``): claim mapping, separators,
encodings, ``groups_filter``, the header budget with a user in 500 groups, stripping of
client copies, and the config rules that keep them meaningful."""

from __future__ import annotations

import base64
import dataclasses
import email.header
from typing import Any

import pytest

from gateway.config import DEFAULT_STRIP_HEADERS, Config, HeadersConfig, parse_config
from gateway.errors import ConfigError, Forbidden
from gateway.explain import explain, render
from gateway.headers import (
    DEFAULT_IDENTITY_RULES,
    Forwarded,
    HeaderPolicy,
    IdentityRules,
    canonical,
    compile_identity_rules,
    configured_identity_headers,
    encode_identity_value,
    identity_rules,
    plan_identity_headers,
)
from gateway.models import Identity

Headers = tuple[tuple[str, str], ...]

FWD = Forwarded(client_ip="203.0.113.9", proto="https", host="app.example.com",
                for_chain="203.0.113.9")
KEY = base64.b64encode(bytes(range(32))).decode()


def identity(claims: dict[str, Any] | None = None, **fields: Any) -> Identity:
    claims = {"sub": "u-1", **(claims or {})}
    base: dict[str, Any] = {"sub": claims["sub"], "user": "alice", "claims": claims}
    base.update(fields)
    return Identity(**base)


def rules(**settings: Any) -> IdentityRules:
    return identity_rules(HeadersConfig.model_validate(settings), groups_claim="groups")


def plan(ident: Identity | None, token: str | None = None, **settings: Any) -> Headers:
    return plan_identity_headers(ident, token, rules(**settings)).headers


def wire_size(headers: Headers) -> int:
    return sum(len(n) + 4 + len(v.encode()) for n, v in headers)


# ---------------------------------------------------------------------------------------------
# Mapping a header name to a claim path
# ---------------------------------------------------------------------------------------------

CLAIMS: dict[str, Any] = {
    "sub": "u-1",
    "email": "alice@example.com",
    "realm_access": {"roles": ["reader", "writer"]},
    "resource_access": {"my.app": {"roles": ["app-admin"]}},
    "https://example.com/tenant": "acme",
    "employee_number": 42,
    "ratio": 1.5,
    "mfa": True,
    "locked": False,
    "address": {"country": "NZ"},
    "nickname": None,
    "mixed": ["a", 7, {"x": 1}, ["nested"], None, True],
    "empty": [],
}


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ("sub", "u-1"),
        ("email", "alice@example.com"),
        ("realm_access.roles", "reader,writer"),
        ('resource_access["my.app"].roles', "app-admin"),
        ('["https://example.com/tenant"]', "acme"),
        ("employee_number", "42"),
        ("ratio", "1.5"),
        ("mfa", "true"),
        ("locked", "false"),
        ("mixed", "a,7,true"),  # objects, nested lists and null have no header form
        ("address", None),
        ("address.country", "NZ"),
        ("nickname", None),
        ("empty", None),
        ("missing", None),
        ("realm_access.roles.more", None),
        ("sub.deeper", None),
    ],
)
def test_a_header_carries_the_claim_at_its_path(claim: str, expected: str | None) -> None:
    out = plan(identity(CLAIMS), send={"X-Value": claim, "X-Sub": "sub"})
    assert dict(out).get("X-Value") == expected
    assert ("X-Sub", "u-1") in out


def test_send_replaces_the_built_in_headers_in_its_order() -> None:
    out = plan(identity(CLAIMS, email="alice@example.com", groups=("eng",)),
               send={"X-Roles": "realm_access.roles", "X-User-Id": "sub"})
    assert out == (("X-Roles", "reader,writer"), ("X-User-Id", "u-1"))


def test_without_send_the_built_in_headers_are_sent_as_before() -> None:
    ident = identity(email="a@example.com", groups=("eng", "Zoë"), preferred_username="al")
    assert plan_identity_headers(ident, "tok", DEFAULT_IDENTITY_RULES).headers == (
        ("X-Forwarded-User", "alice"),
        ("X-Forwarded-Email", "a@example.com"),
        ("X-Forwarded-Groups", "eng,Zoë"),  # UTF-8 as it always was
        ("X-Forwarded-Preferred-Username", "al"),
        ("X-Forwarded-Access-Token", "tok"),
    )


def test_the_groups_claim_is_the_filtered_groups_of_the_identity() -> None:
    ident = identity({"groups": ["app-a", "other", "app-b"]}, groups=("app-a", "other", "app-b"))
    out = plan(ident, send={"X-Groups": "groups"}, groups_filter="app-.*")
    assert out == (("X-Groups", "app-a,app-b"),)


def test_a_required_header_without_a_value_refuses_the_user() -> None:
    with pytest.raises(Forbidden) as info:
        plan(identity(CLAIMS), send={"X-Tenant": "tenant_id"}, required=["x-tenant"])
    assert info.value.reason == "identity_incomplete"
    assert "X-Tenant" in info.value.message


@pytest.mark.parametrize("value", ["bob\r\nX-Injected: 1", " bob", "bob ", "b\x00b", ""])
def test_a_required_header_that_cannot_be_sent_exactly_refuses_the_user(value: str) -> None:
    with pytest.raises(Forbidden):
        plan(identity({"login": value}), send={"X-Login": "login"}, required=["X-Login"])


@pytest.mark.parametrize("value", ["bob\r\nX-Injected: 1", " bob", "b\u2028b", "x" * 1025])
def test_an_optional_header_that_cannot_be_sent_exactly_is_left_out(value: str) -> None:
    out = plan(identity({"login": value}), send={"X-Login": "login", "X-Sub": "sub"})
    assert out == (("X-Sub", "u-1"),)


@pytest.mark.parametrize("user", ["bob\n", " alice", "a\x85b", "\ud800"])
def test_the_built_in_user_header_still_refuses_an_unsafe_name(user: str) -> None:
    with pytest.raises(Forbidden) as info:
        plan_identity_headers(identity(user=user), None)
    assert info.value.reason == "identity_unsafe"


def test_refuse_encoding_refuses_a_non_ascii_user_of_the_built_in_headers() -> None:
    with pytest.raises(Forbidden):
        plan(identity(user="zoë"), encoding="refuse")


# ---------------------------------------------------------------------------------------------
# Separators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("separator", "encoding", "expected"),
    [
        (",", "utf8", "a b,c;d"),  # "x,y" would read as two: left out
        (", ", "utf8", "a b, c;d"),
        (";", "utf8", "a b;x,y"),
        (" ", "utf8", "x,y c;d"),
        ("|", "utf8", "a b|x,y|c;d"),
        (",", "rfc2047", "a b,=?UTF-8?B?eCx5?=,c;d"),  # encoded instead of split
        (" ", "rfc2047", "=?UTF-8?B?YSBi?= x,y c;d"),
        (",", "base64url", "YSBi,eCx5,Yztk"),  # every member encoded
    ],
)
def test_lists_are_joined_and_never_split_a_member(
    separator: str, encoding: str, expected: str
) -> None:
    ident = identity({"roles": ["a b", "x,y", "c;d"]})
    out = plan(ident, send={"X-Roles": "roles"}, separator=separator, encoding=encoding)
    assert out == (("X-Roles", expected),)
    # What the app does: split at the separator, decode each member.
    members = expected.split(separator)
    if encoding == "rfc2047":
        decoded = [_decode_2047(m) for m in members]
        assert set(decoded) <= {"a b", "x,y", "c;d"}


def _decode_2047(text: str) -> str:
    return str(email.header.make_header(email.header.decode_header(text)))


# ---------------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoding", "expected"),
    [
        ("alice", "rfc2047", "alice"),
        ("alice", "utf8", "alice"),
        ("alice", "refuse", "alice"),
        ("alice", "base64url", "YWxpY2U"),
        ("Zoë 山田", "rfc2047", "=?UTF-8?B?Wm/DqyDlsbHnlLA=?="),
        ("Zoë 山田", "utf8", "Zoë 山田"),
        ("Zoë 山田", "refuse", None),
        ("Zoë 山田", "base64url", "Wm_DqyDlsbHnlLA"),
        # ASCII that an RFC 2047 decoder would turn into another name is encoded too.
        ("=?UTF-8?B?YWRtaW4=?=", "rfc2047", "=?UTF-8?B?PT9VVEYtOD9CP1lXUnRhVzQ9Pz0=?="),
        ("=?UTF-8?B?YWRtaW4=?=", "utf8", "=?UTF-8?B?YWRtaW4=?="),
        # Never sent, whatever the encoding: the app would trim or split them.
        ("alice\r\nX-Injected: 1", "rfc2047", None),
        ("alice\r\nX-Injected: 1", "base64url", None),
        (" alice", "base64url", None),
        ("alice\u2028", "rfc2047", None),
        ("", "utf8", None),
    ],
)
def test_encodings(value: str, encoding: str, expected: str | None) -> None:
    assert encode_identity_value(value, encoding) == expected


@pytest.mark.parametrize(
    "value", ["Zoë 山田", "=?UTF-8?B?YWRtaW4=?=", "o'brien", "x" * 300, "😀 emoji", "a=?b"]
)
def test_rfc2047_and_base64url_decode_to_exactly_the_value(value: str) -> None:
    wire = encode_identity_value(value, "rfc2047")
    assert wire is not None
    assert wire.isascii()
    assert _decode_2047(wire) == value
    b64 = encode_identity_value(value, "base64url")
    assert b64 is not None
    assert base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).decode() == value


def test_send_defaults_to_rfc2047_and_the_built_in_headers_to_utf8() -> None:
    ident = identity({"name": "Zoë"}, user="Zoë")
    assert plan(ident, send={"X-Name": "name"}) == (("X-Name", "=?UTF-8?B?Wm/Dqw==?="),)
    assert dict(plan(ident))["X-Forwarded-User"] == "Zoë"
    assert dict(plan(ident, encoding="rfc2047"))["X-Forwarded-User"] == "=?UTF-8?B?Wm/Dqw==?="


# ---------------------------------------------------------------------------------------------
# groups_filter
# ---------------------------------------------------------------------------------------------

GROUPS = ("eng", "app-admins", "xapp-y", "app-", "leavers", "sales", "app-readers")


@pytest.mark.parametrize(
    ("groups_filter", "expected"),
    [
        (None, ",".join(GROUPS)),
        ("app-.*", "app-admins,app-,app-readers"),  # the whole name must match
        ("app-.+", "app-admins,app-readers"),
        ("eng|sales", "eng,sales"),
        ("nothing", None),
    ],
)
def test_groups_filter_regex(groups_filter: str | None, expected: str | None) -> None:
    out = plan(identity(groups=GROUPS), groups_filter=groups_filter)
    assert dict(out).get("X-Forwarded-Groups") == expected


def config(**changes: Any) -> Config:
    data: dict[str, Any] = {
        "version": 1,
        "provider": {"issuer": "https://idp.example.com", "client_id": "gw",
                     "client_secret": "s"},
        "session": {"keys": [KEY]},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:8080"}],
    }
    data.update(changes)
    return parse_config(data, {})


def route(**fields: Any) -> dict[str, Any]:
    return {"name": "app", "upstream": "http://127.0.0.1:8080", **fields}


POLICY = {"groups_filter": "policy"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # allow and deny both count: the app may want to know why a rule would apply.
        ({"routes": [route(allow=[{"groups": ["eng"]}, {"users": ["bob"]}],
                           deny=[{"groups": ["leavers"], "methods": ["POST"]}])]},
         "eng,leavers"),
        # the one-mapping allow form
        ({"routes": [route(allow={"groups": ["sales", "eng"], "emails": ["a@b.c"]})]},
         "eng,sales"),
        # a claims rule on the groups claim names groups too
        ({"routes": [route(allow=[{"claims": {"groups": ["app-admins"]}}])]}, "app-admins"),
        # no rules of its own: default_policy's, as the policy decides
        ({"default_policy": {"allow": [{"groups": ["app-readers"]}]}, "routes": [route()]},
         "app-readers"),
        # a route's own rules replace default_policy's
        ({"default_policy": {"allow": [{"groups": ["app-readers"]}]},
          "routes": [route(allow=[{"groups": ["sales"]}])]}, "sales"),
        # no rules naming groups: no groups at all
        ({"routes": [route()]}, None),
        ({"routes": [route(allow=[{"users": ["alice"]}])]}, None),
    ],
)
def test_groups_filter_policy_keeps_only_the_groups_the_rules_name(
    changes: dict[str, Any], expected: str | None
) -> None:
    cfg = config(headers=POLICY, **changes)
    compiled = compile_identity_rules(cfg)["app"]
    out = plan_identity_headers(identity(groups=GROUPS), None, compiled).headers
    assert dict(out).get("X-Forwarded-Groups") == expected


# ---------------------------------------------------------------------------------------------
# The budget: a user in 500 groups
# ---------------------------------------------------------------------------------------------

MANY = tuple(f"engineering-team-{i:03d}" for i in range(500))  # 20 characters each


def test_a_user_in_500_groups_is_cut_to_the_budget_and_still_forwarded() -> None:
    ident = identity(email="alice@example.com", groups=MANY, preferred_username="alice")
    full = len(",".join(MANY))
    assert full > 8192
    result = plan_identity_headers(ident, None, DEFAULT_IDENTITY_RULES)
    out = dict(result.headers)
    assert wire_size(result.headers) <= 8192
    assert result.size == wire_size(result.headers)
    kept = out["X-Forwarded-Groups"].split(",")
    assert kept == list(MANY[: len(kept)])  # whole groups, from the front, in order
    assert 8192 - wire_size(result.headers) < 22  # not one more group would fit
    assert out["X-Forwarded-User"] == "alice"
    assert out["X-Forwarded-Email"] == "alice@example.com"
    assert out["X-Forwarded-Preferred-Username"] == "alice"
    assert result.groups == tuple(kept)
    assert result.trimmed == (f"X-Forwarded-Groups: {len(kept)} of 500 values kept",)


def test_under_the_budget_nothing_is_cut() -> None:
    result = plan_identity_headers(identity(groups=MANY[:100]), None, DEFAULT_IDENTITY_RULES)
    assert result.trimmed == ()
    assert dict(result.headers)["X-Forwarded-Groups"] == ",".join(MANY[:100])


def test_groups_filter_keeps_500_groups_under_the_limit_without_cutting() -> None:
    ident = identity(groups=(*MANY, "wiki-editors"))
    result = plan_identity_headers(ident, None, rules(groups_filter="wiki-.*"))
    assert dict(result.headers)["X-Forwarded-Groups"] == "wiki-editors"
    assert result.trimmed == ()


def test_a_small_budget_drops_lists_then_optional_headers_from_the_last() -> None:
    ident = identity(email="alice@example.com", groups=MANY, preferred_username="alice-w")
    result = plan_identity_headers(ident, None, rules(max_bytes=512))
    assert [n for n, _ in result.headers] == ["X-Forwarded-User", "X-Forwarded-Email",
                                              "X-Forwarded-Groups",
                                              "X-Forwarded-Preferred-Username"]
    assert 512 - 21 < wire_size(result.headers) <= 512
    # User (25 bytes) + e-mail (38) fit in 64 bytes; the preferred username (41) does not.
    tight = IdentityRules(max_bytes=64)
    result = plan_identity_headers(ident, None, tight)
    assert result.headers == (("X-Forwarded-User", "alice"),
                              ("X-Forwarded-Email", "alice@example.com"))
    assert result.trimmed == ("X-Forwarded-Groups: 0 of 500 values kept",
                              "X-Forwarded-Preferred-Username: left out")


def test_required_headers_are_never_dropped_even_over_the_budget() -> None:
    ident = identity({"tenant": "t" * 1000}, groups=MANY)
    result = plan_identity_headers(
        ident, "x" * 2000,
        rules(send={"X-Tenant": "tenant", "X-Groups": "groups"}, required=["X-Tenant"],
              max_bytes=512))
    names = [n for n, _ in result.headers]
    assert names == ["X-Tenant", "X-Forwarded-Access-Token"]
    assert result.trimmed[-1].startswith("required headers alone take")


def test_the_largest_list_is_cut_first() -> None:
    ident = identity({"roles": [f"role-{i:04d}" for i in range(100)]}, groups=MANY)
    result = plan_identity_headers(
        ident, None, rules(send={"X-Roles": "roles", "X-Groups": "groups"}, encoding="utf8"))
    out = dict(result.headers)
    assert out["X-Roles"].count(",") == 99  # 1 KB of roles: untouched
    assert 0 < out["X-Groups"].count(",") < 499
    assert wire_size(result.headers) <= 8192


def test_a_required_list_keeps_at_least_one_member() -> None:
    required = rules(send={"X-Groups": "groups"}, required=["X-Groups"])
    result = plan_identity_headers(identity(groups=(" bad", *MANY)), None,
                                   dataclasses.replace(required, max_bytes=20))
    assert result.headers == (("X-Groups", "engineering-team-000"),)
    assert result.trimmed[-1] == "required headers alone take 32 bytes, over 20"


# ---------------------------------------------------------------------------------------------
# What the client sends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spoofed", ["X-User-Id", "x-user-id", "X_User_Id", "X-ROLES", "X-Gateway-Assertion",
                "x_gateway_assertion"]
)
@pytest.mark.parametrize("signed_in", [True, False], ids=["protected", "public"])
def test_client_copies_of_configured_headers_never_reach_the_upstream(
    spoofed: str, signed_in: bool
) -> None:
    cfg = config(routes=[
        route(headers={"send": {"X-User-Id": "sub"}}),
        {"name": "other", "match": {"path": "/other/"}, "upstream": "http://127.0.0.1:9",
         "headers": {"send": {"X-Roles": "realm_access.roles"}}, "auth": "public"},
    ])
    names = configured_identity_headers(cfg)
    assert {canonical(n) for n in names} == {"x-user-id", "x-roles"}
    policy = HeaderPolicy(strip_patterns=DEFAULT_STRIP_HEADERS, own_cookie_name="_gw",
                          identity_names=names)
    ident = identity() if signed_in else None
    added = plan_identity_headers(ident, None, compile_identity_rules(cfg)["app"]).headers
    out = policy.upstream_request_headers(
        [(spoofed, "admin"), ("Accept", "*/*")], identity=ident, access_token=None,
        forwarded=FWD, host_header="app.example.com", added=added)
    assert all(v != "admin" for _, v in out)
    assert (("X-User-Id", "u-1") in out) is signed_in


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def problems(**changes: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(**changes)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"send": {}}, "headers.send: names no header"),
        ({"send": {"X User": "sub"}}, "headers.send: 'X User' is not a header name"),
        ({"send": {"Host": "sub"}}, "headers.send: 'Host' cannot carry an identity"),
        ({"send": {"x_gateway_assertion": "sub"}}, "headers.send: 'x_gateway_assertion' cannot"),
        ({"send": {"Authorization": "sub"}}, "headers.send: 'Authorization' cannot"),
        ({"send": {"X-Request-Id": "sub"}}, "headers.send: 'X-Request-Id' cannot"),
        ({"send": {"X-A": "sub", "x_a": "email"}}, "headers.send: 'X-A' and 'x_a' are one header"),
        ({"send": {"X-A": "https://x/roles"}}, "headers.send: X-A: 'https://x/roles' is not a "
                                               "claim path"),
        ({"separator": "x"}, "headers.separator: must be 1 to 3 of the characters"),
        ({"separator": "-"}, "headers.separator: must be 1 to 3 of the characters"),
        ({"encoding": "latin1"}, "headers.encoding: must be one of"),
        ({"groups_filter": "("}, "headers.groups_filter: '(' is not a regular expression"),
        ({"required": ["X-A"]}, "headers: required names headers of send"),
        ({"send": {"X-A": "sub"}, "required": ["X-B"]},
         "headers: 'X-B' is not one of the headers of send"),
        ({"max_bytes": 100}, "headers.max_bytes: Input should be greater than or equal to 512"),
    ],
)
def test_header_settings_that_cannot_mean_anything_are_refused(
    headers: dict[str, Any], expected: str
) -> None:
    found = problems(headers=headers)
    assert any(p.startswith(expected) for p in found), found


def test_a_route_required_header_must_be_in_the_send_it_ends_up_with() -> None:
    found = problems(headers={"send": {"X-A": "sub"}},
                     routes=[route(headers={"required": ["X-B"]})])
    assert found == ["routes[0].headers: with the top-level headers: 'X-B' is not one of the "
                     "headers of send"]


def test_route_headers_replace_the_top_level_keys_one_by_one() -> None:
    cfg = config(headers={"send": {"X-User-Id": "sub"}, "separator": ";", "max_bytes": 4096},
                 routes=[route(headers={"separator": "|", "groups_filter": "a.*"})])
    merged = cfg.headers_for(cfg.routes[0])
    assert merged.send == {"X-User-Id": "sub"}
    assert merged.separator == "|"
    assert merged.groups_filter == "a.*"
    assert merged.max_bytes == 4096


def test_a_space_separator_is_kept_as_written() -> None:
    cfg = config(headers={"separator": ", "})
    assert cfg.headers.separator == ", "


# ---------------------------------------------------------------------------------------------
# oidc-gateway explain shows what the live gateway sends
# ---------------------------------------------------------------------------------------------


def test_explain_shows_the_configured_headers_and_the_assertion() -> None:
    cfg = config(
        headers={"send": {"X-User-Id": "sub", "X-Groups": "groups"}, "groups_filter": "policy"},
        routes=[route(allow=[{"groups": ["eng"]}], assertion=True)],
    )
    ident = identity({"groups": list(MANY)}, groups=(*MANY, "eng"))
    shown = explain(cfg, method="GET", url="https://app.example.com/x", identity=ident,
                    client_ip="203.0.113.9",
                    headers=[("X-User-Id", "root"), ("X-Gateway-Assertion", "forged")])
    headers = dict(shown.headers)
    assert headers["X-User-Id"] == "u-1"
    assert headers["X-Groups"] == "eng"
    assert headers["X-Gateway-Assertion"].startswith("<JWT signed ES256, valid 60s: ")
    assert '"aud": "http://127.0.0.1:8080"' in headers["X-Gateway-Assertion"]
    assert '"groups": ["eng"]' in headers["X-Gateway-Assertion"]
    assert [v for n, v in shown.headers if canonical(n) == "x-user-id"] == ["u-1"]
    assert "X-Gateway-Assertion: <JWT signed ES256" in render(shown)


@pytest.mark.parametrize("assertion", [True, False])
def test_explain_knows_the_well_known_jwks_path_is_the_gateways_only_with_assertions(
    assertion: bool,
) -> None:
    cfg = config(routes=[route(assertion=assertion)])
    shown = explain(cfg, method="GET", url="https://app.example.com/.well-known/jwks.json",
                    identity=identity(), client_ip=None)
    assert shown.own_endpoint is assertion


def test_explain_says_what_the_budget_cuts() -> None:
    shown = explain(config(), method="GET", url="https://app.example.com/x",
                    identity=identity(groups=MANY), client_ip=None)
    assert shown.trimmed
    assert "cut:      to fit headers.max_bytes: X-Forwarded-Groups: " in render(shown)
