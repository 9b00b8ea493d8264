"""Pure tests of gateway.headers: spoofed identity headers, Connection, cookies, X-Forwarded-*,
CR/LF in claims, response headers and header limits."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from gateway import headers as headers_module
from gateway.config import DEFAULT_STRIP_HEADERS
from gateway.errors import Forbidden, HeadersTooLarge
from gateway.headers import (
    IDENTITY_HEADERS,
    Forwarded,
    HeaderPolicy,
    canonical,
    check_header_limits,
    forwarded_facts,
    upstream_response_headers,
)
from gateway.models import Identity
from gateway.routing import authority_host

Headers = list[tuple[str, str]]

POLICY = HeaderPolicy(strip_patterns=DEFAULT_STRIP_HEADERS, own_cookie_name="_oidc_gateway")
FWD = Forwarded(
    client_ip="203.0.113.9", proto="https", host="app.example.com", for_chain="203.0.113.9"
)
ALICE = Identity(
    sub="sub-a",
    user="alice",
    email="alice@example.com",
    email_verified=True,
    groups=("eng", "ops"),
    preferred_username="alice.w",
)
IDENTITY_CANONICAL = {canonical(h) for h in IDENTITY_HEADERS}


def upstream(
    headers: Headers,
    *,
    identity: Identity | None = ALICE,
    access_token: str | None = None,
    policy: HeaderPolicy = POLICY,
    request_id: str | None = None,
) -> Headers:
    return policy.upstream_request_headers(
        headers,
        identity=identity,
        access_token=access_token,
        forwarded=FWD,
        host_header="app.example.com",
        request_id=request_id,
    )


def named(headers: Headers, name: str) -> list[str]:
    """Every value of the header ``name``, in any spelling."""
    return [v for k, v in headers if canonical(k) == canonical(name)]


# ---------------------------------------------------------------------------------------------
# canonical
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X-Forwarded-User", "x-forwarded-user"),
        ("x_forwarded_user", "x-forwarded-user"),
        ("X_FORWARDED-USER", "x-forwarded-user"),
        ("Content-Type", "content-type"),
        ("TE", "te"),
    ],
)
def test_canonical(name: str, expected: str) -> None:
    assert canonical(name) == expected


# ---------------------------------------------------------------------------------------------
# Identity headers never come from the client
# ---------------------------------------------------------------------------------------------

SPOOFED_NAMES = [
    "X-Forwarded-User",
    "x-forwarded-user",
    "X_Forwarded_User",
    "X-FORWARDED-USER",
    "x_forwarded-user",
    "X-Forwarded_User",
    "X-Forwarded-Email",
    "x_forwarded_email",
    "X-Forwarded-Groups",
    "X_FORWARDED_GROUPS",
    "X-Forwarded-Preferred-Username",
    "x_forwarded_preferred_username",
    "X-Forwarded-Access-Token",
    "x-forwarded_access_token",
]


@pytest.mark.parametrize("identity", [ALICE, None], ids=["protected", "public"])
@pytest.mark.parametrize("spoofed", SPOOFED_NAMES)
def test_client_identity_headers_never_reach_the_upstream(
    spoofed: str, identity: Identity | None
) -> None:
    sent = [
        ("Accept", "*/*"),
        (spoofed, "admin"),
        (spoofed, "admin2"),  # duplicates too
        (spoofed.lower(), "admin3"),
    ]
    out = upstream(sent, identity=identity)
    values = [v for k, v in out if canonical(k) in IDENTITY_CANONICAL]
    assert not any(v.startswith("admin") for v in values)
    spellings = [k for k, _ in out if canonical(k) in IDENTITY_CANONICAL]
    assert all(k in IDENTITY_HEADERS for k in spellings)  # only our own spelling
    if identity is None:
        assert values == []
    else:
        assert named(out, "X-Forwarded-User") == ["alice"]
        assert named(out, "X-Forwarded-Access-Token") == []


def test_identity_headers_added() -> None:
    out = upstream([("Accept", "text/html")], access_token="at-123")
    assert out == [
        ("Accept", "text/html"),
        ("Host", "app.example.com"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example.com"),
        ("X-Forwarded-User", "alice"),
        ("X-Forwarded-Email", "alice@example.com"),
        ("X-Forwarded-Groups", "eng,ops"),
        ("X-Forwarded-Preferred-Username", "alice.w"),
        ("X-Forwarded-Access-Token", "at-123"),
    ]


def test_public_route_gets_forwarding_but_no_identity() -> None:
    out = upstream([("X-Forwarded-User", "admin")], identity=None)
    assert out == [
        ("Host", "app.example.com"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example.com"),
    ]


def test_optional_identity_headers_left_out_when_unknown() -> None:
    out = upstream([], identity=Identity(sub="s", user="u"))
    assert named(out, "X-Forwarded-User") == ["u"]
    for name in (
        "X-Forwarded-Email",
        "X-Forwarded-Groups",
        "X-Forwarded-Preferred-Username",
        "X-Forwarded-Access-Token",
    ):
        assert named(out, name) == []


@pytest.mark.parametrize(
    "name",
    [
        "X-Auth-Request-User",
        "x-auth-request-email",
        "X_Auth_Request_Groups",
        "X-Auth-Request-Access-Token",
        "X-Auth-Request-Preferred-Username",
        "Remote-User",
        "remote_user",
        "Remote-Email",
        "Remote-Groups",
        "Remote-Name",
        "X-Remote-User",
        "X_Remote_User",
        "X-WebAuth-User",
        "x-webauth-user",
    ],
)
def test_other_gateways_identity_headers_are_stripped(name: str) -> None:
    out = upstream([(name, "admin"), ("Accept", "*/*")])
    assert named(out, name) == []
    assert ("Accept", "*/*") in out


def test_strip_patterns_from_config() -> None:
    policy = HeaderPolicy(strip_patterns=["X-Custom-*", "My-User", " Spaced "], own_cookie_name="c")
    sent = [
        ("X-Custom-A", "1"),
        ("x_custom_b", "2"),
        ("My_User", "3"),
        ("Spaced", "4"),
        ("X-Customer", "5"),
        ("Remote-User", "6"),
    ]
    out = upstream(sent, policy=policy)
    kept = [k for k, _ in out if not k.startswith(("Host", "X-Forwarded-"))]
    assert kept == ["X-Customer", "Remote-User"]  # the defaults are not implied


def test_a_pattern_of_only_star_is_refused() -> None:
    with pytest.raises(ValueError, match="every header"):
        HeaderPolicy(strip_patterns=["*"], own_cookie_name="c")


# ---------------------------------------------------------------------------------------------
# Hop-by-hop, Connection, forwarding, method overrides, Host
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
        "proxy_connection",
        # forwarding facts the gateway computes itself
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "X-Forwarded-Uri",
        "X-Original-URI",
        "X-Real-IP",
        "x_real_ip",
        "Forwarded",
        # security note 17
        "X-HTTP-Method-Override",
        "x_http_method_override",
        "X-HTTP-Method",
        "X-Method-Override",
        "Host",
    ],
)
def test_dropped_request_headers(name: str) -> None:
    out = upstream([(name, "spoofed"), ("Accept", "*/*")], identity=None)
    assert "spoofed" not in [v for _, v in out]
    assert ("Accept", "*/*") in out


def test_host_is_set_once_from_host_header() -> None:
    out = upstream([("Host", "evil.test"), ("host", "evil2.test")])
    assert named(out, "Host") == ["app.example.com"]


@pytest.mark.parametrize("identity", [ALICE, None], ids=["protected", "public"])
def test_connection_cannot_remove_the_gateways_headers(identity: Identity | None) -> None:
    sent = [
        ("Connection", "X-Forwarded-For, x_forwarded_user"),
        ("connection", "X-Custom , X-Forwarded-Host,Host"),
        ("X-Custom", "hop"),
        ("X-Keep", "end-to-end"),
    ]
    out = upstream(sent, identity=identity)
    assert named(out, "X-Custom") == []
    assert named(out, "Connection") == []
    assert named(out, "X-Keep") == ["end-to-end"]
    assert named(out, "X-Forwarded-For") == ["203.0.113.9"]
    assert named(out, "X-Forwarded-Host") == ["app.example.com"]
    assert named(out, "Host") == ["app.example.com"]
    assert named(out, "X-Forwarded-User") == (["alice"] if identity else [])


def test_connection_tokens_compare_canonically() -> None:
    out = upstream([("Connection", "x_custom_hop"), ("X-Custom-Hop", "1"), ("Other", "2")])
    assert named(out, "X-Custom-Hop") == []
    assert named(out, "Other") == ["2"]


def test_end_to_end_headers_are_kept_in_order_and_byte_exact() -> None:
    sent = [
        ("Accept", "text/html, */*;q=0.1"),
        ("Authorization", "Bearer app-token"),
        ("X-Request-Id", "abc"),
        ("X-Request-Id", "def"),
        ("User-Agent", "Mozilla/5.0  (two spaces)"),
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Sec-WebSocket-Key", "k"),
    ]
    out = upstream(sent, identity=None)
    assert out[: len(sent)] == sent


# ---------------------------------------------------------------------------------------------
# Cookies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("a=1; _oidc_gateway=ticket; b=2", "a=1; b=2"),
        ("_oidc_gateway=ticket", None),
        ("_oidc_gateway=ticket; _oidc_gateway_login=bind", None),
        ("_oidc_gateway_login=bind; a=1", "a=1"),
        ("a=1;_oidc_gateway=t;b=2", "a=1; b=2"),
        ("a=1; _oidc_gateway=; b", "a=1; b"),
        ("a=1; _oidc_gateway=t;", "a=1"),
        # not ours: kept byte-exact
        ("a=1;b=2", "a=1;b=2"),
        ('a=1;  b="x y"', 'a=1;  b="x y"'),
        ("_oidc_gatewayx=1; a=1", "_oidc_gatewayx=1; a=1"),
        ("x=_oidc_gateway", "x=_oidc_gateway"),
        ("_OIDC_GATEWAY=1", "_OIDC_GATEWAY=1"),  # names are case-sensitive (RFC 6265)
        ("oidc_gateway=1", "oidc_gateway=1"),
    ],
)
def test_own_cookies_removed(cookie: str, expected: str | None) -> None:
    out = upstream([("Cookie", cookie)])
    assert named(out, "Cookie") == ([] if expected is None else [expected])


def test_own_cookies_removed_from_every_cookie_header() -> None:
    sent = [("Cookie", "_oidc_gateway=t"), ("cookie", "a=1"), ("COOKIE", "b=2; _oidc_gateway=t")]
    out = upstream(sent)
    assert [(k, v) for k, v in out if canonical(k) == "cookie"] == [
        ("cookie", "a=1"),
        ("COOKIE", "b=2"),
    ]


# ---------------------------------------------------------------------------------------------
# CR/LF and other controls in identity values (security note 8)
# ---------------------------------------------------------------------------------------------


def test_identity_values_that_cannot_be_sent_exactly_are_left_out() -> None:
    # Cleaning "ops\r\n" into "ops" or " admins" into "admins" would hand the app another
    # group (or user) than the provider named: such values are left out, never rewritten.
    identity = Identity(
        sub="s",
        user="bob",
        email="bob@example.com\n",
        groups=("eng", "a,b", "ops\r\n", "\x00", "q\ta", " admins", "x\u2028y", "Zoë"),
        preferred_username="b\x00o\x7fb",
    )
    out = upstream([], identity=identity, access_token="tok\r\n")
    for name, value in out:
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name + value), (name, value)
    assert named(out, "X-Forwarded-User") == ["bob"]
    assert named(out, "X-Forwarded-Email") == []
    assert named(out, "X-Forwarded-Groups") == ["eng,Zoë"]  # "a,b" would split: left out
    assert named(out, "X-Forwarded-Preferred-Username") == []
    assert named(out, "X-Forwarded-Access-Token") == []


@pytest.mark.parametrize(
    "user",
    ["bob\r\nX-Injected: 1", "alice\n", " alice", "alice ", "al\x00ice", "a\x85b", "\ud800",
     "a" * 1025],
)
def test_a_user_name_that_cannot_be_sent_exactly_refuses_the_request(user: str) -> None:
    with pytest.raises(Forbidden) as info:
        upstream([], identity=Identity(sub="s", user=user), access_token=None)
    assert info.value.reason == "identity_unsafe"


def test_groups_header_left_out_when_no_group_survives() -> None:
    out = upstream([], identity=Identity(sub="s", user="u", groups=("a,b", "\r\n")))
    assert named(out, "X-Forwarded-Groups") == []


# ---------------------------------------------------------------------------------------------
# forwarded_facts
# ---------------------------------------------------------------------------------------------

TRUSTED = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "sent", "expected"),
    [
        # untrusted peer: its X-Forwarded-* are ignored
        (
            "203.0.113.5",
            [
                ("X-Forwarded-For", "1.2.3.4"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "evil.test"),
            ],
            Forwarded("203.0.113.5", "http", "app.example.com:8080", "203.0.113.5"),
        ),
        ("", [("X-Forwarded-For", "1.2.3.4")], Forwarded("", "http", "app.example.com:8080", "")),
        (
            "garbage",
            [("X-Forwarded-For", "1.2.3.4")],
            Forwarded("garbage", "http", "app.example.com:8080", "garbage"),
        ),
        (
            "11.0.0.1",
            [("X-Forwarded-For", "1.2.3.4")],
            Forwarded("11.0.0.1", "http", "app.example.com:8080", "11.0.0.1"),
        ),
        # trusted peer
        (
            "10.0.0.2",
            [
                ("X-Forwarded-For", "198.51.100.7"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "App.Example.com"),
            ],
            Forwarded("198.51.100.7", "https", "app.example.com", "198.51.100.7, 10.0.0.2"),
        ),
        ("10.0.0.2", [], Forwarded("10.0.0.2", "http", "app.example.com:8080", "10.0.0.2")),
        # the rightmost untrusted entry is the client; what is left of it may be forged
        (
            "10.0.0.2",
            [("X-Forwarded-For", "1.1.1.1, 198.51.100.7, 10.0.0.3")],
            Forwarded(
                "198.51.100.7",
                "http",
                "app.example.com:8080",
                "1.1.1.1, 198.51.100.7, 10.0.0.3, 10.0.0.2",
            ),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-For", "1.1.1.1"), ("x-forwarded-for", "198.51.100.7")],
            Forwarded(
                "198.51.100.7", "http", "app.example.com:8080", "1.1.1.1, 198.51.100.7, 10.0.0.2"
            ),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-For", "10.1.1.1, 10.0.0.3")],
            Forwarded("10.1.1.1", "http", "app.example.com:8080", "10.1.1.1, 10.0.0.3, 10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-For", "198.51.100.7, unknown, 10.0.0.3")],
            Forwarded(
                "10.0.0.3",
                "http",
                "app.example.com:8080",
                "198.51.100.7, unknown, 10.0.0.3, 10.0.0.2",
            ),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-For", "198.51.100.7:5555")],
            Forwarded(
                "198.51.100.7", "http", "app.example.com:8080", "198.51.100.7:5555, 10.0.0.2"
            ),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-For", "[2001:db8::7]:5555")],
            Forwarded(
                "2001:db8::7", "http", "app.example.com:8080", "[2001:db8::7]:5555, 10.0.0.2"
            ),
        ),
        (
            "::ffff:10.0.0.2",
            [("X-Forwarded-For", "198.51.100.7")],
            Forwarded(
                "198.51.100.7", "http", "app.example.com:8080", "198.51.100.7, ::ffff:10.0.0.2"
            ),
        ),
        (
            "fd00::2",
            [("X-Forwarded-For", "2001:db8::7")],
            Forwarded("2001:db8::7", "http", "app.example.com:8080", "2001:db8::7, fd00::2"),
        ),
        # proto: http/https only, the rightmost value
        (
            "10.0.0.2",
            [("X-Forwarded-Proto", "HTTPS")],
            Forwarded("10.0.0.2", "https", "app.example.com:8080", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Proto", "ftp")],
            Forwarded("10.0.0.2", "http", "app.example.com:8080", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Proto", "javascript")],
            Forwarded("10.0.0.2", "http", "app.example.com:8080", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Proto", "http, https")],
            Forwarded("10.0.0.2", "https", "app.example.com:8080", "10.0.0.2"),
        ),
        # host: validated, else ignored
        (
            "10.0.0.2",
            [("X-Forwarded-Host", "app.example.com:8443")],
            Forwarded("10.0.0.2", "http", "app.example.com:8443", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Host", "a.test, app.example.com")],
            Forwarded("10.0.0.2", "http", "app.example.com", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Host", "evil.test/path")],
            Forwarded("10.0.0.2", "http", "app.example.com:8080", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Host", "user@evil.test")],
            Forwarded("10.0.0.2", "http", "app.example.com:8080", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Host", "evil.test:99999")],
            Forwarded("10.0.0.2", "http", "app.example.com:8080", "10.0.0.2"),
        ),
        (
            "10.0.0.2",
            [("X-Forwarded-Host", "[::1]:8443")],
            Forwarded("10.0.0.2", "http", "[::1]:8443", "10.0.0.2"),
        ),
    ],
)
def test_forwarded_facts(peer: str, sent: Headers, expected: Forwarded) -> None:
    got = forwarded_facts(
        peer_ip=peer, headers=sent, trusted=TRUSTED, scheme="http", host="app.example.com:8080"
    )
    assert got == expected


def test_no_trusted_proxies_means_no_x_forwarded_belief() -> None:
    got = forwarded_facts(
        peer_ip="10.0.0.2",
        headers=[("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-Proto", "https")],
        trusted=[],
        scheme="http",
        host="h",
    )
    assert got == Forwarded("10.0.0.2", "http", "h", "10.0.0.2")


def test_trusted_chain_reaches_the_upstream() -> None:
    facts = forwarded_facts(
        peer_ip="10.0.0.2",
        headers=[("X-Forwarded-For", "198.51.100.7")],
        trusted=TRUSTED,
        scheme="https",
        host="app.example.com",
    )
    out = POLICY.upstream_request_headers(
        [("X-Forwarded-For", "198.51.100.7")],
        identity=None,
        access_token=None,
        forwarded=facts,
        host_header="app.example.com",
    )
    assert named(out, "X-Forwarded-For") == ["198.51.100.7, 10.0.0.2"]


@pytest.mark.parametrize(
    "authority",
    [
        "example.com",
        "Example.com:443",
        "[::1]:80",
        "[::1",
        "a b",
        "u@h",
        "h:",
        "h:0",
        "h:65536",
        "exämple.com",
        "example.com.",
        "a..b",
        "[fe80::1%25x]",
        "",
    ],
)
def test_host_check_agrees_with_routing(authority: str) -> None:
    # headers repeats routing's Host syntax check (siblings in layer 0 don't import each other)
    assert headers_module._authority_host(authority) == authority_host(authority)


# ---------------------------------------------------------------------------------------------
# Response headers
# ---------------------------------------------------------------------------------------------


def test_upstream_response_headers() -> None:
    answer = [
        ("Content-Type", "text/html"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("x_hop", "2"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("Proxy-Authenticate", "Basic"),
        ("Trailer", "X-Checksum"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Content-Length", "42"),
        ("Content-Encoding", "gzip"),
        ("Cache-Control", "no-cache"),
    ]
    assert upstream_response_headers(answer) == [
        ("Content-Type", "text/html"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Content-Length", "42"),
        ("Content-Encoding", "gzip"),
        ("Cache-Control", "no-cache"),
    ]


def test_upstream_response_headers_without_connection() -> None:
    answer = [("Content-Length", "0"), ("Vary", "Accept"), ("Vary", "Cookie")]
    assert upstream_response_headers(answer) == answer


def test_the_request_id_sent_either_way_is_the_gateways_own() -> None:
    """The client's and the upstream's X-Request-Id, in any spelling, are replaced by the
    gateway's, which goes last (after the identity headers on the way in)."""
    sent = upstream([("X-Request-Id", "forged"), ("x_request_id", "forged2"), ("Accept", "*/*")],
                    request_id="abc123")
    assert named(sent, "X-Request-Id") == ["abc123"]
    assert sent[-1] == ("X-Request-Id", "abc123")
    assert ("Accept", "*/*") in sent
    answer = [("X-Request-Id", "app-id"), ("Connection", "close"), ("Content-Length", "2")]
    assert upstream_response_headers(answer, "abc123") == [
        ("Content-Length", "2"), ("X-Request-Id", "abc123")]
    assert upstream_response_headers(answer) == [
        ("X-Request-Id", "app-id"), ("Content-Length", "2")]


# ---------------------------------------------------------------------------------------------
# Limits (security note 18)
# ---------------------------------------------------------------------------------------------


def _headers(count: int, size: int = 1) -> Headers:
    return [(f"X-H{i}", "v" * size) for i in range(count)]


@pytest.mark.parametrize(
    ("sent", "max_count", "max_bytes", "too_large"),
    [
        (_headers(10), 10, 10_000, False),
        (_headers(11), 10, 10_000, True),
        ([], 10, 10, False),
        ([("A", "x" * 95)], 10, 100, False),  # 1 + 95 + 4 (": " and CRLF) = 100
        ([("A", "x" * 96)], 10, 100, True),
        ([("A", "é" * 48)], 10, 100, True),  # counted in UTF-8 bytes: 1 + 96 + 4
        ([("A", "\udcff" * 95)], 10, 100, False),  # surrogateescape'd raw bytes: one each
        (_headers(5, 100), 10, 540, False),  # 5 x (4 + 100 + 4)
        (_headers(5, 100), 10, 539, True),
    ],
)
def test_check_header_limits(
    sent: Headers, max_count: int, max_bytes: int, too_large: bool
) -> None:
    if too_large:
        with pytest.raises(HeadersTooLarge) as caught:
            check_header_limits(sent, max_count=max_count, max_bytes=max_bytes)
        assert caught.value.status_hint == 431
    else:
        check_header_limits(sent, max_count=max_count, max_bytes=max_bytes)
