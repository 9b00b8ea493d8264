"""``oidc-gateway demo``: see the gateway work in one command, nothing to set up.

Starts three servers in one process, on 127.0.0.1 only: the demo OpenID provider
(:mod:`gateway.demo_provider`, with two users whose passwords are printed), an echo app that
shows as a page the identity headers it received, and the real gateway in front of it with
memory sessions (no Redis) and three routes: one for every signed-in user, one for the
``admins`` group only and a public one. SIGINT (Ctrl-C) or SIGTERM stops all three, gateway
first, and the command exits 0.

Everything secret (session key, client secret, passwords) is made fresh at each start and
lives only in this process.
"""

from __future__ import annotations

import asyncio
import html
import logging
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TextIO

from aiohttp import web

from gateway.app import GATEWAY, create_app, server_options
from gateway.config import Config
from gateway.demo_provider import (
    NOT_FOR_PRODUCTION,
    DemoClient,
    DemoProvider,
    DemoUser,
    demo_users,
    render_page,
    serve_on_loopback,
)
from gateway.errors import GatewayError
from gateway.headers import IDENTITY_HEADERS
from gateway.observability import configure_logging

__all__ = ["DemoPorts", "demo_config", "make_echo_app", "run_demo", "serve_demo"]

HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 4180
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
CLIENT_ID: Final = "oidc-gateway-demo"
ADMIN_GROUP: Final = "admins"
READY_DEADLINE: Final = 10.0  # seconds for the gateway to load the provider's metadata
SHUTDOWN_GRACE: Final = 2.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPorts:
    gateway: int
    provider: int
    app: int

    @classmethod
    def choose(
        cls, port: int = DEFAULT_PORT, provider_port: int | None = None,
        app_port: int | None = None,
    ) -> DemoPorts:
        """The gateway's port, and by default the two after it for the provider and the app."""
        ports = cls(
            port,
            port + 1 if provider_port is None else provider_port,
            port + 2 if app_port is None else app_port,
        )
        for what, value in (("gateway", ports.gateway), ("provider", ports.provider),
                            ("app", ports.app)):
            if not 1 <= value <= 65535:
                raise GatewayError(
                    f"The {what} port would be {value}, not a port from 1 to 65535; choose "
                    "ports with --port, --provider-port and --app-port.",
                    reason="bad_port",
                )
        if len({ports.gateway, ports.provider, ports.app}) != 3:
            raise GatewayError(
                f"The gateway, provider and app need three different ports, got {ports.gateway}, "
                f"{ports.provider} and {ports.app}.",
                reason="bad_port",
            )
        return ports

    def url(self, port: int) -> str:
        return f"http://{HOST}:{port}"


def gateway_origins(ports: DemoPorts) -> tuple[str, ...]:
    """Where a browser may reach the gateway: 127.0.0.1 and localhost both work."""
    return (f"http://{HOST}:{ports.gateway}", f"http://localhost:{ports.gateway}")


def demo_config(ports: DemoPorts, *, client_secret: str, session_key: str) -> Config:
    """The gateway's config: memory sessions, plain-http cookies, the three demo routes.

    No ``public_url``: the gateway builds its callback URL from the Host the browser used, and
    the provider has both loopback spellings registered.
    """
    app = ports.url(ports.app)
    return Config.model_validate({
        "version": 1,
        "server": {"listen": f"{HOST}:{ports.gateway}", "shutdown_timeout": SHUTDOWN_GRACE},
        "provider": {
            "issuer": ports.url(ports.provider),
            "client_id": CLIENT_ID,
            "client_secret": client_secret,
            "scopes": ["openid", "email", "profile", "groups"],
            "timeout": 5,
        },
        "session": {
            "store": "memory",
            "cookie": {"secure": False},  # plain http on loopback
            "keys": [session_key],
        },
        "routes": [
            {"name": "public", "match": {"path": "/public"}, "upstream": app, "auth": "public"},
            {"name": "admin", "match": {"path": "/admin"}, "upstream": app,
             "allow": {"groups": [ADMIN_GROUP]}},
            {"name": "everyone", "match": {"path": "/"}, "upstream": app},
        ],
        # Warnings and errors only: the banner on stdout is what a newcomer should read.
        "logging": {"level": "warning", "format": "text"},
    })


# ---------------------------------------------------------------------------------------------
# The echo app
# ---------------------------------------------------------------------------------------------

_SHOWN_IDENTITY = tuple(h for h in IDENTITY_HEADERS if h != "X-Forwarded-Access-Token")
_SHOWN_OTHER = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-Id",
                "Host")


def _rows(request: web.Request, names: Sequence[str]) -> str:
    rows = []
    for name in names:
        value = request.headers.get(name)
        cell = ('<td class="empty">(not sent)</td>' if value is None
                else f"<td>{html.escape(value)}</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{cell}</tr>")
    return "\n".join(rows)


async def _echo(request: web.Request) -> web.Response:
    """Show what the gateway forwarded; the app itself trusts these headers blindly."""
    user = request.headers.get("X-Forwarded-User")
    if user:
        lead = (f"<p>The gateway says you are <b>{html.escape(user)}</b>. This app has no login "
                "of its own: it trusts the headers below, which only the gateway can set.</p>")
    else:
        lead = ("<p>No identity headers: this request came through the gateway's public route "
                "(or straight to the app, around the gateway).</p>")
    extra_note = ""
    if "X-Forwarded-Access-Token" in request.headers:
        extra_note = '<p class="note">An access token was forwarded too (not shown).</p>'
    body = f"""{lead}
<p>{html.escape(request.method)} <code>{html.escape(request.path_qs)}</code></p>
<h2>Identity headers</h2>
<table>
{_rows(request, _SHOWN_IDENTITY)}
</table>
{extra_note}
<h2>Other headers from the gateway</h2>
<table>
{_rows(request, _SHOWN_OTHER)}
</table>
<h2>Try</h2>
<ul>
<li><a href="/">/</a>: every signed-in user</li>
<li><a href="/admin">/admin</a>: the {ADMIN_GROUP} group only</li>
<li><a href="/public">/public</a>: no sign-in, no identity headers</li>
<li><a href="/oauth2/sign_out">/oauth2/sign_out</a>: sign out, then sign in as someone
else</li>
</ul>"""
    return render_page(200, "Echo app: what the gateway forwarded", body)


def make_echo_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


# ---------------------------------------------------------------------------------------------
# Running the three servers
# ---------------------------------------------------------------------------------------------


def banner(ports: DemoPorts, users: Sequence[DemoUser]) -> str:
    """What the demo prints once everything answers: where to go and who may see what."""
    gw = ports.url(ports.gateway)
    admins = [u.username for u in users if ADMIN_GROUP in u.groups]
    others = [u.username for u in users if ADMIN_GROUP not in u.groups]
    lines = [
        "oidc-gateway demo: a gateway, a demo OpenID provider and an echo app on this machine.",
        NOT_FOR_PRODUCTION,
        "",
        f"Open {gw}/",
        "",
        "Sign in as (passwords are new at every start):",
        *(f"  {u.username:<6} password: {u.password}  groups: {', '.join(u.groups)}"
          for u in users),
        "",
        "Routes:",
        f"  {gw + '/':<32} every signed-in user ({', '.join(u.username for u in users)})",
        f"  {gw + '/admin':<32} group {ADMIN_GROUP} only ({', '.join(admins)}; "
        f"{', '.join(others)}: 403 Forbidden)",
        f"  {gw + '/public':<32} public: no sign-in, no identity headers",
        f"  {gw + '/oauth2/sign_out':<32} sign out",
        "",
        f"Demo provider: {ports.url(ports.provider)}   "
        f"Echo app (behind the gateway): {ports.url(ports.app)}",
        "Ctrl-C stops all three.",
    ]
    return "\n".join(lines)


async def _wait_gateway_ready(app: web.Application) -> bool:
    """Until the gateway has loaded the provider's metadata (bounded); False if it did not."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if app[GATEWAY].idp.ready:
            return True
        await asyncio.sleep(0.02)
    return False


async def serve_demo(ports: DemoPorts, *, out: TextIO, stop: asyncio.Event) -> None:
    """Run the provider, the echo app and the gateway until ``stop`` is set; then stop them.

    Raises GatewayError when a port is taken (nothing is left running then).
    """
    users = demo_users()
    client_secret = secrets.token_urlsafe(32)
    session_key = secrets.token_urlsafe(32)  # base64url of 32 random bytes
    origins = gateway_origins(ports)
    provider = DemoProvider(
        issuer=ports.url(ports.provider),
        client=DemoClient(
            client_id=CLIENT_ID,
            client_secret=client_secret,
            redirect_uris=tuple(f"{o}/oauth2/callback" for o in origins),
            post_logout_redirect_uris=tuple(f"{o}/" for o in origins),
        ),
        users=users,
    )
    config = demo_config(ports, client_secret=client_secret, session_key=session_key)
    configure_logging(config.logging.level, config.logging.format)
    # authlib logs issued tokens at debug level: never let them through.
    logging.getLogger("authlib").setLevel(logging.WARNING)
    gateway_app = create_app(config)

    runners: list[web.AppRunner] = []
    try:
        # The provider first, so the gateway finds it at its first try; the gateway last, so
        # it is the first to stop.
        runners.append(await serve_on_loopback(
            provider.make_app(), HOST, ports.provider, what="demo provider", access_log=None))
        runners.append(await serve_on_loopback(
            make_echo_app(), HOST, ports.app, what="echo app", access_log=None))
        runners.append(await serve_on_loopback(
            gateway_app, HOST, ports.gateway, what="gateway",
            shutdown_timeout=config.server.shutdown_timeout,
            **server_options(config),
        ))
        if not await _wait_gateway_ready(gateway_app):
            log.warning("the gateway has not loaded the demo provider yet; it keeps trying")
        print(banner(ports, users), file=out, flush=True)
        await stop.wait()
        print("Stopping the demo...", file=out, flush=True)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _main(ports: DemoPorts, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve_demo(ports, out=out, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_demo(
    port: int = DEFAULT_PORT, *, provider_port: int | None = None, app_port: int | None = None,
    out: TextIO = sys.stdout, err: TextIO = sys.stderr,
) -> int:
    """The ``demo`` command: 0 after a clean stop, 1 (with the reason on ``err``) otherwise."""
    try:
        ports = DemoPorts.choose(port, provider_port, app_port)
        asyncio.run(_main(ports, out))
    except GatewayError as exc:
        print(f"oidc-gateway demo: {exc.message}", file=err)
        return EXIT_FAILED
    return EXIT_OK
