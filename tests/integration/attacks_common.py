"""Shared tools of the attack tests (``test_attacks_*.py``): raw HTTP, a scriptable provider.

* :func:`raw_exchange` sends bytes exactly as written over a plain socket and reads the answer:
  aiohttp's client refuses to send most of what these tests need (``Content-Length`` with
  ``Transfer-Encoding``, two ``Host`` headers, absolute-form targets, control bytes).
* :class:`MiniProvider` is a small, honest OpenID provider on loopback whose next signed-in
  identity a test chooses (the real test OP has two fixed users): for claims that must never
  become injected headers, nonce replay, and watching the PKCE verifier. It checks what a real
  provider checks (client secret, single-use code, redirect URI, PKCE S256), so a login that
  fails through it fails because of the gateway, not because of a sloppy test double.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import aiohttp
from aiohttp import web
from joserfc import jws
from joserfc.jwk import RSAKey

from tests.support.gateway_proc import GatewayProcess, free_port, gateway_config, start_gateway
from tests.support.upstream import Upstream, running_upstream

HTML_ACCEPT = "text/html,application/xhtml+xml,*/*;q=0.8"
CLIENT_ID = "attack-gateway"
CLIENT_SECRET = "attack-secret-0123456789abcdef"  # a loopback test fixture


# ---------------------------------------------------------------------------------------------
# Raw HTTP
# ---------------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """The first HTTP response read off a socket (``status`` None: nothing came back)."""

    status: int | None
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    closed: bool  # the server closed the connection (False: still open when we stopped)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def responses(self) -> int:
        """How many status lines came back (pipelining, smuggling)."""
        return self.raw.count(b"HTTP/1.1 ") + self.raw.count(b"HTTP/1.0 ")


def request_bytes(
    method: str, target: str | bytes, headers: Iterable[str | bytes], body: bytes = b""
) -> bytes:
    """``METHOD target HTTP/1.1`` + the header lines exactly as given + the body."""
    line = target if isinstance(target, bytes) else target.encode("latin-1")
    out = method.encode() + b" " + line + b" HTTP/1.1\r\n"
    for h in headers:
        out += (h if isinstance(h, bytes) else h.encode("utf-8")) + b"\r\n"
    return out + b"\r\n" + body


def _parse(raw: bytes, closed: bool) -> RawResponse:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return RawResponse(None, [], b"", raw, closed)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return RawResponse(status, headers, body, raw, closed)


async def raw_exchange(
    port: int, data: bytes, *, deadline: float = 5.0, until_close: bool = True
) -> RawResponse:
    """Send ``data`` to 127.0.0.1:``port`` and read until the server closes the connection
    (or ``deadline`` seconds); with ``until_close=False``, stop at the first full header block."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = b""
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(deadline):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                raw += chunk
                if not until_close and b"\r\n\r\n" in raw:
                    break
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    finally:
        writer.close()
        with suppress(ConnectionResetError, BrokenPipeError):
            await writer.wait_closed()
    return _parse(raw, closed)


# ---------------------------------------------------------------------------------------------
# A provider whose next identity the test chooses
# ---------------------------------------------------------------------------------------------


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass
class _Grant:
    claims: dict[str, Any]
    nonce: str
    challenge: str
    redirect_uri: str


@dataclass
class MiniProvider:
    """Discovery, JWKS, authorize (signs "the user" in at once) and token, on loopback.

    ``claims`` are the next ID token's identity claims (besides iss, aud, iat, exp, nonce);
    ``next_id_token``, when set, is returned instead of a fresh token once (replay tests).
    Everything the gateway sent is kept: ``authorize_requests`` (query dicts),
    ``token_requests`` (form dicts), ``issued`` (ID tokens).
    """

    claims: dict[str, Any] = field(default_factory=lambda: {"sub": "mini-alice",
                                                            "preferred_username": "mini-alice"})
    next_id_token: str | None = None
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    issuer: str = ""
    _codes: dict[str, _Grant] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _key: RSAKey | None = None

    async def start(self) -> None:
        self._key = RSAKey.generate_key(
            2048, parameters={"kid": "mini-1", "alg": "RS256", "use": "sig"}, private=True)
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.issuer = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        assert self._key is not None
        return web.json_response({"keys": [self._key.as_dict(private=False)]})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.authorize_requests.append(q)
        if (q.get("client_id") != CLIENT_ID or q.get("response_type") != "code"
                or q.get("code_challenge_method") != "S256" or not q.get("code_challenge")):
            return web.Response(status=400, text="bad authorization request")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Grant(dict(self.claims), q.get("nonce", ""), q["code_challenge"],
                                   q.get("redirect_uri", ""))
        back = urlencode({"code": code, "state": q.get("state", ""), "iss": self.issuer})
        raise web.HTTPFound(f"{q.get('redirect_uri', '')}?{back}")

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: v[0] for k, v in parse_qs((await request.read()).decode()).items()}
        self.token_requests.append(form)
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {basic}":
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = self._codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
        if (grant is None or form.get("redirect_uri") != grant.redirect_uri
                or challenge != grant.challenge):
            return web.json_response({"error": "invalid_grant"}, status=400)
        token = self.next_id_token or self.id_token(grant.claims, grant.nonce)
        self.next_id_token = None
        self.issued.append(token)
        return web.json_response({"access_token": secrets.token_urlsafe(24),
                                  "token_type": "Bearer", "expires_in": 3600,
                                  "id_token": token})

    def id_token(self, claims: dict[str, Any], nonce: str) -> str:
        """An RS256 ID token for ``claims``; JSON with ASCII escapes, so even a lone surrogate
        (``"\\ud800"``) travels as the provider wrote it."""
        assert self._key is not None
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 600,
                   "nonce": nonce, **claims}
        return jws.serialize_compact(
            {"alg": "RS256", "kid": "mini-1", "typ": "JWT"},
            json.dumps(payload).encode("ascii"), self._key)


# ---------------------------------------------------------------------------------------------
# A gateway in front of the echo upstream
# ---------------------------------------------------------------------------------------------


def default_routes(upstream: str) -> list[dict[str, Any]]:
    """/public/ (public), /admin (group admins), / (any signed-in user)."""
    return [
        {"name": "public", "match": {"path": "/public/"}, "upstream": upstream, "auth": "public"},
        {"name": "admin", "match": {"path": "/admin"}, "upstream": upstream,
         "allow": {"groups": ["admins"]}},
        {"name": "app", "match": {"path": "/"}, "upstream": upstream},
    ]


@dataclass
class World:
    """A gateway process, the echo upstream behind it, and what the upstream received."""

    gw: GatewayProcess
    upstream: Upstream

    @property
    def url(self) -> str:
        return self.gw.url

    @property
    def port(self) -> int:
        return self.gw.port

    def mark(self) -> int:
        return len(self.upstream.seen.requests)

    def seen_since(self, mark: int) -> list[dict[str, Any]]:
        return self.upstream.seen.requests[mark:]


@asynccontextmanager
async def gateway_world(
    directory: Path,
    *,
    issuer: str,
    client: Callable[[int], tuple[str, str]],
    routes: Callable[[str], list[dict[str, Any]]] = default_routes,
    server: dict[str, Any] | None = None,
    session: dict[str, Any] | None = None,
    provider: dict[str, Any] | None = None,
    store: str = "memory",
    redis_url: str | None = None,
    key_prefix: str = "oidcgw:",
    session_key: str | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[World]:
    """Start the echo upstream and a gateway (plain http on 127.0.0.1) in front of it.

    ``client(port)`` registers (or names) the gateway's client once its port is known."""
    async with running_upstream() as upstream:
        port = free_port()
        client_id, secret = client(port)
        config = gateway_config(
            port=port, issuer=issuer, client_id=client_id, client_secret=secret,
            upstream=upstream.url, routes=routes(upstream.url), store=store,
            redis_url=redis_url, key_prefix=key_prefix, session_key=session_key,
            session_extra=session, provider_extra=provider,
        )
        config["server"].update(server or {})
        gw = await start_gateway(config, directory=directory, wait_ready=wait_ready)
        try:
            yield World(gw, upstream)
        finally:
            gw.stop()


def register_at(provider: Any) -> Callable[[int], tuple[str, str]]:
    """A ``client`` for :func:`gateway_world`: registers at the real test OP."""

    def register(port: int) -> tuple[str, str]:
        origin = f"http://127.0.0.1:{port}"
        return provider.register_client(  # type: ignore[no-any-return]
            [f"{origin}/oauth2/callback"], post_logout_redirect_uris=[f"{origin}/"])

    return register


def new_browser(*secure_origins: str) -> aiohttp.ClientSession:
    """A browser-like client: keeps cookies for 127.0.0.1, and sends Secure cookies to the
    given plain-http origins as a browser does for https ones."""
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=list(secure_origins))
    return aiohttp.ClientSession(cookie_jar=jar)


def cookie_value(browser: aiohttp.ClientSession, name: str) -> str | None:
    for cookie in browser.cookie_jar:
        if cookie.key == name:
            return cookie.value
    return None


def echoed_headers(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The (name, value) header pairs an echo-upstream request record holds."""
    return [(str(k), str(v)) for k, v in record["headers"]]


def canonical_names(record: dict[str, Any]) -> list[str]:
    """Header names as WSGI/PHP read them: lower case, ``_`` as ``-``."""
    return [k.lower().replace("_", "-") for k, _ in echoed_headers(record)]
