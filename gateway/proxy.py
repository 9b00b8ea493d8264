"""Forward one request to an upstream app and stream the answer back.

One pooled ``aiohttp.ClientSession`` serves every route. Bodies are streamed both ways, so a
100 MB upload or download never sits whole in memory, and bytes pass untouched
(``auto_decompress=False`` here; the server side is configured the same way in ``app.py``,
security note 14). The header lists arrive already cleaned by ``headers.HeaderPolicy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import UpstreamError, UpstreamTimeout

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
_CHUNK = 64 * 1024


def upstream_url(upstream: str, encoded_path: str, raw_query: str) -> URL:
    """The exact URL to send: ``encoded=True`` so yarl does not resolve or re-encode the path
    that the gateway authorised (security note 6)."""
    target = upstream + encoded_path + (f"?{raw_query}" if raw_query else "")
    return URL(target, encoded=True)


def is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade", "")
    return upgrade.lower() == "websocket" and request.method == "GET"


class UpstreamProxy:
    """Streams requests to upstreams over one shared connection pool."""

    def __init__(self, session: aiohttp.ClientSession, *, connect_timeout: float = 5.0):
        self._session = session
        self._connect_timeout = connect_timeout
        # One ClientTimeout per distinct route timeout (a handful), not one per request.
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _timeout(self, read_timeout: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(read_timeout)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=read_timeout
            )
            self._timeouts[read_timeout] = timeout
        return timeout

    @staticmethod
    def new_client_session(*, limit: int = 0) -> aiohttp.ClientSession:
        """The pooled client the proxy needs: no decompression, no cookie jar, no env proxies."""
        connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300, enable_cleanup_closed=True)
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
    ) -> aiohttp.ClientResponse:
        """Send the request upstream and return once the answer's headers are in.

        Connection failures become 502, no answer within ``read_timeout`` becomes 504; both before
        anything was sent to the browser, so the caller can still show an error page.
        """
        body = request.content if request.body_exists else None
        try:
            return await self._session.request(
                request.method,
                url,
                headers=CIMultiDict(headers),
                data=body,
                allow_redirects=False,
                compress=None,
                timeout=self._timeout(read_timeout),
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(
                f"the app at {url.origin()} did not answer within {read_timeout:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"the app at {url.origin()} cannot be reached ({type(exc).__name__})"
            ) from exc

    @staticmethod
    async def relay(
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        headers: Sequence[tuple[str, str]],
    ) -> web.StreamResponse:
        """Stream the upstream's answer to the browser, chunk by chunk."""
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in headers:
            response.headers.add(name, value)
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            await response.write_eof()
        except (TimeoutError, aiohttp.ClientError, ConnectionResetError) as exc:
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
        request: web.Request,
        url: URL,
        headers: Sequence[tuple[str, str]],
        *,
        read_timeout: float,
    ) -> web.WebSocketResponse:
        """Open the upstream websocket first (failure → 502 page), then pump both ways."""
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
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
