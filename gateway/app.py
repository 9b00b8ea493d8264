"""Wiring: build the aiohttp application from a Config, and serve it.

Resources (HTTP client pools, the session store, the provider loader) are created and closed in
one ``cleanup_ctx``, so a test or a second app in the same process never shares them by
accident, and SIGTERM drains requests before the pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from gateway.config import Config
from gateway.endpoints import Gateway
from gateway.errors import GatewayError
from gateway.idp import IdentityProvider
from gateway.observability import Metrics
from gateway.pages import Pages
from gateway.proxy import UpstreamProxy
from gateway.store import SessionStore, store_from_config

log = logging.getLogger("gateway")

GATEWAY = web.AppKey("gateway", Gateway)


def make_store(config: Config) -> SessionStore:
    """Memory, or Redis: one server, a Sentinel-managed master or a Cluster (session.redis)."""
    return store_from_config(config.session)


def provider_client(config: Config) -> aiohttp.ClientSession:
    """The client for calls to the provider: its own small pool, no cookies, no env proxies."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.provider.timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        headers={"User-Agent": "oidc-gateway"},
    )


def create_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(client_max_size=1024**2)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = make_store(config)
        idp_http = provider_client(config)
        upstream_http = UpstreamProxy.new_client_session()
        idp = IdentityProvider(config.provider, idp_http, clock=clock)
        loader = asyncio.create_task(idp.run_loader(), name="provider-loader")
        app[GATEWAY] = Gateway(
            config,
            store=store,
            idp=idp,
            proxy=UpstreamProxy(upstream_http),
            pages=Pages(),
            metrics=Metrics(),
            clock=clock,
        )
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await store.close()
            await idp_http.close()
            await upstream_http.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].handle(request)

    app.cleanup_ctx.append(resources)
    # [\s\S] and not ".": a decoded path may hold "\n" (%0a), which "." would not match, and
    # aiohttp would then answer 404 itself, past the gateway's checks and its access log.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
    return app


# aiohttp's limit for the request line (method, target, version): a longer URL is a 400.
MAX_REQUEST_LINE: Final = 8190


def server_options(config: Config) -> dict[str, object]:
    """Options for aiohttp's request handler (security notes 9, 10, 14, 18).

    ``keepalive_timeout`` also bounds how long a client may take to send a request's headers:
    aiohttp closes a connection whose next request is not complete when it fires (slowloris).
    The header caps sit just above the gateway's own limits, so the parser only stops what
    the gateway's check (431) would refuse anyway; :class:`GatewayRequestHandler` answers those
    431 too. The per-field cap never equals the request-line cap, which tells the two apart.
    """
    server = config.server
    return {
        "auto_decompress": False,  # forward compressed bodies byte for byte
        "keepalive_timeout": server.keepalive_timeout,
        "max_headers": server.max_header_count + 1,
        "max_field_size": max(server.max_header_bytes, MAX_REQUEST_LINE + 1),
        "max_line_size": MAX_REQUEST_LINE,
        "access_log": None,
    }


_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 38\r\nRetry-After: 1\r\nCache-Control: no-store\r\n"
    b"Connection: close\r\n\r\nToo many connections; try again soon.\n"
)


class ConnectionGuard:
    """Counts open client connections against ``server.max_connections``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def admit(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


class GatewayRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with what the gateway needs on top:

    * a connection cap: beyond ``server.max_connections`` a new connection gets a plain 503
      and is closed at once, before any parsing (idle-connection floods, note 10);
    * 431 for headers the parser refuses as too many or too long (RFC 6585 5), like the
      gateway's own check, instead of aiohttp's 400;
    * protocol errors logged as one line naming the error type: aiohttp's message quotes the
      offending header line, which may be a cookie or a token (never logged).
    """

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit():
            log.warning("connection refused: server.max_connections reached",
                        extra={"limit": self._guard.limit})
            transport.write(_BUSY)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._counted = True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.release()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        too_long = isinstance(exc, LineTooLong) and exc.args[1:2] == (self.max_field_size,)
        too_many = isinstance(exc, HttpProcessingError) and "Too many headers" in exc.message
        if status == 400 and (too_long or too_many):
            status, message = 431, "Request header fields too large"
        return super().handle_error(request, status, exc, message)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            log.info("malformed request refused by the HTTP parser",
                     extra={"error": type(exc).__name__, "status": exc.code})
            return
        super().log_exception(*args, **kw)


class GatewaySite(web.BaseSite):
    """A TCP site serving with :class:`GatewayRequestHandler` (aiohttp's TCPSite hands every
    connection to a plain RequestHandler, with no connection cap)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        handler_options: dict[str, object],
        max_connections: int,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._handler_options = handler_options
        self.guard = ConnectionGuard(max_connections)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")

        def connection() -> GatewayRequestHandler:
            return GatewayRequestHandler(
                server, guard=self.guard, loop=loop, **self._handler_options)

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=True)


async def serve(config: Config, app: web.Application | None = None) -> None:
    """Serve ``app`` (default: ``create_app(config)``) on ``server.listen`` until cancelled or
    SIGTERM/SIGINT (:class:`aiohttp.web.GracefulExit`); then drain for ``shutdown_timeout``."""
    host, port = config.server.listen_address
    options = server_options(config)
    runner = web.AppRunner(
        app or create_app(config), handle_signals=True,
        shutdown_timeout=config.server.shutdown_timeout, **options,  # type: ignore[arg-type]
    )
    await runner.setup()
    try:
        site = GatewaySite(runner, host, port, handler_options=options,
                           max_connections=config.server.max_connections)
        await site.start()
        log.info("listening", extra={"address": f"{host}:{port}", "routes": len(config.routes),
                                     "store": config.session.store})
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, then drain for ``server.shutdown_timeout`` seconds.

    Like ``aiohttp.web.run_app`` (which cannot take a custom site): the serving task is
    cancelled first and its ``runner.cleanup()`` drains in-flight requests; only then are the
    tasks left over cancelled.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(serve(config))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        rest = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in rest:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def check_online(config: Config) -> list[str]:
    """What ``check --online`` reports: can we reach discovery, the JWKS and the store?"""
    problems: list[str] = []
    async with provider_client(config) as http:
        idp = IdentityProvider(config.provider, http)
        try:
            await idp.load()
        except GatewayError as exc:
            problems.append(f"provider: {exc.message}")
    store = make_store(config)
    try:
        await store.ping()
    except GatewayError as exc:
        problems.append(f"session.store: {exc.message}")
    finally:
        await store.close()
    return problems
