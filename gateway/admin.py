"""The session admin API (``admin.listen``): list a user's sessions and revoke them.

A small aiohttp app of its own, served on a separate address so it never shares a port with
user traffic, and closed to anyone without ``admin.token`` (a bearer token, compared in
constant time). It shows what an operator needs to judge a session (an id hash, created, last
seen, client IP, user agent) and never a token, cookie or session id. Revoking deletes from
the shared store, so every gateway process refuses the session from its next request on.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Final

from aiohttp import web

from gateway.endpoints import Gateway, admin_id

__all__ = ["create_admin_app"]

_NO_STORE: Final = {"Cache-Control": "no-store"}
_ID_RE: Final = re.compile(r"[0-9a-f]{24}")
_FIELDS: Final = ("created", "last_seen", "client_ip", "user_agent")


def _user(request: web.Request) -> str:
    user = request.query.get("user", "")
    if not user or len(user) > 512:
        raise web.HTTPBadRequest(text='{"error": "give ?user=NAME"}',
                                 content_type="application/json", headers=_NO_STORE)
    return user


def create_admin_app(gateway: Callable[[], Gateway], token: str) -> web.Application:
    """The admin app; ``gateway`` returns the running Gateway (created by the main app)."""
    expected = token.encode()

    @web.middleware
    async def bearer(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
        sent = request.headers.get("Authorization", "")
        scheme, _, value = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
            return web.json_response(
                {"error": "unauthorized"}, status=401,
                headers={**_NO_STORE, "WWW-Authenticate": 'Bearer realm="oidc-gateway-admin"'})
        result = await handler(request)  # type: ignore[misc]
        assert isinstance(result, web.StreamResponse)  # noqa: S101 - handlers below
        return result

    async def list_sessions(request: web.Request) -> web.Response:
        user = _user(request)
        entries = await gateway().sessions_in(f"x:user:{user}")
        sessions = [{"id": admin_id(sid), **{k: meta.get(k) for k in _FIELDS}}
                    for sid, meta in entries.items()]
        sessions.sort(key=lambda s: str(s.get("created")))
        return web.json_response({"user": user, "sessions": sessions}, headers=_NO_STORE)

    async def revoke_user(request: web.Request) -> web.Response:
        gw = gateway()
        count = await gw.revoke(await gw.sessions_in(f"x:user:{_user(request)}"))
        return web.json_response({"revoked": count}, headers=_NO_STORE)

    async def revoke_one(request: web.Request) -> web.Response:
        id_hash = request.match_info["id"]
        if not _ID_RE.fullmatch(id_hash):
            return web.json_response({"error": "not found"}, status=404, headers=_NO_STORE)
        gw = gateway()
        entries = await gw.sessions_in(f"x:h:{id_hash}")
        if not entries:
            return web.json_response({"error": "not found"}, status=404, headers=_NO_STORE)
        return web.json_response({"revoked": await gw.revoke(entries)}, headers=_NO_STORE)

    app = web.Application(middlewares=[bearer], client_max_size=64 * 1024)
    app.router.add_get("/sessions", list_sessions)
    app.router.add_delete("/sessions", revoke_user)
    app.router.add_delete("/sessions/{id}", revoke_one)
    return app
