"""A config reload frees what the previous config built, so reloads do not grow the process.

The gateway serves with raised garbage-collector thresholds (``gateway.app.GC_THRESHOLDS``,
issue 7), under which a full collection may not run for hours on a quiet gateway; the
previous config's gateway (cycles of objects) is collected when it is retired instead. Here
the collector is off while the test runs, so only that collection can free it.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import time
import weakref
from typing import Any

import pytest
from aiohttp import web

from gateway.app import LIVE, create_app
from gateway.config import parse_config
from tests.support.config_source import FixedSource
from tests.support.gateway_proc import free_port, gateway_config


@pytest.mark.provider
async def test_each_reload_frees_the_config_it_replaces(oidc_provider: Any) -> None:
    port = free_port()
    client_id, secret = oidc_provider.register_client(
        [f"http://127.0.0.1:{port}/oauth2/callback"])
    base = gateway_config(port=port, issuer=oidc_provider.issuer, client_id=client_id,
                          client_secret=secret, upstream="http://127.0.0.1:9")
    app = create_app(parse_config(base, {}))
    runner = web.AppRunner(app)
    await runner.setup()
    gc.disable()
    try:
        live = app[LIVE]
        replaced: list[weakref.ref[Any]] = []
        for group in ("sales", "ops", "finance"):
            edited = copy.deepcopy(base)
            edited["routes"][1]["allow"] = {"groups": ["admins", group]}  # a route change only
            replaced.append(weakref.ref(live.current.gateway))
            assert await live.reload(FixedSource(parse_config(edited, {})), trigger="test")
        serving = live.current.gateway
        # The first is the one app[GATEWAY] keeps (the gateway built at start-up); every
        # gateway a reload built and a later reload replaced is gone once retired.
        built_by_reloads = replaced[1:]
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in built_by_reloads):
            assert time.monotonic() < deadline, "a replaced config's gateway is still alive"
            await asyncio.sleep(0.02)
        assert live.current.gateway is serving
        assert replaced[0]() is not None
    finally:
        gc.enable()
        await runner.cleanup()
