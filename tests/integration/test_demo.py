"""``oidc-gateway demo``: the real command as a child process, driven over HTTP like a browser.

Each test starts ``python -m gateway demo`` on free ports, reads the URL and the demo users'
passwords from what it prints, and signs in through the demo provider's login form.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from gateway.demo_provider import require_loopback, serve_on_loopback
from gateway.errors import GatewayError
from tests.support.gateway_proc import free_port
from tests.support.login import browser_login, new_browser

START_DEADLINE = 30.0  # imports and an RSA key on a busy 2-core machine
STOP_DEADLINE = 10.0
JSON = {"Accept": "application/json"}


@dataclass
class Demo:
    proc: asyncio.subprocess.Process
    url: str
    ports: tuple[int, int, int]  # gateway, provider, app
    passwords: dict[str, str]
    banner: str
    stderr_path: Path

    @property
    def provider(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_DEADLINE)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


def three_free_ports() -> tuple[int, int, int]:
    ports: list[int] = []
    for _ in range(50):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == 3:
            return ports[0], ports[1], ports[2]
    raise RuntimeError("could not find three free ports")


async def spawn_demo(ports: tuple[int, int, int], tmp: Path) -> tuple[asyncio.subprocess.Process,
                                                                      Path]:
    stderr_path = tmp / f"demo-{ports[0]}.stderr"
    with stderr_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "demo", "--port", str(ports[0]),
            "--provider-port", str(ports[1]), "--app-port", str(ports[2]),
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )
    return proc, stderr_path


async def port_closed(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def start_demo(tmp: Path) -> Demo:
    """Start the demo and wait (bounded) for its banner and for its printed URL to answer."""
    ports = three_free_ports()
    proc, stderr_path = await spawn_demo(ports, tmp)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + START_DEADLINE
    while not lines or not lines[-1].startswith("Ctrl-C"):
        remaining = deadline - time.monotonic()
        try:
            raw = await asyncio.wait_for(proc.stdout.readline(), max(remaining, 0.01))
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"no banner in {START_DEADLINE}s: {lines}\n"
                                 f"{stderr_path.read_text()}") from None
        if not raw:
            await proc.wait()
            raise AssertionError(f"demo exited with {proc.returncode}: {lines}\n"
                                 f"{stderr_path.read_text()}")
        lines.append(raw.decode().rstrip("\n"))
    banner = "\n".join(lines)
    opened = re.search(r"^Open (http://\S+)$", banner, re.M)
    assert opened, banner
    passwords = dict(re.findall(r"^\s+(\w+)\s+password: (\S+)", banner, re.M))
    demo = Demo(proc, opened.group(1), ports, passwords, banner, stderr_path)
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            try:
                async with http.get(demo.url, headers=JSON,
                                    timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    await resp.read()
                    return demo
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.1)
    await demo.stop()
    raise AssertionError(f"{demo.url} does not answer:\n{demo.stderr()}")


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    running = await start_demo(tmp_path)
    try:
        yield running
    finally:
        await running.stop()


def header_cell(page: str, name: str) -> str | None:
    """The value the echo page shows for header ``name`` (None when it was not sent)."""
    found = re.search(rf"<th>{re.escape(name)}</th><td( class=\"empty\")?>([^<]*)</td>", page)
    assert found, f"no row for {name} in:\n{page}"
    return None if found.group(1) else found.group(2)


async def test_banner_names_the_url_users_and_who_sees_which_route(demo: Demo) -> None:
    assert demo.url == f"http://127.0.0.1:{demo.ports[0]}/"
    assert set(demo.passwords) == {"alice", "bob"}
    assert "not for production" in demo.banner
    assert re.search(r"/admin\s+group admins only \(alice; bob: 403 Forbidden\)", demo.banner)
    assert re.search(r":\d+/\s+every signed-in user \(alice, bob\)", demo.banner)


async def test_alice_sees_her_identity_and_the_admin_route_bob_gets_403(demo: Demo) -> None:
    gw = demo.url.rstrip("/")
    async with new_browser() as browser:
        alice = await browser_login(browser, demo.url, username="alice",
                                    password=demo.passwords["alice"])
        assert alice.status == 200, alice.text
        assert alice.visited_provider()
        assert urlsplit(alice.trace[1][1]).netloc == f"127.0.0.1:{demo.ports[1]}"
        assert "Echo app" in alice.text
        assert header_cell(alice.text, "X-Forwarded-User") == "alice"
        assert header_cell(alice.text, "X-Forwarded-Groups") == "admins,staff"
        assert header_cell(alice.text, "X-Forwarded-Email") == "alice@demo.test"

        admin = await browser_login(browser, f"{gw}/admin", username="alice",
                                    password=demo.passwords["alice"])
        assert admin.status == 200
        assert not admin.visited_provider()  # already signed in
        assert header_cell(admin.text, "X-Forwarded-User") == "alice"

    async with new_browser() as browser:
        bob = await browser_login(browser, f"{gw}/admin", username="bob",
                                  password=demo.passwords["bob"])
        assert bob.status == 403
        assert bob.visited_provider()
        assert "alice" not in bob.text
        home = await browser_login(browser, demo.url, username="bob",
                                   password=demo.passwords["bob"])
        assert home.status == 200
        assert header_cell(home.text, "X-Forwarded-User") == "bob"
        assert header_cell(home.text, "X-Forwarded-Groups") == "staff"

    async with new_browser() as browser:
        public = await browser_login(browser, f"{gw}/public", username="", password="")
        assert public.status == 200
        assert not public.visited_provider()
        assert header_cell(public.text, "X-Forwarded-User") is None


async def test_wrong_password_stays_at_the_provider(demo: Demo) -> None:
    async with new_browser() as browser:
        result = await browser_login(browser, demo.url, username="alice", password="not-it")
        assert result.status == 401
        assert result.url == f"{demo.provider}/authorize"
        assert "Wrong user name or password" in result.text
        assert result.callback_url is None
        async with browser.get(demo.url.rstrip("/") + "/oauth2/userinfo") as resp:
            assert resp.status == 401


async def test_sign_out_ends_the_session_and_comes_back_through_the_provider(demo: Demo) -> None:
    gw = demo.url.rstrip("/")
    async with new_browser() as browser:
        alice = await browser_login(browser, demo.url, username="alice",
                                    password=demo.passwords["alice"])
        assert alice.status == 200
        async with browser.get(f"{gw}/oauth2/sign_out", allow_redirects=False) as out:
            assert out.status == 302
            end_session = out.headers["Location"]
        assert end_session.startswith(f"{demo.provider}/end_session?")
        async with browser.get(end_session, allow_redirects=False) as back:
            assert back.status == 302
            assert back.headers["Location"] == f"{gw}/"
        async with browser.get(f"{gw}/oauth2/userinfo") as resp:
            assert resp.status == 401


async def test_provider_requires_pkce_s256(demo: Demo) -> None:
    """Without a code challenge the provider sends the error back, with its issuer (RFC 9207)."""
    gw = demo.url.rstrip("/")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw}/", headers={"Accept": "text/html"},
                            allow_redirects=False) as start:
            authorize = start.headers["Location"]
        parts = urlsplit(authorize)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        del query["code_challenge"], query["code_challenge_method"]
        async with http.get(f"{demo.provider}/authorize", params=query,
                            allow_redirects=False) as resp:
            assert resp.status == 302
            answer = parse_qs(urlsplit(resp.headers["Location"]).query)
        assert answer["error"] == ["invalid_request"]
        assert answer["iss"] == [demo.provider]
        assert answer["state"] == [query["state"]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_all_three_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    demo = await start_demo(tmp_path)
    try:
        for port in demo.ports:
            assert not await port_closed(port)
    finally:
        code = await demo.stop(sig)
    assert code == 0, demo.stderr()
    for port in demo.ports:
        assert await port_closed(port), f"port {port} still open"
    assert "Traceback" not in demo.stderr()


async def test_a_taken_port_fails_clearly_and_leaves_nothing_running(tmp_path: Path) -> None:
    ports = three_free_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", ports[0]))
        taken.listen()
        proc, stderr_path = await spawn_demo(ports, tmp_path)
        try:
            code = await asyncio.wait_for(proc.wait(), START_DEADLINE)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    err = stderr_path.read_text()
    assert code == 1
    assert f"Port {ports[0]} on 127.0.0.1 is already in use" in err
    assert "Traceback" not in err
    for port in ports[1:]:
        assert await port_closed(port)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "localhost", "example.com"])
def test_demo_refuses_non_loopback_addresses(host: str) -> None:
    with pytest.raises(GatewayError, match="not for production") as caught:
        require_loopback(host)
    assert caught.value.reason == "demo_not_loopback"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1"])
def test_demo_accepts_loopback_addresses(host: str) -> None:
    require_loopback(host)


async def test_provider_site_is_never_bound_off_loopback() -> None:
    port = free_port()
    with pytest.raises(GatewayError, match="loopback"):
        await serve_on_loopback(web.Application(), "0.0.0.0", port, what="demo provider")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", port))  # still free: nothing was bound, not even 0.0.0.0
