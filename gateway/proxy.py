"""Forward one request to an upstream app and stream the answer back.

Plain requests go through ``upstream_client.UpstreamClient`` (a lean keep-alive HTTP/1.1 client:
aiohttp's client cost more CPU per request than the rest of the proxy path, issue 7); websockets
through the pooled ``aiohttp.ClientSession``. The client's pool lives on the session's connector,
so closing the session closes both. Bodies are streamed both ways, so a 100 MB upload or download
never sits whole in memory, and bytes pass untouched (no decompression on either side; the
server side is configured in ``app.py``, security note 14). The header lists arrive already
cleaned by ``headers.HeaderPolicy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.upstream_client import (
    UpstreamClient,
    UpstreamClientError,
    UpstreamResponse,
    UpstreamResponseTimeout,
)

log = logging.getLogger("gateway.proxy")

# Headers aiohttp's client would invent when the browser did not send them: we forward
# exactly what the client sent (after hygiene), nothing more.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# The websocket handshake headers are made anew by the client side of the tunnel.
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
# Answers with a Content-Length up to this size that are already whole go out in one write
# with their head (web.Response) instead of head, body and end separately.
_SMALL_BODY = 64 * 1024


def upstream_url(upstream: str, encoded_path: str, raw_query: str) -> URL:
    """The exact URL to send: ``encoded=True`` so yarl does not resolve or re-encode the path
    that the gateway authorised (security note 6)."""
    target = upstream + encoded_path + (f"?{raw_query}" if raw_query else "")
    return URL(target, encoded=True)


def is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade", "")
    return upgrade.lower() == "websocket" and request.method == "GET"


class _ProxyConnector(aiohttp.TCPConnector):
    """aiohttp's connector (for websockets) that also owns the plain requests' pool, so that
    whoever closes the session (app.py, on shutdown) closes that pool's connections too."""

    def __init__(self, plain: UpstreamClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plain = plain

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.plain.close()
        await super().close(abort_ssl=abort_ssl)


class UpstreamProxy:
    """Streams requests to upstreams over shared connection pools."""

    def __init__(self, session: aiohttp.ClientSession, *, connect_timeout: float = 5.0):
        self._session = session
        self._connect_timeout = connect_timeout
        connector = session.connector
        self._client = (
            connector.plain
            if isinstance(connector, _ProxyConnector)
            else UpstreamClient(connect_timeout=connect_timeout)
        )

    @staticmethod
    def new_client_session(*, limit: int = 0) -> aiohttp.ClientSession:
        """The pooled client the proxy needs: no decompression, no cookie jar, no env proxies."""
        connector = _ProxyConnector(
            UpstreamClient(), limit=limit, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=_AUTO_HEADERS,
        )

    async def send(
        self,
        request: web.BaseRequest,
        url: URL,
        headers: Sequence[tuple[str, str]],
        *,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Send the request upstream and return once the answer's headers are in.

        Connection failures and invalid answers become 502, no answer within ``read_timeout``
        becomes 504; both before anything was sent to the browser, so the caller can still show
        an error page.
        """
        body = request.content if request.body_exists else None
        scheme = url.scheme
        port = url.port or (443 if scheme == "https" else 80)
        try:
            return await self._client.request(
                request.method,
                (scheme, url.raw_host or "", port),
                url.raw_path_qs,  # verbatim: built with encoded=True (security note 6)
                headers,
                host=url.host_port_subcomponent or "",
                body=body,
                read_timeout=read_timeout,
            )
        except UpstreamResponseTimeout as exc:
            raise UpstreamTimeout(
                f"the app at {url.origin()} did not answer within {read_timeout:g} s"
            ) from exc
        except UpstreamClientError as exc:
            raise UpstreamError(f"the app at {url.origin()} cannot be reached ({exc})") from exc

    @staticmethod
    async def relay(
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        headers: Sequence[tuple[str, str]],
    ) -> web.StreamResponse:
        """Stream the upstream's answer to the browser, chunk by chunk. A small answer that
        is already whole is returned unsent, as a ``web.Response`` holding its body: the
        server writes it, head and body in one write (app.GatewayRequestHandler)."""
        response: web.StreamResponse
        try:
            body = upstream.buffered_body(_SMALL_BODY)
            if body is not None:
                return web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    body=body,
                    headers=CIMultiDict(headers),
                )
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in headers:
                response.headers.add(name, value)
            await response.prepare(request)
            if request.method != "HEAD":
                while chunk := await upstream.read_chunk():
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # The browser left mid-answer (a closed tab, a cancelled download): not a fault.
            log.info("browser left before the answer was whole")
        except (TimeoutError, UpstreamClientError) as exc:
            # The headers are already out: the only honest signal left is a cut connection.
            log.warning(
                "upstream answer broken off mid-stream",
                extra={"error": type(exc).__name__},
            )
            if request.transport is not None:
                request.transport.close()
        finally:
            upstream.release()
        return response

    async def websocket(
        self,
        request: web.BaseRequest,
        url: URL,
        headers: Sequence[tuple[str, str]],
        *,
        read_timeout: float,
    ) -> web.WebSocketResponse:
        """Open the upstream websocket first (failure → 502 page), then pump both ways."""
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        forwarded = CIMultiDict(
            (name, value) for name, value in headers if name.lower() not in _WS_HANDSHAKE
        )
        try:
            upstream = await self._session.ws_connect(
                url.with_scheme("wss" if url.scheme == "https" else "ws"),
                headers=forwarded,
                protocols=protocols,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=read_timeout),
                autoping=True,
                compress=0,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(
                f"the app at {url.origin()} did not accept the websocket"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"the app at {url.origin()} refused the websocket ({type(exc).__name__})"
            ) from exc

        browser = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (), autoping=True
        )
        await browser.prepare(request)

        async def pump(
            src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
            dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        ) -> None:
            async for msg in src:
                if msg.type == WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                else:
                    break
            await dst.close()

        tasks = [
            asyncio.create_task(pump(browser, upstream)),
            asyncio.create_task(pump(upstream, browser)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await upstream.close()
            await browser.close()
        return browser
