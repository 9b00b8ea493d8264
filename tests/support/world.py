"""One test's world: an echo upstream, the shared test provider, and the gateways it starts.

Integration test modules subclass ``GatewayWorld`` to add the config shapes they need; the
registration of a client, the start of a gateway and the cleanup live here once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.gateway_proc import GatewayProcess, gateway_config, start_gateway
from tests.support.upstream import Upstream, running_upstream


@dataclass
class GatewayWorld:
    upstream: Upstream
    provider: Any
    tmp: Path
    gateways: list[GatewayProcess] = field(default_factory=list)

    def register(
        self, *ports: int, auth_method: str = "client_secret_basic"
    ) -> tuple[str, str]:
        """A client at the test provider for gateways on these loopback ports."""
        origins = [f"http://127.0.0.1:{p}" for p in ports]
        return self.provider.register_client(  # type: ignore[no-any-return]
            redirect_uris=[f"{o}/oauth2/callback" for o in origins],
            post_logout_redirect_uris=[f"{o}/" for o in origins],
            auth_method=auth_method,
        )

    def base_config(
        self, port: int, *, client: tuple[str, str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """``gateway_config`` for this world's provider and upstream, with its own client."""
        auth = kwargs.get("token_endpoint_auth", "client_secret_basic")
        client_id, secret = client or self.register(port, auth_method=auth)
        return gateway_config(port=port, issuer=self.provider.issuer, client_id=client_id,
                              client_secret=secret, upstream=self.upstream.url, **kwargs)

    async def start(self, config: dict[str, Any], **kwargs: Any) -> GatewayProcess:
        gw = await start_gateway(config, directory=self.tmp, **kwargs)
        self.gateways.append(gw)
        return gw


W = TypeVar("W", bound=GatewayWorld)


@asynccontextmanager
async def open_world(kind: type[W], provider: Any, tmp: Path) -> AsyncIterator[W]:
    """The world, with every gateway it started stopped at the end, even when a test fails."""
    async with running_upstream() as upstream:
        world = kind(upstream, provider, tmp)
        try:
            yield world
        finally:
            for gw in world.gateways:
                gw.stop()
