"""Properties of path normalisation and routing: the path the gateway judges is the path the
upstream receives.

The gateway decodes the raw request path once and resolves dot-segments
(:func:`~gateway.routing.normalize_path`), matches a route on that, and sends the upstream
:func:`~gateway.routing.encode_path` of it through :func:`~gateway.proxy.upstream_url`. The
upstream decodes once. So for every raw path the normaliser accepts, the upstream must decode
back to exactly the authorised path, and that path must select the same route. Inputs mix the
pieces that path-confusion attacks are made of (raw and encoded dot-segments, encoded slashes
and backslashes, ``;`` parameters, NUL and control bytes, overlong UTF-8, ``%25`` double
encodings) with arbitrary text.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config import RouteConfig
from gateway.errors import BadRequest
from gateway.proxy import upstream_url
from gateway.routing import RouteTable, encode_path, normalize_path

UPSTREAM = "http://127.0.0.1:8080"

# The pieces of path-confusion attacks, raw and percent-encoded in both cases.
PIECES = [
    ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2e.", "%252e", "%252e%252e",
    "%2f", "%2F", "%252f", "%5c", "%5C", "\\", "%255c",
    ";", "..;", ".;x", "%3b", "%3B", ";jsessionid=1",
    "%00", "%0a", "%0d", "%09", "%7f", "%c2%85", "\x00", "\t", "\n", "\x7f", "\x85",
    "?", "#", "%3f", "%3F", "%23", "%25", "%", "%g0", "%2", "%%32%65",
    "%c0%ae", "%c0%af", "%e0%80%ae", "%ff", "%fe%ff", "%C3%A9", "é", "\udcff",
    "~", "@", ":", "+", "*", "!", "$", "&", "'", "(", ")", ",", "=", " ", "%20",
    "\u2215", "\uff0f", "\uff0e", "\u2024",  # look-alike slashes and dots
    "admin", "Admin", "ADMIN", "admin2", "public", "static", "api", "a", "b",
]
piece = st.one_of(
    st.sampled_from(PIECES),
    st.text(alphabet=st.sampled_from("ab./%;\\2eEfF5cC"), max_size=6),
)
segment = st.lists(piece, max_size=3).map("".join)
tricky_path = st.lists(segment, max_size=8).map(lambda segs: "/" + "/".join(segs))
raw_path = st.one_of(
    tricky_path,
    tricky_path.map(lambda p: p.replace("/", "//", 1)),
    st.text().map(lambda t: "/" + t),
    st.text(),
)

# What the normaliser must never let through (C0, DEL, C1 and the backslash).
FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
# RFC 3986 3.3 path-absolute: what encode_path must produce so any upstream parses it alike.
PATH_ABSOLUTE = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-F]{2})*)+")


def _decoded(raw: str) -> str:
    """The raw path decoded once, as the normaliser reads it (only called when it accepted)."""
    return unquote_to_bytes(raw).decode("utf-8") if "%" in raw else raw


def _normalized_or_none(raw: str) -> str | None:
    try:
        return normalize_path(raw)
    except BadRequest:
        return None


@given(raw_path)
@example("/public/%2e%2e/admin")
@example("/..;/admin")
@example("/%")
@example("/\udcff")
def test_normalize_raises_nothing_but_bad_request(raw: str) -> None:
    """Whatever the client sends, the answer is a path or a 400, never a 500."""
    _normalized_or_none(raw)


@given(raw_path)
def test_normalized_path_has_no_traversal_and_matches_a_reference(raw: str) -> None:
    """The output is a canonical absolute path: no empty, "." or ".." segment (so no ``//``,
    ``/./``, ``/../``), no dot-segment hiding behind ``;`` parameters, no control character or
    backslash, valid UTF-8; and it is what POSIX path resolution makes of the decoded path."""
    n = _normalized_or_none(raw)
    if n is None:
        return
    assert n.startswith("/")
    segments = n.split("/")[1:]
    assert all(seg not in (".", "..") for seg in segments)
    assert "" not in segments[:-1]  # only a trailing "/" leaves an empty last segment
    assert all(seg.partition(";")[0] not in (".", "..") for seg in segments)
    assert not FORBIDDEN.search(n)
    n.encode("utf-8")
    # An independent resolution of the same decoded path. posixpath keeps a leading "//" and
    # drops the trailing "/", so compare without them.
    decoded = _decoded(raw)
    assert posixpath.normpath("/" + decoded.lstrip("/")) == (n.rstrip("/") or "/")
    # A trailing "/" (a directory) survives, as RFC 3986 5.2.4 keeps it.
    last = decoded.rsplit("/", 1)[-1]
    assert n.endswith("/") == (n == "/" or last in ("", ".", ".."))


@given(raw_path)
@example("/%252e%252e/admin")
@example("/a%3Fb%23c")
@example("/caf%C3%A9/%25")
def test_upstream_receives_exactly_the_authorised_path(raw: str) -> None:
    """``encode_path`` is a valid RFC 3986 path that every upstream decodes back to the
    authorised path: the URL the proxy builds keeps it byte for byte (no client-side
    dot-segment resolution), aiohttp/yarl and WSGI-style latin-1 decoding both get the same
    path back, and the normaliser itself reads it as the same path (a fixed point)."""
    n = _normalized_or_none(raw)
    if n is None:
        return
    wire = encode_path(n)
    assert wire.isascii()
    assert PATH_ABSOLUTE.fullmatch(wire), wire
    # No dot-segment and no empty segment even before decoding: an intermediary that resolves
    # dot-segments in the raw path changes nothing either.
    assert all(seg not in (".", "..") for seg in wire.split("/")[1:])
    assert "//" not in wire
    assert normalize_path(wire) == n
    url = upstream_url(UPSTREAM, wire, "")
    assert url.raw_path == wire
    assert url.path == n
    assert unquote(wire, encoding="latin-1").encode("latin-1").decode("utf-8") == n


@given(raw_path)
def test_normalize_is_idempotent_on_decoded_text(raw: str) -> None:
    """Normalising twice changes nothing unless the path holds a literal "%" (which a second
    decode would read as an escape: by design, the path is decoded exactly once, and
    ``encode_path`` protects such a "%" as ``%25`` on the way to the upstream)."""
    n = _normalized_or_none(raw)
    if n is None or "%" in n:
        return
    assert normalize_path(n) == n


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------

WORDS = ["admin", "public", "a", "x;y", "é"]
ROUTE_HOSTS = [
    None, None, None, "app.example.com", "*.example.com", "*.b.example.com", "other.test"
]
REQUEST_HOSTS = [
    "app.example.com", "a.b.example.com", "b.example.com", "x.example.com", "example.com",
    "other.test", "unknown.test",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE"]

prefix = st.lists(st.sampled_from(WORDS), max_size=2).flatmap(
    lambda words: st.sampled_from(["/" + "/".join(words), "/" + "/".join(words) + "/"])
).map(lambda p: "/" if p == "//" else p)
route_spec = st.tuples(
    prefix,
    st.sampled_from(ROUTE_HOSTS),
    st.one_of(st.none(), st.lists(st.sampled_from(METHODS), min_size=1, max_size=3)),
)
route_table = st.lists(route_spec, min_size=1, max_size=7)
# Request paths built from the route words and the attack pieces, so they often sit exactly at
# (or one encoded "/" or ".." away from) a route boundary.
BOUNDARY_PIECES = ["..", "%2e%2e", ".", "", "%2f", "%2F", "..;", "%5c", "%2fadmin", "%2e"]
request_segments = st.lists(
    st.one_of(
        st.sampled_from(WORDS),
        st.sampled_from(BOUNDARY_PIECES),
        st.tuples(st.sampled_from(WORDS), st.sampled_from(PIECES)).map("".join),
        segment,
    ),
    max_size=5,
)
request_path = st.one_of(
    request_segments.map(lambda segs: "/" + "/".join(segs)),
    st.tuples(st.sampled_from(WORDS), request_segments).map(
        lambda t: "/" + t[0] + "/" + "/".join(t[1])
    ),
)


def _routes(specs: list[tuple[str, str | None, list[str] | None]]) -> list[RouteConfig]:
    routes = []
    for i, (path, host, methods) in enumerate(specs):
        match: dict[str, Any] = {"path": path}
        if host is not None:
            match["host"] = host
        if methods is not None:
            match["methods"] = methods
        routes.append(
            RouteConfig.model_validate({"name": f"r{i}", "match": match, "upstream": UPSTREAM})
        )
    return routes


def _reference_match(
    routes: list[RouteConfig], host: str, path: str, method: str
) -> RouteConfig | None:
    """The README's precedence rules, written out naively (quadratic, no tables): exact host,
    then wildcards from the longest suffix, then host-less routes; in a tier the longest
    segment-boundary prefix claims the path, the first of its routes allowing the method wins,
    and a claimed path never falls through."""

    def tier_of(route: RouteConfig) -> tuple[int, int] | None:
        h = route.match.host
        if h is None:
            return (2, 0)
        if h.startswith("*."):
            return (1, -len(h)) if host.endswith(h[1:]) else None
        return (0, 0) if h == host else None

    def claims(route: RouteConfig) -> bool:
        p = route.match.path.rstrip("/")
        return path == p or path.startswith(p + "/") or (p == "" and path == "/")

    def allows(route: RouteConfig) -> bool:
        m = route.match.methods
        return m is None or method in m or (method == "HEAD" and "GET" in m)

    tiers: dict[tuple[int, int], list[RouteConfig]] = {}
    for route in routes:
        t = tier_of(route)
        if t is not None:
            tiers.setdefault(t, []).append(route)
    for t in sorted(tiers):
        claiming = [r for r in tiers[t] if claims(r)]
        if not claiming:
            continue
        longest = max(len(r.match.path.rstrip("/")) for r in claiming)
        for r in claiming:
            if len(r.match.path.rstrip("/")) == longest and allows(r):
                return r
        return None
    return None


@given(route_table, st.sampled_from(REQUEST_HOSTS), request_path, st.sampled_from(METHODS))
def test_route_of_the_judged_path_is_the_route_of_the_forwarded_path(
    specs: list[tuple[str, str | None, list[str] | None]], host: str, raw: str, method: str
) -> None:
    """Whatever the path, the route matched is the route of the path the upstream receives,
    and it is the route the documented precedence rules pick."""
    routes = _routes(specs)
    table = RouteTable(routes)
    n = _normalized_or_none(raw)
    if n is None:
        return
    judged = table.match(host, n, method)
    received = upstream_url(UPSTREAM, encode_path(n), "").path
    assert received == n
    assert table.match(host, normalize_path(encode_path(n)), method) is judged
    assert judged is _reference_match(routes, host, n, method)
    if judged is not None:
        # Segment boundary: "/admin" never claims "/administrator".
        p = judged.match.path.rstrip("/")
        assert n == p or n.startswith(p + "/") or p == ""
