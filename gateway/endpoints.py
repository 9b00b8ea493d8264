"""The gateway's request handlers: its own ``/oauth2/*`` endpoints and the catch-all proxy.

Every request, whatever it asks for, goes through ``Gateway.handle``: one place that checks
header limits, settles the host and the normalised path, and turns every ``RequestError`` into
the right status with a page (browsers) or JSON (API clients). Protected proxying and
``/oauth2/userinfo`` share ``authenticate()``, so there is one way a session is believed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from aiohttp import web

from gateway.config import Config, RouteConfig
from gateway.errors import (
    BadRequest,
    Forbidden,
    NotAuthenticated,
    NotFound,
    OIDCError,
    ProviderUnavailable,
    RequestError,
    SessionStoreError,
)
from gateway.headers import (
    Forwarded,
    HeaderPolicy,
    check_header_limits,
    forwarded_facts,
    identity_value_problem,
    upstream_response_headers,
)
from gateway.idp import IdentityProvider
from gateway.models import Identity, Session, Ticket
from gateway.observability import METRICS_CONTENT_TYPE, Metrics, new_request_id, short_hash
from gateway.oidc import end_session_url, new_login_state
from gateway.pages import Link, Pages
from gateway.policy import authorize, login_style
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
from gateway.sessions import (
    SessionInvalid,
    decode_ticket,
    dump_login_state,
    dump_session,
    encode_ticket,
    load_login_state,
    load_session,
    needs_touch,
    new_ticket,
    seal,
    session_end_reason,
    store_ttl,
    touched,
    unseal,
)
from gateway.store import SessionStore

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

_BINDING_BYTES = 32
_NO_STORE = "no-store"
# The gateway's own pages (sign-out confirmation, errors) are never framed: a framed
# "Sign out" button is a clickjacking target.
_PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the gateway settled about a request before deciding anything."""

    request_id: str
    host: str  # validated host name, lower case, no port
    host_header: str  # the Host header as sent (with port), after validation
    path: str  # decoded, normalised path: what routes and policy see
    raw_query: str  # the query string exactly as received
    forwarded: Forwarded

    @property
    def origin(self) -> str:
        return f"{self.forwarded.proto}://{self.forwarded.host}"


Handler = Callable[[web.Request, RequestFacts], Awaitable[web.StreamResponse]]


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


def _wants_html(request: web.BaseRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _is_navigation(request: web.BaseRequest) -> bool:
    """A browser navigating (it can follow a redirect to the provider) rather than a script."""
    return (
        request.method in ("GET", "HEAD")
        and _wants_html(request)
        and request.headers.get("X-Requested-With", "").lower() != "xmlhttprequest"
    )


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
    ):
        self.config = config
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
            "/ping": self.ping,
            "/ready": self.ready,
            "/metrics": self.metrics_endpoint,
        }

    # ------------------------------------------------------------------ entry point

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = new_request_id()
        facts: RequestFacts | None = None
        route_name = "-"
        user = None
        try:
            facts = self._facts(request, request_id)
            handler = self.own.get(facts.path)
            if handler is not None:
                route_name = facts.path
                response = await handler(request, facts)
            elif facts.path == self.prefix or facts.path.startswith(self.prefix + "/"):
                raise NotFound("the gateway has no endpoint at this path")
            else:
                route = self.routes.match(facts.host, facts.path, request.method)
                if route is None:
                    raise NotFound("no route of this gateway matches this host and path")
                if ";" in facts.path and route is not self.routes.match(
                    facts.host, without_path_params(facts.path), request.method
                ):
                    # Servlet containers drop ";params" before mapping a path: /admin;x is
                    # their /admin, but here it matched another route. Refuse the ambiguity.
                    raise BadRequest(
                        'the request path has ";" parameters that change which route serves it'
                    )
                route_name = route.name
                response, user = await self._proxy(request, facts, route)
        except RequestError as exc:
            response = self._error(request, exc, request_id, facts)
        except Exception:
            log.exception("unexpected error", extra={"request_id": request_id})
            response = self._error(
                request, RequestError("internal error", reason="internal_error", status_hint=500),
                request_id, facts,
            )
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(route_name, f"{response.status // 100}xx").inc()
        self.metrics.duration.observe(elapsed)
        if self.config.logging.access_log:
            access_log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": request.method,
                    "path": facts.path if facts else "-",
                    "host": facts.host if facts else "-",
                    "status": response.status,
                    "route": route_name,
                    "user": user,
                    "client_ip": facts.forwarded.client_ip if facts else request.remote,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
        return response

    def _facts(self, request: web.Request, request_id: str) -> RequestFacts:
        server = self.config.server
        items = list(request.headers.items())
        check_header_limits(
            items, max_count=server.max_header_count, max_bytes=server.max_header_bytes
        )
        # RFC 9112 3.2: more than one Host is a 400. aiohttp's parser refuses it today; checked
        # here too because routing and URL building must rest on exactly one authority.
        if len(request.headers.getall("Host", ())) > 1:
            raise BadRequest("the request has more than one Host header")
        host_header = request.headers.get("Host", "")
        host = authority_host(host_header)
        if host is None:
            raise BadRequest("the Host header is missing or malformed")
        raw_path, raw_query = _split_target(request.raw_path, host_header)
        path = normalize_path(raw_path)
        scheme = "https" if request.secure else "http"
        forwarded = forwarded_facts(
            peer_ip=request.remote or "",
            headers=items,
            trusted=server.trusted_proxies,
            scheme=scheme,
            host=host_header,
        )
        return RequestFacts(request_id, host, host_header, path, raw_query, forwarded)

    # ------------------------------------------------------------------ sessions

    async def authenticate(self, request: web.BaseRequest) -> tuple[Ticket, Session] | None:
        """The session this request's cookie opens, or None. Store failures propagate (503):
        a store we cannot read must never turn into a pass."""
        ticket = decode_ticket(request.cookies.get(self.cookie_name, ""))
        if ticket is None:
            return None
        key = f"s:{ticket.session_id}"
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
        now = self.clock()
        idle = self.config.session.idle_timeout
        ended = session_end_reason(session, now=now, idle_timeout=idle)
        if ended is not None:
            await self.store.delete(key)
            log.info("session ended", extra={"reason": ended,
                                             "session": short_hash(ticket.session_id)})
            return None
        if needs_touch(session, now=now, idle_timeout=idle):
            session = touched(session, now)
            await self._save(ticket, session, now)
        return ticket, session

    async def _save(self, ticket: Ticket, session: Session, now: float) -> None:
        key = f"s:{ticket.session_id}"
        blob = seal(
            dump_session(session),
            key=self.keys[0],
            secret=ticket.secret,
            aad=key.encode(),
            nonce_bytes=self.token_bytes(12),
        )
        ttl = store_ttl(session, now=now, idle_timeout=self.config.session.idle_timeout)
        await self.store.set(key, blob, ttl)

    def _set_cookie(
        self, response: web.StreamResponse, name: str, value: str, *, max_age: int, path: str
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=path,
            domain=self.cookie.domain,
            secure=self.cookie.secure,
            httponly=True,
            samesite=self.cookie.samesite.capitalize(),
        )

    # ------------------------------------------------------------------ proxy

    async def _proxy(
        self, request: web.Request, facts: RequestFacts, route: RouteConfig
    ) -> tuple[web.StreamResponse, str | None]:
        access_token = None
        # Public routes never look at the session; optional ones use it when there is one.
        found = await self.authenticate(request) if route.auth != "public" else None
        # One decision for the live gateway and `oidc-gateway explain` (policy.authorize).
        access = authorize(
            route, found[1].identity if found else None, method=request.method,
            client_ip=facts.forwarded.client_ip, default_policy=self.config.default_policy,
        )
        if access.login_needed:
            return await self._unauthenticated(request, facts, route), None
        if not access.forward:
            decision = access.decision
            who = found[1].identity.user if found else "-"
            log.info(
                "access denied",
                extra={"request_id": facts.request_id, "route": route.name, "user": who,
                       "reason": decision.reason if decision else "-",
                       "rule": str(decision.rule) if decision and decision.rule else "-"},
            )
            raise Forbidden(
                f"You are signed in as {who}, but this account may not open this page.",
                reason="policy_denied",
            )
        identity: Identity | None = access.identity
        if identity is not None and found is not None and route.pass_access_token:
            access_token = found[1].tokens.access_token
        host_header = facts.host_header if route.pass_host_header else urlsplit(
            route.upstream).netloc
        headers = self.header_policy.upstream_request_headers(
            list(request.headers.items()),
            identity=identity,
            access_token=access_token,
            forwarded=facts.forwarded,
            host_header=host_header,
        )
        url = upstream_url(route.upstream, encode_path(facts.path), facts.raw_query)
        user = identity.user if identity else None
        if is_websocket(request):
            return await self.proxy.websocket(
                request, url, headers, read_timeout=route.timeout), user
        answer = await self.proxy.send(request, url, headers, read_timeout=route.timeout)
        out_headers = upstream_response_headers(list(answer.headers.items()))
        return await self.proxy.relay(request, answer, out_headers), user

    async def _unauthenticated(
        self, request: web.Request, facts: RequestFacts, route: RouteConfig
    ) -> web.StreamResponse:
        target = self._target_of(facts)
        # route.unauthenticated may force either answer (policy.login_style).
        if login_style(route, navigation=_is_navigation(request)) == "redirect":
            return await self._begin_login(request, facts, target)
        login_url = f"{self._callback_origin(facts)}{self.prefix}/start?rd={quote(target, safe='')}"
        return web.json_response(
            {"error": "unauthenticated", "login_url": login_url},
            status=401,
            headers={"Cache-Control": _NO_STORE, "WWW-Authenticate": 'Bearer realm="oidc-gateway"'},
        )

    def _callback_origin(self, facts: RequestFacts) -> str:
        return self.config.server.public_url or facts.origin

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
        if not self.idp.ready:
            raise ProviderUnavailable(
                "The sign-in service cannot be reached right now. Try again in a minute."
            )
        redirect_uri = self._redirect_uri(facts)
        self._check_cookie_reach(facts, redirect_uri)
        binding = self._binding(request) or self.token_bytes(_BINDING_BYTES)
        now = self.clock()
        login = new_login_state(target=target, now=now, token_bytes=self.token_bytes)
        key = f"l:{login.state}"
        blob = seal(
            dump_login_state(login),
            key=self.keys[0],
            secret=binding,
            aad=key.encode(),
            nonce_bytes=self.token_bytes(12),
        )
        await self.store.set(key, blob, self.login_ttl)
        location = self.idp.authorization_url(login, redirect_uri)
        response = web.Response(status=302, headers={"Location": location,
                                                     "Cache-Control": _NO_STORE})
        # One binding cookie per browser, shared by every login started in it, so logins in
        # parallel tabs all succeed; each login state is sealed under it (bound to the browser).
        self._set_cookie(
            response,
            self.login_cookie,
            base64.urlsafe_b64encode(binding).decode().rstrip("="),
            max_age=max(1, math.ceil(self.login_ttl)),
            # "/" and not the prefix: a login may start on any path (the protected page itself),
            # and the browser must send the cookie there to reuse it. It never reaches the
            # upstream: the gateway's own cookies are stripped from every forwarded request.
            path="/",
        )
        return response

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

    async def start(self, request: web.Request, facts: RequestFacts) -> web.StreamResponse:
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

    async def callback(self, request: web.Request, facts: RequestFacts) -> web.StreamResponse:
        self._check_served(facts)
        query: Mapping[str, str] = request.query
        state = query.get("state", "")
        if not state or len(state) > 128:
            raise OIDCError(
                "The sign-in answer carries no state, so it cannot be matched to a sign-in "
                "started here. Start again.", reason="login_state_missing", status_hint=400)
        blob = await self.store.pop(f"l:{state}")
        if blob is None:
            raise OIDCError(
                "This sign-in has expired or was already completed. Start again.",
                reason="login_state_unknown", status_hint=400)
        binding = self._binding(request)
        try:
            if binding is None:
                raise SessionInvalid("no binding cookie")
            login = load_login_state(
                unseal(blob, keys=self.keys, secret=binding, aad=f"l:{state}".encode()))
        except SessionInvalid:
            raise OIDCError(
                "This sign-in was started in another browser (or its cookie was lost). "
                "Start again in this browser.", reason="login_not_bound", status_hint=400,
            ) from None
        now = self.clock()
        # Besides the store's TTL: stores expire lazily, and a late replay must not complete.
        if now - login.created_at >= self.login_ttl:
            raise OIDCError("This sign-in took too long and expired. Start again.",
                            reason="login_state_expired", status_hint=400)
        try:
            identity, tokens, claims = await self.idp.complete_login(
                query, login, redirect_uri=self._redirect_uri(facts))
        except OIDCError as exc:
            self.metrics.logins.labels("failed").inc()
            exc.retry_target = login.target
            raise
        problem = identity_value_problem(identity.user)
        if problem is not None:
            # Sent as X-Forwarded-User exactly or not at all: refuse now rather than on every
            # request (headers.identity_value_problem says why cleaning it is no option).
            self.metrics.logins.labels("failed").inc()
            refused = OIDCError(
                f"The sign-in service names your account with a user name that {problem}; "
                "this gateway cannot pass it on to applications unchanged. Ask your "
                "administrator to correct the account.",
                reason="identity_unsafe", status_hint=401)
            refused.retry_target = login.target
            raise refused

        # Session fixation: whatever session the browser brought is ended, and the new one
        # gets a fresh id and secret.
        old = decode_ticket(request.cookies.get(self.cookie_name, ""))
        if old is not None:
            await self.store.delete(f"s:{old.session_id}")
        ticket = new_ticket(self.token_bytes)
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
        await self._save(ticket, session, now)
        self.metrics.logins.labels("ok").inc()
        log.info("login", extra={"request_id": facts.request_id, "user": identity.user,
                                 "session": short_hash(ticket.session_id)})
        response = web.Response(status=302, headers={
            "Location": login.target,
            "Cache-Control": _NO_STORE,
            # RFC 9700 §4.2.4: the code in this URL must not leak through Referer (note 20).
            "Referrer-Policy": "no-referrer",
        })
        self._set_cookie(response, self.cookie_name, encode_ticket(ticket),
                         max_age=int(self.config.session.lifetime), path="/")
        return response

    async def sign_out(self, request: web.Request, facts: RequestFacts) -> web.StreamResponse:
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
                request_id=facts.request_id,
            )
        session: Session | None = None
        ticket = decode_ticket(request.cookies.get(self.cookie_name, ""))
        if ticket is not None:
            found = await self.authenticate(request)
            session = found[1] if found else None
            await self.store.delete(f"s:{ticket.session_id}")
            log.info("sign-out", extra={"request_id": facts.request_id,
                                        "session": short_hash(ticket.session_id)})
        response: web.StreamResponse
        logout_url = None
        if session is not None and self.idp.ready:
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
                request_id=facts.request_id,
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

    async def userinfo(self, request: web.Request, facts: RequestFacts) -> web.StreamResponse:
        found = await self.authenticate(request)
        if found is None:
            return web.json_response({"error": "unauthenticated"}, status=401,
                                     headers={"Cache-Control": _NO_STORE})
        identity = found[1].identity
        return web.json_response(
            {
                "user": identity.user,
                "email": identity.email,
                "groups": list(identity.groups),
                "preferred_username": identity.preferred_username,
            },
            headers={"Cache-Control": _NO_STORE},
        )

    # ------------------------------------------------------------------ health and metrics

    async def ping(self, request: web.Request, facts: RequestFacts) -> web.StreamResponse:
        return web.Response(text="OK")

    async def ready(self, request: web.Request, facts: RequestFacts) -> web.StreamResponse:
        provider_ok = self.idp.ready
        try:
            await self.store.ping()
            store_ok = True
        except SessionStoreError:
            store_ok = False
        ok = provider_ok and store_ok
        return web.json_response(
            {"ready": ok, "provider": provider_ok, "store": store_ok},
            status=200 if ok else 503,
        )

    async def metrics_endpoint(
        self, request: web.Request, facts: RequestFacts
    ) -> web.StreamResponse:
        self.metrics.provider_ready.set(1 if self.idp.ready else 0)
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    # ------------------------------------------------------------------ errors

    def _page(
        self, status: int, heading: str, message: str, *, advice: str = "",
        link: Link | None = None, request_id: str = "",
    ) -> web.Response:
        body = self.pages.render(status=status, heading=heading, message=message,
                                 advice=advice, link=link, request_id=request_id)
        return web.Response(status=status, text=body, content_type="text/html",
                            headers={"Cache-Control": _NO_STORE, **_PAGE_HEADERS})

    def _error(
        self, request: web.BaseRequest, exc: RequestError, request_id: str,
        facts: RequestFacts | None,
    ) -> web.StreamResponse:
        status = exc.status_hint
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(level, "request failed", extra={
            "request_id": request_id, "reason": exc.reason, "status": status,
            "detail": exc.message})
        if not _wants_html(request):
            return web.json_response(
                {"error": exc.reason, "message": exc.message, "request_id": request_id},
                status=status, headers={"Cache-Control": _NO_STORE},
            )
        heading, advice, link = self._explain(exc, facts)
        return self._page(status, heading, exc.message, advice=advice, link=link,
                          request_id=request_id)

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
        if exc.status_hint == 503:
            return ("Temporarily unavailable",
                    "Nobody can sign in or reach this application until it is back. Try again "
                    "in a minute.", None)
        if exc.status_hint in (502, 504):
            return ("The application is not answering",
                    "Try again in a minute; if it persists, tell the application's owner the "
                    "reference below.", None)
        return ("Request refused", "", None)
