"""Properties of the upstream request-header builder: what the client sends can never pose as
what the gateway says, and what the gateway says can never break the request.

The client's headers are generated as aiohttp's server hands them over (names are RFC 9110
tokens: it answers 400 to anything else; values may hold obs-text, which it decodes with
surrogateescape) and built from the shapes spoofing attacks take: our identity headers and
other gateways' in any case and with ``_`` for ``-``, duplicates, forwarding headers, method
overrides, hop-by-hop headers, and ``Connection`` naming any of them. Whether a client header
"is" a protected one is judged the way upstream frameworks read names (WSGI/CGI/PHP:
``HTTP_`` + upper case with ``-`` as ``_``), written out here independently of
``gateway.headers.canonical``.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config import DEFAULT_STRIP_HEADERS
from gateway.errors import Forbidden
from gateway.headers import MAX_IDENTITY_VALUE, Forwarded, HeaderPolicy
from gateway.models import Identity

COOKIE = "_oidc_gateway"
POLICY = HeaderPolicy(strip_patterns=DEFAULT_STRIP_HEADERS, own_cookie_name=COOKIE)
FORWARDED = Forwarded(
    client_ip="203.0.113.9", proto="https", host="app.example.com",
    for_chain="198.51.100.7, 203.0.113.9",
)

OURS = [
    "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username", "X-Forwarded-Access-Token",
]
FORWARDING = [
    "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port",
    "X-Forwarded-Uri", "X-Original-URI", "X-Real-IP", "Forwarded",
]
METHOD_OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]
HOP_BY_HOP = [
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Proxy-Connection",
]
OTHER_GATEWAYS = [
    "X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups",
    "X-Auth-Request-Access-Token", "X-Auth-Request-Preferred-Username", "X-Auth-Request-",
    "Remote-User", "Remote-Email", "Remote-Groups", "Remote-Name", "X-Remote-User",
    "X-WebAuth-User",
]
HARMLESS = [
    "Accept", "Content-Type", "User-Agent", "X-Request-Id", "X-Forwarded", "X-Forwarded-Userx",
    "X-Forwarded-Users", "Remote-Userx", "X-Auth-Requests", "Authorization", "Cookie",
]


def cgi_key(name: str) -> str:
    """How WSGI, CGI and PHP name a header (``HTTP_X_FORWARDED_USER``), and so which client
    headers an upstream framework reads as the same header."""
    return "HTTP_" + name.upper().replace("-", "_")


# Every name the upstream must only ever get from the gateway, as the upstream reads names.
PROTECTED_KEYS = frozenset(
    cgi_key(n) for n in [*OURS, *FORWARDING, *METHOD_OVERRIDES, *HOP_BY_HOP, "Host"]
    + [n for n in OTHER_GATEWAYS if not n.endswith("-")]
)
PROTECTED_PREFIXES = (cgi_key("X-Auth-Request-"),)


def protected(name: str) -> bool:
    key = cgi_key(name)
    return key in PROTECTED_KEYS or key.startswith(PROTECTED_PREFIXES)


# aiohttp's client refuses these in a header (http_writer._FORBIDDEN_HEADER_CHARS_RE) and then
# fails the request; it also encodes headers as strict UTF-8, so surrogates fail too.
AIOHTTP_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@st.composite
def spelling(draw: st.DrawFn, name: str) -> str:
    """``name`` in a random spelling: each letter's case and each ``-``/``_`` chosen anew."""
    out = []
    for ch in name:
        if ch in "-_":
            out.append(draw(st.sampled_from("-_")))
        elif ch.isalpha():
            out.append(draw(st.sampled_from([ch.lower(), ch.upper()])))
        else:
            out.append(ch)
    return "".join(out)


TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
header_name = st.one_of(
    st.sampled_from(OURS + FORWARDING + METHOD_OVERRIDES + HOP_BY_HOP + OTHER_GATEWAYS
                    + HARMLESS + ["Host"]).flatmap(spelling),
    st.sampled_from(OTHER_GATEWAYS[:6]).map(lambda p: p.rstrip("-") + "-Anything").flatmap(
        spelling
    ),
    st.text(alphabet=TCHAR, min_size=1, max_size=20),
)
# Header values as aiohttp's server delivers them: visible ASCII, space, tab, obs-text (bytes
# >= 0x80, as surrogates when they are not UTF-8, or as the characters they encode).
field_value = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.sampled_from(["\t", "é", "\u2028", "\udcff", "\udc85"]),
    ),
    max_size=30,
)
connection_value = st.lists(
    st.one_of(header_name, st.sampled_from(["", " ", "close", "keep-alive"])), max_size=4
).map(lambda names: ",".join(f" {n} " if i % 2 else n for i, n in enumerate(names)))
cookie_value = st.lists(
    st.tuples(
        st.sampled_from([COOKIE, COOKIE + "_bind", COOKIE + "_x", "_oidc_gatewayx", "a", "sid",
                         "_OIDC_GATEWAY", " " + COOKIE]),
        st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=8),
    ),
    max_size=4,
).map(lambda pairs: "; ".join(f"{k}={v}" for k, v in pairs))
client_header = st.one_of(
    st.tuples(header_name, field_value),
    st.tuples(st.sampled_from(["Connection", "connection", "CONNECTION"]), connection_value),
    st.tuples(st.sampled_from(["Cookie", "cookie"]), cookie_value),
)
client_headers = st.lists(client_header, max_size=12)

# Identity values come from the provider's JSON, which can carry anything: controls, lone
# surrogates (JSON's "\ud800"), Unicode line separators, commas and spaces.
NASTY = ["\r", "\n", "\x00", "\x0b", "\x7f", "\x85", "\u2028", "\u2029", "\ud800",
         "\udfff", ",", " ", "\t", "é", "\ufeff"]
claim_text = st.text(alphabet=st.one_of(st.characters(), st.sampled_from(NASTY)), max_size=20)
GROUP_NAMES = ["eng", "admins", "eng,admins", " admins", "admins ", "admins\x00", "adm\r\nins",
               "admins\t", "ad\u2028mins", "admins\ud800", "", ",", "eng, admins"]
identity = st.builds(
    Identity,
    sub=st.just("sub-1"),
    user=st.one_of(st.sampled_from(["alice", "alice\r\nX-Forwarded-User: admin"]), claim_text),
    email=st.one_of(st.none(), claim_text),
    groups=st.lists(st.one_of(st.sampled_from(GROUP_NAMES), claim_text), max_size=5).map(tuple),
    preferred_username=st.one_of(st.none(), claim_text),
)


# Characters no identity header value may carry: Unicode controls (C0, DEL, C1), lone
# surrogates (not UTF-8), and the line and paragraph separators that some parsers split on.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _plain(text: str | None, max_length: int | None = MAX_IDENTITY_VALUE) -> bool:
    """A value HTTP carries exactly as it is: not empty, no unsafe character, no white space
    at either end (HTTP drops spaces and tabs there; apps trim more: Go's TrimSpace, Python's
    strip), and not absurdly long. The only identity values the gateway may send."""
    if not text:
        return False
    return (
        not any(unicodedata.category(c) in UNSAFE_CATEGORIES for c in text)
        and text == text.strip()
        and (max_length is None or len(text) <= max_length)
    )


def build(
    headers: Sequence[tuple[str, str]], ident: Identity | None, token: str | None
) -> list[tuple[str, str]]:
    return POLICY.upstream_request_headers(
        headers, identity=ident, access_token=token, forwarded=FORWARDED,
        host_header="app.example.com",
    )


def added_names(ident: Identity | None, token: str | None) -> list[str]:
    """The headers the gateway itself adds, in order: identity values only when they can be
    sent exactly, the groups header only when at least one group can."""
    names = ["Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"]
    if ident is not None:
        names.append("X-Forwarded-User")
        if _plain(ident.email):
            names.append("X-Forwarded-Email")
        if any(_plain(g) and "," not in g for g in ident.groups):
            names.append("X-Forwarded-Groups")
        if _plain(ident.preferred_username):
            names.append("X-Forwarded-Preferred-Username")
    if _plain(token, max_length=None):
        names.append("X-Forwarded-Access-Token")
    return names


def build_or_refuse(
    headers: Sequence[tuple[str, str]], ident: Identity | None, token: str | None
) -> list[tuple[str, str]] | None:
    """The upstream headers, or None when the request is refused because the user name cannot
    be sent exactly (then nothing reaches the upstream, and that must be the only reason)."""
    try:
        out = build(headers, ident, token)
    except Forbidden:
        assert ident is not None
        assert not _plain(ident.user)
        return None
    assert ident is None or _plain(ident.user)
    return out


@given(client_headers, st.one_of(st.none(), identity), st.one_of(st.none(), claim_text))
@example([("X_Forwarded_User", "admin"), ("Connection", "X-Forwarded-User")], None, None)
@example([("Connection", "x_forwarded_user, X-Forwarded-For, host")],
         Identity(sub="s", user="alice"), None)
@example([("x-auth-request-user", "admin"), ("REMOTE_USER", "admin")], None, None)
def test_no_client_sent_identity_header_reaches_the_upstream(
    headers: list[tuple[str, str]], ident: Identity | None, token: str | None
) -> None:
    """Whatever the client sends, every header the upstream reads as an identity, forwarding,
    method-override or hop-by-hop header is the gateway's own, once, in its own spelling; a
    client's ``Connection`` removes the headers it names from the client's request and never
    the gateway's; everything else the client sent passes in order; and the gateway's cookies
    never do."""
    out = build_or_refuse(headers, ident, token)
    if out is None:
        return
    names = added_names(ident, token)
    client_part, gateway_part = out[: len(out) - len(names)], out[len(out) - len(names) :]
    assert [k for k, _ in gateway_part] == names

    named_by_connection = {
        cgi_key(token.strip())
        for k, v in headers if cgi_key(k) == cgi_key("Connection")
        for token in v.split(",")
    }
    expected_client = []
    for k, v in headers:
        if protected(k) or cgi_key(k) in named_by_connection:
            continue
        if cgi_key(k) == cgi_key("Cookie"):
            pairs = [p.strip() for p in v.split(";") if p.strip()]
            kept = [p for p in pairs
                    if not (p.partition("=")[0].strip() == COOKIE
                            or p.partition("=")[0].strip().startswith(COOKIE + "_"))]
            if len(kept) != len(pairs):  # untouched Cookie headers pass byte for byte
                v = "; ".join(kept)
            if not v:
                continue
        expected_client.append((k, v))
    assert client_part == expected_client
    assert not any(protected(k) for k, _ in client_part)
    assert ("X-Forwarded-For", FORWARDED.for_chain) in gateway_part
    assert ("X-Forwarded-Host", FORWARDED.host) in gateway_part


# Identity values as the provider's JSON can carry them, with a plain user name, so the request
# is not refused and every added value is inspected.
identity_sent = st.builds(
    Identity,
    sub=st.just("sub-1"),
    user=st.sampled_from(["alice", "Ålice Ünicode", "a" * MAX_IDENTITY_VALUE]),
    email=st.one_of(st.none(), claim_text),
    groups=st.lists(st.one_of(st.sampled_from(GROUP_NAMES), claim_text), max_size=5).map(tuple),
    preferred_username=st.one_of(st.none(), claim_text),
)


@given(identity_sent, st.one_of(st.none(), claim_text))
@example(Identity(sub="s", user="alice", email="e\x85", groups=("g\u2028", "\ud800")),
         "t\r\nX: 1")
def test_identity_values_never_break_or_split_a_header(
    ident: Identity, token: str | None
) -> None:
    """Identity values with arbitrary Unicode and control characters never produce a header
    value with CR, LF, NUL or another control, a lone surrogate or a line separator (aiohttp's
    client would refuse it - a 500 - or an upstream could split it into a second header), nor
    one with white space at either end, which the upstream would read as another value."""
    out = build([], ident, token)
    for name, value in out:
        assert not AIOHTTP_FORBIDDEN.search(value), (name, value)
        value.encode("utf-8")
        assert not any(unicodedata.category(c) in UNSAFE_CATEGORIES for c in value), (name, value)
        assert value == value.strip(), (name, value)


@given(identity)
@example(Identity(sub="s", user="u", groups=("eng,admins",)))
@example(Identity(sub="s", user="u", groups=("eng", "admins\x00", " admins", "ad\r\nmins")))
@example(Identity(sub="s", user="u", groups=("eng", "admins\u3000", "admins\ud800")))
def test_upstream_reads_exactly_the_users_groups(ident: Identity) -> None:
    """However the provider spells group names, the groups the upstream reads (split on ",",
    trimmed as apps do) are groups the user has: ``eng,admins`` never grants ``admins``, nor
    do ``admins\\0``, `` admins`` or ``admins\\u3000``. Every plain group passes, in order."""
    out = build_or_refuse([], ident, None)
    if out is None:
        return
    values = [v for k, v in out if k == "X-Forwarded-Groups"]
    assert len(values) <= 1
    read = [g.strip() for g in values[0].split(",")] if values else []
    assert set(read) <= set(ident.groups), read
    assert read == [g for g in ident.groups if "," not in g and _plain(g)]


@given(identity, st.one_of(st.none(), claim_text))
@example(Identity(sub="s", user="alice\n"), None)
@example(Identity(sub="s", user=" admin"), None)
@example(Identity(sub="s", user="admin\ud800"), None)
def test_identity_values_pass_exactly_or_not_at_all(ident: Identity, token: str | None) -> None:
    """No account is ever shown to the upstream as another: a user name that HTTP cannot carry
    exactly refuses the request; an e-mail, preferred username or access token that cannot is
    left out; every value that can reaches the upstream exactly."""
    out = build_or_refuse([], ident, token)
    if out is None:
        return
    sent = dict(out)
    assert sent["X-Forwarded-User"] == ident.user
    assert sent.get("X-Forwarded-Email") == (ident.email if _plain(ident.email) else None)
    assert sent.get("X-Forwarded-Preferred-Username") == (
        ident.preferred_username if _plain(ident.preferred_username) else None
    )
    assert sent.get("X-Forwarded-Access-Token") == (
        token if _plain(token, max_length=None) else None
    )
