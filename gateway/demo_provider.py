"""The demo OpenID provider of ``oidc-gateway demo``. NOT FOR PRODUCTION.

Built from authlib's server components rather than by hand: the authorization code grant with
the OpenID Connect ``OpenIDCode`` extension (ID tokens, nonce), PKCE (``CodeChallenge``, S256
only and required), the RFC 9207 ``iss`` parameter, the userinfo endpoint and RP-initiated
logout. authlib ships Flask and Django integrations only; :class:`_AuthlibAdapter` is the thin
aiohttp one (an ``OAuth2Request`` built from an aiohttp request, responses as a small value).

What makes it a demo and nothing more: two users whose random passwords are printed at start,
one client (the demo gateway), everything in memory and gone at exit, a signing key made at
start, no login session of its own (every sign-in asks for the password, so switching between
users needs only the gateway's sign-out), no brute-force protection. :func:`serve_on_loopback`
refuses any address but loopback.
"""

from __future__ import annotations

import contextvars
import errno
import hmac
import html
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from authlib.oauth2 import AuthorizationServer, OAuth2Error, ResourceProtector
from authlib.oauth2.rfc6749 import (
    ClientMixin,
    InvalidRequestError,
    OAuth2Payload,
    OAuth2Request,
    TokenMixin,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant
from authlib.oauth2.rfc6750 import BearerTokenGenerator, BearerTokenValidator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import AuthorizationServerMetadata as IssParameterMetadata
from authlib.oauth2.rfc9207 import IssuerParameter
from authlib.oidc.core import AuthorizationCodeMixin, OpenIDCode, UserInfo, UserInfoEndpoint
from authlib.oidc.discovery import OpenIDProviderMetadata
from authlib.oidc.rpinitiated import EndSessionEndpoint
from authlib.oidc.rpinitiated import OpenIDProviderMetadata as LogoutMetadata
from joserfc.jwk import KeySet, RSAKey
from multidict import CIMultiDict, MultiDict, MultiMapping

from gateway.errors import GatewayError

__all__ = [
    "DemoClient",
    "DemoProvider",
    "DemoUser",
    "demo_users",
    "render_page",
    "require_loopback",
    "serve_on_loopback",
]

log = logging.getLogger(__name__)

NOT_FOR_PRODUCTION: Final = (
    "This is the demo provider of `oidc-gateway demo`: throwaway users with printed passwords, "
    "on this machine only. It is not for production; use a real OpenID provider with "
    "`oidc-gateway run`."
)
SCOPES: Final = ("openid", "profile", "email", "groups")
ALGORITHM: Final = "RS256"  # the algorithm every OpenID provider must support (Core §15.1)
CODE_TTL: Final = 120.0  # RFC 6749 §4.1.2: short-lived, 10 minutes at most
TOKEN_TTL: Final = 3600
# Fields of the login form that are ours, not part of the authorization request.
LOGIN_FIELDS: Final = ("username", "password")


# ---------------------------------------------------------------------------------------------
# Binding: loopback only
# ---------------------------------------------------------------------------------------------


def require_loopback(host: str) -> None:
    """Refuse any listen address but a loopback IP literal (127.0.0.0/8, ::1).

    A name such as ``localhost`` is refused too: what it resolves to is up to the machine.
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise GatewayError(
            f"The demo refuses to listen on {host!r}: it serves on loopback addresses only "
            f"(127.0.0.1 or ::1). {NOT_FOR_PRODUCTION}",
            reason="demo_not_loopback",
        )


async def serve_on_loopback(
    app: web.Application,
    host: str,
    port: int,
    *,
    what: str,
    shutdown_timeout: float = 2.0,
    **handler_options: Any,
) -> web.AppRunner:
    """Set up ``app`` and listen on ``host:port`` (loopback only); the caller cleans it up.

    A port already taken becomes a GatewayError naming it, not an OSError traceback.
    """
    require_loopback(host)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, **handler_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise GatewayError(
                f"Port {port} on {host} is already in use, so the {what} cannot start. Stop "
                "what uses it, or choose other ports with --port, --provider-port and "
                "--app-port.",
                reason="port_in_use",
            ) from None
        raise GatewayError(
            f"The {what} cannot listen on {host}:{port}: {exc.strerror or exc}.",
            reason="listen_failed",
        ) from None
    return runner


# ---------------------------------------------------------------------------------------------
# Users, client, codes, tokens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoUser:
    username: str
    password: str = field(repr=False)
    name: str
    email: str
    groups: tuple[str, ...]

    @property
    def sub(self) -> str:
        return f"demo-{self.username}"


def demo_users(password: Callable[[], str] | None = None) -> tuple[DemoUser, ...]:
    """alice (admins, staff) and bob (staff), with fresh random passwords."""
    make = password or (lambda: secrets.token_urlsafe(9))
    return (
        DemoUser("alice", make(), "Alice Liddell", "alice@demo.test", ("admins", "staff")),
        DemoUser("bob", make(), "Bob Builder", "bob@demo.test", ("staff",)),
    )


@dataclass(frozen=True)
class DemoClient(ClientMixin):  # type: ignore[misc]  # authlib is untyped
    """The one client the demo provider knows: the demo gateway (a confidential client)."""

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()

    @property
    def client_metadata(self) -> dict[str, Any]:
        # Read by authlib's userinfo (signed or not) and end-session endpoints.
        return {"post_logout_redirect_uris": list(self.post_logout_redirect_uris)}

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None  # the request must name one of redirect_uris

    def get_allowed_scope(self, scope: str | None) -> str:
        return " ".join(s for s in (scope or "").split() if s in SCOPES)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(client_secret.encode(), self.client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class _Code(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str = field(repr=False)
    client_id: str
    redirect_uri: str
    scope: str
    user: DemoUser
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time


@dataclass
class _Token(TokenMixin):  # type: ignore[misc]
    client: DemoClient
    user: DemoUser
    scope: str
    expires_in: int
    issued_at: float
    revoked: bool = False

    def check_client(self, client: DemoClient) -> bool:
        return client.client_id == self.client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked

    def get_user(self) -> DemoUser:
        return self.user

    def get_client(self) -> DemoClient:
        return self.client


# ---------------------------------------------------------------------------------------------
# The aiohttp adapter for authlib's server classes
# ---------------------------------------------------------------------------------------------


class _Payload(OAuth2Payload):  # type: ignore[misc]
    """The request's parameters: query, then form, as Flask's ``request.values`` gives them."""

    def __init__(self, values: MultiDict[str]) -> None:
        self._values = values

    @property
    def data(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self._values.items():
            out.setdefault(key, value)
        return out

    @property
    def datalist(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, value in self._values.items():
            out.setdefault(key, []).append(value)
        return out


class AiohttpOAuth2Request(OAuth2Request):  # type: ignore[misc]
    """authlib's view of one aiohttp request; the form is read before (authlib is sync)."""

    def __init__(
        self, request: web.Request, form: MultiMapping[str], *,
        origin: str, drop: Iterable[str] = (),
    ) -> None:
        # The URL from our own origin, not the client's Host header: authlib refuses plain
        # http except on loopback, and a forged Host must not turn that into a 500.
        super().__init__(request.method, origin + str(request.rel_url), headers=request.headers)
        self._args = request.query
        self._form = form
        dropped = set(drop)
        values: MultiDict[str] = MultiDict(
            (k, v) for k, v in (*request.query.items(), *form.items()) if k not in dropped
        )
        self.payload = _Payload(values)

    @property
    def args(self) -> MultiMapping[str]:
        return self._args

    @property
    def form(self) -> MultiMapping[str]:
        return self._form


async def oauth2_request(
    request: web.Request, *, origin: str, drop: Iterable[str] = ()
) -> AiohttpOAuth2Request:
    """Read the form body (if any) and wrap ``request`` for authlib; ``drop`` leaves out fields."""
    form: MultiDict[str] = MultiDict()
    if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
        posted = await request.post()
        form = MultiDict((k, v) for k, v in posted.items() if isinstance(v, str))
    return AiohttpOAuth2Request(request, form, origin=origin, drop=drop)


@dataclass
class AuthlibResponse:
    """What authlib's ``handle_response`` produces; ``location`` is what its RFC 9207 hook edits."""

    status: int
    body: Any
    headers: list[tuple[str, str]]

    @property
    def location(self) -> str | None:
        return next((v for k, v in self.headers if k.lower() == "location"), None)

    @location.setter
    def location(self, value: str) -> None:
        self.headers = [(k, v) for k, v in self.headers if k.lower() != "location"]
        self.headers.append(("Location", value))

    def to_aiohttp(self) -> web.Response:
        body = json.dumps(self.body) if isinstance(self.body, dict) else str(self.body or "")
        return web.Response(
            status=self.status, body=body.encode() or None, headers=CIMultiDict(self.headers)
        )


# The request being answered, for authlib's ResourceProtector.acquire_token(), which (as in its
# Flask integration) takes no request argument. Set around one synchronous authlib call.
_CURRENT: contextvars.ContextVar[AiohttpOAuth2Request] = contextvars.ContextVar("demo_op_request")


class _Protector(ResourceProtector):  # type: ignore[misc]
    def acquire_token(self, scopes: str | list[str] | None = None) -> _Token:
        wanted = [scopes] if isinstance(scopes, str) else scopes
        token: _Token = self.validate_request(wanted, _CURRENT.get())
        return token


class _AuthlibAdapter(AuthorizationServer):  # type: ignore[misc]
    """authlib's AuthorizationServer for aiohttp, backed by the provider's memory."""

    def __init__(self, op: DemoProvider) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        self.op = op

    def query_client(self, client_id: str) -> DemoClient | None:
        client = self.op.client
        return client if client_id == client.client_id else None

    def save_token(self, token: Mapping[str, Any], request: OAuth2Request) -> None:
        self.op.tokens[token["access_token"]] = _Token(
            client=request.client, user=request.user, scope=token.get("scope", ""),
            expires_in=int(token.get("expires_in", TOKEN_TTL)), issued_at=time.time(),
        )

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if not isinstance(request, OAuth2Request):
            raise TypeError("wrap aiohttp requests with oauth2_request() first")
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> AuthlibResponse:
        return AuthlibResponse(status, body, list(headers or []))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass  # no framework signals here


# ---------------------------------------------------------------------------------------------
# authlib grant, extensions and endpoints, bound to the provider
# ---------------------------------------------------------------------------------------------


class _CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012
    AUTHORIZATION_CODE_LENGTH = 43

    @property
    def op(self) -> DemoProvider:
        op: DemoProvider = self.server.op
        return op

    def generate_authorization_code(self) -> str:
        return secrets.token_urlsafe(32)

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        now = time.time()
        self.op.purge(now)
        self.op.codes[code] = _Code(
            code=code, client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri, scope=request.scope, user=request.user,
            nonce=data.get("nonce"), code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"), auth_time=int(now),
            expires_at=now + CODE_TTL,
        )
        if nonce := data.get("nonce"):
            self.op.nonces[(request.client.client_id, nonce)] = now + CODE_TTL

    def query_authorization_code(self, code: str, client: DemoClient) -> _Code | None:
        found = self.op.codes.get(code)
        if found is None or found.client_id != client.client_id or found.expires_at < time.time():
            return None
        return found

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        self.op.codes.pop(authorization_code.code, None)  # single use

    def authenticate_user(self, authorization_code: _Code) -> DemoUser:
        return authorization_code.user


class _S256Required(CodeChallenge):  # type: ignore[misc]
    """PKCE for every client (OAuth 2.1 / RFC 9700 §2.1.1), and only S256: plain proves little."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        if not grant.request.payload.data.get("code_challenge"):
            raise InvalidRequestError("Missing 'code_challenge': PKCE (S256) is required.")
        if grant.request.payload.data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("Unsupported 'code_challenge_method': use S256.")
        super().validate_code_challenge(grant, redirect_uri)


class _OpenIDCode(OpenIDCode):  # type: ignore[misc]
    def __init__(self, op: DemoProvider) -> None:
        super().__init__(require_nonce=True)
        self.op = op

    def resolve_client_private_key(self, client: DemoClient) -> RSAKey:
        return self.op.key

    def get_client_algorithm(self, client: DemoClient) -> str:
        return ALGORITHM

    def get_encode_header(self, client: DemoClient) -> dict[str, str]:
        return {"alg": ALGORITHM, "kid": self.op.key.kid or "", "typ": "JWT"}

    def get_client_claims(self, client: DemoClient) -> dict[str, Any]:
        return {"iss": self.op.issuer, "aud": client.client_id}

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        expiry = self.op.nonces.get((request.payload.client_id, nonce))
        return expiry is not None and expiry > time.time()

    def generate_user_info(self, user: DemoUser, scope: str) -> UserInfo:
        return self.op.user_info(user, scope)


class _Issuer(IssuerParameter):  # type: ignore[misc]
    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def get_issuer(self) -> str:
        return self.issuer


class _BearerValidator(BearerTokenValidator):  # type: ignore[misc]
    def __init__(self, op: DemoProvider) -> None:
        super().__init__()
        self.op = op

    def authenticate_token(self, token_string: str) -> _Token | None:
        return self.op.tokens.get(token_string)


class _UserInfo(UserInfoEndpoint):  # type: ignore[misc]
    def __init__(self, op: DemoProvider, protector: _Protector) -> None:
        super().__init__(resource_protector=protector)
        self.op = op

    def get_issuer(self) -> str:
        return self.op.issuer

    def generate_user_info(self, user: DemoUser, scope: str) -> UserInfo:
        return self.op.user_info(user, scope)


class _EndSession(EndSessionEndpoint):  # type: ignore[misc]
    def __init__(self, op: DemoProvider) -> None:
        super().__init__()
        self.op = op

    def get_server_jwks(self) -> KeySet:
        return KeySet([self.op.key])

    def get_algorithms(self) -> list[str]:
        return [ALGORITHM]

    def end_session(self, end_session_request: Any) -> None:
        # No login session to end here (see the module docstring); revoke the user's tokens.
        claims = end_session_request.id_token_claims or {}
        for token in self.op.tokens.values():
            if token.user.sub == claims.get("sub"):
                token.revoked = True


# ---------------------------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------------------------


class DemoProvider:
    """An OpenID provider for one client and a few users, in memory; see the module docstring."""

    def __init__(
        self, *, issuer: str, client: DemoClient, users: Iterable[DemoUser],
        key: RSAKey | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.client = client
        self.users = {u.username: u for u in users}
        self.key = key or RSAKey.generate_key(
            2048, parameters={"use": "sig", "alg": ALGORITHM}, private=True, auto_kid=True
        )
        self.codes: dict[str, _Code] = {}
        self.tokens: dict[str, _Token] = {}
        self.nonces: dict[tuple[str, str], float] = {}

        server = _AuthlibAdapter(self)
        server.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(32),
                expires_generator=TOKEN_TTL,
            ),
        )
        server.register_grant(_CodeGrant, [_S256Required(required=True), _OpenIDCode(self)])
        server.register_extension(_Issuer(self.issuer))  # RFC 9207 iss in every answer
        protector = _Protector()
        protector.register_token_validator(_BearerValidator(self))
        server.register_endpoint(_UserInfo(self, protector))
        server.register_endpoint(_EndSession(self))
        self.server = server
        self.metadata = self._metadata()

    # ------------------------------------------------------------------ state

    def purge(self, now: float) -> None:
        """Forget expired codes, nonces and tokens (the demo keeps nothing longer)."""
        self.codes = {k: c for k, c in self.codes.items() if c.expires_at > now}
        self.nonces = {k: t for k, t in self.nonces.items() if t > now}
        self.tokens = {k: t for k, t in self.tokens.items() if not t.is_expired()}

    def user_info(self, user: DemoUser, scope: str) -> UserInfo:
        info = UserInfo(
            sub=user.sub, name=user.name, preferred_username=user.username,
            email=user.email, email_verified=True,
        ).filter(scope)
        if "groups" in scope.split():  # not a standard claim: UserInfo.filter() drops it
            info["groups"] = list(user.groups)
        return info

    def check_password(self, username: str, password: str) -> DemoUser | None:
        user = self.users.get(username)
        # Compare against something even for an unknown name, in constant time.
        expected = user.password if user else secrets.token_urlsafe(9)
        ok = hmac.compare_digest(password.encode(), expected.encode())
        return user if ok and user is not None else None

    def _metadata(self) -> dict[str, Any]:
        """The discovery document, checked by authlib's metadata validators."""
        base = self.issuer
        meta = OpenIDProviderMetadata(
            issuer=base,
            authorization_endpoint=f"{base}/authorize",
            token_endpoint=f"{base}/token",
            userinfo_endpoint=f"{base}/userinfo",
            jwks_uri=f"{base}/jwks",
            end_session_endpoint=f"{base}/end_session",
            scopes_supported=list(SCOPES),
            response_types_supported=["code"],
            response_modes_supported=["query"],
            grant_types_supported=["authorization_code"],
            subject_types_supported=["public"],
            id_token_signing_alg_values_supported=[ALGORITHM],
            token_endpoint_auth_methods_supported=["client_secret_basic", "client_secret_post"],
            code_challenge_methods_supported=["S256"],
            claims_supported=["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "name",
                              "preferred_username", "email", "email_verified", "groups"],
            authorization_response_iss_parameter_supported=True,
        )
        meta.validate(metadata_classes=[LogoutMetadata, IssParameterMetadata])
        return dict(meta)

    # ------------------------------------------------------------------ HTTP

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[_no_cache])
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_route("GET", "/authorize", self._authorize)
        app.router.add_route("POST", "/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_route("GET", "/userinfo", self._userinfo)
        app.router.add_route("POST", "/userinfo", self._userinfo)
        app.router.add_route("GET", "/end_session", self._end_session)
        app.router.add_route("POST", "/end_session", self._end_session)
        app.router.add_get("/", self._home)
        return app

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(self.metadata)

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(KeySet([self.key]).as_dict(private=False))

    async def _home(self, request: web.Request) -> web.Response:
        return render_page(
            200, "Demo OpenID provider",
            f"<p>{html.escape(NOT_FOR_PRODUCTION)}</p><p>Discovery: <a href=\"/.well-known/"
            "openid-configuration\">/.well-known/openid-configuration</a></p>",
        )

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        req = await oauth2_request(request, origin=self.issuer, drop=LOGIN_FIELDS)
        user: DemoUser | None = None
        failed = False
        if request.method == "POST":
            form = req.form
            user = self.check_password(form.get("username", ""), form.get("password", ""))
            failed = user is None
        try:
            grant = self.server.get_consent_grant(req, end_user=user)
        except OAuth2Error as error:
            return self._authorize_error(error)
        if user is None:
            return self._login_form(req, failed=failed)
        log.info("demo provider: signed in", extra={"user": user.username})
        response: AuthlibResponse = self.server.create_authorization_response(
            req, grant_user=user, grant=grant
        )
        return response.to_aiohttp()

    def _authorize_error(self, error: OAuth2Error) -> web.StreamResponse:
        answer = self.server.handle_response(*error())
        if answer.location:  # the redirect URI is known good: tell the client (RFC 9207 iss too)
            _Issuer(self.issuer).add_issuer_parameter(self.server, answer)
            return answer.to_aiohttp()
        detail = error.description or error.error
        return render_page(
            400, "Invalid sign-in request",
            "<p>The application sent a sign-in request this provider cannot accept: "
            f"<b>{html.escape(str(detail).rstrip('.'))}</b>.</p>"
            "<p>Start again from the application.</p>",
        )

    def _login_form(self, req: AiohttpOAuth2Request, *, failed: bool) -> web.Response:
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in req.payload.data.items()
        )
        users = ", ".join(
            f"<b>{html.escape(u.username)}</b> ({html.escape(', '.join(u.groups))})"
            for u in self.users.values()
        )
        error = (
            '<p class="error" role="alert">Wrong user name or password.</p>' if failed else ""
        )
        body = f"""{error}
<form method="post" action="/authorize">
{hidden}
<label>User name <input type="text" name="username" autocomplete="username" required
 autofocus></label>
<label>Password <input type="password" name="password" autocomplete="current-password"
 required></label>
<button type="submit">Sign in</button>
</form>
<p class="note">Demo users: {users}. Their passwords were printed by
<code>oidc-gateway demo</code> when it started.</p>
<p class="note">{html.escape(NOT_FOR_PRODUCTION)}</p>"""
        return render_page(401 if failed else 200, "Sign in to the demo provider", body)

    async def _token(self, request: web.Request) -> web.Response:
        req = await oauth2_request(request, origin=self.issuer)
        response: AuthlibResponse = self.server.create_token_response(req)
        return response.to_aiohttp()

    async def _userinfo(self, request: web.Request) -> web.Response:
        req = await oauth2_request(request, origin=self.issuer)
        reset = _CURRENT.set(req)
        try:
            response: AuthlibResponse = self.server.create_endpoint_response("userinfo", req)
        finally:
            _CURRENT.reset(reset)
        return response.to_aiohttp()

    async def _end_session(self, request: web.Request) -> web.Response:
        req = await oauth2_request(request, origin=self.issuer)
        try:
            validated = self.server.validate_endpoint_request("end_session", req)
        except OAuth2Error as error:
            return render_page(
                400, "Sign-out request refused",
                f"<p>{html.escape(str(error.description or error.error))}</p>",
            )
        response: AuthlibResponse | None = self.server.create_endpoint_response(
            "end_session", validated
        )
        if response is not None:
            return response.to_aiohttp()
        return render_page(200, "Signed out", "<p>You are signed out of the demo provider.</p>")


@web.middleware
async def _no_cache(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# ---------------------------------------------------------------------------------------------
# Pages (shared with the demo's echo app)
# ---------------------------------------------------------------------------------------------

_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;margin:0 auto;max-width:44rem;padding:1rem;color:#222}
h1{font-size:1.4rem} .banner{background:#fff3cd;border:1px solid #e0c36c;padding:.4rem .8rem}
form{display:grid;gap:.8rem;max-width:20rem} label{display:grid}
input,button{font:inherit;padding:.4rem} .error{color:#a00;font-weight:bold}
.note{color:#555;font-size:.9rem} table{border-collapse:collapse;width:100%}
th,td{text-align:left;border-bottom:1px solid #ddd;padding:.3rem .5rem;vertical-align:top}
td{font-family:ui-monospace,monospace;word-break:break-all} .empty{color:#888}
"""


def render_page(status: int, title: str, body_html: str, *, banner: str = "Demo") -> web.Response:
    """A small self-contained HTML page; ``body_html`` must already be escaped."""
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body><p class="banner">{html.escape(banner)}: not for production</p>
<h1>{html.escape(title)}</h1>
{body_html}
</body></html>
"""
    return web.Response(
        status=status, text=text, content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
