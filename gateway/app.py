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

import aiohttp
from aiohttp import web

from gateway.config import Config
from gateway.endpoints import Gateway
from gateway.errors import GatewayError
from gateway.idp import IdentityProvider
from gateway.observability import Metrics
from gateway.pages import Pages
from gateway.proxy import UpstreamProxy
from gateway.store import MemoryStore, RedisStore, SessionStore

log = logging.getLogger("gateway")

GATEWAY = web.AppKey("gateway", Gateway)


def make_store(config: Config) -> SessionStore:
    session = config.session
    if session.store == "memory":
        return MemoryStore()
    return RedisStore.from_url(
        session.redis_url,
        prefix=session.key_prefix,
        connect_timeout=session.redis_timeout,
        command_timeout=session.redis_timeout,
    )


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
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def server_options(config: Config) -> dict[str, object]:
    """Options for aiohttp's request handler (security notes 9, 10, 14)."""
    return {
        "auto_decompress": False,  # forward compressed bodies byte for byte
        "keepalive_timeout": config.server.keepalive_timeout,
        # Our own check answers 431 below this; aiohttp's own cap is only a backstop.
        "max_headers": 1000,
        "access_log": None,
    }


def run(config: Config) -> None:
    """Serve until SIGTERM/SIGINT, then drain for ``server.shutdown_timeout`` seconds."""
    host, port = config.server.listen_address
    log.info("listening", extra={"address": f"{host}:{port}", "routes": len(config.routes),
                                 "store": config.session.store})
    web.run_app(
        create_app(config),
        host=host,
        port=port,
        shutdown_timeout=config.server.shutdown_timeout,
        print=None,
        handle_signals=True,
        **server_options(config),  # type: ignore[arg-type]
    )


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
