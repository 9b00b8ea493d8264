"""Wiring: build the aiohttp application from a Config, serve it, reload it, stop it.

Resources (HTTP client pools, the session store, the provider loader) are created and closed in
one ``cleanup_ctx``, so a test or a second app in the same process never shares them by
accident, and SIGTERM drains requests before the pools close.

Lifecycle, as an operator sees it:

* SIGTERM (or SIGINT): ``/ready`` answers 503 at once; after ``server.shutdown_delay`` the
  listener closes; requests in flight get ``server.shutdown_timeout``; exit 0 (:func:`serve`).
* SIGHUP, or the config file changing: the new config is validated and swapped in whole
  (:class:`Live`); an invalid one changes nothing and is logged. Sessions survive: the store
  is kept unless its own settings changed, and requests in flight finish on the config they
  started with.
* ``server.workers: N``: a supervisor and N worker processes on one port (:func:`supervise`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeGuard

import aiohttp
import httptools
from aiohttp import web
from aiohttp.helpers import (
    must_be_empty_body,
    rfc822_formatted_time,
    should_remove_content_length,
)
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter, _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD
from prometheus_client import multiprocess

from gateway.admin import create_admin_app
from gateway.assertion_keys import AssertionKeys, key_settings
from gateway.config import Config, parse_listen
from gateway.endpoints import Gateway, RequestHead, WholeAnswer
from gateway.errors import ConfigError, GatewayError
from gateway.idp import IdentityProvider
from gateway.observability import (
    METRICS_CONTENT_TYPE,
    HeldLines,
    LineStreamHandler,
    MeteredStore,
    Metrics,
    configure_logging,
)
from gateway.pages import Pages
from gateway.proxy import UpstreamProxy
from gateway.session_cache import InvalidatingStore, with_cache
from gateway.store import SessionStore, store_from_config
from gateway.upstream_client import UpstreamClient

log = logging.getLogger("gateway")

# Closes one resource of a previous config (after a reload).
Closer = Callable[[], Awaitable[None]]

GATEWAY = web.AppKey("gateway", Gateway)


def make_store(config: Config) -> SessionStore:
    """Memory, or Redis: one server, a Sentinel-managed master or a Cluster (session.redis)."""
    return store_from_config(config.session)


# The cyclic garbage collector's thresholds while serving (CPython's default: 700, 10, 10).
# Every request in flight holds a few dozen containers (frames, futures, dicts) that are young
# when a collection starts, so under load the default ran a collection every few dozen
# requests and a full one every few thousand, over every object of the process: 4-6 % of a
# signed-in GET's CPU at 50 connections per process (issue 7, side by side; nothing at 25).
# Nearly everything a request makes is freed by reference counting; the few cycles wait
# longer, and a retired config's objects are collected at once (Live._retire).
GC_THRESHOLDS: Final = (10_000, 10, 10)

# Idle provider connections are dropped before Node's default 5 s keep-alive (oidc-provider and
# many IdPs behind Node) ends them from the other side: reusing one the server is closing at
# that moment would fail a token request, which cannot be retried.
_PROVIDER_KEEPALIVE: Final = 4.0


def provider_client(config: Config) -> UpstreamClient:
    """The client for calls to the provider: its own small keep-alive pool, no cookies, no env
    proxies. The lean client and not aiohttp's: a login makes two or three calls in a row, and
    aiohttp's per-request machinery cost about 0.5 ms of each at idle (issue 7)."""
    return UpstreamClient(connect_timeout=config.provider.timeout, max_idle_per_origin=8,
                          keepalive_timeout=_PROVIDER_KEEPALIVE)


class ConfigSource(Protocol):
    """Where a reload reads the config from (``cli.py``: the file given with ``-c``, so that
    the CLI stays the only place that reads files and the environment)."""

    @property
    def name(self) -> str:
        """What to call it in log lines (the file's path)."""
        ...

    def load(self) -> Config:
        """Read and validate the config now; raise ConfigError (every problem) or OSError."""
        ...

    def fingerprint(self) -> Hashable:
        """A value that changes whenever the file does, the swap of a symlink (a Kubernetes
        ConfigMap update) included; raise OSError while it cannot be read."""
        ...


# Session settings the store is not built from: a change to them keeps the store (and with
# it every session). Any other change to session.* builds a new store.
_NOT_STORE_SETTINGS: Final = frozenset({"cookie", "lifetime", "idle_timeout", "login_timeout",
                                        "keys"})
# What a reload cannot change in a running process: the listening sockets and the options
# each connection was set up with. The log says so when one of them changes.
_RESTART_SETTINGS: Final = ("listen", "metrics_listen", "workers", "max_connections",
                            "keepalive_timeout", "max_header_count", "max_header_bytes",
                            "shutdown_timeout")


def _store_settings(config: Config) -> dict[str, Any]:
    return config.session.model_dump(exclude=set(_NOT_STORE_SETTINGS))


@dataclass(eq=False)
class Parts:
    """The resources a :class:`Gateway` uses: kept across a reload when the config they were
    built from did not change, so sessions (the store), the provider's keys and pooled
    connections survive it."""

    store: SessionStore
    store_settings: dict[str, Any]
    idp: IdentityProvider
    idp_http: UpstreamClient
    loader: asyncio.Task[None]
    proxy: UpstreamProxy
    upstream_http: aiohttp.ClientSession
    # The identity assertion's keys (None: no route signs one); its Redis pool is its own.
    assertion_keys: AssertionKeys | None = None

    @classmethod
    def open(cls, config: Config, metrics: Metrics, clock: Callable[[], float]) -> Parts:
        assertion_keys = AssertionKeys.open(config, clock=clock)  # first: may raise
        upstream_http = UpstreamProxy.new_client_session()
        store, settings = cls._store(config, metrics)
        idp, idp_http, loader = cls._provider(config, clock)
        return cls(store, settings, idp, idp_http, loader, UpstreamProxy(upstream_http),
                   upstream_http, assertion_keys)

    @staticmethod
    def _store(config: Config, metrics: Metrics) -> tuple[SessionStore, dict[str, Any]]:
        raw = make_store(config)
        store = with_cache(MeteredStore(raw, metrics), raw, config.session, metrics)
        return store, _store_settings(config)

    @staticmethod
    def _provider(
        config: Config, clock: Callable[[], float]
    ) -> tuple[IdentityProvider, UpstreamClient, asyncio.Task[None]]:
        http = provider_client(config)
        idp = IdentityProvider(config.provider, http, clock=clock)
        loader = asyncio.create_task(idp.run_loader(), name="provider-loader")
        return idp, http, loader

    @staticmethod
    async def close_store(store: SessionStore) -> None:
        await store.close()

    @staticmethod
    async def close_provider(http: UpstreamClient, loader: asyncio.Task[None]) -> None:
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
        http.close()

    async def close(self) -> None:
        await self.close_provider(self.idp_http, self.loader)
        await self.close_store(self.store)
        await self.upstream_http.close()
        if self.assertion_keys is not None:
            await self.assertion_keys.close()


def build_gateway(
    config: Config, parts: Parts, pages: Pages, metrics: Metrics, clock: Callable[[], float]
) -> Gateway:
    """The one place a Gateway is assembled, at start-up and at every reload: anything built
    from the config belongs here so that a reload rebuilds it too."""
    return Gateway(
        config,
        store=parts.store,
        idp=parts.idp,
        proxy=parts.proxy,
        pages=pages,
        metrics=metrics,
        clock=clock,
        assertion_keys=parts.assertion_keys,
        session_cache=parts.store.cache if isinstance(parts.store, InvalidatingStore) else None,
    )


@dataclass(eq=False)
class Generation:
    """One Gateway and the requests it is answering; a reload starts a new generation and the
    old one is retired once its requests are done."""

    gateway: Gateway
    in_flight: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class Live:
    """The Gateway answering new requests, and how it is replaced.

    Every request is handed to ``current.gateway`` as it arrives, so a reload is one reference
    swap: requests already running finish on the Gateway (and store, provider client) they
    started on, new ones use the new config. Resources the new config no longer uses are
    closed only when the old generation's requests are done (bounded wait).
    """

    def __init__(
        self, config: Config, parts: Parts, metrics: Metrics, clock: Callable[[], float], *,
        pages: Pages, log_pid: bool = False,
    ) -> None:
        self.config = config
        self.parts = parts
        self.metrics = metrics
        self.clock = clock
        self.log_pid = log_pid
        self.current = Generation(build_gateway(config, parts, pages, metrics, clock))
        self.hup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], list[Closer]] = {}
        self._draining = False

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        generation = self.current
        generation.in_flight += 1
        self.metrics.answering += 1
        try:
            return await generation.gateway.handle(request)
        finally:
            generation.in_flight -= 1
            self.metrics.answering -= 1
            if generation.retired and not generation.in_flight:
                generation.idle.set()

    def request_arrived(self) -> int | None:
        """Bytes of a request with a cookie arrived: the session cache's early ping
        (SessionCache.ping_early), whose mark the request's handler reads off its protocol."""
        cache = self.current.gateway.session_cache
        return cache.ping_early() if cache is not None else None

    def answer_at_once(self, head: RequestHead) -> WholeAnswer | None:
        """The current Gateway's answer to ``head`` when it needs no I/O (nothing awaits it,
        so no generation bookkeeping either)."""
        return self.current.gateway.answer_at_once(head)

    def begin_drain(self) -> None:
        """SIGTERM: /ready answers 503 from now on, and no reload starts any more."""
        self._draining = True
        self.current.gateway.draining = True
        self.metrics.draining.set(1)

    @property
    def in_flight(self) -> int:
        return self.current.in_flight

    async def keep_gauges(self) -> None:
        """Keep ``oidc_gateway_provider_ready`` and the request metrics current without a
        scrape: with several workers a scrape reaches one of them, and the others' values
        must not be a stale 0 (their request counts are at most a second late:
        :meth:`Metrics.observe_request`)."""
        while True:
            ready, loader = self.parts.idp.ready, self.parts.loader
            self.metrics.provider_ready.set(1 if ready else 0)
            self.metrics.flush()
            if ready or loader.done():
                await asyncio.sleep(1.0)
            else:  # set it the moment the provider has loaded
                await asyncio.wait({loader}, timeout=1.0)

    async def keep_store_checked(self) -> None:
        """``Gateway.keep_store_checked`` of the current Gateway, every tenth of a second."""
        while True:
            await asyncio.sleep(0.1)
            try:
                await self.current.gateway.keep_store_checked()
            except Exception:  # a bug; sign-ins then ask the store themselves, as before
                log.exception("the store check for sign-ins failed")
                await asyncio.sleep(10)  # one line per bug, not ten a second

    # ------------------------------------------------------------------ reload

    async def watch(self, source: ConfigSource) -> None:
        """Reload on SIGHUP (``hup``) and when ``source``'s fingerprint changes; polled every
        ``server.watch_interval`` (no inotify: a ConfigMap update replaces a symlink two
        directories up, which a poll of the resolved path sees and a watch may miss)."""
        last = await self._fingerprint(source)
        while not self._draining:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hup.wait(), self.config.server.watch_interval)
            if self._draining:
                return
            if self.hup.is_set():
                self.hup.clear()
                last = await self._fingerprint(source) or last
                await self._reload_logged(source, "SIGHUP")
                continue
            if not self.config.server.watch_config:
                continue
            now = await self._fingerprint(source)
            # None: gone for a moment (a symlink being swapped); keep the last one seen.
            if now is not None and now != last:
                last = now
                await self._reload_logged(source, "file changed")

    async def _reload_logged(self, source: ConfigSource, trigger: str) -> None:
        """A reload that cannot end the watch: whatever goes wrong is logged, and the next
        change is watched for as before."""
        try:
            await self.reload(source, trigger=trigger)
        except Exception:
            self.metrics.config_reloads.labels("failed").inc()
            self.metrics.config_reload_ok.set(0)
            log.exception("config reload failed: still serving the previous config",
                          extra={"config": source.name, "trigger": trigger})

    @staticmethod
    async def _fingerprint(source: ConfigSource) -> Hashable | None:
        try:
            return await asyncio.to_thread(source.fingerprint)
        except OSError:
            return None

    async def reload(self, source: ConfigSource, *, trigger: str) -> bool:
        """Load, validate and swap in the config from ``source``. An invalid config (or one
        whose store cannot even be built) changes nothing: the old one keeps serving and every
        problem is logged. True when the config now served is the one in ``source``."""
        async with self._lock:
            if self._draining:
                return False
            try:
                config = await asyncio.to_thread(source.load)
            except ConfigError as exc:
                return self._failed(source, trigger, [str(p) for p in exc.problems])
            except OSError as exc:
                return self._failed(source, trigger, [f"cannot read the file: {exc.strerror}"])
            except UnicodeDecodeError:
                return self._failed(source, trigger, ["the file is not UTF-8 text"])
            if config == self.config:
                log.info("config reload: no change", extra={"config": source.name,
                                                            "trigger": trigger})
                self.metrics.config_reload_ok.set(1)
                return True
            try:
                await self._swap(config)
            except (GatewayError, ValueError) as exc:
                text = exc.message if isinstance(exc, GatewayError) else str(exc)
                return self._failed(source, trigger, [text])
            self.metrics.config_reloads.labels("ok").inc()
            self.metrics.config_reload_ok.set(1)
            self.metrics.config_loaded_at.set(time.time())
            log.info("config reloaded", extra={"config": source.name, "trigger": trigger,
                                               "routes": len(config.routes)})
            return True

    def _failed(self, source: ConfigSource, trigger: str, problems: list[str]) -> bool:
        self.metrics.config_reloads.labels("failed").inc()
        self.metrics.config_reload_ok.set(0)
        log.error(
            "config reload failed: still serving the previous config",
            extra={"config": source.name, "trigger": trigger, "problems": problems},
        )
        return False

    async def _swap(self, config: Config) -> None:
        old_config, old = self.config, self.parts
        restart = [f"server.{key}" for key in _RESTART_SETTINGS
                   if getattr(config.server, key) != getattr(old_config.server, key)]
        if restart:
            log.warning("config reload: these settings take effect at the next restart",
                        extra={"settings": restart})
        closers: list[Closer] = []  # what the old config used and this one does not
        built: list[Closer] = []  # what this reload made: closed again if it fails
        try:
            # First, as it may refuse the config (assertion.key_file): nothing else built yet.
            assertion_keys = old.assertion_keys
            if key_settings(config) != key_settings(old_config):
                assertion_keys = AssertionKeys.open(config, clock=self.clock)
                if assertion_keys is not None:
                    built.append(assertion_keys.close)
                if old.assertion_keys is not None:
                    closers.append(old.assertion_keys.close)
            store, settings = old.store, old.store_settings
            if _store_settings(config) != old.store_settings:
                if config.session.store == "memory" and old_config.session.store == "memory":
                    # A new memory store would forget every session.
                    log.warning("config reload: session.memory_max_sessions takes effect at "
                                "the next restart (a new memory store would end every session)")
                else:
                    store, settings = Parts._store(config, self.metrics)
                    built.append(functools.partial(Parts.close_store, store))
                    closers.append(functools.partial(Parts.close_store, old.store))
                    if old_config.session.store == "memory":
                        log.warning("config reload: sessions of the memory store are not "
                                    "carried to the new store; their users sign in again")
            idp, idp_http, loader = old.idp, old.idp_http, old.loader
            if config.provider != old_config.provider:
                idp, idp_http, loader = Parts._provider(config, self.clock)
                built.append(functools.partial(Parts.close_provider, idp_http, loader))
                # Let the new provider load before it serves, so sign-ins do not see a 503.
                await asyncio.wait({loader}, timeout=config.provider.timeout + 1)
                if not idp.ready:
                    log.warning("config reload: the new provider is not reachable yet; "
                                "sign-ins answer 503 until it is",
                                extra={"issuer": config.provider.issuer})
                closers.append(functools.partial(Parts.close_provider, old.idp_http,
                                                 old.loader))
            parts = Parts(store, settings, idp, idp_http, loader, old.proxy, old.upstream_http,
                          assertion_keys)
            pages = await asyncio.to_thread(Pages, config.server.templates_dir)
            gateway = build_gateway(config, parts, pages, self.metrics, self.clock)
        except BaseException:
            await self._close_all(built)
            raise
        retired = self.current
        self.current, self.config, self.parts = Generation(gateway), config, parts
        if config.logging != old_config.logging:
            configure_logging(config.logging.level, config.logging.format, pid=self.log_pid)
        wait = max([r.timeout for r in old_config.routes] + [old_config.provider.timeout])
        task = asyncio.create_task(self._retire(retired, closers, wait))
        self._retiring[task] = closers
        task.add_done_callback(self._retiring.pop)
        retired.retired = True
        if not retired.in_flight:
            retired.idle.set()

    @classmethod
    async def _retire(cls, generation: Generation, closers: list[Closer], wait: float) -> None:
        """Close what the previous config used once its requests are done (a websocket may
        hold a generation open for hours: after ``wait`` it is closed anyway, and a websocket
        needs neither the store nor the provider once it is open), then free it: its gateway
        and clients are cycles of objects, which GC_THRESHOLDS would otherwise leave to a full
        collection a quiet gateway may not run for hours."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(generation.idle.wait(), wait)
        await cls._close_all(closers)
        del generation
        gc.collect()

    @staticmethod
    async def _close_all(closers: list[Closer]) -> None:
        while closers:
            try:
                await closers.pop(0)()
            except Exception:
                log.warning("closing a resource of the previous config failed", exc_info=True)

    async def close(self) -> None:
        """Close everything, what a pending retirement still holds included."""
        pending = list(self._retiring.items())
        for task, _ in pending:
            task.cancel()
        for task, closers in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._close_all(closers)
        await self.parts.close()


LIVE = web.AppKey("live", Live)


def create_app(
    config: Config, *, clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
    log_pid: bool = False,
) -> web.Application:
    """The gateway's aiohttp application. ``app[LIVE]`` answers every request; ``app[GATEWAY]``
    is the Gateway built at start-up (a reload replaces ``app[LIVE].current``, never it)."""
    app = web.Application(client_max_size=1024**2)
    meter = metrics or Metrics()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        parts = Parts.open(config, meter, clock)
        live = Live(config, parts, meter, clock, pages=Pages(config.server.templates_dir),
                    log_pid=log_pid)
        app[LIVE] = live
        app[GATEWAY] = live.current.gateway
        try:
            yield
        finally:
            await live.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[LIVE].handle(request)

    async def expect_nothing(request: web.Request) -> None:
        """Gateway.handle answers ``Expect`` itself (as it must where serve() bypasses the
        router); the router's own 100 Continue would come twice."""

    app.cleanup_ctx.append(resources)
    # [\s\S] and not ".": a decoded path may hold "\n" (%0a), which "." would not match, and
    # aiohttp would then answer 404 itself, past the gateway's checks and its access log.
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle, expect_handler=expect_nothing)
    return app


def metrics_app(live: Live) -> web.Application:
    """The ``server.metrics_listen`` listener's application: ``/metrics`` and nothing else."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        gateway = live.current.gateway
        gateway.metrics.provider_ready.set(1 if gateway.idp.ready else 0)
        response = web.Response(body=gateway.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
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


def _is_whole(response: web.StreamResponse) -> TypeGuard[web.Response]:
    """A plain ``web.Response`` whose body is bytes in memory, neither compressed nor
    chunked: what :meth:`GatewayRequestHandler._write_whole` can write itself."""
    return (type(response) is web.Response and isinstance(response.body, bytes | None)
            and not response.chunked and response.compression is False)


# A request head answered before aiohttp parses it is at most this long (well under the
# request line and header caps of server_options, so they never apply to it).
_AT_ONCE_MAX: Final = 4096
# Headers that need handle(): credentials (the 401 is only for requests with none), a body,
# an expectation, a protocol switch.
_HAND_OFF: Final = frozenset({
    "cookie", "authorization", "content-length", "transfer-encoding", "expect", "upgrade"})


def _has_credentials(data: bytes) -> bool:
    """Whether the head at the start of ``data`` (its first 4 KiB) sends a Cookie or an
    Authorization header, as browsers and API clients spell them. Found before httptools
    reads the head, a browser's signed-in request (and a login's callback) goes to aiohttp's
    parser straight away instead of being parsed twice (0.05 ms of a callback at idle, issue
    7); four substring searches, not a case-blind regex, which cost every 401 3 % more. Only
    an early way out: _HeadReader still checks every name of _HAND_OFF in any case."""
    return (data.find(b"\r\nCookie:", 0, _AT_ONCE_MAX) >= 0
            or data.find(b"\r\ncookie:", 0, _AT_ONCE_MAX) >= 0
            or data.find(b"\r\nAuthorization:", 0, _AT_ONCE_MAX) >= 0
            or data.find(b"\r\nauthorization:", 0, _AT_ONCE_MAX) >= 0)


# Heads read (_HeadReader), by their bytes and the connection's address and scheme: the same
# bytes always read the same. Past this many the memo starts over (each at most
# _AT_ONCE_MAX bytes).
_HEAD_MEMO: Final = 256
_UNREAD: Final = object()


class _HeadReader:
    """Reads one connection's requests with httptools while each arrives as one whole head
    of an HTTP/1.1 keep-alive GET without body or credentials (:class:`RequestHead`); None
    for anything else, which aiohttp's parser then reads.

    ``memo``: heads already read, shared by the connections of a server. A client sends the
    same bytes for the same URL again and again (an API client polling, a browser's
    navigations): those are not parsed again (issue 7: the parse was a sixth of a 401's CPU).
    """

    __slots__ = ("done", "handoff", "items", "kept_get", "memo", "parser", "remote", "secure",
                 "url")

    def __init__(self, remote: str, secure: bool,
                 memo: dict[tuple[bytes, str, bool], RequestHead | None] | None = None) -> None:
        self.remote = remote
        self.secure = secure
        self.memo = memo if memo is not None else {}
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.items: list[tuple[str, str]] = []
        self.done = self.handoff = self.kept_get = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("ascii")
        self.items.append((key, value.decode("ascii")))
        if key.lower() in _HAND_OFF:
            self.handoff = True

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete the parser is ready for the next one.
        parser = self.parser
        self.kept_get = (parser.get_method() == b"GET" and parser.get_http_version() == "1.1"
                         and parser.should_keep_alive())

    def on_message_complete(self) -> None:
        self.done = True

    def known(self, data: bytes) -> RequestHead | None:
        """The head ``data`` was read as before, if it was one to answer at once; else None
        (never read, or not such a head)."""
        return self.memo.get((data, self.remote, self.secure))

    def read(self, data: bytes) -> RequestHead | None:
        """``data`` must be ASCII and hold exactly one request head."""
        key = (data, self.remote, self.secure)
        memo = self.memo
        head = memo.get(key, _UNREAD)
        if head is _UNREAD:
            head = self._parse(data)
            if len(memo) >= _HEAD_MEMO:
                memo.clear()
            memo[key] = head
        return head  # type: ignore[return-value]

    def _parse(self, data: bytes) -> RequestHead | None:
        self.url = b""
        self.items = []
        self.done = self.handoff = self.kept_get = False
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        if not self.done or self.handoff or not self.kept_get:
            return None
        return RequestHead("GET", self.url.decode("ascii"), self.items, self.remote, self.secure,
                           data)


class _Frame:
    """An answer decided at once, framed as :meth:`GatewayRequestHandler._write_whole` frames
    a ``web.Response`` to an HTTP/1.1 keep-alive request (the headers in the same order),
    its bytes cut around the value of its last header (the request id, which every answer
    decided at once ends with) and the date. No value holds CR or LF:
    ``Gateway.answer_at_once`` sends constants, a request id (hex, or a trusted proxy's
    checked one), a checked cookie and a provider URL it checked."""

    __slots__ = ("_date", "_date_text", "_head", "_middle", "_tail")

    def __init__(self, answer: WholeAnswer) -> None:
        *fixed, (last, _) = answer.headers
        self._head = "".join([
            f"HTTP/1.1 {answer.status} {answer.reason}\r\n",
            *[f"{name}: {value}\r\n" for name, value in fixed], f"{last}: ",
        ]).encode("ascii")
        self._middle = f"\r\nContent-Length: {len(answer.body)}\r\nDate: ".encode("ascii")
        self._tail = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode("ascii") + answer.body
        self._date_text = ""
        self._date = b""

    def bytes_with(self, value: str) -> bytes:
        """The answer whose last header has ``value`` (ASCII, no CR or LF), dated now."""
        text = rfc822_formatted_time()
        if text is not self._date_text:  # aiohttp makes the text anew once a second
            self._date_text, self._date = text, text.encode("ascii")
        return b"".join((self._head, value.encode("ascii"), self._middle, self._date,
                         self._tail))


class _Frames:
    """The frames of the answers that share a ``WholeAnswer.frame`` (the 401s of one request
    head differ only in their request id), kept by the connections of one server: made once,
    not for every answer (issue 7: formatting every header of every 401 anew was a tenth of
    its CPU). Past ``limit`` the memo starts over."""

    __slots__ = ("_kept", "limit")

    def __init__(self, limit: int = 1024) -> None:
        self._kept: dict[object, _Frame] = {}
        self.limit = limit

    def framed(self, answer: WholeAnswer) -> bytes:
        key = answer.frame
        frame = self._kept.get(key) if key is not None else None
        if frame is None:
            frame = _Frame(answer)
            if key is not None:
                if len(self._kept) >= self.limit:
                    self._kept.clear()
                self._kept[key] = frame
        return frame.bytes_with(answer.headers[-1][1])


class TurnWriter:
    """The answers written at the end of an event-loop turn, and their log lines: the lines
    of all of them with one write(2), then each answer. A reader of the log who just got an
    answer still finds its lines there; one write per line cost a 401 under load about a
    fifth of its CPU (issue 7). The answers wait for no I/O: the write is the next callback
    the loop runs, before it polls for more. Requests answered at once, and whole answers
    to requests read by :meth:`GatewayRequestHandler.start` on a connection that stays open,
    go this way; any other answer first has them all written (:meth:`flush`)."""

    __slots__ = ("_after", "_answers", "_due", "_loop", "lines")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._answers: list[tuple[asyncio.Transport, bytes]] = []
        self._after: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self._due = False
        self.lines = HeldLines()

    def after_answer(self, callback: Callable[..., object], *args: object) -> None:
        """Run ``callback(*args)`` once the answers of this turn are written: work for the
        client's next request, which must not delay this one's answer (a ``call_soon`` from
        the handler ran before the end of the turn, so before the answer went out)."""
        self._after.append((callback, args))
        self._flush_soon()

    def hold_info(self, logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
        self.lines.hold_info(logger, message, fields)
        self._flush_soon()

    def hold_line(self, handler: LineStreamHandler, line: str) -> None:
        self.lines.hold(handler, line)
        self._flush_soon()

    def add(self, transport: asyncio.Transport, data: bytes,
            lines: Sequence[tuple[LineStreamHandler, str]] = ()) -> None:
        for handler, line in lines:
            self.lines.hold(handler, line)
        self._answers.append((transport, data))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if not self._due:
            self._due = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._due = False
        self.lines.write()
        answers, self._answers = self._answers, []
        for transport, data in answers:
            if not transport.is_closing():
                transport.write(data)
        after, self._after = self._after, []
        for callback, args in after:  # each on its own: one failing stops no other
            self._loop.call_soon(callback, *args)


class GatewayRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with what the gateway needs on top:

    * a connection cap: beyond ``server.max_connections`` a new connection gets a plain 503
      and is closed at once, before any parsing (idle-connection floods, note 10);
    * 431 for headers the parser refuses as too many or too long (RFC 6585 5), like the
      gateway's own check, instead of aiohttp's 400;
    * protocol errors logged as one line naming the error type: aiohttp's message quotes the
      offending header line, which may be a cookie or a token (never logged);
    * requests answered before aiohttp reads them (``at_once``, ``Live.answer_at_once``):
      the 401 or the redirect to the provider of a request with no credentials, while the
      connection has sent nothing else (:meth:`data_received`).
    """

    def __init__(
        self, manager: web.Server, *, guard: ConnectionGuard,
        at_once: Callable[[RequestHead], WholeAnswer | None] | None = None,
        arrived: Callable[[], int | None] | None = None, turn: TurnWriter | None = None,
        head_memo: dict[tuple[bytes, str, bool], RequestHead | None] | None = None,
        frames: _Frames | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = False
        self._at_once = at_once
        self._turn = turn if turn is not None else TurnWriter(self._loop)
        self._head_memo = head_memo
        self._frames = frames if frames is not None else _Frames()
        # Where the request being answered by start() holds its log lines (read by
        # Gateway.handle), while it is; None for requests aiohttp's own loop answers.
        self.held_lines: TurnWriter | None = None
        self._arrived = arrived
        # The session cache's mark for the requests in the bytes last received (Live.
        # request_arrived); None when they carried no cookie. Read by Gateway._open.
        self.confirm_after: int | None = None
        self._heads: _HeadReader | None = None
        # Whether the requests come to _heads first (else aiohttp's parser reads them).
        self._reading_heads = False
        # Whether aiohttp's parser got exactly one whole head, bodiless, since _heads last
        # read: once that request is answered, _heads may read the next one.
        self._clean_handoff = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit():
            log.warning("connection refused: server.max_connections reached",
                        extra={"limit": self._guard.limit})
            transport.write(_BUSY)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._counted = True
        if self._at_once is not None:
            peer = self.peername
            remote = str(peer[0]) if isinstance(peer, list | tuple) else str(peer or "")
            self._heads = _HeadReader(remote, self.ssl_context is not None, self._head_memo)
            self._reading_heads = True

    def data_received(self, data: bytes) -> None:
        """Answer a request at once when the Gateway can (``at_once``), else hand it to
        aiohttp's parser, and then every byte after it until that request is answered: no
        answer overtakes another, and no byte is read by both parsers.

        At once: ``data`` holds exactly one HTTP/1.1 GET head (as clients send requests one
        at a time on a connection), ASCII, no body, no cookie or Authorization, keep-alive.
        When it held such a head that the Gateway left to :meth:`Gateway.handle` (a health
        check, a sign-in whose store check is due), aiohttp's parser ends exactly at its end,
        and once it is answered with nothing else come in, :meth:`start` lets ``_heads``
        read again. Anything else makes the connection aiohttp's for good.
        """
        heads = self._heads
        credentials: bool | None = None
        if self._reading_heads and heads is not None:
            # A head read before (an API client polling, wrk) is found by its bytes first:
            # it was checked when it was read, and holds no credentials.
            head = heads.known(data) if len(data) <= _AT_ONCE_MAX else None
            if head is not None and self._can_answer_at_once():
                credentials = False
            else:
                credentials = _has_credentials(data)
                head = None if credentials else self._head_of(heads, data)
            if head is not None:
                answer = self._answer_at_once(head)
                if answer is not None:
                    self._send_at_once(answer)
                    return
            self._reading_heads = False
            self._clean_handoff = head is not None
        else:
            self._clean_handoff = False
        # A signed-in request: the session cache's confirmation ping leaves now, before the
        # request is parsed (issue 7). Bytes without a cookie in their first 4 KiB (where a
        # request's head is; an upload's body arrives in many pieces, none worth scanning
        # whole) reset the mark, so that no request uses a ping sent before it arrived.
        arrived = self._arrived
        if arrived is not None:
            if credentials is None:
                credentials = _has_credentials(data)
            self.confirm_after = arrived() if credentials else None
        super().data_received(data)

    def _answer_at_once(self, head: RequestHead) -> WholeAnswer | None:
        if self._at_once is None:
            return None
        try:
            return self._at_once(head)
        except Exception:  # a bug: handle() answers the request (its error page, a 500)
            log.exception("request not answered at once")
            return None

    def _can_answer_at_once(self) -> bool:
        # Writing paused: a client that does not read its answers waits in start().
        return not (self._force_close or self._close or self.writing_paused)

    def _head_of(self, heads: _HeadReader, data: bytes) -> RequestHead | None:
        if (not self._can_answer_at_once() or len(data) > _AT_ONCE_MAX
                or not data.startswith(b"GET ") or data.find(b"\r\n\r\n") != len(data) - 4
                or not data.isascii()):
            return None
        return heads.read(data)

    def _send_at_once(self, answer: WholeAnswer) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._turn.add(transport, self._frames.framed(answer), answer.lines)
        if self._manager is not None:
            self._manager.requests_count += 1
        self._keepalive = True
        self._keep_alive_until_idle()

    def _keep_alive_until_idle(self) -> None:
        """Close the connection if no request follows within the keep-alive timeout (as
        aiohttp's own loop does after each answer)."""
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

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

    async def start(self) -> None:
        """aiohttp's request loop, with a short way for requests that have no body.

        For every request aiohttp's loop starts a task (to give each its own copy of the
        context variables; the gateway keeps none), and writes the answer through the
        StreamResponse machinery. Here a request without a body (and not an upgrade) is
        answered in this connection's own task, and an answer that is whole (a
        ``web.Response`` with its body: a 401, a redirect, an error page, a small page from
        the upstream) goes out in one write: :meth:`_write_whole`. Issue 7: a bare 401
        server ran at 9.8k req/s through aiohttp's loop and at 16.5k through this one.

        At the first request with a body or an upgrade, aiohttp's own loop takes over the
        connection for good (that request is still first in the queue); so does every
        parse error (aiohttp answers those itself).
        """
        loop = self._loop
        manager, handler = self._manager, self._request_handler
        factory = self._request_factory
        if manager is None or handler is None or factory is None:
            return  # the connection is already gone
        messages = self._messages
        while not self._force_close:
            if not messages:
                try:
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            message, payload = messages[0]
            if (payload is not EMPTY_PAYLOAD or not isinstance(message, RawRequestMessage)
                    or message.upgrade or self._upgraded):
                break
            messages.popleft()
            if self._parser is not None:
                self._parser.message_consumed()
            if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()
            manager.requests_count += 1
            request = factory(message, payload, self, StreamWriter(self, loop),
                              self._task_handler)  # type: ignore[arg-type]
            if not await self._answer(request, handler):
                if not self._force_close:  # as aiohttp ends a connection that is not kept
                    self._task_handler = None
                    if self.transport is not None:
                        self._turn.flush()  # its answer, if it waits for the turn's end
                        self.transport.close()
                return
            self._keep_alive_until_idle()
            if messages:  # requests sent ahead: their answers' backlog must show
                self._turn.flush()
            if self.writing_paused:
                # A client that sends requests without reading the answers: take no more of
                # them until it has (whole answers are written without waiting).
                try:
                    await self._drain_helper()
                except ConnectionError:
                    return
            if self._clean_handoff and not messages:  # see data_received
                self._clean_handoff = False
                self._reading_heads = True
        if not self._force_close:
            await super().start()

    async def _answer(
        self, request: web.BaseRequest,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> bool:
        """Answer one request in the connection's task; whether the connection is kept."""
        self._request_in_progress = True
        self._current_request = request
        turn = self._turn
        self.held_lines = turn
        try:
            try:
                response = await handler(request)
            finally:
                self.held_lines = None
            if not response.prepared and _is_whole(response):
                self._write_whole(request, response)
            else:  # the answers before it go first, and every line held
                turn.flush()
                await response.prepare(request)
                await response.write_eof()
        except ConnectionError:  # the client left while its answer was being written
            self.force_close()
            return False
        except asyncio.CancelledError:
            self.force_close()
            raise
        except Exception as exc:  # Gateway.handle answers its own errors; this is a bug
            self.log_exception("Unhandled exception", exc_info=exc)
            self.force_close()
            return False
        finally:
            self._current_request = None
            self._request_in_progress = False
            if self._handler_waiter is not None:  # shutdown() waits for this request
                self._handler_waiter.set_result(None)
                self._handler_waiter = None
        self._keepalive = bool(response.keep_alive)
        return self._keepalive and not self._close and not self._force_close

    def _write_whole(self, request: web.BaseRequest, response: web.Response) -> None:
        """Write a whole answer, head and body, in one write: the bytes aiohttp's
        ``prepare()`` and ``write_eof()`` would write for it, less their bookkeeping (the
        same Content-Length, Content-Type, Date, Server and Connection rules, the same header
        serializer, which refuses CR and LF in a header: security note 8)."""
        method, status = request.method, response.status
        body = response.body or b""
        assert isinstance(body, bytes)  # noqa: S101 - _is_whole checked it
        headers = response.headers
        empty = must_be_empty_body(method, status)
        if "Content-Length" in headers:
            if should_remove_content_length(method, status):
                del headers["Content-Length"]
        elif body or (status != 304 and method != "HEAD"):
            headers["Content-Length"] = str(len(body))
        for cookie in response.cookies.values():
            headers.add("Set-Cookie", cookie.output(header="")[1:])
        if empty:
            headers.pop("Transfer-Encoding", None)
        elif body:
            headers.setdefault("Content-Type", "application/octet-stream")
        if "Date" not in headers:
            headers["Date"] = rfc822_formatted_time()
        headers.setdefault("Server", SERVER_SOFTWARE)
        keep_alive = response.keep_alive
        if keep_alive is None:
            keep_alive = response._keep_alive = request.keep_alive
        version = request.version
        if "Connection" not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers["Connection"] = "keep-alive"
            elif version == HttpVersion11:
                headers["Connection"] = "close"
        head = _serialize_headers(
            f"HTTP/{version[0]}.{version[1]} {status} {response.reason}", headers)
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        data = head if empty or not body else head + body
        if keep_alive:  # with the turn's other answers, after their lines (TurnWriter)
            self._turn.add(transport, data)
        else:  # the connection is closed right after: out now, after what is held
            self._turn.flush()
            transport.write(data)
        response._eof_sent = True  # prepared: nothing more goes out for it

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            log.info("malformed request refused by the HTTP parser",
                     extra={"error": type(exc).__name__, "status": exc.code})
            return
        super().log_exception(*args, **kw)


class GatewaySite(web.BaseSite):
    """A TCP site serving with :class:`GatewayRequestHandler` (aiohttp's TCPSite hands every
    connection to a plain RequestHandler, with no connection cap).

    Requests go straight to ``handler`` (``Live.handle``) through a server of the site's own,
    not through the application's router: for the gateway's one catch-all route, aiohttp's
    router (resolve, match info, middleware check) cost about 13 µs of every request, a fifth
    of a bare 401 (issue 7). The runner still starts and cleans up the application
    (``cleanup_ctx``); :meth:`stop` drains this site's connections, which the runner's own
    server does not know.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        handler_options: dict[str, object],
        max_connections: int,
        at_once: Callable[[RequestHead], WholeAnswer | None] | None = None,
        arrived: Callable[[], int | None] | None = None,
        shutdown_timeout: float,
        backlog: int = 128,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self._handler = handler
        self._handler_options = handler_options
        self._at_once = at_once
        self._arrived = arrived
        self._shutdown_timeout = shutdown_timeout
        self._manager: web.Server | None = None
        self.guard = ConnectionGuard(max_connections)

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        manager = self._manager = web.Server(self._handler, loop=loop)
        turn = TurnWriter(loop)
        head_memo: dict[tuple[bytes, str, bool], RequestHead | None] = {}
        frames = _Frames()

        def connection() -> GatewayRequestHandler:
            return GatewayRequestHandler(
                manager, guard=self.guard, at_once=self._at_once, arrived=self._arrived,
                turn=turn, head_memo=head_memo, frames=frames, loop=loop, **self._handler_options)

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=True,
            reuse_port=self._reuse_port or None)

    async def stop(self) -> None:
        """Close the listener, then idle connections; give requests in flight
        ``shutdown_timeout`` to finish (what the runner does for its own server)."""
        await super().stop()
        manager, self._manager = self._manager, None
        if manager is not None:
            await asyncio.sleep(0)  # requests that just arrived begin before idle ones close
            manager.pre_shutdown()
            await manager.shutdown(self._shutdown_timeout)


async def serve(
    config: Config,
    app: web.Application | None = None,
    *,
    source: ConfigSource | None = None,
    worker: int | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Serve on ``server.listen`` (and ``server.metrics_listen``) until SIGTERM or SIGINT;
    reload on SIGHUP and on a change of ``source``.

    Shutdown, in order: ``/ready`` answers 503 at once; new connections are still accepted
    for ``server.shutdown_delay`` (0 by default); then the listener closes (new connections
    are refused), idle keep-alive connections close, and requests in flight get
    ``server.shutdown_timeout`` to finish before the resources close. Returns normally: the
    process exits 0.

    ``worker``: this process is worker number ``worker`` of a supervisor (``server.workers``);
    it shares the port with its siblings (SO_REUSEPORT) and stops if the supervisor dies.
    """
    loop = asyncio.get_running_loop()
    host, port = config.server.listen_address
    options = server_options(config)
    gc.set_threshold(*GC_THRESHOLDS)
    app = app or create_app(config, metrics=metrics, log_pid=worker is not None)
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=config.server.shutdown_timeout,
        **options,  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    await runner.setup()
    live = app[LIVE]
    tasks: list[asyncio.Task[None]] = []
    metrics_runner: web.AppRunner | None = None
    admin_runner: web.AppRunner | None = None
    reuse_port = worker is not None
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, live.hup.set)
        site = GatewaySite(runner, host, port, handler=live.handle, handler_options=options,
                           at_once=live.answer_at_once, arrived=live.request_arrived,
                           max_connections=config.server.max_connections,
                           shutdown_timeout=config.server.shutdown_timeout,
                           reuse_port=reuse_port)
        await site.start()
        if config.server.metrics_listen is not None:
            metrics_runner = web.AppRunner(metrics_app(live), handle_signals=False,
                                           access_log=None)
            await metrics_runner.setup()
            m_host, m_port = parse_listen(config.server.metrics_listen)
            await web.TCPSite(metrics_runner, m_host, m_port, reuse_port=reuse_port).start()
        admin = config.admin
        if admin.listen is not None and admin.token is not None:
            # The session admin API (gateway/admin.py), on its own address; it acts on
            # whichever Gateway is current (a reload swaps it).
            admin_runner = web.AppRunner(
                create_admin_app(lambda: live.current.gateway, admin.token.get_secret_value()),
                handle_signals=False, access_log=None)
            await admin_runner.setup()
            a_host, a_port = parse_listen(admin.listen)
            await web.TCPSite(admin_runner, a_host, a_port, reuse_port=reuse_port).start()
        tasks.append(asyncio.create_task(live.keep_gauges(), name="gauges"))
        tasks.append(asyncio.create_task(live.keep_store_checked(), name="store-check"))
        if source is not None:
            tasks.append(asyncio.create_task(live.watch(source), name="config-watch"))
        if worker is not None:
            tasks.append(asyncio.create_task(_watch_parent(stop), name="parent-watch"))
        log.info("listening", extra={
            "address": f"{host}:{port}", "metrics": config.server.metrics_listen,
            "routes": len(config.routes), "store": config.session.store, "worker": worker})
        await stop.wait()
        live.begin_drain()
        delay = live.config.server.shutdown_delay
        log.info("shutting down: draining", extra={
            "in_flight": live.in_flight, "delay_s": delay,
            "timeout_s": config.server.shutdown_timeout})
        if delay:
            await asyncio.sleep(delay)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Closes the listener, then waits (up to shutdown_timeout) for requests in flight,
        # then closes the resources (cleanup_ctx).
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        live.metrics.flush()  # the last requests' counts, for the other workers' scrapes
        for sig in signals:
            loop.remove_signal_handler(sig)
        log.info("stopped")


async def _watch_parent(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) stops, rather than serve on unwatched."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            log.error("the supervisor process is gone: stopping")
            stop.set()


def run(
    config: Config,
    *,
    source: ConfigSource | None = None,
    worker: int | None = None,
    worker_command: Callable[[int], Sequence[str]] | None = None,
    metrics_dir: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain; the exit status (0 after a clean stop).

    With ``server.workers`` > 1 (and not already a worker) this process becomes the
    supervisor of that many workers, each started with ``worker_command(index)``.
    """
    if config.server.workers > 1 and worker is None:
        if worker_command is None:
            raise ValueError("server.workers > 1 needs a command to start a worker")
        return asyncio.run(supervise(config, worker_command))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config, source=source, worker=worker,
                         metrics=Metrics(multiprocess_dir=metrics_dir)))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency): libuv's loop runs the same
    aiohttp and redis-py code with less CPU per request (see README "Performance").
    ``OIDC_GATEWAY_EVENT_LOOP=asyncio`` keeps the standard loop, e.g. to compare."""
    if os.environ.get("OIDC_GATEWAY_EVENT_LOOP", "") == "asyncio":
        return None
    try:
        import uvloop  # here, not at the top: absent where it does not build (Windows)
    except ImportError:
        return None
    return uvloop.new_event_loop


# ---------------------------------------------------------------------------------------------
# server.workers: a supervisor and N worker processes on one port
# ---------------------------------------------------------------------------------------------

# A worker that keeps dying is not restarted forever: past this many restarts within
# _RESTART_WINDOW seconds the supervisor stops the others and exits 1.
_MAX_RESTARTS: Final = 5
_RESTART_WINDOW: Final = 60.0
_RESTART_PAUSE: Final = 1.0


async def supervise(config: Config, command: Callable[[int], Sequence[str]]) -> int:
    """Run ``server.workers`` worker processes until SIGTERM/SIGINT; pass SIGHUP on.

    Workers are whole processes started afresh (not forked from a running event loop), each
    binding the port with SO_REUSEPORT, so the kernel spreads connections over them. A worker
    that dies is restarted (bounded). On SIGTERM every worker drains on its own; the
    supervisor exits 0 once all have exited 0, 1 otherwise.

    The workers share a directory for their metric samples (prometheus_client's multiprocess
    mode), so ``/metrics`` at any of them counts the requests of all.
    """
    loop = asyncio.get_running_loop()
    count = config.server.workers
    if config.session.store == "memory":
        log.warning(
            "server.workers > 1 with session.store: memory: every worker keeps its own "
            "sessions, so a user signed in at one worker is unknown to the others and sign-ins "
            "fail at random; use session.store: redis", extra={"workers": count})
    try:
        metrics_dir: str | None = tempfile.mkdtemp(prefix="oidc-gateway-metrics-")
    except OSError as exc:
        metrics_dir = None
        log.warning("no directory for shared metrics (set TMPDIR to a writable one): each "
                    "worker's /metrics shows its own counts only",
                    extra={"error": exc.strerror})
    env = dict(os.environ)
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    stopping = asyncio.Event()
    failed = False
    procs: dict[int, asyncio.subprocess.Process] = {}
    restarts: collections.deque[float] = collections.deque()

    def forward(sig: signal.Signals) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def slot(index: int) -> int:
        nonlocal failed
        while True:
            proc = await asyncio.create_subprocess_exec(*command(index), env=env)
            procs[index] = proc
            if stopping.is_set():  # SIGTERM came while it was starting
                proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            if metrics_dir is not None:
                multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
            if stopping.is_set():
                return code
            log.error("worker exited; restarting it",
                      extra={"worker": index, "pid": proc.pid, "exit_code": code})
            now = time.monotonic()
            restarts.append(now)
            while restarts and now - restarts[0] > _RESTART_WINDOW:
                restarts.popleft()
            if len(restarts) > _MAX_RESTARTS:
                log.error("workers keep exiting: stopping", extra={"restarts": len(restarts)})
                failed = True
                stopping.set()
                return code
            await asyncio.sleep(_RESTART_PAUSE)
            if stopping.is_set():
                return code

    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)
    slots = [asyncio.create_task(slot(i), name=f"worker-{i}") for i in range(count)]
    try:
        await asyncio.sleep(0)
        log.info("supervising workers", extra={"workers": count,
                                               "address": config.server.listen})
        await stopping.wait()
        forward(signal.SIGTERM)
        grace = config.server.shutdown_delay + 2 * config.server.shutdown_timeout + 5
        done, pending = await asyncio.wait(slots, timeout=grace)
        for proc in procs.values():
            if proc.returncode is None:
                log.error("worker did not stop in time: killing it", extra={"pid": proc.pid})
                proc.kill()
        codes = [task.result() for task in done] + [
            await task for task in pending]
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    ok = not failed and all(code == 0 for code in codes)
    log.info("workers stopped", extra={"exit_codes": codes})
    return 0 if ok else 1


async def check_online(config: Config) -> list[str]:
    """What ``check --online`` reports: can we reach discovery, the JWKS and the store?"""
    problems: list[str] = []
    http = provider_client(config)
    try:
        await IdentityProvider(config.provider, http).load()
    except GatewayError as exc:
        problems.append(f"provider: {exc.message}")
    finally:
        http.close()
    store = make_store(config)
    try:
        await store.ping()
    except GatewayError as exc:
        problems.append(f"session.store: {exc.message}")
    finally:
        await store.close()
    return problems
