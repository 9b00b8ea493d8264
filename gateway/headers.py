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

import base64
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from gateway.config import (
    AllowConfig,
    Config,
    HeadersConfig,
    PolicyConfig,
    RouteConfig,
    RuleConfig,
    claim_at,
    parse_claim_path,
)
from gateway.errors import BadRequest, Forbidden, HeadersTooLarge
from gateway.models import Identity

__all__ = [
    "ASSERTION_HEADER",
    "AUTH_REQUEST_HEADERS",
    "BUILTIN_HEADERS",
    "DEFAULT_IDENTITY_RULES",
    "HOP_BY_HOP",
    "IDENTITY_HEADERS",
    "MAX_IDENTITY_VALUE",
    "REQUEST_ID_HEADER",
    "Forwarded",
    "HeaderPolicy",
    "HeaderSpec",
    "IdentityHeaders",
    "IdentityRules",
    "OriginalRequest",
    "auth_request_headers",
    "canonical",
    "check_header_limits",
    "compile_identity_rules",
    "configured_identity_headers",
    "encode_identity_value",
    "forwarded_facts",
    "identity_headers",
    "identity_rules",
    "identity_value_problem",
    "original_request",
    "peer_trusted",
    "plan_identity_headers",
    "policy_groups",
    "upstream_response_headers",
    "with_gateway_headers",
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

# The request's id, sent to the upstream and back to the client: always the gateway's own.
REQUEST_ID_HEADER: Final = "X-Request-Id"
_REQUEST_ID_KEY: Final = "x-request-id"  # canonical(REQUEST_ID_HEADER)

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



def peer_trusted(peer_ip: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the TCP peer is one of ``server.trusted_proxies``: the test every forwarding
    header must pass before the gateway believes it."""
    return bool(trusted) and _is_trusted(_parse_ip(peer_ip), trusted)


# ---------------------------------------------------------------------------------------------
# Forward-auth: the request a proxy asks about
# ---------------------------------------------------------------------------------------------

# Where proxies put the request they ask about: Traefik's ForwardAuth sends X-Forwarded-Uri and
# X-Forwarded-Method; nginx configs set X-Original-URI and X-Original-Method
# (config/nginx/forward-auth.conf). X-Forwarded-Host and -Proto are read by forwarded_facts.
_ORIGINAL_URI: Final = ("x-forwarded-uri", "x-original-uri")
_ORIGINAL_METHOD: Final = ("x-forwarded-method", "x-original-method")
# RFC 9110 5.6.2 token: what a method may be.
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The request a forward-auth check is about, as a trusted proxy described it.

    ``uri``: its target in origin form (``/path?query``, as received: not decoded), None when
    the proxy sent none. ``method``: None when the proxy sent none.
    """

    uri: str | None
    method: str | None


def original_request(headers: Sequence[tuple[str, str]]) -> OriginalRequest:
    """Read ``X-Forwarded-Uri``/``X-Original-URI`` and ``X-Forwarded-Method``/
    ``X-Original-Method``. Call it only for a trusted peer (:func:`peer_trusted`): from anyone
    else these headers are the client's own words about which URL to judge.

    Raises :class:`BadRequest` when the description is ambiguous: a header given twice, both
    spellings given with different values (a proxy that sets one name and passes the client's
    copy of the other through must not let the client choose), a URI that is not origin-form
    (``/...``), a method that is not an HTTP token. Refusing is the only safe reading: a proxy
    that sends two answers to "which URL?" has let the client write one of them.
    """
    found: dict[str, list[str]] = {}
    for name, value in headers:
        key = canonical(name)
        if key in _ORIGINAL_URI or key in _ORIGINAL_METHOD:
            found.setdefault(key, []).append(value.strip(" \t"))
    uri = _one(found, _ORIGINAL_URI, "URI")
    if uri is not None and not uri.startswith("/"):
        raise BadRequest(
            f"{_names(_ORIGINAL_URI)} must be the original request target in origin form "
            '("/path?query", as nginx\'s $request_uri)'
        )
    method = _one(found, _ORIGINAL_METHOD, "method")
    if method is not None and not _TOKEN.fullmatch(method):
        raise BadRequest(f"{_names(_ORIGINAL_METHOD)} is not an HTTP method")
    return OriginalRequest(uri=uri, method=method)


def _names(keys: Sequence[str]) -> str:
    return " / ".join("-".join(part.capitalize() for part in k.split("-")) for k in keys)


def _one(found: dict[str, list[str]], keys: Sequence[str], what: str) -> str | None:
    values = [v for k in keys for v in found.get(k, ())]
    if not values:
        return None
    if len(values) > 1 and (len(set(values)) > 1 or any(len(found.get(k, ())) > 1 for k in keys)):
        raise BadRequest(
            f"the original request {what} is given more than once ({_names(keys)}); the proxy "
            "must set exactly one value, replacing whatever the client sent"
        )
    return values[0]


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
    ``identity_names``: the headers ``headers.send`` configures (:func:`configured_identity_
    headers`), stripped like the built-in ones; so is ``X-Gateway-Assertion``, always.
    """

    __slots__ = ("_cookie_names", "_cookie_prefixes", "_drop", "_drop_id", "_drop_prefixes")

    def __init__(
        self,
        *,
        strip_patterns: Sequence[str],
        own_cookie_name: str,
        extra_cookie_names: Sequence[str] = (),
        identity_names: Sequence[str] = (),
    ) -> None:
        drop = set(HOP_BY_HOP) | _FORWARDING | _METHOD_OVERRIDES | {"host"}
        drop |= {canonical(h) for h in (*IDENTITY_HEADERS, ASSERTION_HEADER, *identity_names)}
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
        self._drop_id: frozenset[str] = self._drop | {_REQUEST_ID_KEY}
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
        added: Sequence[tuple[str, str]] | None = None,
        request_id: str | None = None,
    ) -> list[tuple[str, str]]:
        """The headers to send upstream: the client's, cleaned, then the gateway's own.

        ``request_id``: sent last as ``X-Request-Id``, in place of any the client sent, so
        the app logs the gateway's id.

        ``added``: the identity headers to send instead of the built-in ones, as planned by
        :func:`plan_identity_headers` for the route (and the assertion); ``identity`` and
        ``access_token`` are then not looked at.

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
        return with_gateway_headers(
            self.client_headers_forwarded(
                headers, forwarded=forwarded, host_header=host_header,
                replace_request_id=request_id is not None),
            identity_headers(identity, access_token) if added is None else added,
            request_id)

    def client_headers_forwarded(
        self,
        headers: Sequence[tuple[str, str]],
        *,
        forwarded: Forwarded,
        host_header: str,
        replace_request_id: bool,
    ) -> list[tuple[str, str]]:
        """The first part of :meth:`upstream_request_headers`: the client's headers, cleaned,
        then ``Host`` and ``X-Forwarded-For/-Proto/-Host``; the client's ``X-Request-Id`` is
        dropped when ``replace_request_id``. It depends on nothing but its arguments, so a
        caller may keep it for a request head sent again (issue 7)."""
        drop = self._drop_id if replace_request_id else self._drop
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


def with_gateway_headers(
    forwarded: Sequence[tuple[str, str]], added: Sequence[tuple[str, str]],
    request_id: str | None,
) -> list[tuple[str, str]]:
    """The second part of :meth:`HeaderPolicy.upstream_request_headers`, for a caller that
    kept the first (:meth:`HeaderPolicy.client_headers_forwarded`): the identity headers
    ``added``, then ``X-Request-Id`` last when ``request_id`` is given."""
    out = [*forwarded, *added]
    if request_id is not None:
        out.append((REQUEST_ID_HEADER, request_id))
    return out


def identity_headers(
    identity: Identity | None, access_token: str | None
) -> list[tuple[str, str]]:
    """The gateway's identity headers for ``identity`` (none for None) and ``access_token``.

    One place for the rules both the proxy (:meth:`HeaderPolicy.upstream_request_headers`)
    and forward-auth (:func:`auth_request_headers`) follow. Identity values are sent exactly
    or not at all (:func:`identity_value_problem`): a user name that cannot be sent exactly
    raises :class:`Forbidden` (the request is refused: never another user's name); an e-mail,
    preferred username or access token that cannot is left out; so is a group that cannot,
    or whose name contains "," (it would read as two groups). The built-in headers, within
    the default budget (:func:`plan_identity_headers`).
    """
    return list(plan_identity_headers(identity, access_token).headers)


# oauth2-proxy's names for the identity in a forward-auth answer (nginx auth_request_set,
# Traefik authResponseHeaders, Envoy allowed_upstream_headers copy them onto the request).
AUTH_REQUEST_HEADERS: Final = {
    "X-Forwarded-User": "X-Auth-Request-User",
    "X-Forwarded-Email": "X-Auth-Request-Email",
    "X-Forwarded-Groups": "X-Auth-Request-Groups",
    "X-Forwarded-Preferred-Username": "X-Auth-Request-Preferred-Username",
    "X-Forwarded-Access-Token": "X-Auth-Request-Access-Token",
}


def auth_request_headers(
    identity: Identity | None, access_token: str | None
) -> list[tuple[str, str]]:
    """The headers of a forward-auth 202: :func:`identity_headers` under the
    ``X-Auth-Request-*`` names, so the same values are sent, or left out, for the same reasons."""
    return [(AUTH_REQUEST_HEADERS[name], value)
            for name, value in identity_headers(identity, access_token)]


# ---------------------------------------------------------------------------------------------
# Configurable identity headers and their budget (issue 5 item 2)
# ---------------------------------------------------------------------------------------------

ASSERTION_HEADER: Final = "X-Gateway-Assertion"
"""The signed identity assertion (:mod:`gateway.assertion`); removed from every client request
in any spelling, like the identity headers."""

HeaderSource = Literal["user", "email", "groups", "preferred_username", "claim"]


@dataclass(frozen=True, slots=True)
class HeaderSpec:
    """One identity header: its name, where its value comes from (an :class:`Identity` field,
    or a claim path into ``Identity.claims``), and whether a user without a sendable value is
    refused (``required``) rather than sent without it."""

    name: str
    source: HeaderSource
    path: tuple[str, ...] = ()
    required: bool = False


# The headers of 0.1, still the default: the user is required, the rest optional.
BUILTIN_HEADERS: Final = (
    HeaderSpec("X-Forwarded-User", "user", required=True),
    HeaderSpec("X-Forwarded-Email", "email"),
    HeaderSpec("X-Forwarded-Groups", "groups"),
    HeaderSpec("X-Forwarded-Preferred-Username", "preferred_username"),
)
DEFAULT_MAX_BYTES: Final = 8192


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """How one route's identity headers are made, compiled once from its ``headers:`` settings
    (:func:`compile_identity_rules`). ``policy_groups``: with ``groups_filter: policy``, the
    groups the route's rules name (None: no such filter)."""

    specs: tuple[HeaderSpec, ...] = BUILTIN_HEADERS
    separator: str = ","
    encoding: str = "utf8"
    groups_pattern: re.Pattern[str] | None = None
    policy_groups: frozenset[str] | None = None
    max_bytes: int = DEFAULT_MAX_BYTES

    def groups(self, identity: Identity) -> tuple[str, ...]:
        """The user's groups that may be sent: ``groups_filter`` applied, and only names that
        can be sent exactly (:func:`identity_value_problem`), in the provider's order."""
        out: list[str] = []
        for group in identity.groups:
            if not _sendable(group):
                continue
            if self.groups_pattern is not None and not self.groups_pattern.fullmatch(group):
                continue
            if self.policy_groups is not None and group not in self.policy_groups:
                continue
            out.append(group)
        return tuple(out)


DEFAULT_IDENTITY_RULES: Final = IdentityRules()


def identity_rules(
    headers: HeadersConfig, *, groups_claim: str, policy_groups: frozenset[str] = frozenset()
) -> IdentityRules:
    """Compile (merged, see ``Config.headers_for``) header settings. A ``send`` entry whose
    claim is the provider's groups claim (``provider.claims.groups``) carries the groups the
    policy sees, so ``groups_filter`` applies to it."""
    specs: tuple[HeaderSpec, ...]
    if headers.send is None:
        specs = BUILTIN_HEADERS
        encoding = headers.encoding or "utf8"  # 0.1 sent UTF-8 as is: unchanged by default
    else:
        required = {canonical(name) for name in headers.required}
        built: list[HeaderSpec] = []
        groups_path = parse_claim_path(groups_claim)
        for name, claim in headers.send.items():
            path = parse_claim_path(claim)
            source: HeaderSource = "groups" if path == groups_path else "claim"
            built.append(HeaderSpec(name, source, path, canonical(name) in required))
        specs = tuple(built)
        encoding = headers.encoding or "rfc2047"
    flt = headers.groups_filter
    return IdentityRules(
        specs=specs,
        separator=headers.separator,
        encoding=encoding,
        groups_pattern=re.compile(flt) if flt is not None and flt != "policy" else None,
        policy_groups=policy_groups if flt == "policy" else None,
        max_bytes=headers.max_bytes,
    )


def policy_groups(
    route: RouteConfig, default_policy: PolicyConfig | None, *, groups_claim: str = "groups"
) -> frozenset[str]:
    """The groups a route's rules name (allow and deny; ``default_policy`` when the route has
    none of its own, as the policy itself decides), for ``groups_filter: policy``: an app
    behind a route that admits ``eng`` has no use for the user's 499 other groups."""
    if route.allow is not None or route.deny is not None:
        allow, deny = route.allow, route.deny
    elif default_policy is not None:
        allow, deny = default_policy.allow, default_policy.deny
    else:
        return frozenset()
    found: set[str] = set()
    groups_path = parse_claim_path(groups_claim)
    if isinstance(allow, AllowConfig):
        found.update(allow.groups)
        # The one-mapping form's claim names are literal top-level names.
        for value in allow.claims.get(groups_path[0], ()) if len(groups_path) == 1 else ():
            if isinstance(value, str):
                found.add(value)
        rules: tuple[RuleConfig, ...] = tuple(deny or ())
    else:
        rules = (*(allow or ()), *(deny or ()))
    for rule in rules:
        found.update(rule.groups)
        for name, values in rule.claims.items():
            if parse_claim_path(name) == groups_path:
                found.update(v for v in values if isinstance(v, str))
    return frozenset(found)


def compile_identity_rules(config: Config) -> dict[str, IdentityRules]:
    """Every route's :class:`IdentityRules`, by route name."""
    claim = config.provider.claims.groups
    return {
        route.name: identity_rules(
            config.headers_for(route),
            groups_claim=claim,
            policy_groups=policy_groups(route, config.default_policy, groups_claim=claim),
        )
        for route in config.routes
    }


def configured_identity_headers(config: Config) -> tuple[str, ...]:
    """Every header name a ``headers.send`` of the config sets (top level and routes): the
    gateway strips all of them from every client request, on every route (a public route to
    the same app must not let a client write ``X-User-Id`` either)."""
    names: dict[str, str] = {}
    for block in (config.headers, *(r.headers for r in config.routes)):
        if block is not None and block.send:
            for name in block.send:
                names.setdefault(canonical(name), name)
    return tuple(names.values())


def _sendable(value: str) -> bool:
    """``identity_value_problem(value) is None``, with a fast path for the common case (plain
    printable ASCII): the check runs for every group of every request."""
    if value.isascii() and value.isprintable() and 0 < len(value) <= MAX_IDENTITY_VALUE:
        return value[0] != " " and value[-1] != " "
    return identity_value_problem(value) is None


def _encoded_word(value: str) -> str:
    """RFC 2047 §2 encoded-word, B encoding (base64 has no separator or space in it). One word
    per value, not split at §2's 75 characters: that limit is for mail lines, and HTTP header
    decoders (Python's ``email.header``, Java's ``MimeUtility``) read longer words."""
    return "=?UTF-8?B?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


def encode_identity_value(value: str, encoding: str) -> str | None:
    """``value`` as it goes on the wire under ``encoding``, or None when it cannot go exactly.

    The "exact or not at all" rules of :func:`identity_value_problem` come first, whatever the
    encoding: a value an app would trim or split must not be made decodable either. Then:
    ``utf8`` sends it as is; ``refuse`` only when it is ASCII; ``base64url`` always encodes
    (RFC 4648 §5, no padding), so the app never has to guess; ``rfc2047`` encodes non-ASCII
    text, and also ASCII text containing ``=?``: a user named ``=?UTF-8?B?YWRtaW4=?=`` must
    not decode to ``admin`` at the app.
    """
    if not _sendable(value):
        return None
    if encoding == "utf8":
        return value
    if encoding == "refuse":
        return value if value.isascii() else None
    if encoding == "base64url":
        return base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii").rstrip("=")
    if value.isascii() and "=?" not in value:
        return value
    return _encoded_word(value)


def _list_item(value: str, encoding: str, separator: str) -> str | None:
    """A list member on the wire: like a value, and never containing the separator (it would
    read as two members). Under ``rfc2047`` such a member is encoded instead of left out."""
    encoded = encode_identity_value(value, encoding)
    if encoded is None:
        return None
    core = separator.strip()
    if separator in encoded or (core and core in encoded):
        return _encoded_word(value) if encoding == "rfc2047" else None
    return encoded


def _claim_text(value: object) -> str | None:
    """A scalar claim as header text: strings as they are, numbers and booleans as in JSON.
    Objects, null and non-finite numbers have no header form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _claim_at(claims: Mapping[str, Any], path: Sequence[str]) -> object | None:
    return claim_at(claims, path)  # the walk policy and the identity use too


def _wire_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _header_len(name: str, value: str) -> int:
    """Bytes of ``name: value`` plus CRLF, as :func:`check_header_limits` counts them."""
    return len(name) + 4 + _wire_len(value)


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """The identity headers planned for one request. ``groups``: the groups they carry (also
    the assertion's ``groups``): filtered, and cut to the budget. ``size``: their bytes, plus
    what the caller reserved. ``trimmed``: what the budget cut, for the warning the caller
    logs (empty when nothing was)."""

    headers: tuple[tuple[str, str], ...]
    groups: tuple[str, ...]
    size: int
    trimmed: tuple[str, ...] = ()


@dataclass(slots=True)
class _Planned:
    name: str
    required: bool
    items: list[str | None]  # wire form of each member (None: this member cannot be sent)
    is_list: bool
    source: str  # which list it cuts with: "groups", or its own name
    kept: bool = True
    # prefix[k]: bytes of the first k sendable members, each followed by a separator.
    prefix: list[int] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def measure(self, separator: int) -> None:
        total = sent = 0
        self.prefix, self.count = [0], [0]
        for item in self.items:
            if item is not None:
                total += _wire_len(item) + (separator if self.is_list else 0)
                sent += 1
            self.prefix.append(total)
            self.count.append(sent)

    def size(self, k: int, separator: int) -> int:
        if not self.kept or self.count[k] == 0:
            return 0
        return len(self.name) + 4 + self.prefix[k] - (separator if self.is_list else 0)

    def value(self, k: int, separator: str) -> str | None:
        sent = [item for item in self.items[:k] if item is not None]
        return separator.join(sent) if sent and self.kept else None


def _refuse_user(problem: str) -> Forbidden:
    return Forbidden(
        f"Your account name at the sign-in service {problem}, so this gateway "
        "cannot pass it on to the application unchanged. Ask your administrator "
        "to correct the account.",
        reason="identity_unsafe",
    )


def _refuse_required(name: str, path: Sequence[str]) -> Forbidden:
    return Forbidden(
        f"This application needs {name} (from the claim {'.'.join(path) or name}), and your "
        "account at the sign-in service has no value this gateway can pass on unchanged. Ask "
        "your administrator to correct the account.",
        reason="identity_incomplete",
    )


def plan_identity_headers(
    identity: Identity | None,
    access_token: str | None,
    rules: IdentityRules = DEFAULT_IDENTITY_RULES,
    *,
    reserve: Callable[[Sequence[str]], int] | None = None,
) -> IdentityHeaders:
    """The identity headers for ``identity`` (none for None) and ``access_token`` under
    ``rules``, within ``rules.max_bytes``.

    Values are sent exactly or not at all (:func:`encode_identity_value`): a required header
    (the built-in ``X-Forwarded-User``, or ``headers.required``) that cannot be raises
    :class:`Forbidden`; an optional one is left out; a list member that cannot is left out of
    its list. ``reserve(groups)``: bytes of further headers that carry the groups (the signed
    assertion), counted in the budget and cut with the groups headers.

    Over the budget, the plan trims instead of failing the request (an upstream refusing
    oversized headers would fail it anyway, with no word why): list members are dropped from
    the end, the largest list first, then optional headers from the last; required headers and
    the access token are never dropped. What was cut is in ``trimmed``.
    """
    sep = rules.separator
    sep_len = len(sep)
    planned: list[_Planned] = []
    groups: tuple[str, ...] = ()
    if identity is not None:
        groups = rules.groups(identity)
        for spec in rules.specs:
            entry = _plan_one(spec, identity, rules, groups)
            if entry is not None:
                planned.append(entry)
    # Access tokens are long (JWTs): only their characters are checked, not their length.
    if access_token and identity_value_problem(access_token, max_length=None) is None:
        planned.append(_Planned("X-Forwarded-Access-Token", True, [access_token], False,
                                "X-Forwarded-Access-Token"))
    for entry in planned:
        entry.measure(sep_len)

    # The lists that can be cut, with how many members each keeps so far.
    keep: dict[str, int] = {e.source: len(e.items) for e in planned if e.is_list}
    if reserve is not None and identity is not None:
        keep.setdefault("groups", len(groups))
    # A required list keeps at least its first sendable member.
    floor = dict.fromkeys(keep, 0)
    for entry in planned:
        if entry.required and entry.is_list:
            first = next(i for i, item in enumerate(entry.items) if item is not None)
            floor[entry.source] = max(floor[entry.source], first + 1)

    def total() -> int:
        size = sum(e.size(keep.get(e.source, 1), sep_len) for e in planned)
        if reserve is not None and identity is not None:
            size += reserve(groups[: keep.get("groups", len(groups))])
        return size

    trimmed: list[str] = []
    size = total()
    budget = rules.max_bytes
    if size > budget:
        full = dict(keep)

        def share(source: str) -> int:
            own = sum(e.size(keep[source], sep_len) for e in planned if e.source == source)
            if source == "groups" and reserve is not None and identity is not None:
                own += reserve(groups[: keep[source]])
            return own

        for source in sorted(keep, key=share, reverse=True):
            low, high = floor[source], keep[source]
            keep[source] = low
            if total() > budget:
                continue  # even the floor is too much: cut the next list too
            while low < high:  # the most members that fit
                middle = (low + high + 1) // 2
                keep[source] = middle
                if total() <= budget:
                    low = middle
                else:
                    high = middle - 1
            keep[source] = low
            break
        for source, kept in keep.items():
            if kept < full[source]:
                names = [e.name for e in planned if e.source == source] or ["assertion"]
                trimmed.append(f"{', '.join(names)}: {kept} of {full[source]} values kept")
        size = total()
        for entry in reversed(planned):
            if size <= budget:
                break
            if not entry.required and entry.kept and entry.size(keep.get(entry.source, 1),
                                                                 sep_len):
                entry.kept = False
                trimmed.append(f"{entry.name}: left out")
                size = total()
        if size > budget:
            trimmed.append(f"required headers alone take {size} bytes, over {budget}")

    out: list[tuple[str, str]] = []
    for entry in planned:
        value = entry.value(keep.get(entry.source, 1), sep)
        if value is not None:
            out.append((entry.name, value))
    return IdentityHeaders(
        headers=tuple(out),
        groups=groups[: keep.get("groups", len(groups))],
        size=size,
        trimmed=tuple(trimmed),
    )


def _plan_one(
    spec: HeaderSpec, identity: Identity, rules: IdentityRules, groups: tuple[str, ...]
) -> _Planned | None:
    """One header before the budget: its members on the wire, or None when it is left out.
    Raises :class:`Forbidden` when it is required and cannot be sent."""
    encoding, sep = rules.encoding, rules.separator
    if spec.source == "user":
        problem = identity_value_problem(identity.user)
        if problem is not None:
            raise _refuse_user(problem)
        encoded = encode_identity_value(identity.user, encoding)
        if encoded is None:
            raise _refuse_user("is not plain ASCII text (headers.encoding: refuse)")
        return _Planned(spec.name, True, [encoded], False, spec.name)
    if spec.source == "groups":
        items = [_list_item(g, encoding, sep) for g in groups]
        if spec.required and not any(items):
            raise _refuse_required(spec.name, spec.path)
        return _Planned(spec.name, spec.required, list(items), True, "groups")
    value: object
    if spec.source == "email":
        value = identity.email
    elif spec.source == "preferred_username":
        value = identity.preferred_username
    else:
        value = _claim_at(identity.claims, spec.path)
    if isinstance(value, list | tuple):
        texts = [_claim_text(v) for v in value]
        members = [None if t is None else _list_item(t, encoding, sep) for t in texts]
        if not any(members):
            if spec.required:
                raise _refuse_required(spec.name, spec.path)
            return None
        return _Planned(spec.name, spec.required, members, True, spec.name)
    text = _claim_text(value) if value is not None else None
    encoded = None if text is None else encode_identity_value(text, encoding)
    if encoded is None:
        if spec.required:
            raise _refuse_required(spec.name, spec.path)
        return None
    return _Planned(spec.name, spec.required, [encoded], False, spec.name)


# ---------------------------------------------------------------------------------------------
# Response headers to the client
# ---------------------------------------------------------------------------------------------


# RFC 6265 4.1.1: the octets a cookie value may hold without quoting, and what a Domain or
# Path attribute may hold without ending the attribute (no ";", no controls).
_COOKIE_VALUE: Final = re.compile(r"[!#-+\--:<-\[\]-~]+")
_COOKIE_ATTRIBUTE: Final = re.compile(r"[!-:<-~]+")


def set_cookie(
    name: str, value: str, *, max_age: int, path: str, domain: str | None, secure: bool,
    samesite: str,
) -> str:
    """A ``Set-Cookie`` value, ``HttpOnly`` always, attributes in the order aiohttp writes
    them. Written here rather than through aiohttp's ``set_cookie`` (a ``Morsel`` of the
    standard library: 5 µs of each 302 to the provider, issue 7); the gateway's cookie
    values (tickets, bindings) are base64url and need no quoting, and anything that would
    need it (an empty value included) is refused, never sent half-quoted."""
    if not _COOKIE_VALUE.fullmatch(value) or not _COOKIE_VALUE.fullmatch(name):
        raise ValueError("a cookie name or value holds characters that need quoting")
    for attribute in (path, domain):
        if attribute is not None and not _COOKIE_ATTRIBUTE.fullmatch(attribute):
            raise ValueError("a cookie Path or Domain holds a ';' or a control character")
    out = f"{name}={value}"
    if domain is not None:
        out += f"; Domain={domain}"
    out += f"; HttpOnly; Max-Age={max_age}; Path={path}; SameSite={samesite}"
    return out + "; Secure" if secure else out


_HOP_BY_HOP_AND_ID: Final = HOP_BY_HOP | {_REQUEST_ID_KEY}


def upstream_response_headers(
    headers: Sequence[tuple[str, str]], request_id: str | None = None
) -> list[tuple[str, str]]:
    """The upstream's response headers to relay: without hop-by-hop headers and the headers
    its ``Connection`` names (RFC 9110 7.6.1). ``Transfer-Encoding`` goes (the server frames
    the relayed body itself); ``Content-Length`` and ``Content-Encoding`` stay, since the body
    bytes pass unchanged; repeated headers such as ``Set-Cookie`` stay repeated.
    ``request_id``: sent last as ``X-Request-Id``, in place of any the upstream sent."""
    keys = [canonical(name) for name, _ in headers]
    drop: frozenset[str] | set[str] = HOP_BY_HOP if request_id is None else _HOP_BY_HOP_AND_ID
    if "connection" in keys:
        named = {
            canonical(token.strip())
            for key, (_, value) in zip(keys, headers, strict=True)
            if key == "connection"
            for token in value.split(",")
        }
        drop = drop | named
    out = [header for key, header in zip(keys, headers, strict=True) if key not in drop]
    if request_id is not None:
        out.append((REQUEST_ID_HEADER, request_id))
    return out


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
