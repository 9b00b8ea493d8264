"""The gateway's request handlers: its own ``/oauth2/*`` endpoints and the catch-all proxy.

Every request, whatever it asks for, goes through ``Gateway.handle``: one place that checks
header limits, settles the host and the normalised path, and turns every ``RequestError`` into
the right status with a page (browsers) or JSON (API clients). Protected proxying and
``/oauth2/userinfo`` share ``authenticate()``, so there is one way a session is believed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import math
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol
from urllib.parse import quote, urlsplit

import orjson
from aiohttp import web
from yarl import URL

from gateway.assertion import AssertionRequest, plan_with_assertion
from gateway.assertion import jwks as jwk_set
from gateway.assertion_keys import AssertionKeys
from gateway.bearer_auth import BearerAuth, BearerAuthenticator
from gateway.config import Config, RouteConfig
from gateway.errors import (
    BadRequest,
    BearerTokenError,
    ExpectationFailed,
    Forbidden,
    NotAuthenticated,
    NotFound,
    OIDCError,
    ProviderUnavailable,
    RequestError,
    SessionStoreError,
    UpstreamError,
)
from gateway.headers import (
    Forwarded,
    HeaderPolicy,
    auth_request_headers,
    canonical,
    check_header_limits,
    compile_identity_rules,
    configured_identity_headers,
    forwarded_facts,
    identity_value_problem,
    original_request,
    peer_trusted,
    set_cookie,
    upstream_response_headers,
    with_gateway_headers,
)
from gateway.idp import IdentityProvider
from gateway.models import Decision, Identity, IndexEntry, LoginState, Session, Ticket
from gateway.observability import (
    AUDITED,
    METRICS_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    LineStreamHandler,
    LineTemplate,
    Metrics,
    Outcome,
    log_info,
    new_request_id,
    request_id,
    short_hash,
)
from gateway.oidc import (
    LOGOUT_TOKEN_MAX_AGE,
    end_session_url,
    new_login_state,
    refresh_due,
    tokens_expire_at,
)
from gateway.pages import Link, PageKind, Pages
from gateway.policy import Access, authorize, login_style
from gateway.proxy import UpstreamProxy, is_websocket, upstream_url
from gateway.routing import (
    RouteTable,
    authority_host,
    encode_path,
    host_allowed,
    normalize_path,
    safe_redirect_target,
    without_path_params,
)
from gateway.session_cache import SESSION_KEY_PREFIX, SessionCache
from gateway.sessions import (
    SealingKey,
    SessionInvalid,
    decode_login_blob,
    decode_ticket,
    encode_login_blob,
    encode_ticket,
    load_session,
    login_bound,
    login_mark,
    login_time_left,
    needs_touch,
    new_ticket,
    open_login_state,
    pack_session,
    seal_login_state,
    seal_with,
    sealing_key,
    session_end_reason,
    store_ttl,
    touched,
    unseal,
)
from gateway.store import SessionStore

log = logging.getLogger("gateway")
# Results kept per identity (Gateway._memo_of): policy answers and identity header lists for a
# handful of routes, methods and client addresses; more than this and the oldest go.
_MEMO_ENTRIES = 64
# Cookie headers whose ticket is kept (Gateway._ticket_of): about one per signed-in browser
# of this process; past it the memo starts over.
_TICKET_MEMO = 4096
_TICKET_MEMO_HEADER = 1024
access_log = logging.getLogger("gateway.access")
audit_log = logging.getLogger("gateway.audit")

_BINDING_BYTES = 32
# A login's sealed state travels in the provider's URL up to this size (a return URL of about
# 1 KB); a longer one is kept in the store under a short reference starting with the prefix
# ("." is not base64url, so the two never meet).
_INLINE_STATE_CHARS = 1536
_STORED_STATE_PREFIX = "r."
# Seconds a used state's mark outlives the state's own expiry: gateway replicas whose clocks
# differ by up to this much still all refuse it.
_CLOCK_SKEW = 60.0
# The store is checked for a sign-in at most this often (while it keeps answering).
_STORE_CHECK_EVERY = 0.5
# While a sign-in was started within this many seconds, the check is kept fresh in the
# background (Gateway.keep_store_checked).
_SIGN_INS_RECENT = 60.0
_NO_STORE = "no-store"
# The gateway's own pages (sign-out confirmation, errors) are never framed: a framed
# "Sign out" button is a clickjacking target.
_PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    # The pages need nothing from elsewhere (inline styles, data: images at most): nothing
    # else may load, not even from an operator's templates_dir.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class _KeptAccess:
    """A policy.Access as memoised per identity: the identity by a flag, not a reference."""

    forward: bool
    login_needed: bool
    with_identity: bool
    decision: Decision | None


def _remember(
    memo: dict[tuple[object, ...], object], key: tuple[object, ...], value: object
) -> None:
    if len(memo) >= _MEMO_ENTRIES:
        del memo[next(iter(memo))]
    memo[key] = value


def admin_id(session_id: str) -> str:
    """The name of a session in the admin API: a hash, so listing sessions never reveals an
    id (with the cookie's secret still needed to open one, but ids stay out of logs anyway)."""
    return hashlib.sha256(b"oidc-gateway admin id\x00" + session_id.encode()).hexdigest()[:24]


def _origin_key(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a URL or serialized origin, default ports made explicit, so
    ``http://a`` and ``http://a:80`` compare equal; None when it is not an http(s) origin
    (``null``, garbage)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower().removesuffix("."), port or _DEFAULT_PORTS[scheme]


_CSP_HOST = re.compile(r"[a-z0-9.-]+|\[[0-9a-f:.]+\]")


def _csp_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL as a CSP source expression, or None when
    its host is not plainly a DNS name or IP address (it must not smuggle ``;`` or spaces
    into the header)."""
    key = _origin_key(url)
    if key is None:
        return None
    scheme, host, port = key
    if ":" in host:
        host = f"[{host}]"
    if not _CSP_HOST.fullmatch(host):
        return None
    return f"{scheme}://{host}" + ("" if port == _DEFAULT_PORTS[scheme] else f":{port}")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the gateway settled about a request before deciding anything."""

    request_id: str
    host: str  # validated host name, lower case, no port
    host_header: str  # the Host header as sent (with port), after validation
    path: str  # decoded, normalised path: what routes and policy see
    raw_query: str  # the query string exactly as received
    forwarded: Forwarded
    # Filled in as the request is decided; shared by copies (dataclasses.replace).
    outcome: Outcome = field(default_factory=Outcome)
    # What its head settled, kept for the same head sent again (Gateway._facts); None when
    # the head is not kept.
    head: KnownHead | None = None

    @property
    def origin(self) -> str:
        return f"{self.forwarded.proto}://{self.forwarded.host}"


Handler = Callable[[web.BaseRequest, RequestFacts], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class KnownHead:
    """What a request head settles by itself, kept by the head's exact bytes (with the
    client's address and scheme) while the config stays: a browser and an API client send
    the same head again and again (the session cookie included), and working it out anew
    (the facts, the route, the cleaned headers for the upstream) was a tenth of a signed-in
    request's CPU (issue 7). Each part is a pure function of the head and the config."""

    host: str
    host_header: str
    path: str
    raw_query: str
    forwarded: Forwarded
    items: list[tuple[str, str]]  # the headers as sent
    routes: dict[str, RouteConfig] = field(default_factory=dict)  # by method
    # (route, Authorization left out) -> the client's headers cleaned, Host and
    # X-Forwarded-*, for the upstream; and the upstream URL.
    upstream: dict[tuple[str, bool], tuple[tuple[tuple[str, str], ...], URL]] = field(
        default_factory=dict)


@dataclass(slots=True)
class RequestHead:
    """A request without a body, without credentials, as the server itself read it
    (``app.GatewayRequestHandler``): what :meth:`Gateway.answer_at_once` needs to refuse it
    without aiohttp's request machinery. ``items``: the headers as sent."""

    method: str
    raw_path: str
    items: list[tuple[str, str]]
    remote: str
    secure: bool
    raw: bytes = b""  # the head as received, when the server read it

    def getall(self, name: str) -> list[str]:
        """The values of the header named ``name`` (lower case), in order."""
        return [value for key, value in self.items if key.lower() == name]

    def get(self, name: str) -> str:
        """The first value of the header named ``name`` (lower case), or ""."""
        return next((value for key, value in self.items if key.lower() == name), "")


class LineSink(Protocol):
    """Where the server holds a request's log lines until it writes them, before its answer
    (``app.TurnWriter``)."""

    def hold_info(self, logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
        ...

    def hold_line(self, handler: LineStreamHandler, line: str) -> None:
        """A line already formatted (:meth:`LineTemplate.line`)."""

    def after_answer(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` once the answer is written."""


@dataclass(frozen=True, slots=True)
class _AtOncePlan:
    """What :meth:`Gateway.answer_at_once` decided for one distinct request head."""

    facts: RequestFacts  # its outcome recorded; request_id "" (each request has its own)
    route: str
    target: str  # where to return after the login
    redirect_uri: str | None  # a browser's redirect to the provider; None: the 401 JSON
    headers: tuple[tuple[str, str], ...]  # the 401's, before X-Request-Id
    body: bytes  # the 401's
    decision: str  # the metrics' decision label of its answer
    lines: tuple[LineTemplate, ...]  # its audit and access lines, but for id and duration
    # Its 401s differ only in the request id, their last header (WholeAnswer.frame).
    frame: object = field(default_factory=object, compare=False)


# Distinct request heads whose plan is kept (Gateway.answer_at_once): each at most
# app._AT_ONCE_MAX bytes; past this many the memo starts over.
_PLAN_MEMO = 1024
# Distinct request heads kept (Gateway._facts, KnownHead), each of at most _KNOWN_HEAD_BYTES
# of header names and values; past this many the memo starts over.
_KNOWN_HEADS = 1024
_KNOWN_HEAD_BYTES = 8192
# Log line templates kept (Gateway._line_template); past this many the memo starts over.
_LINE_TEMPLATES = 1024
_UNSEEN: Final = object()


@dataclass(slots=True)
class WholeAnswer:
    """An answer decided at once: the server frames it (Content-Length, Date, Server).

    Not frozen: one is made per request answered at once, and a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (4 % of a 401, issue 7).
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    # Its log lines, formatted, to be written before it is sent (app's turn writer).
    lines: list[tuple[LineStreamHandler, str]] = field(default_factory=list)
    # Answers with the same frame (not None) have the same status, reason, body and headers
    # but for the value of the last header: the server frames their constant bytes once.
    frame: object | None = None


def _split_target(raw_target: str, host_header: str) -> tuple[str, str]:
    """Request target → (raw path, raw query). An absolute-form target (``GET http://x/ ``) is
    accepted only when its authority is the Host header, so routing and URL building use one
    authority (security note 13)."""
    if not raw_target.startswith("/"):
        parts = urlsplit(raw_target)
        if parts.scheme not in ("http", "https") or parts.netloc.lower() != host_header.lower():
            raise BadRequest("the request target must be a path on this host")
        path, query = parts.path or "/", parts.query
        return path, query
    path, _, query = raw_target.partition("?")
    path = path.partition("#")[0]
    return path, query


def _json_answer(
    data: object, *, status: int = 200, headers: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> web.Response:
    """``web.json_response``, encoded with orjson: every 401 of an API client is one of these
    (issue 7: aiohttp's helper with the standard encoder cost 3.5 µs of a 40 µs answer).
    What orjson refuses (an integer beyond 64 bits in a provider's claims, say) takes the
    standard encoder."""
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError:
        body = json.dumps(data).encode()
    answer = web.Response(body=body, status=status, headers=headers)
    answer.headers["Content-Type"] = f"{content_type}; charset=utf-8"
    return answer


def _session_key(session_id: str) -> str:
    """The store key of a session (the session cache announces changes of these keys)."""
    return f"{SESSION_KEY_PREFIX}{session_id}"


def _wants_html(request: web.BaseRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _is_form_navigation(request: web.BaseRequest) -> bool:
    """A browser sending a form as a top-level navigation (``Sec-Fetch-Mode: navigate``, which
    only browsers send and pages cannot forge): it shows whatever comes back as the page, so
    it gets a page and never JSON. Scripts send no Fetch Metadata and keep getting JSON."""
    return (
        request.method not in ("GET", "HEAD")
        and request.headers.get("Sec-Fetch-Mode", "").strip().lower() == "navigate"
    )


def _is_navigation(request: web.BaseRequest) -> bool:
    """A browser navigating (it can follow a redirect to the provider) rather than a script."""
    headers = request.headers
    return _navigates(request.method, headers.get("Accept", ""),
                      headers.get("X-Requested-With", ""))


def _navigates(method: str, accept: str, requested_with: str) -> bool:
    return (method in ("GET", "HEAD") and "text/html" in accept
            and requested_with.lower() != "xmlhttprequest")


_UNAUTHENTICATED_HEADERS: Final = {
    "Cache-Control": _NO_STORE, "WWW-Authenticate": 'Bearer realm="oidc-gateway"'}


class Gateway:
    """Holds the wired parts and answers every request."""

    def __init__(
        self,
        config: Config,
        *,
        store: SessionStore,
        idp: IdentityProvider,
        proxy: UpstreamProxy,
        pages: Pages,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
        assertion_keys: AssertionKeys | None = None,
        session_cache: SessionCache | None = None,
    ):
        self.config = config
        # Recently used sessions of this process (None: off); kept correct by the store.
        self.session_cache = session_cache
        # When the store last answered a sign-in's check (_check_store_for_login).
        self._store_answered_at = -math.inf
        # When this process last started a sign-in (keep_store_checked).
        self._sign_in_at = -math.inf
        # The signed identity assertion's keys; None when no route has assertion: true.
        self.assertion_keys = assertion_keys
        # Each route's identity headers (headers:, merged with the route's own), by name.
        self.identity_rules = compile_identity_rules(config)
        self.store = store
        self.idp = idp
        self.proxy = proxy
        self.pages = pages
        self.metrics = metrics
        self.clock = clock
        self.token_bytes = token_bytes

        server, session = config.server, config.session
        self.routes = RouteTable(config.routes)
        self.keys = session.key_bytes
        self.prefix = server.prefix
        self.cookie = session.cookie
        # The names browsers see: "__Host-" + cookie.name when secure without a domain.
        self.cookie_name = session.cookie.effective_name
        self.login_cookie = f"{self.cookie_name}_login"
        self.login_ttl = session.login_timeout
        self.header_policy = HeaderPolicy(
            strip_patterns=server.strip_headers,
            own_cookie_name=self.cookie_name,
            extra_cookie_names=(session.cookie.name,),
            identity_names=configured_identity_headers(config),
        )
        hosts = [r.match.host for r in config.routes if r.match.host]
        if server.public_url:
            hosts.append(urlsplit(server.public_url).hostname or "")
        self.allowed_hosts = tuple(h for h in hosts if h)
        self.own: dict[str, Handler] = {
            f"{self.prefix}/start": self.start,
            f"{self.prefix}/callback": self.callback,
            f"{self.prefix}/sign_out": self.sign_out,
            f"{self.prefix}/userinfo": self.userinfo,
            f"{self.prefix}/auth": self.forward_auth,
            f"{self.prefix}/backchannel_logout": self.backchannel_logout,
            f"{self.prefix}/frontchannel_logout": self.frontchannel_logout,
            "/ping": self.ping,
            "/ready": self.ready,
            f"{self.prefix}/jwks.json": self.jwks,
        }
        if any(route.assertion for route in config.routes):
            # The usual JWKS place too, outside the prefix: taken from the upstreams only when
            # some route signs assertions (explain.py lists it alike).
            self.own["/.well-known/jwks.json"] = self.jwks
        if server.metrics_listen is None:  # else /metrics has a listener of its own (app.py)
            self.own["/metrics"] = self.metrics_endpoint
        self.callback_path = f"{self.prefix}/callback"
        self.sign_out_path = f"{self.prefix}/sign_out"
        # Set from SIGTERM on (app.py): /ready answers 503 so load balancers stop sending.
        self.draining = False
        # Session id → the refresh in flight in this process: concurrent requests of one
        # session await the same one (plus a store lock across processes, _refresh).
        self._refreshing: dict[str, asyncio.Task[Session | None]] = {}
        # id(identity) -> what was worked out for that Identity object: policy answers and
        # identity headers. An entry goes when its Identity is collected (weakref.finalize),
        # so the memo never outlives the sessions this process still holds.
        self._memos: dict[int, dict[tuple[object, ...], object]] = {}
        # Cookie header -> the ticket in it (_ticket_of).
        self._tickets: dict[str, Ticket | None] = {}
        self._spare_ticket: tuple[Ticket, SealingKey] | None = None
        # A request head without credentials -> its plan, or None (answer_at_once).
        self._plans: dict[tuple[object, ...], _AtOncePlan | None] = {}
        # A request head -> what it settles by itself (_facts).
        self._known_heads: dict[tuple[object, ...], KnownHead] = {}
        # A log line's fields but for request id and duration -> its template (_account).
        self._templates: dict[tuple[object, ...], LineTemplate | None] = {}
        # Routes with bearer: (API clients): their tokens' checks and introspection cache.
        self.bearer = BearerAuthenticator(config, idp, clock=clock)

    # ------------------------------------------------------------------ entry point

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = self._request_id(request)
        facts: RequestFacts | None = None
        route_name = "-"
        own = False
        error: RequestError | None = None
        try:
            expects = "Expect" in request.headers and self._expects_continue(request)
            facts = self._facts(request, request_id)
            handler = self.own.get(facts.path)
            if handler is not None:
                route_name = facts.path
                own = True
                if expects:
                    await self._continue(request)
                response = await handler(request, facts)
            elif facts.path.startswith(f"{self.prefix}/auth/"):
                # Envoy ext_authz's path_prefix form: /oauth2/auth/<original path>.
                route_name = f"{self.prefix}/auth"
                if expects:
                    await self._continue(request)
                response = await self.forward_auth(request, facts)
            elif facts.path == self.prefix or facts.path.startswith(self.prefix + "/"):
                raise NotFound("the gateway has no endpoint at this path")
            else:
                route = self._route_of(facts, request.method)
                route_name = route.name
                response, _ = await self._proxy(request, facts, route, expects=expects)
        except RequestError as exc:
            error = exc
            if isinstance(exc, SessionStoreError):
                self._store_answered_at = -math.inf  # the next sign-in asks the store again
            response = self._error(request, exc, request_id, facts)
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id})
            error = RequestError("internal error", reason="internal_error", status_hint=500)
            response = self._error(request, error, request_id, facts)
        if not response.prepared:  # a streamed answer got it with its headers (_proxy)
            response.headers[REQUEST_ID_HEADER] = request_id
        self._account(request.method, request.remote, request_id, facts, response.status,
                      route_name, own, error, time.perf_counter() - started,
                      held=getattr(request.protocol, "held_lines", None))
        return response

    def answer_at_once(self, head: RequestHead) -> WholeAnswer | None:
        """The answer to a request without credentials on a protected route, when it needs no
        I/O: the 401 of an API client, the redirect of a browser to the provider. None for
        anything else (and before any side effect): :meth:`handle` answers it.

        The server asks this before aiohttp parses the request (issue 7: a 401 through
        aiohttp's request objects and :meth:`handle` cost 51 µs of CPU). The decisions are
        :meth:`handle`'s own, through the same functions, made once per distinct head
        (:meth:`_plan_at_once`); ``tests/integration/test_at_once.py`` holds the two paths'
        answers to each other.
        """
        started = time.perf_counter()
        # The bytes read, when there are: their hash is kept with them (the server reads each
        # distinct head once), where a tuple of the headers is hashed anew every time.
        key = ((head.remote, head.secure, head.raw) if head.raw
               else (head.remote, head.secure, head.raw_path, *head.items))
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plan_at_once(head)
            if len(self._plans) >= _PLAN_MEMO:
                self._plans.clear()
            self._plans[key] = plan
        if plan is None:
            return None
        # Only a trusted proxy's X-Request-Id is ever used (_request_id_of).
        sent = head.getall("x-request-id") if self.config.server.trusted_proxies else None
        request_id = self._request_id_of(sent, head.remote)
        if plan.redirect_uri is not None:
            answer = self._redirect_at_once(plan, request_id)
            if answer is None:
                return None
        else:
            answer = WholeAnswer(401, "Unauthorized",
                                 [*plan.headers, (REQUEST_ID_HEADER, request_id)], plan.body,
                                 [], plan.frame)
        # _account's work, with the lines made from the plan's templates (and written by the
        # server together with those of the other answers of this event-loop turn).
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(plan.route, answer.status, plan.decision, elapsed)
        duration_ms = round(elapsed * 1000, 2)
        for template in plan.lines:
            line = template.line(request_id, duration_ms)
            if line is not None:
                answer.lines.append(line)
        return answer

    def _plan_at_once(self, head: RequestHead) -> _AtOncePlan | None:
        """What :meth:`handle` would decide for ``head``, when it is a login needed and
        nothing of it depends on more than the head and the config; else None."""
        try:
            facts = self._facts_of(head.items, head.getall("host"), head.raw_path,
                                   secure=head.secure, remote=head.remote, request_id="")
            if self._own_path(facts.path):
                return None
            route = self._match_route(facts.host, facts.path, head.method)
        except RequestError:
            return None
        if route.auth == "public" or route.bearer is not None:
            return None
        access = self._access(route, None, head.method, facts.forwarded.client_ip)
        if not access.login_needed:
            return None
        facts.outcome.record(route.auth, access)
        target = self._target_of(facts)
        navigation = _navigates(head.method, head.get("accept"), head.get("x-requested-with"))
        if login_style(route, navigation=navigation) == "redirect":
            redirect_uri = self._redirect_uri(facts)
            try:
                self._check_cookie_reach(facts, redirect_uri)
            except RequestError:
                return None
            decision = facts.outcome.final(302, own_endpoint=False)
            return _AtOncePlan(facts, route.name, target, redirect_uri, (), b"", decision,
                               self._plan_templates(head, facts, 302, route.name, decision))
        headers = (*_UNAUTHENTICATED_HEADERS.items(),
                   ("Content-Type", "application/json; charset=utf-8"))
        body = orjson.dumps(self._unauthenticated_json(facts, target))
        decision = facts.outcome.final(401, own_endpoint=False)
        return _AtOncePlan(facts, route.name, target, None, headers, body, decision,
                           self._plan_templates(head, facts, 401, route.name, decision))

    def _plan_templates(
        self, head: RequestHead, facts: RequestFacts, status: int, route: str, decision: str
    ) -> tuple[LineTemplate, ...]:
        """The lines :meth:`_account` writes for an answer of this plan, less the request id
        and duration that each request has its own of."""
        return tuple(
            LineTemplate(logger, message, fields, ("request_id", "duration_ms"))
            for logger, message, fields in self._log_lines(
                head.method, head.remote, "", facts, status, route, decision, None, 0.0))

    def _redirect_at_once(self, plan: _AtOncePlan, request_id: str) -> WholeAnswer | None:
        """:meth:`_begin_login` for a browser without a binding cookie, when nothing waits:
        the provider is loaded, the store answered a moment ago, the state fits the URL."""
        now = time.monotonic()
        if (not self.idp.ready or plan.redirect_uri is None
                or now - self._store_answered_at >= _STORE_CHECK_EVERY):
            return None
        self._sign_in_at = now
        login, blob, binding = self._new_login(plan.target, None)
        state = encode_login_blob(blob)
        if len(state) > _INLINE_STATE_CHARS:
            return None
        location, cookie = self._login_redirect(login, state, binding, plan.redirect_uri)
        if "\r" in location or "\n" in location:
            return None  # handle() refuses to send it (security note 8)
        return WholeAnswer(302, "Found", [
            ("Location", location), ("Cache-Control", _NO_STORE), ("Set-Cookie", cookie),
            (REQUEST_ID_HEADER, request_id),
        ], b"")

    @staticmethod
    def _expects_continue(request: web.BaseRequest) -> bool:
        """Whether the client holds its body back until it hears ``100 Continue`` (RFC 9110
        10.1.1); any other expectation cannot be met (417). HTTP/1.0 has no 1xx answers: its
        Expect is ignored. The gateway's server hands requests straight to :meth:`handle`,
        past aiohttp's router, which used to answer it (``create_app`` turns that off)."""
        if request.version < (1, 1):
            return False
        if request.headers.getone("Expect", "").lower() != "100-continue":
            raise ExpectationFailed("The request's Expect header asks for something this "
                                    "gateway cannot do; only 100-continue is supported.")
        return True

    @staticmethod
    async def _continue(request: web.BaseRequest) -> None:
        """Say "continue" once the request may go ahead: a client holding its body back (curl,
        above 1 KB) then sends it at once rather than after its own wait, and one that is
        refused (401, redirect, 403, 404) hears so without having been asked for its body."""
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own size starts after the 100

    def _request_id(self, request: web.BaseRequest) -> str:
        """A trusted proxy's X-Request-Id when it is a safe id, else a new one."""
        if REQUEST_ID_HEADER not in request.headers:
            return new_request_id()
        return self._request_id_of(request.headers.getall(REQUEST_ID_HEADER), request.remote)

    def _request_id_of(self, sent: Sequence[str] | None, remote: str | None) -> str:
        trusted = self.config.server.trusted_proxies
        if not trusted or not sent:
            return new_request_id()
        return request_id(
            sent[0] if len(sent) == 1 else None, trusted=peer_trusted(remote or "", trusted))

    def _account(
        self, method: str, remote: str | None, request_id: str, facts: RequestFacts | None,
        status: int, route: str, own: bool, error: RequestError | None, elapsed: float,
        held: LineSink | None = None,
    ) -> None:
        """Metrics, the audit line (one per access decision) and the access line of a request.

        Never a token, cookie, session id or query string: the path and the user name are as
        much as a log line says about what was asked and by whom. ``held``: where the server
        holds the lines until it writes them, before the answer (app.TurnWriter).
        """
        outcome = facts.outcome if facts is not None else Outcome()
        decision = outcome.final(status, own_endpoint=own)
        self.metrics.observe_request(route, status, decision, elapsed)
        if own and route == self.callback_path:
            self.metrics.logins.labels("ok" if status == 302 else "failed").inc()
        elif own and route == self.sign_out_path and status >= 500:
            self.metrics.logouts.labels("failed").inc()
        duration_ms = round(elapsed * 1000, 2)
        for logger, message, fields in self._log_lines(
                method, remote, request_id, facts, status, route, decision, error,
                duration_ms):
            if held is None:
                log_info(logger, message, fields)
                continue
            template = self._line_template(logger, message, fields)
            if template is None:
                held.hold_info(logger, message, fields)
                continue
            made = template.line(request_id, duration_ms)
            if made is not None:  # None: the logging set-up is not ours alone, it went out
                held.hold_line(*made)

    def _line_template(
        self, logger: logging.Logger, message: str, fields: dict[str, object]
    ) -> LineTemplate | None:
        """The template of this line but for its request id and duration, kept by the
        rest of its fields: a signed-in user's requests to a page log the same line again and
        again (issue 7: encoding it was a twentieth of a signed-in GET's CPU). Made the second
        time a line is seen: a line seen once (an API with an id in every path) costs a
        template more than it saves. None for the first time, and when a field's value
        cannot be a key."""
        key = (logger, message, *[item for item in fields.items()
                                  if item[0] != "request_id" and item[0] != "duration_ms"])
        templates = self._templates
        try:
            found = templates.get(key, _UNSEEN)
        except TypeError:
            return None
        if isinstance(found, LineTemplate):
            return found
        if len(templates) >= _LINE_TEMPLATES:
            templates.clear()
        if found is _UNSEEN:
            templates[key] = None
            return None
        template = templates[key] = LineTemplate(
            logger, message, fields, ("request_id", "duration_ms"))
        return template

    def _log_lines(
        self, method: str, remote: str | None, request_id: str, facts: RequestFacts | None,
        status: int, route: str, decision: str, error: RequestError | None,
        duration_ms: float,
    ) -> list[tuple[logging.Logger, str, dict[str, object]]]:
        """The audit and access lines of a request, as the config asks for them."""
        settings = self.config.logging
        audited = settings.audit_log and decision in AUDITED
        if not (settings.access_log or audited):
            return []
        outcome = facts.outcome if facts is not None else Outcome()
        fields: dict[str, object] = {
            "request_id": request_id,
            "method": method,
            "host": facts.host if facts else None,
            "path": facts.path if facts else None,
            "status": status,
            "route": route,
            "decision": decision,
            "user": outcome.user,
            "auth": outcome.auth,
            "client_ip": facts.forwarded.client_ip if facts else remote,
            "duration_ms": duration_ms,
        }
        lines: list[tuple[logging.Logger, str, dict[str, object]]] = []
        if audited:
            lines.append((audit_log, AUDITED[decision],
                          {**fields, "reason": outcome.reason, "rule": outcome.rule or "-"}))
        if settings.access_log:
            # The error's reason id when the request failed (upstream_timeout...), else the
            # decision's.
            reason = error.reason if error is not None else outcome.reason
            lines.append((access_log, "request", {**fields, "reason": reason}))
        return lines

    def _facts(self, request: web.BaseRequest, request_id: str) -> RequestFacts:
        """:meth:`_facts_of` the request, from the memo when its head was seen before
        (:class:`KnownHead`: the same raw headers, path, address and scheme)."""
        raw_headers = request.raw_headers
        key = (request.raw_path, raw_headers, request.remote, request.secure)
        known = self._known_heads.get(key)
        if known is not None:
            return RequestFacts(request_id, known.host, known.host_header, known.path,
                                known.raw_query, known.forwarded, Outcome(), known)
        items = list(request.headers.items())
        facts = self._facts_of(
            items, request.headers.getall("Host", ()), request.raw_path,
            secure=request.secure, remote=request.remote, request_id=request_id)
        if sum(len(name) + len(value) for name, value in raw_headers) > _KNOWN_HEAD_BYTES:
            return facts
        known = KnownHead(facts.host, facts.host_header, facts.path, facts.raw_query,
                          facts.forwarded, items)
        if len(self._known_heads) >= _KNOWN_HEADS:
            self._known_heads.clear()
        self._known_heads[key] = known
        return replace(facts, head=known)

    def _facts_of(
        self, items: list[tuple[str, str]], hosts: Sequence[str], raw_target: str, *,
        secure: bool, remote: str | None, request_id: str,
    ) -> RequestFacts:
        server = self.config.server
        check_header_limits(
            items, max_count=server.max_header_count, max_bytes=server.max_header_bytes
        )
        # RFC 9112 3.2: more than one Host is a 400. aiohttp's parser refuses it today; checked
        # here too because routing and URL building must rest on exactly one authority.
        if len(hosts) > 1:
            raise BadRequest("the request has more than one Host header")
        host_header = hosts[0] if hosts else ""
        host = authority_host(host_header)
        if host is None:
            raise BadRequest("the Host header is missing or malformed")
        raw_path, raw_query = _split_target(raw_target, host_header)
        path = normalize_path(raw_path)
        scheme = "https" if secure else "http"
        forwarded = forwarded_facts(
            peer_ip=remote or "",
            headers=items,
            trusted=server.trusted_proxies,
            scheme=scheme,
            host=host_header,
        )
        return RequestFacts(request_id, host, host_header, path, raw_query, forwarded)

    # ------------------------------------------------------------------ sessions

    async def authenticate(self, request: web.BaseRequest) -> tuple[Ticket, Session] | None:
        """The session this request's cookie opens, or None. Store failures propagate (503):
        a store we cannot read must never turn into a pass.

        Tokens about to expire (``session.refresh_before``) are refreshed first, once per
        session however many requests arrive together (:meth:`_refresh_once`)."""
        ticket = self._ticket_of(request)
        if ticket is None:
            return None
        # The session cache's mark for this request's early ping (app.GatewayRequestHandler).
        session = await self._open(
            ticket, arrived=getattr(request.protocol, "confirm_after", None))
        if session is None:
            return None
        now = self.clock()
        settings = self.config.session
        idle = settings.idle_timeout
        ended = session_end_reason(session, now=now, idle_timeout=idle)
        if ended is None and settings.expire_with_tokens and session.tokens.refresh_token is None:
            expires = tokens_expire_at(session.tokens)
            if expires is not None and now >= expires:
                ended = "tokens_expired"
        if ended is not None:
            await self._end_session(ticket.session_id, session)
            log.info("session ended", extra={"reason": ended,
                                             "session": short_hash(ticket.session_id)})
            return None
        if refresh_due(session.tokens, now=now, margin=settings.refresh_before):
            refreshed = await self._refresh_once(ticket)
            if refreshed is None:
                return None
            session = refreshed
        elif needs_touch(session, now=now, idle_timeout=idle):
            session = touched(session, now)
            await self._save(ticket, session, now)
            await self._touch_index(ticket.session_id, session)
        return ticket, session

    def _ticket_of(self, request: web.BaseRequest) -> Ticket | None:
        """The session cookie's ticket, as ``decode_ticket(request.cookies[name])`` gives it.

        A browser sends the same Cookie header with every request, and parsing it (aiohttp's
        cookie parser, then the ticket's strict base64) cost ~15 µs of each signed-in request
        (issue 7). aiohttp parses only the first Cookie header, so the answer depends on that
        header's text alone and is kept by it. Bounded twice, so that clients sending ever new
        cookies cost at most a few MiB: headers longer than a usual browser's are not kept,
        and the memo is emptied when full.
        """
        header = request.headers.get("Cookie", "")
        if header in self._tickets:
            return self._tickets[header]
        ticket = decode_ticket(request.cookies.get(self.cookie_name, ""))
        if len(header) > _TICKET_MEMO_HEADER:
            return ticket
        if len(self._tickets) >= _TICKET_MEMO:
            self._tickets.clear()
        self._tickets[header] = ticket
        return ticket

    async def _open(
        self, ticket: Ticket, *, fresh: bool = False, arrived: int | None = None,
    ) -> Session | None:
        """Read and unseal the session of ``ticket``; None when absent or not opening.

        From this process's session cache when it holds the session (and may be trusted now,
        gateway/session_cache.py), unless ``fresh``: a re-read that must see what another
        process wrote a moment ago (the refresh lock)."""
        key = _session_key(ticket.session_id)
        cache = self.session_cache
        entry = None
        if cache is not None and not fresh:
            # An entry is used only after Redis confirmed that nothing invalidated it since
            # this request arrived (SessionCache.confirmed); without one, no ping: the store.
            if cache.holds(key) and await cache.confirmed(after=arrived):
                entry = cache.lookup(key)
            if entry is not None:
                session = cache.opened(entry, ticket.secret)
                if session is not None:
                    return session
                blob: bytes | None = entry.blob
            else:
                token = cache.begin(key)
                blob = await self.store.get(key)
                entry = cache.fill(key, token, blob)
        else:
            blob = await self.store.get(key)
        if blob is None:
            return None
        try:
            session = load_session(
                unseal(blob, keys=self.keys, secret=ticket.secret, aad=key.encode())
            )
        except SessionInvalid:
            log.info("session cookie does not open its session",
                     extra={"session": short_hash(ticket.session_id)})
            return None
        if entry is not None and cache is not None:
            cache.remember(entry, ticket.secret, session)
        return session

    # ------------------------------------------------------------------ refresh

    async def _refresh_once(self, ticket: Ticket) -> Session | None:
        """Refresh the session's tokens; concurrent callers in this process share one attempt.

        The shared task is shielded: a client that disconnects must not cancel the refresh
        other requests wait for (a cancelled refresh with a rotating provider could lose the
        new refresh token).
        """
        session_id = ticket.session_id
        task = self._refreshing.get(session_id)
        if task is None:
            task = asyncio.create_task(self._refresh(ticket), name="session-refresh")
            self._refreshing[session_id] = task

            def forget(done: asyncio.Task[Session | None]) -> None:
                if self._refreshing.get(session_id) is done:
                    del self._refreshing[session_id]

            task.add_done_callback(forget)
        return await asyncio.shield(task)

    async def _refresh(self, ticket: Ticket) -> Session | None:
        """One refresh across every gateway process sharing the store.

        A lock (``SET NX`` with a short TTL, released by compare-and-delete) lets one process
        call the token endpoint; the others wait for it and then re-read the session, finding
        the fresh tokens already there. That is what keeps a provider that rotates refresh
        tokens (reuse → ``invalid_grant``) from ending sessions under concurrent requests.
        ``invalid_grant`` (any RFC 6749 token error) or a refreshed ID token for another
        subject ends the session; a timeout or 5xx keeps it while its token is still valid.
        """
        lock_key = f"r:{ticket.session_id}"
        lock_value = base64.urlsafe_b64encode(self.token_bytes(18))
        lock_ttl = self.config.provider.timeout + 5.0
        deadline = time.monotonic() + lock_ttl + 1.0
        while not await self.store.set_new(lock_key, lock_value, lock_ttl):
            if time.monotonic() > deadline:
                raise ProviderUnavailable(
                    "Another gateway is refreshing this session's tokens and has not finished. "
                    "Try again in a moment.")
            await asyncio.sleep(0.05)
        try:
            # Re-read, past the cache: another process may have refreshed a moment ago.
            session = await self._open(ticket, fresh=True)
            if session is None:
                return None
            now = self.clock()
            if not refresh_due(session.tokens, now=now,
                               margin=self.config.session.refresh_before):
                return session
            try:
                tokens = await self.idp.refresh(session.tokens, sub=session.identity.sub)
            except OIDCError as exc:
                if exc.reason in ("token_error", "id_token_invalid", "refresh_unavailable"):
                    await self._end_session(ticket.session_id, session)
                    log.info("session ended: refresh refused", extra={
                        "reason": exc.reason, "detail": exc.message,
                        "session": short_hash(ticket.session_id)})
                    return None
                return self._refresh_failed(session, ticket, now, exc)
            except ProviderUnavailable as exc:
                return self._refresh_failed(session, ticket, now, exc)
            identity = await self.idp.identity_after_refresh(
                session.identity, session.tokens, tokens)
            session = replace(touched(session, now), tokens=tokens, identity=identity)
            await self._save(ticket, session, now)
            log.info("tokens refreshed", extra={"session": short_hash(ticket.session_id)})
            return session
        finally:
            await self.store.delete_if(lock_key, lock_value)

    def _refresh_failed(
        self, session: Session, ticket: Ticket, now: float, exc: RequestError
    ) -> Session:
        """A transient refresh failure: keep the session while its token is valid, else 503
        (never a sign-out: the next request tries again)."""
        log.warning("token refresh failed; will retry", extra={
            "reason": exc.reason, "detail": exc.message,
            "session": short_hash(ticket.session_id)})
        expires = tokens_expire_at(session.tokens)
        if expires is not None and expires > now:
            return session
        raise ProviderUnavailable(
            "The sign-in service could not renew your session just now. Try again in a minute.")

    # ------------------------------------------------------------------ session indexes

    def _index_keys(self, session_id: str, meta: Mapping[str, object]) -> list[str]:
        """The indexes a session is listed in: its provider session (sid), subject, user
        name (admin API) and id hash (admin API revocation)."""
        keys = [f"x:sub:{meta['sub']}", f"x:user:{meta['user']}", f"x:h:{admin_id(session_id)}"]
        if meta.get("sid"):
            keys.append(f"x:sid:{meta['sid']}")
        return keys

    def _index_entries(
        self, session_id: str, session: Session, request: web.BaseRequest, *, client_ip: str
    ) -> list[IndexEntry]:
        """A new session's entries in its indexes: what the admin API shows (never a token),
        kept as long as a session can live (``session.lifetime``); entries of sessions that
        ended otherwise are skipped and pruned when read."""
        agent = request.headers.get("User-Agent", "")
        meta = {"user": session.identity.user, "sub": session.identity.sub,
                "sid": session.sid, "created": session.created_at,
                "last_seen": session.last_seen, "client_ip": client_ip,
                "user_agent": agent[:256]}
        value = json.dumps(meta, separators=(",", ":")).encode()
        ttl = self.config.session.lifetime
        return [IndexEntry(key, session_id, value, ttl)
                for key in self._index_keys(session_id, meta)]

    async def _touch_index(self, session_id: str, session: Session) -> None:
        """Refresh a session's last-seen in the indexes the admin API reads."""
        index = f"x:h:{admin_id(session_id)}"
        old = (await self.store.index_get(index)).get(session_id)
        if old is None:
            return
        meta = json.loads(old)
        meta["last_seen"] = session.last_seen
        value = json.dumps(meta, separators=(",", ":")).encode()
        ttl = self.config.session.lifetime
        # Independent writes (one key each): in parallel, one round trip of waiting.
        await asyncio.gather(*(self.store.index_put(key, session_id, value, ttl)
                               for key in (index, f"x:user:{meta['user']}")))

    async def _end_session(self, session_id: str, session: Session | None) -> None:
        """Delete a session and take it out of its indexes."""
        await self.store.delete(_session_key(session_id))
        if session is not None:
            meta = {"sub": session.identity.sub, "user": session.identity.user,
                    "sid": session.sid}
            for key in self._index_keys(session_id, meta):
                await self.store.index_remove(key, session_id)

    async def sessions_in(self, index: str) -> dict[str, dict[str, object]]:
        """The live sessions listed in ``index`` (session id → admin entry); stale entries
        (sessions ended by expiry) are pruned on the way."""
        out: dict[str, dict[str, object]] = {}
        stale: list[str] = []
        for session_id, raw in (await self.store.index_get(index)).items():
            if await self.store.get(_session_key(session_id)) is None:
                stale.append(session_id)
                continue
            try:
                meta = json.loads(raw)
            except ValueError:
                stale.append(session_id)
                continue
            if isinstance(meta, dict):
                out[session_id] = meta
        if stale:
            await self.store.index_remove(index, *stale)
        return out

    async def revoke(self, entries: Mapping[str, Mapping[str, object]]) -> int:
        """End every session of ``entries`` (from :meth:`sessions_in`) in the shared store:
        every gateway process refuses them from its next request on."""
        for session_id, meta in entries.items():
            await self.store.delete(_session_key(session_id))
            for key in self._index_keys(session_id, meta):
                await self.store.index_remove(key, session_id)
            log.info("session revoked", extra={"session": short_hash(session_id)})
        return len(entries)

    async def _save(
        self, ticket: Ticket, session: Session, now: float, *,
        index: Sequence[IndexEntry] | None = None, sealing: SealingKey | None = None,
    ) -> None:
        """Seal and store ``session``. With ``index`` (a login): a session id never used
        before, stored only if absent, with its index entries in the same round trip; no
        process can hold it in its cache, so no invalidation. This process keeps it there
        instead: the browser's next request (the page it came for, most often on this same
        connection) finds it after the confirmation ping, with no store read and no
        unsealing. A revoke during the write voids that, as for a read."""
        key = _session_key(ticket.session_id)
        cache = self.session_cache if index is not None else None
        token = cache.begin(key, read=False) if cache is not None else None
        blob = seal_with(
            sealing or sealing_key(self.keys[0], ticket.secret),
            pack_session(session),
            aad=key.encode(),
            nonce_bytes=self.token_bytes(12),
        )
        ttl = store_ttl(session, now=now, idle_timeout=self.config.session.idle_timeout)
        if index is None:
            await self.store.set(key, blob, ttl)
        elif not await self.store.set_new_indexed(key, blob, ttl, index):
            # A fresh random id already taken: never overwrite someone's session.
            raise SessionStoreError("A new session could not be stored; sign in again.")
        if cache is not None:
            entry = cache.fill(key, token, blob)
            if entry is not None:
                cache.remember(entry, ticket.secret, session)

    def _set_cookie(
        self, response: web.StreamResponse, name: str, value: str, *, max_age: int, path: str
    ) -> None:
        response.headers.add("Set-Cookie", self._cookie(name, value, max_age=max_age, path=path))

    def _cookie(self, name: str, value: str, *, max_age: int, path: str) -> str:
        """A ``Set-Cookie`` value with the configured domain, Secure and SameSite."""
        return set_cookie(
            name, value, max_age=max_age, path=path, domain=self.cookie.domain,
            secure=self.cookie.secure, samesite=self.cookie.samesite.capitalize(),
        )

    # ------------------------------------------------------------------ proxy

    def _own_path(self, path: str) -> bool:
        """Whether :meth:`handle` answers ``path`` itself (an endpoint, or a 404 under the
        prefix) rather than a route."""
        return path in self.own or path == self.prefix or path.startswith(self.prefix + "/")

    def _match_route(self, host: str, path: str, method: str) -> RouteConfig:
        """The route serving ``method`` ``path`` on ``host``: NotFound without one; BadRequest
        when ``;parameters`` would move the request to another route."""
        route = self.routes.match(host, path, method)
        if route is None:
            raise NotFound("no route of this gateway matches this host and path")
        if ";" in path and route is not self.routes.match(
            host, without_path_params(path), method
        ):
            # Servlet containers drop ";params" before mapping a path: /admin;x is
            # their /admin, but here it matched another route. Refuse the ambiguity.
            raise BadRequest(
                'the request path has ";" parameters that change which route serves it'
            )
        return route

    def _route_of(self, facts: RequestFacts, method: str) -> RouteConfig:
        """:meth:`_match_route` for the request, kept with its head (:class:`KnownHead`)."""
        known = facts.head
        if known is None:
            return self._match_route(facts.host, facts.path, method)
        route = known.routes.get(method)
        if route is None:
            route = known.routes[method] = self._match_route(facts.host, facts.path, method)
        return route

    def _memo_of(self, identity: Identity) -> dict[tuple[object, ...], object]:
        """The results kept for this Identity object, dropped when it is collected."""
        key = id(identity)
        memo = self._memos.get(key)
        if memo is None:
            memo = self._memos[key] = {}
            # Runs as the object dies, before its id can be reused by another.
            weakref.finalize(identity, self._memos.pop, key, None)
        return memo

    async def _decide(
        self, request: web.BaseRequest, facts: RequestFacts, route: RouteConfig, method: str
    ) -> tuple[Access, str | None]:
        """Whether ``method`` on ``route`` may go ahead for this request's session, and the
        access token to pass on (when the route passes it). The one decision the proxy and
        forward-auth both act on. Raises Forbidden (logged with the deciding rule) when the
        policy refuses; ``Access.login_needed`` asks the caller to get a sign-in."""
        # Public routes never look at the session; optional ones use it when there is one.
        # On a route with bearer:, an Authorization: Bearer token stands in for the cookie:
        # no cookie is read, no session written for that request (gateway.bearer_auth).
        bearer = await self._bearer(request, facts, route) if route.bearer is not None else None
        found = (await self.authenticate(request)
                 if route.auth != "public" and bearer is None else None)
        identity = bearer.identity if bearer else found[1].identity if found else None
        # One decision for the live gateway and `oidc-gateway explain` (policy.authorize),
        # computed once per (route, identity, method, client address): the same user's next
        # request gets the same answer, and the policy depends on nothing else.
        access = self._access(route, identity, method, facts.forwarded.client_ip)
        # The audit line (Gateway._account) says who, what was decided and by which rule.
        facts.outcome.record(route.auth, access)
        facts.outcome.user = identity.user if identity else None
        facts.outcome.auth = "bearer" if bearer else "session" if found else None
        if not access.login_needed and not access.forward:
            who = identity.user if identity else "-"
            message = f"You are signed in as {who}, but this account may not open this page."
            if identity is not None and identity.groups_state in ("unavailable", "invalid"):
                # The user is not refused for a group they lack: the provider did not say.
                message += (" Your group membership is unavailable (the sign-in service did "
                            "not provide it), so rules on groups cannot admit you.")
            if bearer is not None:  # RFC 6750 3.1: the token is good, its holder may not
                raise BearerTokenError(message, error="insufficient_scope",
                                       reason="policy_denied", status_hint=403)
            raise Forbidden(message, reason="policy_denied")
        token = None
        if access.identity is not None and route.pass_access_token:
            token = bearer.token if bearer else found[1].tokens.access_token if found else None
        return access, token

    def _access(
        self, route: RouteConfig, identity: Identity | None, method: str, client_ip: str
    ) -> Access:
        """``policy.authorize``, kept in the identity's memo."""
        memo = self._memo_of(identity) if identity is not None else None
        memo_key = ("access", route.name, method, client_ip)
        known = memo.get(memo_key) if memo is not None else None
        if isinstance(known, _KeptAccess):
            # Kept without the identity itself, which the memo must not keep alive.
            return Access(known.forward, known.login_needed,
                          identity if known.with_identity else None, known.decision)
        access = authorize(
            route, identity, method=method,
            client_ip=client_ip, default_policy=self.config.default_policy,
            groups_claim=self.config.provider.claims.groups,
        )
        if memo is not None:
            _remember(memo, memo_key, _KeptAccess(
                access.forward, access.login_needed, access.identity is not None,
                access.decision))
        return access

    async def _bearer(
        self, request: web.BaseRequest, facts: RequestFacts, route: RouteConfig
    ) -> BearerAuth | None:
        """Who the request's bearer token proves to be, or None when it sends none. A refused
        token is noted for the audit line and raised: 401 with its WWW-Authenticate."""
        try:
            return await self.bearer.authenticate(
                request.headers.getall("Authorization", ()), route)
        except BearerTokenError as exc:
            facts.outcome.auth = "bearer"
            if exc.status_hint == 401:
                facts.outcome.decision, facts.outcome.reason = "login_needed", exc.reason
            raise

    async def _proxy(
        self, request: web.BaseRequest, facts: RequestFacts, route: RouteConfig, *,
        expects: bool = False,
    ) -> tuple[web.StreamResponse, str | None]:
        access, access_token = await self._decide(request, facts, route, request.method)
        if access.login_needed:
            return await self._unauthenticated(request, facts, route), None
        if expects:  # allowed: now the body is wanted
            await self._continue(request)
        identity: Identity | None = access.identity
        # The token authenticated the request to the gateway; the app gets it only when the
        # route passes tokens on.
        no_authorization = facts.outcome.auth == "bearer" and not route.pass_access_token
        known = facts.head
        planned = (known.upstream.get((route.name, no_authorization)) if known is not None
                   else None)
        if planned is None:
            planned = self._upstream_plan(request, facts, route, no_authorization)
            if known is not None:
                known.upstream[(route.name, no_authorization)] = planned
        forwarded_headers, url = planned
        # The app logs the same id as the gateway: whatever the client sent is replaced.
        headers = with_gateway_headers(
            forwarded_headers, await self._identity_headers(facts, route, identity, access_token),
            facts.request_id)
        user = identity.user if identity else None
        if is_websocket(request):
            return await self.proxy.websocket(
                request, url, headers, read_timeout=route.timeout), user
        sent = time.perf_counter()
        answer = await self.proxy.send(request, url, headers, read_timeout=route.timeout)
        try:
            self.metrics.observe_upstream(route.name, time.perf_counter() - sent)
            out_headers = upstream_response_headers(list(answer.headers.items()),
                                                    facts.request_id)
        except BaseException:
            answer.release()  # the upstream connection is closed, not left half-read
            raise
        return await self.proxy.relay(request, answer, out_headers), user

    def _upstream_plan(
        self, request: web.BaseRequest, facts: RequestFacts, route: RouteConfig,
        no_authorization: bool,
    ) -> tuple[tuple[tuple[str, str], ...], URL]:
        """The client's headers for the upstream (cleaned, with Host and X-Forwarded-*; the
        identity headers and the request id follow them) and the upstream URL: what
        :meth:`HeaderPolicy.upstream_request_headers` and the route make of this head."""
        host_header = facts.host_header if route.pass_host_header else urlsplit(
            route.upstream).netloc
        client_headers = facts.head.items if facts.head is not None else list(
            request.headers.items())
        if no_authorization:
            client_headers = [h for h in client_headers if canonical(h[0]) != "authorization"]
        forwarded_headers = self.header_policy.client_headers_forwarded(
            client_headers, forwarded=facts.forwarded, host_header=host_header,
            replace_request_id=True)
        url = upstream_url(route.upstream, encode_path(facts.path), facts.raw_query)
        return tuple(forwarded_headers), url

    async def _identity_headers(
        self, facts: RequestFacts, route: RouteConfig, identity: Identity | None,
        access_token: str | None, *, sign: bool = True,
    ) -> list[tuple[str, str]]:
        """The route's identity headers (headers:) and, with assertion: true, a signed-in
        user and ``sign``, X-Gateway-Assertion, within the header budget (a cut is logged,
        not refused)."""
        assertion = None
        keys = self.assertion_keys
        if route.assertion and identity is not None and keys is not None and sign:
            settings = self.config.assertion
            assertion = AssertionRequest(
                key=await keys.signing_key(),
                issuer=self.config.server.public_url or facts.origin,
                audience=settings.audience or route.upstream,
                now=self.clock(),
                lifetime=settings.lifetime,
                jti=base64.urlsafe_b64encode(self.token_bytes(16)).decode().rstrip("="),
            )
        return self._planned_headers(facts.request_id, route, identity, access_token,
                                     assertion)

    def _planned_headers(
        self, request_id: str, route: RouteConfig, identity: Identity | None,
        access_token: str | None, assertion: AssertionRequest | None = None,
    ) -> list[tuple[str, str]]:
        memo = None
        memo_key = ("headers", route.name, access_token)
        if assertion is None and identity is not None:
            # The same user's next request builds the same headers: computed once per cached
            # Session's identity (the object, so a refreshed session is planned anew).
            memo = self._memo_of(identity)
            known = memo.get(memo_key)
            if isinstance(known, tuple):
                return list(known)
        plan = plan_with_assertion(
            identity, access_token, self.identity_rules[route.name], assertion)
        if memo is not None and not plan.trimmed:
            _remember(memo, memo_key, tuple(plan.headers))
        if plan.trimmed:
            log.warning(
                "identity headers cut to fit headers.max_bytes",
                extra={"request_id": request_id, "route": route.name,
                       "user": identity.user if identity else "-",
                       "cut": "; ".join(plan.trimmed)},
            )
        return list(plan.headers)

    def _new_ticket(self) -> tuple[Ticket, SealingKey]:
        """A new session's ticket and sealing key: the spare one made after the last login's
        answer was written (each is taken once), else a new one."""
        spare, self._spare_ticket = self._spare_ticket, None
        return spare if spare is not None else self._ticket_and_key()

    def _make_spare_ticket(self) -> None:
        """After a login's answer: the next login's ticket and sealing key, made while nothing
        waits for them (issue 7: 0.1 ms less of the next callback at idle)."""
        if self._spare_ticket is None:
            self._spare_ticket = self._ticket_and_key()

    def _ticket_and_key(self) -> tuple[Ticket, SealingKey]:
        ticket = new_ticket(self.token_bytes)
        return ticket, sealing_key(self.keys[0], ticket.secret)

    def _prepare_return(self, facts: RequestFacts, target: str, session: Session) -> None:
        """After a login's answer is written: the policy's answer and the identity headers
        for the page it returns to, kept in the new identity's memo (both come from there on
        later requests). The browser asks for that page next; the work is done while its
        redirect is on the way rather than after that request arrived (issue 7: 0.2 ms of
        the first page at idle). Only for a plain GET of a path on this host's routes; the
        page's own request decides everything anew if anything differs."""
        if not target.startswith("/"):
            return  # a full URL: another origin (public_url), another host's route
        try:
            path = normalize_path(target.partition("?")[0])
            if self._own_path(path):
                return  # the gateway's own endpoint, no route's page
            route = self._match_route(facts.host, path, "GET")
        except RequestError:
            return
        identity = session.identity
        if route.auth == "public" or route.bearer is not None or route.assertion:
            return
        access = self._access(route, identity, "GET", facts.forwarded.client_ip)
        if access.forward and access.identity is not None:
            token = session.tokens.access_token if route.pass_access_token else None
            self._planned_headers(facts.request_id, route, identity, token)

    async def _unauthenticated(
        self, request: web.BaseRequest, facts: RequestFacts, route: RouteConfig
    ) -> web.StreamResponse:
        target = self._target_of(facts)
        # route.unauthenticated may force either answer (policy.login_style).
        if login_style(route, navigation=_is_navigation(request)) == "redirect":
            return await self._begin_login(request, facts, target)
        if route.unauthenticated == "auto" and _is_form_navigation(request):
            # A browser submitting a form after its session ended: a redirect would drop what
            # was sent without a word, JSON would be a blank stare. Say so, offer the sign-in,
            # and come back to the page the form was on.
            back = self._referring_page(request, facts) or target
            return self._page(
                401, "Sign-in needed",
                "Your session has ended, so what you just sent did not reach the application.",
                advice="Sign in, then send it again.",
                link=Link(f"{self._callback_origin(facts)}{self.prefix}/start?rd="
                          f"{quote(back, safe='')}", "Sign in"),
                request_id=facts.request_id, kind="sign_in",
                headers={"WWW-Authenticate": 'Bearer realm="oidc-gateway"'},
            )
        return _json_answer(self._unauthenticated_json(facts, target), status=401,
                            headers=_UNAUTHENTICATED_HEADERS)

    def _unauthenticated_json(self, facts: RequestFacts, target: str) -> dict[str, str]:
        login_url = f"{self._callback_origin(facts)}{self.prefix}/start?rd={quote(target, safe='')}"
        return {"error": "unauthenticated", "login_url": login_url}

    def _callback_origin(self, facts: RequestFacts) -> str:
        return self.config.server.public_url or facts.origin

    def _referring_page(self, request: web.BaseRequest, facts: RequestFacts) -> str | None:
        """The page of this origin the browser came from (its ``Referer``), as a return
        target like :meth:`_target_of` makes; None for another origin or none. ``/start``
        still checks it with ``safe_redirect_target``."""
        referer = request.headers.get("Referer", "")
        own = _origin_key(facts.origin)
        if not referer or own is None or _origin_key(referer) != own:
            return None
        parts = urlsplit(referer)
        page = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return page if self._callback_origin(facts) == facts.origin else facts.origin + page

    def _redirect_uri(self, facts: RequestFacts) -> str:
        configured = self.config.provider.redirect_url
        return configured or f"{self._callback_origin(facts)}{self.prefix}/callback"

    def _target_of(self, facts: RequestFacts) -> str:
        """Where to return after login: a path on the callback's own origin, else a full URL."""
        path_qs = encode_path(facts.path) + (f"?{facts.raw_query}" if facts.raw_query else "")
        if self._callback_origin(facts) == facts.origin:
            return path_qs
        return facts.origin + path_qs

    # ------------------------------------------------------------------ login

    async def _begin_login(
        self, request: web.BaseRequest, facts: RequestFacts, target: str
    ) -> web.StreamResponse:
        redirect_uri = self._login_preflight(facts)
        self._sign_in_at = time.monotonic()
        await self._check_store_for_login()
        login, blob, binding = self._new_login(target, self._binding(request))
        state = encode_login_blob(blob)
        if len(state) > _INLINE_STATE_CHARS:
            # A long return URL (a dashboard's whole view in its query) would make the
            # provider's URL too long for some providers: that one login keeps its state in
            # the store and sends a short reference.
            state = f"{_STORED_STATE_PREFIX}{login.state}"
            await self.store.set(f"l:{state}", blob, self.login_ttl)
        location, cookie = self._login_redirect(login, state, binding, redirect_uri)
        response = web.Response(status=302, headers={"Location": location,
                                                     "Cache-Control": _NO_STORE})
        response.headers.add("Set-Cookie", cookie)
        return response

    def _login_preflight(self, facts: RequestFacts) -> str:
        """The redirect URI of a login that can start here; raises when none can."""
        if not self.idp.ready:
            raise ProviderUnavailable(
                "The sign-in service cannot be reached right now. Try again in a minute."
            )
        redirect_uri = self._redirect_uri(facts)
        self._check_cookie_reach(facts, redirect_uri)
        return redirect_uri

    def _new_login(self, target: str, binding: bytes | None) -> tuple[LoginState, bytes, bytes]:
        """A new login's state, its sealed blob and the browser binding it is sealed under
        (the browser's own, else a new one)."""
        binding = binding or self.token_bytes(_BINDING_BYTES)
        login = new_login_state(target=target, now=self.clock(), token_bytes=self.token_bytes)
        blob = seal_login_state(login, binding=binding, key=self.keys[0],
                                token_bytes=self.token_bytes)
        return login, blob, binding

    def _login_redirect(
        self, login: LoginState, state: str, binding: bytes, redirect_uri: str
    ) -> tuple[str, str]:
        """The provider URL of a login sent as ``state``, and its binding cookie."""
        location = self.idp.authorization_url(
            dataclasses.replace(login, state=state), redirect_uri)
        # One binding cookie per browser, shared by every login started in it, so logins in
        # parallel tabs all succeed; each login state is sealed under it (bound to the browser).
        cookie = self._cookie(
            self.login_cookie, base64.urlsafe_b64encode(binding).decode().rstrip("="),
            max_age=max(1, math.ceil(self.login_ttl)),
            # "/" and not the prefix: a login may start on any path (the protected page itself),
            # and the browser must send the cookie there to reuse it. It never reaches the
            # upstream: the gateway's own cookies are stripped from every forwarded request.
            path="/",
        )
        return location, cookie

    async def keep_store_checked(self) -> None:
        """Ask the store before its last answer is too old for a sign-in, while sign-ins are
        being started here (one within the last minute): the next one, even after a pause,
        then waits for no round trip and is answered at once (issue 7: the check's round trip
        at idle was a third of a login's first hop). Called every tenth of a second
        (``Live.keep_store_checked``): about three PINGs a second while sign-ins come, none
        when they do not. A failure leaves no answer: the next sign-in asks the store itself
        (and gets its 503)."""
        now = time.monotonic()
        if (now - self._sign_in_at > _SIGN_INS_RECENT
                or now - self._store_answered_at < _STORE_CHECK_EVERY / 2):
            return
        try:
            await self._check_store_for_login(fresh_for=0.0)
        except SessionStoreError:
            self._store_answered_at = -math.inf

    async def _check_store_for_login(self, *, fresh_for: float = _STORE_CHECK_EVERY) -> None:
        """Raise SessionStoreError (503) when the store is down: a sign-in's callback needs it
        (single use, the session), so nobody is sent to the provider for one that could not
        finish. A store that answered this check less than ``_STORE_CHECK_EVERY`` seconds ago,
        with no store failure since (:meth:`handle` forgets the answer on one), is not asked
        again: a sign-in waits for no round trip of its own, and a flood of them is no flood of
        PINGs, to every master of a Cluster. (A store that dies in that half second fails the
        callback instead, with the same 503.) The check is the session cache's shared ping
        when its subscription is live, else one PING."""
        if time.monotonic() - self._store_answered_at < fresh_for:
            return
        cache = self.session_cache
        if cache is None or not await cache.confirmed():
            await self.store.ping()
        self._store_answered_at = time.monotonic()

    def _check_cookie_reach(self, facts: RequestFacts, redirect_uri: str) -> None:
        """Refuse to start a login that cannot finish: the binding cookie set here must reach
        the callback's host, and the session cookie set there must come back here.

        With ``public_url`` (or ``redirect_url``) on another host and no ``cookie.domain``
        covering both, every such login would fail at the callback ("started in another
        browser") after a round trip to the provider. Say what to configure instead.
        """
        callback_host = (urlsplit(redirect_uri).hostname or "").lower().removesuffix(".")
        here = authority_host(facts.forwarded.host) or facts.host
        domain = (self.cookie.domain or "").lower().lstrip(".").removesuffix(".")
        if not domain:
            reach = here == callback_host  # host-only cookies
        else:
            reach = all(h == domain or h.endswith("." + domain) for h in (here, callback_host))
        if reach:
            return
        raise RequestError(
            f"Signing in cannot work at {here}: the sign-in returns to {callback_host}, and "
            "this gateway's cookies do not reach from one to the other. An administrator must "
            "set session.cookie.domain to a domain both share, or this page must be opened at "
            f"{callback_host}.",
            reason="cookie_scope", status_hint=500,
        )

    def _binding(self, request: web.BaseRequest) -> bytes | None:
        value = request.cookies.get(self.login_cookie, "")
        if not value or len(value) > 64:
            return None
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
        return raw if len(raw) == _BINDING_BYTES else None

    async def start(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        self._check_served(facts)
        rd = request.query.get("rd")
        target = safe_redirect_target(rd, allowed_hosts=self.allowed_hosts, default="/")
        return await self._begin_login(request, facts, target)

    def _check_served(self, facts: RequestFacts) -> None:
        """Refuse the login endpoints on a host no route serves when ``public_url`` is unset.

        The redirect URI and the return URL are then built from the request's own origin
        (Host, or X-Forwarded-Host from a trusted proxy): an origin this gateway does not serve
        must not become one (an attacker's Host header would otherwise end up in the
        redirect_uri sent to the provider).
        """
        if self.config.server.public_url:
            return
        host = authority_host(facts.forwarded.host)
        if host is None or not (
            self.routes.serves(host) or host_allowed(host, self.allowed_hosts)
        ):
            raise NotFound("this gateway serves no route on this host")

    async def _take_login(self, state: str) -> tuple[LoginState, bytes]:
        """The login a callback's ``state`` names, used up (single use) and not expired, with
        its binding digest; every other case is the same 400 (nothing to tell apart for a
        forger)."""
        unknown = OIDCError("This sign-in has expired or was already completed. Start again.",
                            reason="login_state_unknown", status_hint=400)
        stored = state.startswith(_STORED_STATE_PREFIX)
        blob = await self.store.pop(f"l:{state}") if stored else decode_login_blob(state)
        if blob is None:
            raise unknown
        try:
            login, bound_to = open_login_state(blob, keys=self.keys, state=state)
        except SessionInvalid:
            raise unknown from None
        left = login_time_left(login, now=self.clock(), timeout=self.login_ttl)
        if left <= 0:
            raise OIDCError("This sign-in took too long and expired. Start again.",
                            reason="login_state_expired", status_hint=400)
        if not stored:
            # One mark per blob (canonical base64url: one spelling each), kept as long as the
            # state could still be used, by this clock or a replica's a little behind it.
            mark = f"l:used:{login_mark(blob)}"
            if not await self.store.set_new(mark, b"1", left + _CLOCK_SKEW):
                raise unknown
        return login, bound_to

    async def callback(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        self._check_served(facts)
        query: Mapping[str, str] = request.query
        state = query.get("state", "")
        if not state or len(state) > _INLINE_STATE_CHARS:
            raise OIDCError(
                "The sign-in answer carries no state, so it cannot be matched to a sign-in "
                "started here. Start again.", reason="login_state_missing", status_hint=400)
        login, bound_to = await self._take_login(state)
        # Used up above, before the browser is compared: a callback tried in another browser
        # spends the state, so the login it stole from cannot complete either.
        if not login_bound(bound_to, self._binding(request)):
            raise OIDCError(
                "This sign-in was started in another browser (or its cookie was lost). "
                "Start again in this browser.", reason="login_not_bound", status_hint=400,
            )
        now = self.clock()
        try:
            identity, tokens, claims = await self.idp.complete_login(
                query, login, redirect_uri=self._redirect_uri(facts))
        except OIDCError as exc:
            exc.retry_target = login.target
            raise
        problem = identity_value_problem(identity.user)
        if problem is not None:
            # Sent as X-Forwarded-User exactly or not at all: refuse now rather than on every
            # request (headers.identity_value_problem says why cleaning it is no option).
            refused = OIDCError(
                f"The sign-in service names your account with a user name that {problem}; "
                "this gateway cannot pass it on to applications unchanged. Ask your "
                "administrator to correct the account.",
                reason="identity_unsafe", status_hint=401)
            refused.retry_target = login.target
            raise refused

        # Session fixation: whatever session the browser brought is ended, and the new one
        # gets a fresh id and secret.
        old = self._ticket_of(request)
        if old is not None:
            await self.store.delete(_session_key(old.session_id))
        ticket, sealing = self._new_ticket()
        sid = claims.get("sid")
        session = Session(
            identity=identity,
            tokens=tokens,
            created_at=now,
            last_seen=now,
            expires_at=now + self.config.session.lifetime,
            issuer=self.idp.metadata.issuer,
            sid=sid if isinstance(sid, str) else None,
        )
        # The session and its index entries in one round trip to the store (one answer to
        # wait for: at idle each answer wakes a cold process, issue 7).
        await self._save(ticket, session, now, sealing=sealing, index=self._index_entries(
            ticket.session_id, session, request, client_ip=facts.forwarded.client_ip))
        # The access and audit lines' fast path: the same line, 0.06 ms less of a callback at
        # idle (issue 7); held with the request's other lines when the server holds them.
        held: LineSink | None = getattr(request.protocol, "held_lines", None)
        line = {"request_id": facts.request_id, "user": identity.user,
                "session": short_hash(ticket.session_id)}
        if held is not None:
            held.hold_info(log, "login", line)
        else:
            log_info(log, "login", line)
        # Work for the next login and the page the browser asks for next, done once the
        # answer is written (issue 7: scheduled with call_soon, it ran before the server's
        # end-of-turn write of the answer, and made every callback 0.3 ms slower at idle).
        later = held.after_answer if held is not None else asyncio.get_running_loop().call_soon
        later(self._prepare_return, facts, login.target, session)
        later(self._make_spare_ticket)
        response = web.Response(status=302, headers={
            "Location": login.target,
            "Cache-Control": _NO_STORE,
            # RFC 9700 §4.2.4: the code in this URL must not leak through Referer (note 20).
            "Referrer-Policy": "no-referrer",
        })
        self._set_cookie(response, self.cookie_name, encode_ticket(ticket),
                         max_age=int(self.config.session.lifetime), path="/")
        return response

    async def sign_out(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        if request.method not in ("GET", "POST"):
            raise RequestError("use GET or POST", reason="method_not_allowed", status_hint=405)
        self._check_served(facts)
        rd = request.query.get("rd")
        target = safe_redirect_target(rd, allowed_hosts=self.allowed_hosts, default="/")
        if self._cross_site(request, facts):
            # Logout CSRF: another site may link or post here, but only the user decides.
            again = f"{self.prefix}/sign_out" + (f"?rd={quote(rd, safe='')}" if rd else "")
            return self._page(
                200, "Sign out?", "Another site sent you here to sign you out of this gateway.",
                advice="If you want to sign out, press the button. Otherwise close this page: "
                "you stay signed in.",
                link=Link(again, "Sign out"),
                request_id=facts.request_id, kind="sign_out_confirm",
            )
        session: Session | None = None
        ticket = self._ticket_of(request)
        if ticket is not None:
            found = await self.authenticate(request)
            session = found[1] if found else None
            await self._end_session(ticket.session_id, session)
            self.metrics.logouts.labels("ok").inc()
            log.info("sign-out", extra={"request_id": facts.request_id,
                                        "session": short_hash(ticket.session_id)})
        response: web.StreamResponse
        logout_url = None
        # provider.logout: local ends the gateway's session only (Google, Dex, GitLab and
        # Cognito offer no RP-initiated logout; some operators want the SSO session kept).
        if session is not None and self.idp.ready and self.config.provider.logout == "provider":
            absolute = target
            if target.startswith("/"):
                absolute = self._callback_origin(facts) + target
            logout_url = end_session_url(
                self.idp.metadata,
                id_token_hint=session.tokens.id_token,
                post_logout_redirect_uri=absolute,
                client_id=self.config.provider.client_id,
            )
        if logout_url:
            response = web.Response(status=302, headers={"Location": logout_url})
        elif rd:
            response = web.Response(status=302, headers={"Location": target})
        else:
            response = self._page(
                200, "Signed out", "You are signed out of this gateway.",
                advice="Close the browser to end your session at the identity provider too.",
                link=Link(f"{self.prefix}/start?rd=%2F", "Sign in again"),
                request_id=facts.request_id, kind="signed_out",
            )
        response.headers["Cache-Control"] = _NO_STORE
        # The same attributes as when set: browsers ignore a __Host- cookie without Secure.
        response.del_cookie(
            self.cookie_name, path="/", domain=self.cookie.domain, secure=self.cookie.secure,
            httponly=True, samesite=self.cookie.samesite.capitalize(),
        )
        return response

    def _cross_site(self, request: web.BaseRequest, facts: RequestFacts) -> bool:
        """Whether another site made the browser send this request.

        Judged by ``Sec-Fetch-Site`` (Fetch Metadata; every current browser sends it, and pages
        cannot forge it): ``same-origin``, ``same-site`` and ``none`` (typed, bookmarked) are
        not cross-site; anything else is. Without it, by ``Origin`` (sent on cross-site POSTs
        by older browsers), then by ``Referer``; a request with none of them (a script,
        curl) is not judged cross-site.
        """
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None:
            return site.strip().lower() not in ("same-origin", "same-site", "none")
        own = {_origin_key(facts.origin)}
        if self.config.server.public_url:
            own.add(_origin_key(self.config.server.public_url))
        own.discard(None)  # "Origin: null" must never equal an unparseable own origin
        origin = request.headers.get("Origin")
        if origin is not None:
            return _origin_key(origin) not in own
        referer = request.headers.get("Referer")
        if referer:
            return _origin_key(referer) not in own
        return False

    async def userinfo(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        found = await self.authenticate(request)
        if found is None:
            return _json_answer({"error": "unauthenticated"}, status=401,
                                headers={"Cache-Control": _NO_STORE})
        identity = found[1].identity
        return _json_answer(
            {
                "user": identity.user,
                "email": identity.email,
                "groups": list(identity.groups),
                "preferred_username": identity.preferred_username,
            },
            headers={"Cache-Control": _NO_STORE},
        )

    async def backchannel_logout(
        self, request: web.BaseRequest, facts: RequestFacts
    ) -> web.StreamResponse:
        """OpenID Connect Back-Channel Logout 1.0: the provider POSTs a ``logout_token``; every
        session of its ``sid`` (or of its ``sub`` when it names no sid) ends, in every gateway
        sharing the store. 200 when done, 400 for a token that is invalid or replayed (§2.8).
        """
        if request.method != "POST":
            raise RequestError("use POST", reason="method_not_allowed", status_hint=405)
        form = await request.post()
        token = form.get("logout_token")
        if not isinstance(token, str) or not token or len(token) > 16384:
            raise OIDCError("logout token: missing", reason="logout_token_invalid",
                            status_hint=400)
        logout = await self.idp.validate_logout_token(token)
        # Replays: each jti is accepted once while a token could still be fresh (iat check).
        jti_key = "j:" + hashlib.sha256(logout.jti.encode()).hexdigest()
        if not await self.store.set_new(jti_key, b"1", 2 * LOGOUT_TOKEN_MAX_AGE):
            raise OIDCError("logout token: already used (jti replayed)",
                            reason="logout_token_replayed", status_hint=400)
        if logout.sid is not None:
            entries = await self.sessions_in(f"x:sid:{logout.sid}")
            if logout.sub is not None:
                entries = {k: v for k, v in entries.items() if v.get("sub") == logout.sub}
        else:
            entries = await self.sessions_in(f"x:sub:{logout.sub}")
        count = await self.revoke(entries)
        log.info("back-channel logout", extra={"request_id": facts.request_id,
                                               "sessions": count})
        return web.Response(status=200, headers={"Cache-Control": _NO_STORE})

    async def frontchannel_logout(
        self, request: web.BaseRequest, facts: RequestFacts
    ) -> web.StreamResponse:
        """OpenID Connect Front-Channel Logout 1.0: the provider's logout page loads
        ``?iss=…&sid=…`` in an iframe; every session of that provider session ends, in every
        gateway sharing the store.

        By ``sid`` alone, never by cookie: the session cookie is ``SameSite=Lax``, so a browser
        does not send it in a cross-site iframe. ``iss`` must be exactly ``provider.issuer``
        and ``sid`` present (§2: both are sent when the client registers
        ``frontchannel_logout_session_required``), else 400 and nothing ends. An unknown sid
        is a 200 (nothing to end; the provider may call twice). Weaker than back-channel:
        nothing here is signed, so anyone who knows a sid can end that session, which is why
        it rests on sids being unguessable. The answer is empty and framable by the provider
        only (§4: not cached); the gateway's own pages stay unframable.
        """
        if request.method != "GET":
            raise RequestError("use GET", reason="method_not_allowed", status_hint=405)
        iss = request.query.getall("iss", [])
        sid = request.query.getall("sid", [])
        # provider.issuer, or discovery's spelling of it (one trailing slash apart: Auth0).
        issuers = {self.config.provider.issuer}
        if self.idp.ready:
            issuers.add(self.idp.metadata.issuer)
        if len(iss) != 1 or iss[0] not in issuers:
            raise BadRequest(
                "front-channel logout: iss must be given once and be exactly provider.issuer; "
                "register the URL at the provider with frontchannel_logout_session_required",
                reason="frontchannel_logout_invalid")
        if len(sid) != 1 or not sid[0] or len(sid[0]) > 512:
            raise BadRequest(
                "front-channel logout: sid must be given once (register the URL at the "
                "provider with frontchannel_logout_session_required)",
                reason="frontchannel_logout_invalid")
        count = await self.revoke(await self.sessions_in(f"x:sid:{sid[0]}"))
        log.info("front-channel logout", extra={"request_id": facts.request_id,
                                                "sessions": count})
        return web.Response(
            status=200, body=b"", content_type="text/html", charset="utf-8",
            headers={
                "Cache-Control": "no-cache, no-store",
                "Pragma": "no-cache",
                "Content-Security-Policy": "default-src 'none'; frame-ancestors "
                + " ".join(self._provider_origins()),
                "X-Content-Type-Options": "nosniff",
            },
        )

    def _provider_origins(self) -> list[str]:
        """CSP sources of the origins the provider frames the front-channel URL from: the
        issuer's and, when discovery named one elsewhere, the end_session_endpoint's (the
        logout page). ``'none'`` if neither is a plain http(s) origin."""
        urls = [self.config.provider.issuer]
        if self.idp.ready and self.idp.metadata.end_session_endpoint:
            urls.append(self.idp.metadata.end_session_endpoint)
        origins: list[str] = []
        for url in urls:
            source = _csp_origin(url)
            if source is not None and source not in origins:
                origins.append(source)
        return origins or ["'none'"]

    # ------------------------------------------------------------------ forward-auth

    async def forward_auth(
        self, request: web.BaseRequest, facts: RequestFacts
    ) -> web.StreamResponse:
        """``/oauth2/auth``: nginx ``auth_request``, Traefik ForwardAuth and Envoy ext_authz ask
        whether the request they hold may go ahead (design §5).

        The original request is judged exactly as the proxy mode judges its own: the same
        route matching (:meth:`_match_route`) and the same decision (:meth:`_decide`). Answers:
        202 with the ``X-Auth-Request-*`` identity (none on public routes, nor for anonymous
        visitors of optional ones); 401 without a session: for a browser navigation (or a
        route with ``unauthenticated: redirect``) a page with a sign-in link, which Traefik
        and Envoy pass on as it is, and the link in ``X-Auth-Request-Login-Url`` for nginx
        to redirect to; else JSON with ``login_url``, as the proxy mode; 403 when the policy
        refuses, and 403 too when no route serves the URL or its path is one the proxy would
        refuse, since nginx's ``auth_request`` knows only 2xx, 401 and 403 and turns anything
        else into a 500. 400 when the check itself is malformed (:meth:`_original_target`).
        Any method is accepted: Envoy asks with the original request's method.
        """
        raw_path, raw_query, method, authority = self._original_target(request, facts)
        try:
            path = normalize_path(raw_path)
            host = authority_host(authority)
            if host is None:
                raise BadRequest("the original request's host is malformed")
            route = self._match_route(host, path, method)
        except (NotFound, BadRequest) as exc:
            raise Forbidden(exc.message, reason=exc.reason) from None
        original = replace(
            facts, host=host, host_header=authority, path=path, raw_query=raw_query,
            forwarded=replace(facts.forwarded, host=authority),
        )
        access, token = await self._decide(request, original, route, method)
        if access.login_needed:
            login_url = self._login_url(original)
            headers = {"WWW-Authenticate": 'Bearer realm="oidc-gateway"'}
            # The proxy mode's choice between a redirect and a 401 (policy.login_style), made
            # on the original request: the check carries the client's headers, not its method.
            navigation = (method in ("GET", "HEAD") and _wants_html(request)
                          and request.headers.get("X-Requested-With", "").lower()
                          != "xmlhttprequest")
            if login_style(route, navigation=navigation) == "redirect":
                # Only then: nginx's @sign_in redirects there, and answers 401 without it.
                headers["X-Auth-Request-Login-Url"] = login_url
                # Traefik and Envoy hand this answer to the browser as it is: a page with the
                # way in, since a 401 cannot redirect.
                return self._page(
                    401, "Sign-in needed", "This page needs you to sign in.",
                    link=Link(login_url, "Sign in"), request_id=facts.request_id,
                    kind="sign_in", headers=headers)
            return _json_answer(
                {"error": "unauthenticated", "login_url": login_url},
                status=401, headers={"Cache-Control": _NO_STORE, **headers},
            )
        trusted = peer_trusted(request.remote or "", self.config.server.trusted_proxies)
        if not trusted:
            # The answer goes to whoever asked. A trusted proxy copies the token onto the
            # request to the app; anyone else asking (a page's script, with the user's
            # cookie) would be reading a bearer token the gateway otherwise never lets out.
            # The same goes for a signed assertion, which an app takes as the user.
            token = None
        response = web.Response(status=202, headers={"Cache-Control": _NO_STORE})
        for name, value in auth_request_headers(access.identity, token):
            response.headers[name] = value
        if access.identity is not None:
            # And the headers the proxy mode would send this route's app (headers:, and
            # X-Gateway-Assertion with assertion: true), for the proxy to copy by name.
            for name, value in await self._identity_headers(
                    original, route, access.identity, token, sign=trusted):
                response.headers.add(name, value)
        return response

    def _original_target(
        self, request: web.BaseRequest, facts: RequestFacts
    ) -> tuple[str, str, str, str]:
        """(raw path, raw query, method, authority) of the request a forward-auth check is
        about. Raises BadRequest when the check does not say, or says it ambiguously.

        * ``/oauth2/auth/<original path>`` (Envoy's ``path_prefix``): everything comes from
          the check request itself: the path after the prefix, the query, the method and the
          ``Host`` (Envoy sends the original ``:authority``). Headers claiming another URL or
          method are ignored, even from a trusted proxy: the request line is the proxy's own
          word, a header may be the client's, passed through.
        * ``/oauth2/auth``: the URL and method come from ``X-Forwarded-Uri`` /
          ``X-Original-URI`` and ``X-Forwarded-Method`` / ``X-Original-Method``, the host from
          ``X-Forwarded-Host`` (else ``Host``), and only from ``server.trusted_proxies``: from
          anyone else they are ignored, and since the check's own path names no page, the
          answer is a 400 that says what to configure (judging the endpoint's own path, or
          the headers of a client that picks the URL it is judged on, would fail open).
        """
        raw_path, raw_query = _split_target(request.raw_path, facts.host_header)
        endpoint = f"{self.prefix}/auth"
        if facts.path != endpoint:
            if not raw_path.startswith(endpoint + "/"):
                raise BadRequest(
                    f"a forward-auth check names the original path right after {endpoint}, "
                    f"as written ({endpoint}/app/page), not encoded or with dot-segments")
            return raw_path[len(endpoint):], raw_query, request.method, facts.host_header
        peer = request.remote or ""
        if not peer_trusted(peer, self.config.server.trusted_proxies):
            raise BadRequest(
                f"This authorization check does not say which page it is for: it came from "
                f"{peer or 'an unknown address'}, which is not in server.trusted_proxies, so "
                "its X-Forwarded-Uri / X-Original-URI headers are not believed. Add the "
                "proxy's address to server.trusted_proxies, or ask with the original path "
                f"appended ({endpoint}/app/page, Envoy's path_prefix).")
        said = original_request(list(request.headers.items()))
        if said.uri is None or said.method is None:
            raise BadRequest(
                "This authorization check does not say which request it is for: the proxy "
                "must send the original URI (X-Original-URI or X-Forwarded-Uri) and method "
                "(X-Original-Method or X-Forwarded-Method); see config/nginx/.")
        path, _, query = said.uri.partition("?")
        return path.partition("#")[0], query.partition("#")[0], said.method, facts.forwarded.host

    def _login_url(self, facts: RequestFacts) -> str:
        """Where to send someone to sign in and come back to the request of ``facts``."""
        target = quote(self._target_of(facts), safe="")
        return f"{self._callback_origin(facts)}{self.prefix}/start?rd={target}"

    async def jwks(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        """The public keys of X-Gateway-Assertion (RFC 7517 JWK Set). Cacheable for a
        minute: a new generated key is published two minutes before it signs."""
        if self.assertion_keys is None:
            raise NotFound("no route of this gateway signs identity assertions")
        document = jwk_set(await self.assertion_keys.published())
        return _json_answer(
            document, content_type="application/jwk-set+json",
            headers={"Cache-Control": "public, max-age=60"},
        )

    # ------------------------------------------------------------------ health and metrics

    async def ping(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        return web.Response(text="OK")

    async def ready(self, request: web.BaseRequest, facts: RequestFacts) -> web.StreamResponse:
        provider_ok = self.idp.ready
        if self.draining:  # shutting down: no store round trip, just "send elsewhere"
            return _json_answer(
                {"ready": False, "provider": provider_ok, "store": None, "draining": True},
                status=503, headers={"Retry-After": "1"},
            )
        try:
            await self.store.ping()
            store_ok = True
        except SessionStoreError:
            store_ok = False
        ok = provider_ok and store_ok
        return _json_answer(
            {"ready": ok, "provider": provider_ok, "store": store_ok, "draining": False},
            status=200 if ok else 503,
        )

    async def metrics_endpoint(
        self, request: web.BaseRequest, facts: RequestFacts
    ) -> web.StreamResponse:
        self.metrics.provider_ready.set(1 if self.idp.ready else 0)
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    # ------------------------------------------------------------------ errors

    def _page(
        self, status: int, heading: str, message: str, *, advice: str = "",
        link: Link | None = None, request_id: str = "", kind: PageKind | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        body = self.pages.render(kind, status=status, heading=heading, message=message,
                                 advice=advice, link=link, request_id=request_id)
        return web.Response(status=status, text=body, content_type="text/html",
                            headers={"Cache-Control": _NO_STORE, **_PAGE_HEADERS,
                                     **(headers or {})})

    def _error(
        self, request: web.BaseRequest, exc: RequestError, request_id: str,
        facts: RequestFacts | None,
    ) -> web.StreamResponse:
        status = exc.status_hint
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(level, "request failed", extra={
            "request_id": request_id, "reason": exc.reason, "status": status,
            "detail": exc.message})
        extra = ({"WWW-Authenticate": exc.challenge} if isinstance(exc, BearerTokenError)
                 else {})
        if not _wants_html(request):
            return _json_answer(
                {"error": exc.reason, "message": exc.message, "request_id": request_id},
                status=status, headers={"Cache-Control": _NO_STORE, **extra},
            )
        heading, advice, link = self._explain(exc, facts)
        message = exc.message
        if isinstance(exc, UpstreamError):
            # The app's internal address and the client's exception name are for the log.
            message = ("The application behind this address took too long to answer."
                       if status == 504 else
                       "The application behind this address could not be reached.")
        return self._page(status, heading, message, advice=advice, link=link,
                          request_id=request_id,
                          kind="sign_in" if isinstance(exc, NotAuthenticated) else None,
                          headers=extra)

    def _explain(
        self, exc: RequestError, facts: RequestFacts | None
    ) -> tuple[str, str, Link | None]:
        start = f"{self.prefix}/start?rd="
        if isinstance(exc, OIDCError) and exc.status_hint != 503:
            target = exc.retry_target
            return ("Sign-in failed",
                    "If this keeps happening, tell your administrator the reference below.",
                    Link(start + quote(target, safe=""), "Try again"))
        if isinstance(exc, Forbidden):
            return ("Access denied",
                    "Ask the owner of this application for access, or sign in with another "
                    "account.",
                    Link(f"{self.prefix}/sign_out", "Sign out"))
        if isinstance(exc, NotFound):
            return ("Not found", "Check the address.", None)
        if isinstance(exc, NotAuthenticated):
            return ("Sign-in needed", "", Link(start + "%2F", "Sign in"))
        # href="": the button reloads the page that failed (the same URL, never elsewhere).
        if exc.status_hint == 503:
            return ("Temporarily unavailable",
                    "Nobody can sign in or reach this application until it is back. Try again "
                    "in a minute.", Link("", "Try again"))
        if exc.status_hint in (502, 504):
            return ("The application is not answering",
                    "Try again in a minute; if it persists, tell the application's owner the "
                    "reference below.", Link("", "Try again"))
        if exc.status_hint >= 500:
            return ("Something went wrong",
                    "If this keeps happening, tell your administrator the reference below.", None)
        return ("Request refused", "", None)
