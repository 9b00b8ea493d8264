"""Log in through the gateway the way a browser does, against the real test OP.

``browser_login`` starts at a URL on the gateway, follows every redirect by hand (gateway → OP
→ OP interaction forms → gateway callback → original URL), fills and submits the OP's HTML forms
(login form: ``login`` + ``password``; consent form: its submit button; also auto-submitting
``form_post`` pages) and stops at the first answer that is neither a redirect nor a form on the
OP. Cookies live in the caller's ``aiohttp.ClientSession``; make it with :func:`new_browser`
(``CookieJar(unsafe=True)`` keeps cookies for IP hosts; like a browser, cookies ignore ports,
so the OP's and the gateway's cookies share the jar for 127.0.0.1).

Every request is recorded in ``result.trace`` as ``(method, url, status)``; ``trace[0]`` is the
start URL and, for a gateway that sends the browser to the provider, ``trace[1]`` is the OP's
authorization request.

Requests go to loopback addresses only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_FIELDS = ("login", "username", "user", "email", "uname")
FORM_TYPE = "application/x-www-form-urlencoded"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class LoginError(RuntimeError):
    """The browser walk could not go on (no Location, a redirect loop, a non-loopback URL)."""


@dataclass
class BrowserResult:
    """Where a browser walk ended."""

    status: int
    url: str  # the URL of the last request sent
    text: str
    headers: CIMultiDictProxy[str]
    trace: list[tuple[str, str, int]] = field(default_factory=list)
    # The first redirect (or form) from the OP back to the relying party: the gateway's callback
    # URL with code, state and iss. With stop_before_callback it is not requested.
    callback_url: str | None = None
    # When the walk stopped before following a redirect (stop_before_callback, or a sign-out
    # leaving the OP): the URL it would have gone to next.
    next_url: str | None = None
    provider_origin: str | None = None

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    def urls(self) -> list[str]:
        return [url for _, url, _ in self.trace]

    def visited_provider(self) -> bool:
        return self.provider_origin is not None and any(
            _origin(url) == self.provider_origin for url in self.urls())


@dataclass
class Form:
    action: str = ""
    method: str = "get"
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, value)
    submit: tuple[str, str] | None = None  # the first named submit button


class FormParser(HTMLParser):
    """Collects the forms of a page: their fields and first named submit button."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "form":
            method = (a.get("method") or "get").lower()
            self.forms.append(Form(action=a.get("action", ""), method=method))
            self._in_form = True
        elif self._in_form and tag in ("input", "button"):
            kind = a.get("type", "submit" if tag == "button" else "text").lower() or "text"
            name = a.get("name", "")
            form = self.forms[-1]
            if kind == "submit":
                if name and form.submit is None:
                    form.submit = (name, a.get("value", ""))
            elif name and kind not in ("button", "reset", "image", "file"):
                if kind in ("checkbox", "radio") and "checked" not in a:
                    return
                form.fields.append((name, kind, a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def parse_forms(html: str) -> list[Form]:
    parser = FormParser()
    parser.feed(html)
    parser.close()
    return parser.forms


def fill(form: Form, username: str, password: str) -> list[tuple[str, str]]:
    data: list[tuple[str, str]] = []
    for name, kind, value in form.fields:
        if kind == "password":
            value = password
        elif kind in ("text", "email") and name.lower() in USER_FIELDS:
            value = username
        data.append((name, value))
    if form.submit:
        data.append(form.submit)
    return data


def new_browser() -> aiohttp.ClientSession:
    """A client session with a browser-like cookie jar (cookies kept for 127.0.0.1 too).

    Call it inside a running event loop and close it (``async with new_browser() as b:``).
    """
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise LoginError(f"refusing to send a request off this machine: {url}")


def _with_query(url: str, data: list[tuple[str, str]]) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(data)))


async def _browse(
    session: aiohttp.ClientSession,
    start_url: str,
    *,
    username: str,
    password: str,
    accept: str,
    method: str,
    data: list[tuple[str, str]] | None,
    headers: dict[str, str] | None,
    provider_origin: str | None,
    stop_when_leaving_provider: bool,
    max_steps: int,
    request_timeout: float,
) -> BrowserResult:
    trace: list[tuple[str, str, int]] = []
    start_origin = _origin(start_url)
    op = provider_origin.lower().rstrip("/") if provider_origin else None
    callback_url: str | None = None
    url = start_url
    status = 0
    text = ""
    resp_headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)

    for _ in range(max_steps):
        _check_loopback(url)
        req_headers = {"Accept": accept, **(headers or {})}
        body: bytes | None = None
        if data is not None and method != "GET":
            body = urlencode(data).encode()
            req_headers["Content-Type"] = FORM_TYPE
        # encoded=True: send the URL exactly as the server wrote it, as a browser does.
        async with session.request(method, URL(url, encoded=True), data=body,
                                   headers=req_headers, allow_redirects=False,
                                   timeout=client_timeout) as resp:
            status = resp.status
            resp_headers = resp.headers
            text = await resp.text(errors="replace")
            content_type = resp.content_type
        trace.append((method, url, status))
        here = _origin(url)

        next_url: str | None = None
        next_method, next_data = "GET", None
        if status in REDIRECTS:
            location = resp_headers.get("Location")
            if not location:
                raise LoginError(f"HTTP {status} without Location from {method} {url}")
            next_url = urljoin(url, location)
            if status in (307, 308):
                next_method, next_data = method, data
        elif here == op and status < 400 and "html" in content_type:
            forms = parse_forms(text)
            if forms:
                form = forms[0]
                filled = fill(form, username, password)
                next_url = urljoin(url, form.action or url)
                if form.method == "post":
                    next_method, next_data = "POST", filled
                else:
                    next_url = _with_query(next_url, filled)

        if next_url is None:  # a final answer
            return BrowserResult(status, url, text, resp_headers, trace, callback_url, None, op)

        # The relying party's first redirect to another origin is the OP.
        if op is None and here == start_origin and _origin(next_url) != here:
            op = _origin(next_url)
        leaving_provider = here == op and _origin(next_url) != op
        if leaving_provider and callback_url is None:
            callback_url = next_url
        if leaving_provider and stop_when_leaving_provider:
            return BrowserResult(status, url, text, resp_headers, trace, callback_url, next_url,
                                 op)
        method, url, data = next_method, next_url, next_data

    raise LoginError(f"no end after {max_steps} steps (a redirect loop?): {trace}")


async def browser_login(
    session: aiohttp.ClientSession,
    start_url: str,
    *,
    username: str = "alice",
    password: str = "wonderland",  # noqa: S107 - alice's password at the loopback test OP
    accept: str = BROWSER_ACCEPT,
    stop_before_callback: bool = False,
    provider_origin: str | None = None,
    method: str = "GET",
    data: list[tuple[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    max_steps: int = 30,
    request_timeout: float = 10.0,
) -> BrowserResult:
    """Navigate to ``start_url`` and sign in at the OP when it asks; see the module docstring.

    Returns the first answer that is not a redirect and not an OP form (the page asked for, or an
    error page: a wrong password ends on the OP's 401 page). With ``stop_before_callback`` it
    stops when the OP redirects back to the relying party and returns that URL as
    ``callback_url`` without requesting it. The OP is the first origin, other than the start
    URL's, that the start origin redirects to, unless ``provider_origin`` says otherwise.
    """
    return await _browse(
        session, start_url, username=username, password=password, accept=accept,
        method=method.upper(), data=data, headers=headers, provider_origin=provider_origin,
        stop_when_leaving_provider=stop_before_callback, max_steps=max_steps,
        request_timeout=request_timeout,
    )


async def browser_sign_out(
    session: aiohttp.ClientSession,
    sign_out_url: str,
    *,
    method: str = "GET",
    accept: str = BROWSER_ACCEPT,
    provider_origin: str | None = None,
    headers: dict[str, str] | None = None,
    max_steps: int = 20,
    request_timeout: float = 10.0,
) -> BrowserResult:
    """Follow a sign-out: gateway → OP end_session → confirm the OP's sign-out form → back.

    Stops when the OP redirects back to the relying party (``next_url`` is the
    post_logout_redirect_uri, not requested), or at the first final answer (a gateway without
    RP-initiated logout ends on its own page).
    """
    return await _browse(
        session, sign_out_url, username="", password="", accept=accept, method=method.upper(),
        data=[] if method.upper() == "POST" else None, headers=headers,
        provider_origin=provider_origin, stop_when_leaving_provider=True, max_steps=max_steps,
        request_timeout=request_timeout,
    )
