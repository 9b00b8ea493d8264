"""Run the real gateway (``python -m gateway run``) as a child process for integration tests.

Tests talk to it over loopback exactly as a browser or an ingress would; its JSON log is kept
in a file so a failing test can show it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

# Re-exported: most tests take it from here.
from tests.support.peers import free_port as free_port

START_DEADLINE = 20.0


def new_session_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def gateway_config(
    *,
    port: int,
    issuer: str,
    client_id: str,
    client_secret: str,
    upstream: str,
    store: str = "memory",
    redis_url: str | None = None,
    key_prefix: str = "oidcgw:",
    session_key: str | None = None,
    token_endpoint_auth: str = "client_secret_basic",  # noqa: S107 - a method name
    routes: list[dict[str, Any]] | None = None,
    session_extra: dict[str, Any] | None = None,
    provider_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config for a gateway on 127.0.0.1:port over plain http (cookies not Secure)."""
    session: dict[str, Any] = {
        "store": store,
        "key_prefix": key_prefix,
        "cookie": {"secure": False},
        "keys": [session_key or new_session_key()],
    }
    if redis_url:
        session["redis_url"] = redis_url
    session.update(session_extra or {})
    provider: dict[str, Any] = {
        "issuer": issuer,
        "client_id": client_id,
        "client_secret": client_secret,
        "scopes": ["openid", "email", "profile", "groups"],
        "token_endpoint_auth": token_endpoint_auth,
        "timeout": "5s",
    }
    provider.update(provider_extra or {})
    return {
        "version": 1,
        "server": {"listen": f"127.0.0.1:{port}", "shutdown_timeout": "2s"},
        "provider": provider,
        "session": session,
        "routes": routes
        if routes is not None
        else [
            {"name": "public", "match": {"path": "/public/"}, "upstream": upstream,
             "auth": "public"},
            {"name": "admin", "match": {"path": "/admin"}, "upstream": upstream,
             "allow": {"groups": ["admins"]}},
            {"name": "app", "match": {"path": "/"}, "upstream": upstream},
        ],
        "logging": {"level": "info", "format": "json"},
    }


@dataclass
class GatewayProcess:
    url: str
    port: int
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as Kubernetes does; kill only if it does not drain in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn_gateway(
    config: dict[str, Any], *, directory: Path, env: dict[str, str] | None = None
) -> GatewayProcess:
    """Write the config and start ``python -m gateway run`` on it; does not wait."""
    port = int(config["server"]["listen"].rsplit(":", 1)[1])
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / f"gateway-{port}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = directory / f"gateway-{port}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return GatewayProcess(f"http://127.0.0.1:{port}", port, config_path, log_path, proc)


async def start_gateway(
    config: dict[str, Any], *, directory: Path, env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> GatewayProcess:
    """Start a gateway and wait (bounded) until /ready answers 200, or /ping when told."""
    gw = spawn_gateway(config, directory=directory, env=env)
    proc = gw.proc
    probe = "/ready" if wait_ready else "/ping"
    deadline = time.monotonic() + START_DEADLINE
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.logs()}")
            try:
                async with http.get(gw.url + probe, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return gw
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                gw.stop()
                raise RuntimeError(f"gateway did not answer {probe} in time:\n{gw.logs()}")
            await asyncio.sleep(0.05)


