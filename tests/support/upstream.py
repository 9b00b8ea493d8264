"""A real upstream app for the tests: echoes what it received, streams, stalls, speaks websocket.

It runs in the test's own event loop on 127.0.0.1 and a free port, so tests can assert exactly
which path, headers and body bytes the gateway forwarded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web


@dataclass
class Seen:
    """Every request the upstream received, newest last."""

    requests: list[dict[str, object]] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read() if request.can_read_body else b""
    record: dict[str, object] = {
        "method": request.method,
        "raw_path": request.raw_path,
        "path": request.path,
        "query": request.rel_url.raw_query_string,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    request.app[SEEN].requests.append(record)
    return web.json_response(record)


async def _upload(request: web.Request) -> web.Response:
    """Hash an upload chunk by chunk: proves streaming without holding it."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest(),
                              "content_encoding": request.headers.get("Content-Encoding")})


async def _download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "1048576"))
    response = web.StreamResponse()
    response.content_length = size
    response.content_type = "application/octet-stream"
    await response.prepare(request)
    chunk = bytes(range(256)) * 256  # 64 KiB, deterministic
    sent = 0
    while sent < size:
        part = chunk[: min(len(chunk), size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "5")))
    return web.Response(text="late")


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    user = request.headers.get("X-Forwarded-User", "")
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"{user}:{msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


def make_app() -> web.Application:
    app = web.Application(client_max_size=1024**2)
    app[SEEN] = Seen()
    app.router.add_route("POST", "/upload", _upload)
    app.router.add_get("/download", _download)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/ws", _ws)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


@dataclass
class Upstream:
    url: str
    seen: Seen


@asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    app = make_app()
    # auto_decompress off: the upload test checks that gzip bytes arrive untouched.
    runner = web.AppRunner(app, auto_decompress=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Upstream(f"http://127.0.0.1:{port}", app[SEEN])
    finally:
        await runner.cleanup()
