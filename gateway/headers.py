"""Header hygiene, pure: what the upstream may see of the client's headers, and what we add.

Why it is built this way (design §6):

* The upstream trusts ``X-Forwarded-User`` and friends because only the gateway sets them. So
  every client-sent copy is removed in every spelling: header names are compared lower-cased
  with ``_`` read as ``-`` (security note 7: aiohttp keeps ``X_Forwarded_User`` apart, WSGI and
  PHP merge it into ``HTTP_X_FORWARDED_USER``). The same goes for other gateways' identity
  headers (security note 16, ``server.strip_headers``) and for method overrides (security
  note 17: a permitted GET must not act as a forbidden DELETE).
* Hop-by-hop headers and every header named in ``Connection`` are removed (RFC 9110 7.6.1).
  ``Connection`` is applied to the client's headers *before* the gateway adds its own, so a
  client's ``Connection: X-Forwarded-User`` cannot remove what the gateway sets (note 7).
* ``X-Forwarded-*`` from the client are believed only when the peer is a trusted proxy
  (design §4 ``trusted_proxies``); otherwise they are replaced with what the gateway saw.
* Identity values come from the provider and may contain CR/LF: aiohttp's client raises
  ``ValueError`` on them (security note 8), so they are cleaned instead of crashing a request.
* Layer 0: no I/O. :class:`HeaderPolicy` compiles the name sets once; the per-request work is
  one set lookup per header name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gateway.errors import Forbidden, HeadersTooLarge
from gateway.models import Identity

__all__ = [
    "HOP_BY_HOP",
    "IDENTITY_HEADERS",
    "MAX_IDENTITY_VALUE",
    "Forwarded",
    "HeaderPolicy",
    "canonical",
    "check_header_limits",
    "forwarded_facts",
    "identity_value_problem",
    "upstream_response_headers",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The identity headers the gateway sets; removed from every client request in any spelling.
IDENTITY_HEADERS: Final = (
    "X-Forwarded-User",
    "X-Forwarded-Email",
    "X-Forwarded-Groups",
    "X-Forwarded-Preferred-Username",
    "X-Forwarded-Access-Token",
)

# RFC 9110 7.6.1 and RFC 9112 (TE, Transfer-Encoding, Upgrade), plus the non-standard
# Proxy-Connection and Keep-Alive that old clients send. Canonical spelling.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)

# Forwarding facts the gateway computes itself, and headers that upstream frameworks read as
# the client's address or URL (nginx's X-Real-IP / X-Original-URI, RFC 7239 Forwarded).
_FORWARDING: Final = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-uri",
        "x-original-uri",
        "x-real-ip",
        "forwarded",
    }
)

# Security note 17: Rails, Laravel, Express's method-override, Symfony and others honour these.
_METHOD_OVERRIDES: Final = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override"}
)


def canonical(name: str) -> str:
    """A header name as upstream frameworks will read it: lower case, ``_`` as ``-``.

    Security note 7: ``X_Forwarded_User`` and ``x-forwarded-user`` are one header to WSGI, CGI
    and PHP (both become ``HTTP_X_FORWARDED_USER``), so they must be one header here too.
    """
    return name.lower().replace("_", "-")


# C0 controls and DEL: aiohttp refuses CR, LF and NUL in a header value with ValueError
# (security note 8), and the others have no business in an identity either.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: str) -> str:
    """A forwarding value (address chain, scheme, host) with control characters removed
    (security note 8). Only for values the gateway derived or validated itself; identity
    values go through :func:`identity_value_problem` instead, never through this."""
    if _CONTROL.search(value):
        value = _CONTROL.sub("", value)
    return value.strip(" ")


# What an identity value sent upstream must not contain: C0 controls, DEL, C1 controls (U+0085
# NEL ends a line for some parsers) and the Unicode line and paragraph separators.
_UNSAFE_IN_IDENTITY: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_IDENTITY_VALUE: Final = 1024
"""Longest user, e-mail, preferred username or group name sent as a header (characters)."""


def identity_value_problem(
    value: str, *, max_length: int | None = MAX_IDENTITY_VALUE
) -> str | None:
    """Why ``value`` cannot be sent upstream *exactly as it is*, or ``None`` when it can.

    An identity value is passed on byte for byte or not at all. Cleaning it instead (dropping
    a newline, trimming spaces) would map one account onto another: a provider account whose
    username is ``"alice\\n"`` or ``" admins"`` would reach the app as ``alice`` or ``admins``.
    Refused: control characters and line separators (header injection, security note 8),
    leading or trailing whitespace, lone surrogates (not UTF-8: aiohttp would raise), the empty
    string, and values longer than ``max_length`` (upstream header-line limits are about 8 KiB;
    a name this long is a fault, not a user). Other non-ASCII text is sent as UTF-8.
    """
    if not value:
        return "is empty"
    if max_length is not None and len(value) > max_length:
        return f"is longer than {max_length} characters"
    if _UNSAFE_IN_IDENTITY.search(value):
        return "contains a control character or a line break"
    if value != value.strip():
        return "begins or ends with white space"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    return None


# ---------------------------------------------------------------------------------------------
# X-Forwarded-* facts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What the gateway believes about the client and the URL it used.

    ``client_ip``: the client's address, for logs. ``proto``: ``http`` or ``https``.
    ``host``: the authority the client used (``host[:port]``), for building URLs.
    ``for_chain``: the ``X-Forwarded-For`` value to send upstream.
    """

    client_ip: str
    proto: str
    host: str
    for_chain: str


def _parse_ip(text: str) -> IPAddress | None:
    """An address from an X-Forwarded-For entry or a peer: ``1.2.3.4``, ``::1``, and the
    ``1.2.3.4:5678`` / ``[::1]:5678`` forms that some load balancers write."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return address


def _is_trusted(address: IPAddress | None, trusted: Sequence[IPNetwork]) -> bool:
    return address is not None and any(address in net for net in trusted)


def forwarded_facts(
    *,
    peer_ip: str,
    headers: Sequence[tuple[str, str]],
    trusted: Sequence[IPNetwork],
    scheme: str,
    host: str,
) -> Forwarded:
    """The client address, scheme and authority, believing ``X-Forwarded-*`` only from a
    trusted peer (design §4: "X-Forwarded-* believed only from these peers").

    Untrusted peer (or no trusted proxies): the client is the peer; ``proto`` and ``host`` are
    ``scheme`` and ``host`` as the gateway saw them; ``for_chain`` is the peer's address.

    Trusted peer: ``for_chain`` is the received ``X-Forwarded-For`` chain with the peer
    appended (what a proxy is expected to do). ``client_ip`` is the rightmost address of that
    chain not in ``trusted``: everything left of it was written by a host we do not trust and
    may be forged. ``X-Forwarded-Proto`` and ``-Host`` are taken from their rightmost value
    (the one our trusted peer wrote, like Werkzeug's ProxyFix with one trusted hop), and only
    when valid: ``http``/``https``, and a well-formed ``host[:port]``; otherwise ignored.
    """
    if not trusted or not _is_trusted(_parse_ip(peer_ip), trusted):
        return Forwarded(client_ip=peer_ip, proto=scheme, host=host, for_chain=peer_ip)

    chain: list[str] = []
    proto, fwd_host = scheme, host
    for name, value in headers:
        key = canonical(name)
        if key == "x-forwarded-for":
            chain.extend(entry.strip() for entry in value.split(",") if entry.strip())
        elif key == "x-forwarded-proto":
            candidate = value.rsplit(",", 1)[-1].strip().lower()
            if candidate in ("http", "https"):
                proto = candidate
        elif key == "x-forwarded-host":
            candidate = value.rsplit(",", 1)[-1].strip()
            if _authority_host(candidate) is not None:
                fwd_host = candidate.lower()
    chain = [_clean(entry) for entry in chain]
    chain.append(peer_ip)

    client_ip = peer_ip
    for entry in reversed(chain):
        address = _parse_ip(entry)
        if address is None:
            break  # garbage: nothing at or beyond it can be believed; keep the last good hop
        client_ip = str(address)
        if not _is_trusted(address, trusted):
            break
    return Forwarded(client_ip=client_ip, proto=proto, host=fwd_host, for_chain=", ".join(chain))


# The Host-header syntax check of routing.authority_host, repeated here because sibling core
# modules do not import each other (design §2); tests/unit/test_headers.py keeps them in step.
_REG_NAME: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_PORT: Final = re.compile(r"[0-9]{1,5}")


def _authority_host(authority: str) -> str | None:
    if not authority or len(authority) > 262:
        return None
    if authority.startswith("["):
        inside, sep, rest = authority[1:].partition("]")
        if not sep or "%" in inside:
            return None
        try:
            host = f"[{ipaddress.IPv6Address(inside).compressed}]"
        except ValueError:
            return None
    else:
        name, sep, rest = authority.partition(":")
        if not _REG_NAME.fullmatch(name):
            return None
        host = name.lower().removesuffix(".")
        rest = sep + rest
    if rest:
        port = rest[1:]
        if rest[0] != ":" or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            return None
    return host


# ---------------------------------------------------------------------------------------------
# Request headers to the upstream
# ---------------------------------------------------------------------------------------------


class HeaderPolicy:
    """The request-header rules, compiled once from config.

    ``strip_patterns``: other gateways' identity headers (``server.strip_headers``, security
    note 16); a trailing ``*`` makes an entry a prefix (``X-Auth-Request-*``); compared
    canonically. ``own_cookie_name``: the session cookie; it and every cookie named
    ``<name>_...`` (the login-binding cookie) are the gateway's and never reach an upstream.
    ``extra_cookie_names`` are stripped the same way (the un-prefixed name when the cookie is
    ``__Host-`` prefixed: a ticket left from before must not leak to an app either).
    """

    __slots__ = ("_cookie_names", "_cookie_prefixes", "_drop", "_drop_prefixes")

    def __init__(
        self,
        *,
        strip_patterns: Sequence[str],
        own_cookie_name: str,
        extra_cookie_names: Sequence[str] = (),
    ) -> None:
        drop = set(HOP_BY_HOP) | _FORWARDING | _METHOD_OVERRIDES | {"host"}
        drop |= {canonical(h) for h in IDENTITY_HEADERS}
        prefixes: list[str] = []
        for pattern in strip_patterns:
            name = canonical(pattern.strip())
            if name.endswith("*"):
                prefix = name[:-1]
                if not prefix:
                    raise ValueError('a strip_headers pattern "*" would remove every header')
                prefixes.append(prefix)
            elif name:
                drop.add(name)
        self._drop: frozenset[str] = frozenset(drop)
        self._drop_prefixes: tuple[str, ...] = tuple(prefixes)
        names = tuple(dict.fromkeys((own_cookie_name, *extra_cookie_names)))
        self._cookie_names: tuple[str, ...] = names
        self._cookie_prefixes: tuple[str, ...] = tuple(n + "_" for n in names)

    def upstream_request_headers(
        self,
        headers: Sequence[tuple[str, str]],
        *,
        identity: Identity | None,
        access_token: str | None,
        forwarded: Forwarded,
        host_header: str,
    ) -> list[tuple[str, str]]:
        """The headers to send upstream: the client's, cleaned, then the gateway's own.

        Removed from the client's headers: hop-by-hop headers and every header named in any
        ``Connection`` header; every identity header (ours in any spelling, and
        ``strip_patterns``); ``X-Forwarded-For/-Proto/-Host/-Port/-Uri``, ``X-Original-URI``,
        ``X-Real-IP``, ``Forwarded``; method overrides; ``Host``; and the gateway's own cookies
        from ``Cookie`` (the other cookies are kept byte for byte).

        Added: ``Host`` (``host_header``), ``X-Forwarded-For`` (``forwarded.for_chain``),
        ``-Proto``, ``-Host``; with an ``identity`` (protected routes; public routes pass
        ``None``): ``X-Forwarded-User``, ``-Email`` and ``-Preferred-Username`` when known,
        ``-Groups`` (comma-joined, when there are any), and ``X-Forwarded-Access-Token`` when
        ``access_token`` is given. Identity values are sent exactly or not at all
        (:func:`identity_value_problem`): a user name that cannot be sent exactly raises
        :class:`Forbidden` (the request is refused: never another user's name); an e-mail,
        preferred username or access token that cannot is left out; so is a group that
        cannot, or whose name contains "," (it would read as two groups).
        """
        drop = self._drop
        keys = [canonical(name) for name, _ in headers]
        # RFC 9110 7.6.1: a Connection header lists more hop-by-hop headers. Collected first,
        # and applied to the client's headers only (security note 7).
        if "connection" in keys:
            named: set[str] = set()
            for key, (_, value) in zip(keys, headers, strict=True):
                if key == "connection":
                    named.update(canonical(token.strip()) for token in value.split(","))
            drop = drop | named

        prefixes = self._drop_prefixes
        out: list[tuple[str, str]] = []
        for key, (name, value) in zip(keys, headers, strict=True):
            if key in drop or (prefixes and key.startswith(prefixes)):
                continue
            if key == "cookie":
                kept = self._strip_own_cookies(value)
                if kept:
                    out.append((name, kept))
                continue
            out.append((name, value))

        out.append(("Host", _clean(host_header)))
        out.append(("X-Forwarded-For", _clean(forwarded.for_chain)))
        out.append(("X-Forwarded-Proto", _clean(forwarded.proto)))
        out.append(("X-Forwarded-Host", _clean(forwarded.host)))
        if identity is not None:
            problem = identity_value_problem(identity.user)
            if problem is not None:
                raise Forbidden(
                    f"Your account name at the sign-in service {problem}, so this gateway "
                    "cannot pass it on to the application unchanged. Ask your administrator "
                    "to correct the account.",
                    reason="identity_unsafe",
                )
            out.append(("X-Forwarded-User", identity.user))
            if identity.email and identity_value_problem(identity.email) is None:
                out.append(("X-Forwarded-Email", identity.email))
            groups = [
                g for g in identity.groups if "," not in g and identity_value_problem(g) is None
            ]
            if groups:
                out.append(("X-Forwarded-Groups", ",".join(groups)))
            preferred = identity.preferred_username
            if preferred and identity_value_problem(preferred) is None:
                out.append(("X-Forwarded-Preferred-Username", preferred))
        # Access tokens are long (JWTs): only their characters are checked, not their length.
        if access_token and identity_value_problem(access_token, max_length=None) is None:
            out.append(("X-Forwarded-Access-Token", access_token))
        return out

    def _strip_own_cookies(self, value: str) -> str:
        """A Cookie header value without the gateway's cookies ("" if nothing is left).

        The upstream has no use for the session ticket, and an upstream that logs or echoes
        cookies must not leak it. Names compare exactly (RFC 6265 5.4: cookie names are
        case-sensitive). Untouched values are returned as they came.
        """
        if not any(name in value for name in self._cookie_names):
            return value
        kept: list[str] = []
        removed = False
        for pair in value.split(";"):
            pair = pair.strip()
            if not pair:
                continue
            cookie = pair.partition("=")[0].strip()
            if cookie in self._cookie_names or cookie.startswith(self._cookie_prefixes):
                removed = True
                continue
            kept.append(pair)
        return "; ".join(kept) if removed else value


# ---------------------------------------------------------------------------------------------
# Response headers to the client
# ---------------------------------------------------------------------------------------------


def upstream_response_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers to relay: without hop-by-hop headers and the headers
    its ``Connection`` names (RFC 9110 7.6.1). ``Transfer-Encoding`` goes (the server frames
    the relayed body itself); ``Content-Length`` and ``Content-Encoding`` stay, since the body
    bytes pass unchanged; repeated headers such as ``Set-Cookie`` stay repeated."""
    keys = [canonical(name) for name, _ in headers]
    drop: frozenset[str] | set[str] = HOP_BY_HOP
    if "connection" in keys:
        named = {
            canonical(token.strip())
            for key, (_, value) in zip(keys, headers, strict=True)
            if key == "connection"
            for token in value.split(",")
        }
        drop = HOP_BY_HOP | named
    return [header for key, header in zip(keys, headers, strict=True) if key not in drop]


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def check_header_limits(
    headers: Sequence[tuple[str, str]], *, max_count: int, max_bytes: int
) -> None:
    """Raise :class:`HeadersTooLarge` (431, RFC 6585 5) when the request has more than
    ``max_count`` headers or their size exceeds ``max_bytes`` (security note 18: aiohttp caps
    one header line, not their number or sum). Size counts each header as it would be on the
    wire: ``name: value`` plus CRLF, in UTF-8 bytes."""
    if len(headers) > max_count:
        raise HeadersTooLarge(
            f"the request has {len(headers)} headers; at most {max_count} are accepted"
        )
    total = 0
    for name, value in headers:
        total += 4 + (len(name) if name.isascii() else _utf8_len(name))
        total += len(value) if value.isascii() else _utf8_len(value)
        if total > max_bytes:
            raise HeadersTooLarge(f"the request headers exceed {max_bytes} bytes in total")


def _utf8_len(text: str) -> int:
    # Header bytes that are not UTF-8 arrive as surrogates (aiohttp decodes with
    # surrogateescape); each stands for one byte.
    return len(text.encode("utf-8", "surrogateescape"))
