"""An OpenID provider that misbehaves on request, for the relying-party conformance tests.

The OpenID Foundation certifies relying parties by running them against a provider that sends
subtly wrong answers (a token for another audience, a forged signature, a userinfo ``sub`` of
someone else...) and checking that the RP refuses each one. The real test OP (``tests/op``)
is an honest provider and cannot be made to lie, so this module is that dishonest provider:
a real HTTP server (aiohttp, 127.0.0.1, a free port) serving discovery, JWKS, authorize, token
and userinfo, whose next answers a test scripts through :class:`Script`.

Honest by default: the authorize endpoint checks ``client_id``, ``redirect_uri`` and
``response_type`` and redirects straight back to the gateway's callback with a code (no login
form: the user "alice" is always signed in), plus ``iss`` (RFC 9207) when announced; the token
endpoint checks client authentication (the method the provider requires), the code (single use),
the redirect URI and the PKCE verifier, and returns a correctly signed ID token. A test then
changes only the thing it is about, so a rejection can only come from that one lie.

What discovery announces and which keys are published are set when the provider is built (the
gateway reads discovery once, at start-up); the JWKS may be changed later (rotation). Every
endpoint counts its calls in :attr:`AdversarialProvider.calls`, so a test can assert that the
token endpoint was never reached, or that the JWKS was fetched exactly once more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal
from urllib.parse import unquote_plus, urlencode

from aiohttp import web
from joserfc import jws
from joserfc.jwk import Key

__all__ = [
    "DROP",
    "AdversarialProvider",
    "Script",
    "TokenFailure",
    "b64url",
]

# A claim, header or userinfo value set to DROP is removed instead of replaced.
DROP: Final = object()
# The longest a "timeout" token request is held before the provider gives up on its own
# (the gateway under test times out well before; the bound keeps a broken test from hanging).
HANG_LIMIT: Final = 15.0
SUB: Final = "alice-sub-1"

Value = Any  # a JSON value, DROP, or a callable now -> JSON value
TokenMode = Literal["ok", "timeout", "drop"]
Signature = Literal["valid", "corrupt", "none"]
ClientAuth = Literal["client_secret_basic", "client_secret_post"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _apply(base: dict[str, Any], changes: Mapping[str, Value], now: int) -> dict[str, Any]:
    """``base`` with ``changes`` applied: DROP removes, a callable gets ``now``."""
    out = dict(base)
    for name, value in changes.items():
        if value is DROP:
            out.pop(name, None)
        elif callable(value):
            out[name] = value(now)
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class TokenFailure:
    """A token endpoint answer other than tokens: this status, body and content type."""

    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass
class Script:
    """What the provider does on the next logins; a fresh Script is the honest provider."""

    # Authorization response: an error code instead of a code, and the RFC 9207 iss parameter
    # ("issuer": ours, None: omitted, any other string: sent as is).
    authorize_error: str | None = None
    authorize_error_description: str | None = None
    authorize_iss: str | None = "issuer"
    authorize_omit_code: bool = False
    # ID token: claim and header changes (DROP removes, callables get the issue time),
    # the signing key (None: the provider's current key), and the signature.
    claims: dict[str, Value] = field(default_factory=dict)
    header: dict[str, Value] = field(default_factory=dict)
    key: Key | None = None
    signature: Signature = "valid"
    # Full control when the above is not enough: claims, header -> compact JWT.
    sign: Callable[[dict[str, Any], dict[str, Any]], str] | None = None
    # Token endpoint: tokens, a failure answer, a hang, or a dropped connection; changes to the
    # JSON of a successful answer (DROP removes a member).
    client_auth: ClientAuth | None = None  # the method required, None: the announced one
    token_mode: TokenMode = "ok"
    token_failure: TokenFailure | None = None
    token_response: dict[str, Value] = field(default_factory=dict)
    # Refresh (RFC 6749 §6): whether the code exchange hands out a refresh token; changes to
    # the refresh answer (DROP "refresh_token": none returned, the old one stays valid); an
    # ID token in the refresh answer (OIDC Core §12.2 lets it be left out) with these claim
    # changes (e.g. another sub).
    refresh_token: bool = False
    refresh_response: dict[str, Value] = field(default_factory=dict)
    refresh_id_token: bool = False
    refresh_claims: dict[str, Value] = field(default_factory=dict)
    # Userinfo: changes to the claims (DROP removes, e.g. sub), or a failure answer.
    userinfo: dict[str, Value] = field(default_factory=dict)
    userinfo_failure: TokenFailure | None = None
    # The login's access token (Keycloak puts roles there): None keeps it opaque; else a JWT
    # with these changes to honest claims (iss, sub, azp: the client, aud: account, exp),
    # signed as login_access_signature and login_access_key (None: the signing key) say.
    login_access_token: dict[str, Value] | None = None
    login_access_signature: Signature = "valid"
    login_access_key: Key | None = None
    # Microsoft Graph (Entra group overage), served on this server's origin: the user's
    # groups (None: 404), the page size, a status instead of pages, and another origin
    # (scheme://host:port) for @odata.nextLink.
    graph_groups: list[str] | None = None
    graph_page_size: int = 100
    graph_status: int = 200
    graph_next_origin: str | None = None
    # Introspection (RFC 7662): a failure answer instead of the token's entry, or a hang.
    introspection_failure: TokenFailure | None = None
    introspection_hang: bool = False


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    nonce: str | None
    challenge: str | None
    challenge_method: str | None


class AdversarialProvider:
    """The provider; ``async with`` it (or start()/close()) to serve on 127.0.0.1."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        keys: list[Key],
        client_auth: ClientAuth = "client_secret_basic",
        algs: tuple[str, ...] = ("RS256", "ES256"),
        iss_parameter_supported: bool = True,
        strip_kids: bool = False,
        junk_keys: list[Any] | None = None,
        issuer_path: str = "",
        issuer_as: Callable[[AdversarialProvider], str] | None = None,
        internal_port: bool = False,
        end_session: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.client_auth: ClientAuth = client_auth
        self.algs = algs
        self.iss_parameter_supported = iss_parameter_supported
        # The JWKS: the public halves of ``published`` (without "kid" when strip_kids),
        # followed by ``junk`` entries served verbatim (unparseable or unusable keys).
        self.published: list[Key] = list(keys)
        self.strip_kids = strip_kids
        self.junk: list[Any] = list(junk_keys or [])
        self.signing_key: Key = keys[0]
        self.script = Script()
        self.calls: Counter[str] = Counter()
        self.last_authorize: dict[str, str] = {}
        self.last_token_form: dict[str, str] = {}
        self.last_token_auth: str | None = None
        # Every code, access token and ID token handed out: none may ever appear in a log.
        self.issued: list[str] = []
        self.issuer = ""
        # Provider quirks (presets): the issuer's path (/oauth2/default, /organizations/v2.0),
        # the issuer as discovery and honest tokens spell it (a trailing slash, Entra's
        # {tenantid} template, an internal hostname), a second, "cluster-internal" port
        # serving the same endpoints (split horizon), an end_session_endpoint.
        self.issuer_path = issuer_path
        self.issuer_as = issuer_as
        self.internal_port = internal_port
        self.internal_origin = ""
        self.end_session = end_session
        # (site, path) of every request: "public" or "internal".
        self.hits: list[tuple[str, str]] = []
        self.refresh_forms: list[dict[str, str]] = []
        self._refresh_tokens: dict[str, _Grant] = {}
        self._grants: dict[str, _Grant] = {}
        self._access_tokens: set[str] = set()
        # Opaque API tokens and what introspection says of them (unknown: {"active": false}).
        self.introspection: dict[str, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        app = inner = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_get("/userinfo", self._userinfo)
        app.router.add_post("/introspect", self._introspect)
        if self.issuer_path:
            app = web.Application()
            app.add_subapp(self.issuer_path, inner)
        app.middlewares.append(self._record_site)
        # On the origin, not under issuer_path: provider.graph_url is an origin.
        app.router.add_get("/v1.0/me/transitiveMemberOf", self._graph_member_of)
        app.router.add_get("/claim-source", self._claim_source)
        self._release = asyncio.Event()
        # shutdown_timeout: a request held by the "timeout" mode must not hold up teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.issuer = f"http://127.0.0.1:{port}{self.issuer_path}"
        if self.internal_port:
            internal = web.TCPSite(self._runner, "127.0.0.1", 0)
            await internal.start()
            other = [a[1] for a in self._runner.addresses if a[1] != port]
            self.internal_origin = f"http://127.0.0.1:{other[0]}"

    @property
    def published_issuer(self) -> str:
        """The issuer discovery names and honest tokens carry (``issuer_as``, else issuer)."""
        return self.issuer_as(self) if self.issuer_as is not None else self.issuer

    @web.middleware
    async def _record_site(self, request: web.Request, handler: Any) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        public = f"http://127.0.0.1:{sockname[1]}" if sockname else ""
        site = "internal" if self.internal_origin and public == self.internal_origin else "public"
        self.hits.append((site, request.path))
        response: web.StreamResponse = await handler(request)
        return response

    async def close(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> AdversarialProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def reset(self) -> None:
        """Back to honest behaviour for the next test (keys and discovery stay as built)."""
        self.script = Script()
        if self._release is not None:
            # Let go of any request a previous test held, then arm the event again.
            self._release.set()
            self._release = asyncio.Event()

    # ------------------------------------------------------------------ ID tokens

    def claims_for(self, grant: _Grant, now: int) -> dict[str, Any]:
        """The honest ID token claims for ``grant``, with the script's changes applied."""
        honest: dict[str, Any] = {
            "iss": self.published_issuer,
            "sub": SUB,
            "aud": grant.client_id,
            "iat": now,
            "exp": now + 300,
            "auth_time": now,
        }
        if grant.nonce is not None:
            honest["nonce"] = grant.nonce
        return _apply(honest, self.script.claims, now)

    def id_token(self, claims: dict[str, Any], now: int) -> str:
        """Sign ``claims`` as the script says (key, header, intact/corrupt/no signature)."""
        script = self.script
        key = script.key or self.signing_key
        alg = "ES256" if key.key_type == "EC" else "RS256"
        header: dict[str, Any] = {"typ": "JWT", "alg": alg}
        if key.kid is not None:
            header["kid"] = key.kid
        header = _apply(header, script.header, now)
        payload = json.dumps(claims).encode()
        if script.sign is not None:
            return script.sign(header, claims)
        if script.signature == "none":
            # An unsigned JWT (RFC 7519 §6): alg "none" unless the script names another
            # spelling, and an empty signature.
            if "alg" not in script.header:
                header["alg"] = "none"
            return f"{b64url(json.dumps(header).encode())}.{b64url(payload)}."
        # Signed by hand with joserfc's algorithm, not jws.serialize_compact: a lying provider
        # must be able to send headers (crit, odd kids) that joserfc would refuse to produce.
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(payload)}"
        model = jws.JWSRegistry.algorithms[header["alg"]]
        signature = bytearray(model.sign(signing_input.encode("ascii"), key))
        if script.signature == "corrupt":
            signature[len(signature) // 2] ^= 0x01
        return f"{signing_input}.{b64url(bytes(signature))}"

    def access_token(
        self,
        claims: Mapping[str, Value] | None = None,
        *,
        key: Key | None = None,
        alg: str | None = None,
        header: Mapping[str, Value] | None = None,
        audience: str = "https://api.test",
    ) -> str:
        """A JWT access token (RFC 9068) for API calls: honest claims for alice (``iss``,
        ``sub``, ``aud``, ``exp`` in 5 minutes...) with ``claims`` changes applied (DROP
        removes), signed with ``key`` (default: the current signing key) and ``alg``
        (default: the key's usual one), typ ``at+jwt``, with ``header`` changes applied."""
        now = int(time.time())
        honest: dict[str, Any] = {
            "iss": self.issuer,
            "sub": SUB,
            "aud": audience,
            "client_id": "api-client",
            "iat": now,
            "exp": now + 300,
            "jti": secrets.token_urlsafe(12),
            "scope": "openid",
            "preferred_username": "alice",
            "email": "alice@example.test",
            "email_verified": True,
            "groups": ["eng"],
        }
        payload = _apply(honest, claims or {}, now)
        key = key or self.signing_key
        if alg is None:
            alg = "ES256" if key.key_type == "EC" else "RS256"
        head: dict[str, Any] = {"typ": "at+jwt", "alg": alg}
        if key.kid is not None:
            head["kid"] = key.kid
        head = _apply(head, header or {}, now)
        signing_input = (
            f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(payload).encode())}"
        )
        model = jws.JWSRegistry.algorithms[alg]
        token = f"{signing_input}.{b64url(model.sign(signing_input.encode('ascii'), key))}"
        self.issued.append(token)
        return token

    def opaque_token(self, answer: Mapping[str, Value] | None = None) -> str:
        """An opaque access token whose introspection answers alice's active token with
        ``answer`` changes applied (``{"active": False}`` for a revoked one)."""
        now = int(time.time())
        token = secrets.token_urlsafe(32)
        honest: dict[str, Any] = {
            "active": True,
            "iss": self.issuer,
            "sub": SUB,
            "aud": "https://api.test",
            "client_id": "api-client",
            "token_type": "Bearer",
            "iat": now,
            "exp": now + 300,
            "preferred_username": "alice",
            "groups": ["eng"],
        }
        self.introspection[token] = _apply(honest, answer or {}, now)
        self.issued.append(token)
        return token

    # ------------------------------------------------------------------ endpoints

    async def _discovery(self, request: web.Request) -> web.Response:
        self.calls["discovery"] += 1
        doc: dict[str, Any] = {
            "issuer": self.published_issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(self.algs),
            "token_endpoint_auth_methods_supported": [self.client_auth],
            "code_challenge_methods_supported": ["S256"],
            "introspection_endpoint": f"{self.issuer}/introspect",
            "scopes_supported": ["openid", "email", "profile", "groups"],
        }
        if self.iss_parameter_supported:
            doc["authorization_response_iss_parameter_supported"] = True
        if self.end_session:
            doc["end_session_endpoint"] = f"{self.issuer}/logout"
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.calls["jwks"] += 1
        keys: list[Any] = []
        for key in self.published:
            public = key.as_dict(private=False)
            if self.strip_kids:
                public.pop("kid", None)
            keys.append(public)
        keys.extend(self.junk)
        return web.json_response({"keys": keys})

    async def _authorize(self, request: web.Request) -> web.Response:
        """Redirect straight back with a code (or the scripted error): alice is signed in."""
        self.calls["authorize"] += 1
        query = {k: v for k, v in request.query.items()}
        self.last_authorize = query
        # A real provider shows an error page (never a redirect) for an unknown client or
        # redirect URI: redirecting there would make it an open redirector.
        if query.get("client_id") != self.client_id:
            return web.Response(status=400, text="unknown client_id")
        if query.get("redirect_uri") != self.redirect_uri:
            return web.Response(status=400, text="redirect_uri not registered")
        script = self.script
        params: list[tuple[str, str]] = []
        if script.authorize_error is not None:
            params.append(("error", script.authorize_error))
            if script.authorize_error_description is not None:
                params.append(("error_description", script.authorize_error_description))
        elif query.get("response_type") != "code":
            params.append(("error", "unsupported_response_type"))
        elif not script.authorize_omit_code:
            code = secrets.token_urlsafe(24)
            self._grants[code] = _Grant(
                client_id=query["client_id"],
                redirect_uri=query["redirect_uri"],
                nonce=query.get("nonce"),
                challenge=query.get("code_challenge"),
                challenge_method=query.get("code_challenge_method"),
            )
            self.issued.append(code)
            params.append(("code", code))
        if "state" in query:
            params.append(("state", query["state"]))
        if script.authorize_iss == "issuer":
            params.append(("iss", self.published_issuer))
        elif script.authorize_iss is not None:
            params.append(("iss", script.authorize_iss))
        location = f"{self.redirect_uri}?{urlencode(params)}"
        return web.Response(status=302, headers={"Location": location})

    def _authenticate_client(self, request: web.Request, form: Mapping[str, str]) -> str | None:
        """Which method the client used, or None when its credentials are wrong.

        RFC 6749 §2.3: a client MUST NOT use more than one method in a request; §2.3.1: the
        Basic user and password are the form-urlencoded client id and secret.
        """
        header = request.headers.get("Authorization")
        in_form = "client_secret" in form
        if header is not None and in_form:
            return None
        if header is not None:
            scheme, _, encoded = header.partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                raw = base64.b64decode(encoded, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return None
            user, sep, password = raw.partition(":")
            if not sep:
                return None
            client_id, secret = unquote_plus(user), unquote_plus(password)
            method = "client_secret_basic"
        elif in_form:
            client_id, secret = form.get("client_id", ""), form["client_secret"]
            method = "client_secret_post"
        else:
            return None
        if client_id != self.client_id or not hmac.compare_digest(
            secret.encode(), self.client_secret.encode()
        ):
            return None
        return method

    async def _token(self, request: web.Request) -> web.Response:
        self.calls["token"] += 1
        script = self.script
        if script.token_mode == "timeout":
            release = self._release
            assert release is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), timeout=HANG_LIMIT)
            return web.Response(status=504, text="held")
        if script.token_mode == "drop":
            transport = request.transport
            assert transport is not None
            transport.abort()
            return web.Response(status=500)
        if script.token_failure is not None:
            failure = script.token_failure
            return web.Response(
                status=failure.status, body=failure.body, content_type=failure.content_type
            )
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.last_token_form = form
        method = self._authenticate_client(request, form)
        self.last_token_auth = method
        required = script.client_auth or self.client_auth
        if method != required:
            return web.json_response(
                {"error": "invalid_client", "error_description": f"use {required}"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="token"'},
            )
        if form.get("grant_type") == "refresh_token":
            return self._refresh(form)
        if form.get("grant_type") != "authorization_code":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        grant = self._grants.pop(form.get("code", ""), None)  # single use
        if grant is None or grant.redirect_uri != form.get("redirect_uri"):
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = form.get("code_verifier", "")
        challenge = b64url(hashlib.sha256(verifier.encode()).digest())
        if grant.challenge_method != "S256" or grant.challenge != challenge:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "PKCE verification failed"},
                status=400,
            )
        now = int(time.time())
        access_token = secrets.token_urlsafe(24)
        if script.login_access_token is not None:
            access_token = self.login_access_jwt(script.login_access_token, now)
        self._access_tokens.add(access_token)
        id_token = self.id_token(self.claims_for(grant, now), now)
        self.issued += [access_token, id_token]
        doc = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": id_token,
        }
        if script.refresh_token:
            refresh_token = secrets.token_urlsafe(24)
            self._refresh_tokens[refresh_token] = replace(grant, nonce=None)
            self.issued.append(refresh_token)
            doc["refresh_token"] = refresh_token
        return web.json_response(_apply(doc, script.token_response, now))

    def _refresh(self, form: Mapping[str, str]) -> web.Response:
        """A refresh token grant: a new access token, a rotated refresh token and no ID token
        unless the script says otherwise. A refresh token not rotated stays valid."""
        self.refresh_forms.append(dict(form))
        script = self.script
        old = form.get("refresh_token", "")
        grant = self._refresh_tokens.get(old)
        if grant is None:
            return web.json_response({"error": "invalid_grant"}, status=400)
        now = int(time.time())
        access_token = secrets.token_urlsafe(24)
        self._access_tokens.add(access_token)
        new_refresh = secrets.token_urlsafe(24)
        self.issued += [access_token, new_refresh]
        doc: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": new_refresh,
        }
        if script.refresh_id_token:
            claims = _apply(self.claims_for(grant, now), script.refresh_claims, now)
            doc["id_token"] = self.id_token(claims, now)
            self.issued.append(doc["id_token"])
        doc = _apply(doc, script.refresh_response, now)
        if doc.get("refresh_token") == new_refresh:  # rotated: the old one is spent
            del self._refresh_tokens[old]
            self._refresh_tokens[new_refresh] = grant
        return web.json_response(doc)

    async def _userinfo(self, request: web.Request) -> web.Response:
        self.calls["userinfo"] += 1
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in self._access_tokens:
            return web.json_response({"error": "invalid_token"}, status=401)
        failure = self.script.userinfo_failure
        if failure is not None:
            return web.Response(
                status=failure.status, body=failure.body, content_type=failure.content_type
            )
        claims = {
            "sub": SUB,
            "preferred_username": "alice",
            "name": "Alice Adversary",
            "email": "alice@example.test",
            "email_verified": True,
            "groups": ["eng"],
        }
        return web.json_response(_apply(claims, self.script.userinfo, int(time.time())))

    async def _introspect(self, request: web.Request) -> web.Response:
        """RFC 7662: the scripted failure or hang, else the token's entry for an
        authenticated client (401 for anyone else, as the RFC requires)."""
        self.calls["introspect"] += 1
        script = self.script
        if script.introspection_hang:
            release = self._release
            assert release is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), timeout=HANG_LIMIT)
            return web.Response(status=504, text="held")
        if script.introspection_failure is not None:
            failure = script.introspection_failure
            return web.Response(
                status=failure.status, body=failure.body, content_type=failure.content_type
            )
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self._authenticate_client(request, form) != self.client_auth:
            return web.json_response({"error": "invalid_client"}, status=401)
        answer = self.introspection.get(form.get("token", ""), {"active": False})
        return web.json_response(answer)

    # ------------------------------------------------------------------ claims and groups

    def login_access_jwt(self, changes: Mapping[str, Value], now: int) -> str:
        """The login's access token as a JWT, Keycloak style: ``azp`` our client, ``aud``
        "account", with ``changes`` applied and the script's key and signature."""
        honest: dict[str, Any] = {
            "iss": self.published_issuer,
            "sub": SUB,
            "aud": "account",
            "azp": self.client_id,
            "typ": "Bearer",
            "iat": now,
            "exp": now + 300,
        }
        claims = _apply(honest, changes, now)
        key = self.script.login_access_key or self.signing_key
        alg = "ES256" if key.key_type == "EC" else "RS256"
        header: dict[str, Any] = {"typ": "JWT", "alg": alg}
        if key.kid is not None:
            header["kid"] = key.kid
        head, body = json.dumps(header).encode(), json.dumps(claims).encode()
        signing_input = f"{b64url(head)}.{b64url(body)}"
        model = jws.JWSRegistry.algorithms[alg]
        signature = bytearray(model.sign(signing_input.encode(), key))
        if self.script.login_access_signature == "corrupt":
            signature[len(signature) // 2] ^= 0x01
        return f"{signing_input}.{b64url(bytes(signature))}"

    async def _graph_member_of(self, request: web.Request) -> web.Response:
        """Microsoft Graph's ``/me/transitiveMemberOf``, paged by ``$skiptoken``, for a
        bearer access token this provider issued."""
        self.calls["graph"] += 1
        script = self.script
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in self._access_tokens:
            return web.json_response({"error": {"code": "InvalidAuthenticationToken"}}, status=401)
        if script.graph_status != 200:
            return web.json_response(
                {"error": {"code": "ServiceUnavailable"}}, status=script.graph_status
            )
        if script.graph_groups is None:
            return web.json_response({"error": {"code": "Request_ResourceNotFound"}}, status=404)
        start = int(request.query.get("$skiptoken", "0"))
        size = script.graph_page_size
        page = script.graph_groups[start : start + size]
        doc: dict[str, Any] = {
            "value": [{"@odata.type": "#microsoft.graph.group", "id": g} for g in page]
            # A directory role is a membership too, but not a group.
            + [{"@odata.type": "#microsoft.graph.directoryRole", "id": "role-global-admin"}],
        }
        if start + size < len(script.graph_groups):
            origin = script.graph_next_origin or f"{request.scheme}://{request.host}"
            doc["@odata.nextLink"] = (
                f"{origin}/v1.0/me/transitiveMemberOf?$select=id&$skiptoken={start + size}"
            )
        return web.json_response(doc)

    async def _claim_source(self, request: web.Request) -> web.Response:
        """A distributed-claims endpoint as named in a token's ``_claim_sources``: a gateway
        must never call it (it would grant "admins" if it did)."""
        self.calls["claim_source"] += 1
        return web.json_response({"groups": ["admins"]})
