"""Shutdown, config reload and worker processes of a real gateway process.

What an orchestrator and an operator do to a running gateway: SIGTERM it with a request in
flight, edit its config file (in place, and the way a Kubernetes ConfigMap update swaps a
symlink), break that file, SIGHUP it, and run it as several workers on one port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_proc import (
    START_DEADLINE,
    GatewayProcess,
    free_port,
)
from tests.support.login import browser_login
from tests.support.world import GatewayWorld, open_world

pytestmark = [pytest.mark.provider]

JSON = {"Accept": "application/json"}
RELOAD_DEADLINE = 10.0  # watch_interval is 0.5 s in these tests


async def bob_login(session: aiohttp.ClientSession, url: str) -> int:
    """Sign in as bob (group sales, not admins) from ``url``; the status landed on."""
    return (await browser_login(session, url, username="bob", password="builder")).status


class World(GatewayWorld):
    def config(self, port: int, **server: Any) -> dict[str, Any]:
        up = self.upstream.url
        config = self.base_config(
            port,
            routes=[
                {"name": "slow", "match": {"path": "/slow"}, "upstream": up, "auth": "public"},
                {"name": "public", "match": {"path": "/public/"}, "upstream": up,
                 "auth": "public"},
                {"name": "admin", "match": {"path": "/admin"}, "upstream": up,
                 "allow": {"groups": ["admins"]}},
                {"name": "app", "match": {"path": "/"}, "upstream": up},
            ],
        )
        config["server"].update({"watch_interval": "0.5s", **server})
        return config


@pytest.fixture
async def world(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(World, oidc_provider, tmp_path) as w:
        yield w


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def until(what: str, check: Callable[[], Awaitable[bool]],
                deadline: float = RELOAD_DEADLINE) -> float:
    """Poll ``check`` until it is true; the seconds it took. Bounded by ``deadline``."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < deadline, f"not within {deadline} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, headers=JSON, allow_redirects=False) as r:
        await r.read()
        return r.status


async def refused(url: str) -> bool:
    """Whether a new connection to ``url`` is refused."""
    try:
        async with aiohttp.ClientSession() as http, http.get(
            url, timeout=aiohttp.ClientTimeout(total=2)
        ) as r:
            await r.read()
            return False
    except aiohttp.ClientConnectorError:
        return True


def json_logs(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]


async def wait_exit(proc: subprocess.Popen[bytes], deadline: float) -> int:
    started = time.monotonic()
    while proc.poll() is None:
        assert time.monotonic() - started < deadline, "the gateway did not exit in time"
        await asyncio.sleep(0.05)
    return proc.returncode


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as r:
        return r.status, await r.text()


async def in_flight_at_least(http: aiohttp.ClientSession, gw: GatewayProcess, n: int) -> None:
    """Until ``n`` requests are in flight (the scrape itself is one of them)."""

    async def check() -> bool:
        async with http.get(f"{gw.url}/metrics") as r:
            return metric(await r.text(), "oidc_gateway_requests_in_flight") >= n

    await until(f"{n} requests in flight", check, deadline=5.0)


# ---------------------------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------------------------


async def test_sigterm_turns_ready_off_finishes_in_flight_refuses_new_and_exits_0(
    world: World,
) -> None:
    port = free_port()
    gw = await world.start(world.config(port, shutdown_delay="2s", shutdown_timeout="8s"))
    async with aiohttp.ClientSession() as http:
        slow = asyncio.create_task(fetch(http, f"{gw.url}/slow?delay=5"))
        await in_flight_at_least(http, gw, 2)
        gw.proc.send_signal(signal.SIGTERM)
        # /ready says "not me" at once, on a new connection, while the listener still accepts
        # (shutdown_delay) so that a load balancer polling it can stop sending first.
        async with aiohttp.ClientSession() as fresh:

            async def draining() -> bool:
                async with fresh.get(f"{gw.url}/ready") as r:
                    return r.status == 503 and (await r.json())["draining"] is True

            await until("/ready answers 503", draining, 1.5)
        # After shutdown_delay, new connections are refused while the slow request runs on.
        await until("new connections refused", lambda: refused(f"{gw.url}/ping"), 5.0)
        assert not slow.done()
        assert await asyncio.wait_for(slow, 10) == (200, "late")
    assert await wait_exit(gw.proc, 10) == 0
    messages = [line["msg"] for line in json_logs(gw)]
    assert "shutting down: draining" in messages
    assert messages[-1] == "stopped"


async def test_a_request_longer_than_the_grace_is_cut_and_the_exit_is_still_0(
    world: World,
) -> None:
    gw = await world.start(world.config(free_port(), shutdown_timeout="1s"))
    async with aiohttp.ClientSession() as http:
        slow = asyncio.create_task(fetch(http, f"{gw.url}/slow?delay=6"))
        await in_flight_at_least(http, gw, 2)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(gw.proc, 10) == 0
        took = time.monotonic() - started
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(slow, 5)
    # aiohttp gives the handler the grace, then as long again to react to cancellation.
    assert took < 4.0


# ---------------------------------------------------------------------------------------------
# Reload
# ---------------------------------------------------------------------------------------------


def configmap_layout(
    directory: Path, config: dict[str, Any]
) -> tuple[Path, Callable[[dict[str, Any]], None]]:
    """The files of a Kubernetes ConfigMap volume: ``config.yaml -> ..data/config.yaml`` and
    ``..data -> ..<version>``; an update writes a new version directory and swaps ``..data``
    atomically (a rename over the old symlink). Returns the path and the update function."""
    directory.mkdir(parents=True, exist_ok=True)
    versions = iter(range(1, 1000))

    def publish(new: dict[str, Any]) -> None:
        version = directory / f"..2026_{next(versions):03d}"
        version.mkdir()
        (version / "config.yaml").write_text(yaml.safe_dump(new))
        tmp_link = directory / "..data_tmp"
        tmp_link.symlink_to(version.name)
        os.replace(tmp_link, directory / "..data")

    publish(config)
    (directory / "config.yaml").symlink_to("..data/config.yaml")
    return directory / "config.yaml", publish


def spawn_at(path: Path, port: int, log_path: Path) -> GatewayProcess:
    """``python -m gateway run -c path``, the path as given (symlinks and all)."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(path)],
                                stdout=log, stderr=subprocess.STDOUT)
    return GatewayProcess(f"http://127.0.0.1:{port}", port, path, log_path, proc)


async def start_at(world: World, path: Path, port: int) -> GatewayProcess:
    """:func:`spawn_at`, then wait (bounded) until /ready answers 200."""
    gw = spawn_at(path, port, world.tmp / f"gateway-{port}.log")
    proc = gw.proc
    world.gateways.append(gw)
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert proc.poll() is None, gw.logs()
            try:
                return await status_of(http, f"{gw.url}/ready") == 200
            except aiohttp.ClientError:
                return False

        await until("the gateway is ready", ready, START_DEADLINE)
    return gw


async def test_a_configmap_update_changes_access_keeps_sessions_and_in_flight_requests(
    world: World,
) -> None:
    port = free_port()
    config = world.config(port)
    path, publish = configmap_layout(world.tmp / "configmap", config)
    gw = await start_at(world, path, port)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as bob:
        assert await bob_login(bob, f"{gw.url}/app") == 200
        assert await status_of(bob, f"{gw.url}/admin") == 403
        slow = asyncio.create_task(fetch(bob, f"{gw.url}/slow?delay=2"))
        await in_flight_at_least(bob, gw, 2)

        # The operator lets the sales group into /admin.
        config["routes"][2]["allow"] = {"groups": ["admins", "sales"]}
        publish(config)
        took = await until("bob reaches /admin",
                           lambda: _is(status_of(bob, f"{gw.url}/admin"), 200))
        # The same session cookie still works: the memory store (and its sessions) was kept.
        assert await status_of(bob, f"{gw.url}/app") == 200
        # The request that was running during the reload finished normally.
        assert await asyncio.wait_for(slow, 10) == (200, "late")

        # An invalid file: the old config keeps serving, the problem is logged with its path.
        broken = json.loads(json.dumps(config))
        broken["routes"][2]["alow"] = broken["routes"][2].pop("allow")
        publish(broken)

        def reload_failed() -> Awaitable[bool]:
            return _true(any(line["msg"].startswith("config reload failed")
                             for line in json_logs(gw)))

        await until("the failed reload is logged", reload_failed)
        assert await status_of(bob, f"{gw.url}/admin") == 200
        async with bob.get(f"{gw.url}/metrics") as r:
            text = await r.text()
        assert metric(text, "oidc_gateway_config_last_reload_successful") == 0
        assert metric(text, "oidc_gateway_config_reloads_total", result="ok") == 1
        assert metric(text, "oidc_gateway_config_reloads_total", result="failed") == 1
    failure = next(line for line in json_logs(gw)
                   if line["msg"].startswith("config reload failed"))
    assert failure["level"] == "error"
    assert "routes[2].alow: unknown key" in failure["problems"]
    assert failure["config"] == str(path)
    assert took < 5.0  # polled every 0.5 s


async def test_sighup_reloads_an_edited_file(world: World) -> None:
    port = free_port()
    config = world.config(port, watch_config=False)
    config["routes"][2]["allow"] = {"groups": ["admins", "sales"]}
    gw = await world.start(config)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as bob:
        assert await bob_login(bob, f"{gw.url}/admin") == 200
        config["routes"][2]["allow"] = {"groups": ["admins"]}
        gw.config_path.write_text(yaml.safe_dump(config))
        gw.proc.send_signal(signal.SIGHUP)
        await until("bob is refused /admin", lambda: _is(status_of(bob, f"{gw.url}/admin"), 403))
    reloaded = [line for line in json_logs(gw) if line["msg"] == "config reloaded"]
    assert [line["trigger"] for line in reloaded] == ["SIGHUP"]


@pytest.mark.redis
async def test_a_reload_onto_another_redis_and_provider_client_keeps_serving(
    world: World, redis_server_factory: Any
) -> None:
    first, second = redis_server_factory(persist=False), redis_server_factory(persist=False)
    port = free_port()
    config = world.config(port, watch_config=False)
    config["session"].update({"store": "redis", "redis_url": first.url})
    gw = await world.start(config)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as alice:
        assert (await browser_login(alice, f"{gw.url}/app")).status == 200
        slow = asyncio.create_task(fetch(alice, f"{gw.url}/slow?delay=2"))
        await in_flight_at_least(alice, gw, 2)
        # Another Redis and another provider setting: a new store and provider client.
        config["session"]["redis_url"] = second.url
        config["provider"]["timeout"] = "4s"
        gw.config_path.write_text(yaml.safe_dump(config))
        gw.proc.send_signal(signal.SIGHUP)
        await until("reloaded", lambda: _true(
            any(line["msg"] == "config reloaded" for line in json_logs(gw))))
        # The session lives in the first Redis, which this gateway no longer reads.
        assert await status_of(alice, f"{gw.url}/app") == 401
        assert (await browser_login(alice, f"{gw.url}/app")).status == 200
        assert await asyncio.wait_for(slow, 10) == (200, "late")
        assert await status_of(alice, f"{gw.url}/ready") == 200
        async with alice.get(f"{gw.url}/metrics") as r:
            text = await r.text()
    assert metric(text, "oidc_gateway_session_store_errors_total") == 0
    assert metric(text, "oidc_gateway_logins_total", result="ok") == 2
    assert not [line for line in json_logs(gw) if line["level"] == "error"]


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def _true(value: bool) -> bool:
    return value


# ---------------------------------------------------------------------------------------------
# server.workers
# ---------------------------------------------------------------------------------------------


async def test_two_workers_serve_one_port_count_together_and_stop_together(
    world: World,
) -> None:
    port = free_port()
    gw = await world.start(world.config(port, workers=2, watch_config=False))

    def listening() -> list[dict[str, Any]]:
        return [line for line in json_logs(gw) if line["msg"] == "listening"]

    await until("both workers listen", lambda: _true(len(listening()) == 2), START_DEADLINE)
    worker_pids = {line["pid"] for line in listening()}
    assert len(worker_pids) == 2
    assert gw.proc.pid not in worker_pids
    # The memory store with several workers: sessions are per process, and the log says so.
    assert any("session.store: memory" in line["msg"] for line in json_logs(gw))

    # New connections each time: the kernel spreads them over the workers.
    for _ in range(40):
        async with aiohttp.ClientSession() as http:
            assert await status_of(http, f"{gw.url}/ping") == 200

    def ping_pids() -> set[int]:
        return {line["pid"] for line in json_logs(gw)
                if line["logger"] == "gateway.access" and line["route"] == "/ping"}

    await until("40 pings logged", lambda: _true(
        sum(1 for line in json_logs(gw) if line["logger"] == "gateway.access"
            and line["route"] == "/ping") >= 40), 5.0)
    assert ping_pids() == worker_pids
    # Whichever worker answers /metrics counts the requests of both: its own at once, the
    # other's within a second (each worker hands its counts over every second).
    async def scrape() -> str:
        async with aiohttp.ClientSession() as http, http.get(
            f"{gw.url}/metrics", headers={"Connection": "close"}
        ) as r:
            return await r.text()

    async def counted_both() -> bool:
        return metric(await scrape(), "oidc_gateway_requests_total", route="/ping") == 40

    await until("a scrape counts both workers' pings", counted_both, 3.0)
    async with aiohttp.ClientSession() as http:
        for _ in range(4):
            async with http.get(f"{gw.url}/metrics", headers={"Connection": "close"}) as r:
                text = await r.text()
            assert metric(text, "oidc_gateway_requests_total", route="/ping") == 40
            assert metric(text, "oidc_gateway_provider_ready") == 1  # both workers

    # SIGHUP to the supervisor reaches both workers.
    gw.proc.send_signal(signal.SIGHUP)
    await until("both workers reloaded", lambda: _true(
        {line["pid"] for line in json_logs(gw) if line["msg"].startswith("config reload")}
        == worker_pids))

    gw.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(gw.proc, 15) == 0
    assert await refused(f"{gw.url}/ping")
    for pid in worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
