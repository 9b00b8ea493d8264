"""Routing, pure: path normalisation, the route table, and safe post-login redirect targets.

Why it is built this way:

* The path that routes and policy judge must be the path the upstream acts on. aiohttp's
  ``request.path`` percent-decodes but keeps dot-segments (security note 5), and aiohttp's
  client resolves dot-segments of a ``str`` URL on its own (security note 6). So the gateway
  takes the raw request-target, decodes it exactly once and resolves dot-segments itself
  (:func:`normalize_path`), authorises that result, and sends the upstream exactly that result
  re-encoded (:func:`encode_path`), so that the upstream, decoding once, sees the authorised
  path and nothing else.
* One authority is used for routing and URL building (security note 13):
  :func:`authority_host` validates the Host header (or an absolute-form target's authority).
* Layer 0: stdlib and ``gateway.config``/``models``/``errors`` only; no I/O. The per-request
  functions are on every request's path, so tables are precomputed in constructors and the
  common case (a plain path) takes the fast paths.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit

from gateway.config import RouteConfig
from gateway.errors import BadRedirect, BadRequest

__all__ = [
    "RouteTable",
    "authority_host",
    "encode_path",
    "host_allowed",
    "normalize_path",
    "safe_redirect_target",
    "without_path_params",
]

# C0 controls (NUL included), DEL and C1 controls, and the backslash: some upstreams (IIS,
# Windows file servers, several frameworks) read "\" as "/", so "/public\..\admin" would be a
# traversal the gateway never saw. Rejected raw and after decoding (so %5C and %00 too).
_FORBIDDEN_IN_PATH: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
# A "%" not followed by two hex digits: RFC 3986 2.1 says pct-encoded is "%" HEXDIG HEXDIG;
# lenient decoders (urllib's unquote) pass "%zz" through, which upstreams then read differently.
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")

# RFC 3986 3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; plus "/" between
# segments. Everything else (and "%" itself) is percent-encoded by encode_path.
# quote() always keeps ALPHA / DIGIT / "-" / "." / "_" / "~".
_PATH_SAFE: Final = "/:@!$&'()*+,;="


def normalize_path(raw_path: str) -> str:
    """The request path as routes, policy and the upstream must all see it.

    ``raw_path`` is the path of the request-target exactly as received (no query, no fragment).
    It is percent-decoded exactly once (UTF-8), dot-segments are resolved as in RFC 3986 5.2.4
    (``..`` never climbs above ``/``), runs of ``/`` collapse to one, and a trailing ``/`` is
    kept. ``%2F`` decodes to ``/`` and so becomes a separator: the gateway forwards this
    normalised form (:func:`encode_path`), so what was authorised is what the upstream gets.
    A double encoding (``%252e``) decodes once to the literal text ``%2e``, which is *not* a
    dot-segment here and is re-encoded as ``%252e`` for the upstream.

    Raises :class:`BadRequest` for: a path not starting with ``/``; a control character or a
    backslash, raw or percent-encoded (security note 5: ``%5c`` would decode to ``\\``);
    a malformed escape; bytes that are not UTF-8; and a dot-segment carrying ``;`` parameters
    (``/..;/``), which Tomcat and Jetty resolve as ``..`` after dropping the parameter, while
    here it is an ordinary segment: the classic ACL-bypass shape, with no legitimate use.
    """
    if not raw_path.startswith("/"):
        raise BadRequest('the request path must start with "/"')
    if _FORBIDDEN_IN_PATH.search(raw_path):
        raise BadRequest("the request path contains a control character or a backslash")
    path = raw_path
    if "%" in raw_path:
        if _BAD_ESCAPE.search(raw_path):
            raise BadRequest('the request path has a "%" that is not followed by two hex digits')
        try:
            # Decode once: unquote_to_bytes turns every %XX into its byte, nothing more.
            path = unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeError:
            raise BadRequest("the request path is not valid UTF-8 once decoded") from None
        if _FORBIDDEN_IN_PATH.search(path):
            raise BadRequest("the request path contains an encoded control character or backslash")
    elif not raw_path.isascii():
        # Lone surrogates (undecodable bytes carried through surrogateescape) can't be
        # re-encoded for the upstream: reject them like invalid percent-encoded UTF-8.
        try:
            raw_path.encode("utf-8")
        except UnicodeError:
            raise BadRequest("the request path is not valid UTF-8") from None
    # Fast path: nothing to resolve or collapse.
    if "//" not in path and "/." not in path:
        return path
    return _remove_dot_segments(path)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path, also collapsing empty segments ("//")."""
    out: list[str] = []
    segments = path.split("/")
    # segments[0] is "" (the path starts with "/").
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        if ";" in seg and seg.partition(";")[0] in (".", ".."):
            raise BadRequest(
                'the request path has a dot-segment with ";" parameters (like "/..;/")'
            )
        out.append(seg)
    # A path ending in "/", "/." or "/.." names a directory: keep (or add) the trailing slash,
    # as 5.2.4 does ("/a/b/.." -> "/a/").
    trailing = segments[-1] in ("", ".", "..")
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def without_path_params(path: str) -> str:
    """``path`` with the ``;parameters`` of each segment removed: ``/admin;x=1/a`` → ``/admin/a``.

    This is how Tomcat, Jetty and other servlet containers read a path before mapping it
    (``;jsessionid=...``), while routes here match segments as written. The gateway matches
    both readings and refuses the request (400) when they reach different routes: otherwise
    ``/admin;x`` would be judged by the ``/`` route and served by the app as ``/admin``.
    """
    if ";" not in path:
        return path
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def encode_path(path: str) -> str:
    """Re-encode a normalised path for the upstream's request line.

    The upstream decodes the path once; it must get back exactly ``path`` (security note 6):
    every character outside RFC 3986 pchar (unreserved, sub-delims, ":", "@") and "/" is
    percent-encoded as UTF-8, and "%" becomes "%25" so that a literal "%2e" stays a literal.
    ``normalize_path(encode_path(p)) == p`` for every ``p`` that ``normalize_path`` returns.
    """
    return quote(path, safe=_PATH_SAFE)


# RFC 3986 3.2.2 reg-name, restricted to what DNS names look like (letters, digits, "-", "_",
# dots; "_" appears in internal names). Explicit ASCII classes: str.lower() would turn the
# Kelvin sign into "k" if lower-casing came first. No "%": a pct-encoded host is not a host we
# route. No "@": userinfo has no place in a Host header (RFC 9110 7.2).
_REG_NAME: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_PORT: Final = re.compile(r"[0-9]{1,5}")


def authority_host(authority: str) -> str | None:
    """The host of a Host header (or absolute-form authority), lower case, without the port.

    ``None`` when it is not a plain ``host[:port]``: empty, spaces, userinfo, a bad port,
    an unbracketed IPv6 address, anything but ASCII. Used for routing and for building URLs,
    so there is exactly one authority per request (security note 13). A trailing dot (the
    fully-qualified spelling ``example.com.``) is removed so it routes like ``example.com``.
    IPv6 literals keep their brackets and are returned in their compressed form (``[::1]``).
    """
    if not authority or len(authority) > 262:  # 255 for the name, ":" and 5 port digits
        return None
    if authority.startswith("["):
        inside, sep, rest = authority[1:].partition("]")
        if not sep or "%" in inside:  # no zone ids: they mean nothing to another machine
            return None
        try:
            address = ipaddress.IPv6Address(inside)
        except ValueError:
            return None
        host = f"[{address.compressed}]"
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
# Route table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    route: RouteConfig
    methods: frozenset[str] | None  # None: any method


class RouteTable:
    """Finds the route for a request: host first, then the longest path prefix, then method.

    Precedence, exactly:

    1. Host tier. A route whose ``match.host`` equals the host (case-insensitively) beats a
       ``*.example.com`` wildcard route, which beats a route without a host. A wildcard matches
       a subdomain at any depth (``a.b.example.com``) and never the apex (``example.com``);
       between two matching wildcards the longer (more specific) suffix wins. If no route of
       a tier matches the path, the next tier is tried.
    2. Path prefix, at segment boundaries: ``/admin`` matches ``/admin`` and ``/admin/x``,
       never ``/administrator``; ``/static/`` matches ``/static/...`` and ``/static`` itself
       (so ``/admin`` and ``/admin/`` match the same paths). The longest prefix wins; two
       routes with the same prefix in the same tier are tried in config order.
    3. Method. A route that lists ``methods`` matches only those. The most specific routes by
       host and prefix *claim* the path: when none of them allows the method there is no
       match (404), and the request never falls through to a shorter prefix or a broader host
       tier. Falling through would let ``DELETE /admin`` reach a public ``/`` route just because
       ``/admin`` was configured for GET; failing closed makes the operator add the method.
       A route that allows GET also allows HEAD: RFC 9110 9.3.2 makes HEAD a GET without the
       body, every GET endpoint serves it, and browsers and monitors send it. A route listing
       only HEAD does not allow GET.

    Matching costs a few dict lookups per path segment, independent of the number of routes.
    """

    __slots__ = ("_any_host", "_exact", "_wildcard")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        # Each tier maps a prefix key (the prefix without its trailing "/"; "" for "/") to the
        # entries with that prefix, in config order.
        self._exact: dict[str, dict[str, list[_Entry]]] = {}
        self._wildcard: dict[str, dict[str, list[_Entry]]] = {}  # keyed by ".example.com"
        self._any_host: dict[str, list[_Entry]] = {}
        for route in routes:
            match = route.match
            try:
                prefix = normalize_path(match.path)
            except BadRequest as exc:
                raise ValueError(f"route {route.name!r}: bad match.path: {exc.message}") from None
            key = prefix.rstrip("/")
            methods: frozenset[str] | None = None
            if match.methods is not None:
                methods = frozenset(m.upper() for m in match.methods)
                if "GET" in methods:
                    methods |= {"HEAD"}
            entry = _Entry(route, methods)
            host = match.host.lower().removesuffix(".") if match.host else None
            if host is None:
                tier = self._any_host
            elif host.startswith("*."):
                tier = self._wildcard.setdefault(host[1:], {})
            else:
                tier = self._exact.setdefault(host, {})
            tier.setdefault(key, []).append(entry)

    def serves(self, host: str) -> bool:
        """Whether any route could match ``host`` (a route without a host serves every host)."""
        host = host.lower()
        if self._any_host or host in self._exact:
            return True
        dot = host.find(".")
        while dot != -1:
            if host[dot:] in self._wildcard:
                return True
            dot = host.find(".", dot + 1)
        return False

    def match(self, host: str, path: str, method: str) -> RouteConfig | None:
        """The route for this (validated) host, normalised path and method, or None (404)."""
        host = host.lower()
        method = method.upper()
        keys = _prefix_keys(path)
        exact = self._exact.get(host)
        if exact is not None:
            claimed, found = _first(exact, keys, method)
            if claimed:
                return found
        if self._wildcard:
            # ".b.example.com", then ".example.com", then ".com": most specific first.
            dot = host.find(".")
            while dot != -1:
                tier = self._wildcard.get(host[dot:])
                if tier is not None:
                    claimed, found = _first(tier, keys, method)
                    if claimed:
                        return found
                dot = host.find(".", dot + 1)
        return _first(self._any_host, keys, method)[1]


def _prefix_keys(path: str) -> list[str]:
    """Every prefix key that can match ``path``, longest first: /a/b/ → /a/b, /a, ""."""
    key = path.rstrip("/")
    keys = [key]
    while key:
        key = key[: key.rfind("/")]
        keys.append(key)
    return keys


def _first(
    tier: dict[str, list[_Entry]], keys: list[str], method: str
) -> tuple[bool, RouteConfig | None]:
    """(whether a prefix of this tier claims the path, the route allowing the method)."""
    for key in keys:
        entries = tier.get(key)
        if entries is not None:
            for entry in entries:
                if entry.methods is None or method in entry.methods:
                    return True, entry.route
            return True, None
    return False, None


# ---------------------------------------------------------------------------------------------
# Redirect targets
# ---------------------------------------------------------------------------------------------

# Control characters and whitespace: browsers strip tabs and newlines from URLs before parsing
# (WHATWG URL), so "/\t/evil.com" becomes "//evil.com"; raw spaces have no place in a URL.
_FORBIDDEN_IN_TARGET: Final = re.compile(r"[\x00-\x20\x7f-\x9f\\]|\s")
# In the decoded path, an encoded space is ordinary data, but "\" and controls are not.
_FORBIDDEN_DECODED: Final = re.compile(r"[\x00-\x1f\x7f\\]")


def safe_redirect_target(
    rd: str | None, *, allowed_hosts: Sequence[str], default: str = "/"
) -> str:
    """Where the browser may be sent after login or sign-out (the ``rd`` parameter).

    Accepted, returned unchanged: a path-absolute reference (``/x?y=1``), or an absolute
    ``http``/``https`` URL whose host is in ``allowed_hosts`` (exact, or ``*.example.com``
    matching any subdomain but not the apex). ``None`` or ``""`` gives ``default``.

    Anything else raises :class:`BadRedirect`: an open redirect turns the login page into a
    phishing aid (RFC 9700 4.11.2, OWASP "Unvalidated Redirects"). In particular
    ``//evil.com`` and ``/\\evil.com`` (browsers read both as another host), ``%5C`` in the
    path (some servers decode it to ``\\``), control characters and whitespace (browsers drop
    tabs and newlines, turning ``/\\t/evil.com`` into ``//evil.com``), userinfo
    (``https://good.com@evil.com`` goes to evil.com), other schemes (``javascript:``,
    ``data:``) and hosts not allowed.
    """
    if not rd:
        return default
    if _FORBIDDEN_IN_TARGET.search(rd):
        raise BadRedirect("the redirect target contains whitespace, a control character or \\")
    if rd.startswith("/"):
        if rd.startswith("//"):
            raise BadRedirect('the redirect target starts with "//", which names another host')
        # Judge the path also as a server that decodes it once would read it.
        path = rd.split("?", 1)[0].split("#", 1)[0]
        if "%" in path:
            decoded = unquote(path)
            if decoded.startswith("//") or _FORBIDDEN_DECODED.search(decoded):
                raise BadRedirect(
                    "the redirect target's path decodes to another host or a forbidden character"
                )
        return rd
    lowered = rd[:8].lower()
    if not (lowered.startswith("http://") or lowered.startswith("https://")):
        raise BadRedirect("the redirect target must be a path or an http(s) URL")
    try:
        netloc = urlsplit(rd).netloc
    except ValueError:  # an unbalanced "[" in the authority
        raise BadRedirect("the redirect target is not a valid URL") from None
    if "@" in netloc:
        raise BadRedirect("the redirect target must not contain user information")
    host = authority_host(netloc)
    if host is None:
        raise BadRedirect("the redirect target has no valid host")
    if not host_allowed(host, allowed_hosts):
        raise BadRedirect(f"the redirect target's host {host} is not served by this gateway")
    return rd


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """Is ``host`` (lower case) one of ``allowed_hosts`` (exact or ``*.example.com``)?"""
    for entry in allowed_hosts:
        allowed = entry.lower().removesuffix(".")
        if allowed.startswith("*."):
            if host.endswith(allowed[1:]):  # ".example.com": any depth, never the apex
                return True
        elif host == allowed:
            return True
    return False
