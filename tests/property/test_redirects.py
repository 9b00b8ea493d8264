"""Properties of the post-login / sign-out redirect validator: no open redirect, as urllib reads
a URL and as a browser does.

The browser's reading comes from ada (``ada-url``), the WHATWG URL parser Node.js uses: it
strips tabs and newlines, reads ``\\`` as ``/`` in http(s) URLs, takes ``https:evil`` as
``https://evil/`` when the base is http, percent-decodes and IDNA-maps hosts, and so on. Whatever
:func:`~gateway.routing.safe_redirect_target` accepts, the browser must land on the gateway's
own origin (a path) or on a configured host.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ada_url import URL
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.errors import BadRedirect
from gateway.routing import safe_redirect_target

ALLOWED = ("good.example", "*.apps.example")
# The page the browser is on when it follows the redirect (the callback or sign-out URL), over
# both schemes: WHATWG resolves "https:evil" differently against an http and an https base.
BASES = ("https://gw.example/oauth2/callback", "http://gw.example/oauth2/sign_out")


def browser_host_allowed(host: str) -> bool:
    """The allow-list read independently of gateway.routing.host_allowed."""
    host = host.removesuffix(".")
    return host == "good.example" or host.endswith(".apps.example")


SCHEMES = [
    "", "http:", "https:", "HTTPS:", "hTtP:", "javascript:", "data:", "ftp:", "ws:", "file:",
    "http", "https;", " https:", "\thttps:",
]
SEPARATORS = [
    "", "/", "//", "///", "\\", "\\\\", "/\\", "\\/", "%2f%2f", "/%2f", "/%5c", "%5c%5c",
    "\t//", "/\t/", "/\n/", "\r\n//", " //", "\u2215\u2215", "\uff0f\uff0f", "/\u3000/",
    "/%09/", "/%2F", "/./", "/../", "/.//", "/%2e%2e//",
]
USERINFO = ["", "", "", "user@", "good.example@", "good.example:pw@", "@", "%40", "a%40b@"]
HOSTS = [
    "good.example", "GOOD.example", "good.example.", "x.apps.example", "a.b.apps.example",
    "apps.example", "evilapps.example", "evil.test", "good.example.evil.test",
    "evil.test#good.example", "evil.test?good.example", "evil.test\\good.example",
    "evil.test%2f.good.example", "good%2eexample", "\uff47ood.example", "evil.test\u3002good",
    "good.example%00.evil.test", "[::1]", "127.0.0.1", "0x7f.1", "evil.test\t",
    "good.example\\@evil.test", "evil.test;good.example", "",
]
PORTS = ["", "", ":443", ":8443", ":0", ":99999", ":x", ":"]
TAILS = [
    "", "/", "/x", "/x?rd=//evil.test", "?a=b", "#frag", "@evil.test", "\\evil.test",
    "/..//evil.test", "/%2f%2fevil.test", "/%5cevil.test", "/%2e%2e/%2e%2e/",
    "/\u2215evil.test", "%0d%0aSet-Cookie:x=1",
]

PARTS = (SCHEMES, SEPARATORS, USERINFO, HOSTS, PORTS, TAILS)
# A URL that is accepted as it stands: an http(s) URL on a configured host, or a plain path.
GOOD_PARTS = (
    ["http:", "https:", "HTTPS:", ""],
    ["//"],
    [""],
    ["good.example", "GOOD.example", "good.example.", "x.apps.example", "a.b.apps.example"],
    ["", ":443", ":8443"],
    ["", "/", "/x", "?a=b", "#frag", "/x?rd=//evil.test"],
)


@st.composite
def composed(draw: st.DrawFn) -> str:
    """A URL built from parts: mostly a good one with one or two parts swapped for hostile
    ones (so the input sits right next to the accept/reject line), else parts at random."""
    parts = [draw(st.sampled_from(good)) for good in GOOD_PARTS]
    if parts[0] == "":  # a path: "//" would make it network-path reference
        parts[1], parts[3], parts[4] = "", "", ""
    mutate = draw(st.lists(st.integers(0, len(PARTS) - 1), max_size=2, unique=True))
    if draw(st.booleans()) and len(mutate) == 2:
        mutate = list(range(len(PARTS)))
    for i in mutate:
        parts[i] = draw(st.sampled_from(PARTS[i]))
    return "".join(parts)


@st.composite
def with_junk(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """Insert a character browsers drop or treat specially somewhere in the URL."""
    text = draw(base)
    junk = draw(st.sampled_from(["\t", "\n", "\r", " ", "\x00", "\x0c", "\\", "\u00a0", "\x7f"]))
    at = draw(st.integers(0, len(text)))
    return text[:at] + junk + text[at:]


redirect_target = st.one_of(
    composed(),
    with_junk(composed()),
    st.text(alphabet=st.sampled_from("/\\:@.%2fFcC5ehtps\t\n ?#evilgood"), max_size=30),
    st.text().map(lambda t: "/" + t),
    st.text(),
)


def _accepted(rd: str) -> str | None:
    try:
        return safe_redirect_target(rd, allowed_hosts=ALLOWED, default="/")
    except BadRedirect:
        return None


@given(redirect_target)
@example("//evil.test")
@example("/\\evil.test")
@example("/%5Cevil.test")
@example("/\t/evil.test")
@example("https:evil.test")
@example("https://good.example@evil.test")
@example("https://good.example\\@evil.test")
@example("https://evil.test#@good.example")
@example("javascript:alert(1)")
@example("https://x.apps.example/ok")
@example("/ok?next=//evil.test")
def test_accepted_targets_never_leave_the_allowed_hosts(rd: str) -> None:
    """Whatever ``rd`` is, an accepted target is returned unchanged and is either a path that
    keeps the browser on the gateway's origin, or an http(s) URL whose host - as urllib parses
    it and as a browser does - is configured."""
    target = _accepted(rd)
    if target is None:
        return
    assert target == (rd or "/")  # unchanged; no target at all means the default
    if target.startswith("/"):
        assert not target.startswith(("//", "/\\"))
        # A server that decodes the path once must not read it as another host either.
        path = unquote(target.split("?", 1)[0].split("#", 1)[0])
        assert not path.startswith(("//", "/\\"))
        assert urlsplit(target).netloc == ""
        for base in BASES:
            landed = URL(target, base)
            assert landed.hostname == "gw.example", (base, landed.href)
            assert landed.protocol == base.split("//", 1)[0]
        return
    parts = urlsplit(target)
    assert parts.scheme in ("http", "https")
    assert parts.username is None
    assert parts.password is None
    assert parts.hostname is not None
    assert browser_host_allowed(parts.hostname)
    for base in BASES:
        landed = URL(target, base)
        assert landed.protocol in ("http:", "https:")
        assert landed.username == ""
        assert landed.password == ""
        assert browser_host_allowed(landed.hostname), (base, landed.href)
        # Both readings name the same host.
        assert landed.hostname.removesuffix(".") == parts.hostname.removesuffix(".")


@given(redirect_target)
def test_the_validator_raises_nothing_but_bad_redirect(rd: str) -> None:
    """``rd`` comes straight from a query string: any text is a redirect or a 400, never a
    500."""
    _accepted(rd)


SAFE_PATH_CHARS = st.text(
    alphabet=st.sampled_from("abcxyzABC0123456789-._~!$&'()*+,;=:@"), max_size=20
)


@given(st.lists(SAFE_PATH_CHARS, min_size=1, max_size=4), SAFE_PATH_CHARS)
def test_plain_same_site_paths_and_allowed_urls_are_accepted(
    segments: list[str], query: str
) -> None:
    """The validator is not a wall: ordinary paths (with a query) and URLs on configured hosts
    come back unchanged, so users land where they were going."""
    path = "/" + "/".join(segments)
    if path.startswith("//"):
        return
    target = path + (f"?{query}" if query else "")
    assert _accepted(target) == target
    for host in ("good.example", "GOOD.EXAMPLE", "deep.x.apps.example"):
        url = f"https://{host}{path}"
        assert _accepted(url) == url

