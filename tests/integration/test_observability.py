"""Metrics, access and audit logs, request ids: what an operator reads, from a real gateway.

Each test starts ``python -m gateway run`` in front of the echo upstream, drives it like a
browser (and like scripts and proxies), then reads what the operator would read: ``/metrics``
as Prometheus parses it, and the JSON (or text) log lines the process wrote.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_proc import GatewayProcess, free_port
from tests.support.login import browser_login
from tests.support.world import GatewayWorld, open_world

pytestmark = [pytest.mark.provider]

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
JSON = {"Accept": "application/json"}


async def bob_login(session: aiohttp.ClientSession, url: str) -> int:
    """Sign in as bob (group sales, not admins) from ``url``; the status landed on."""
    return (await browser_login(session, url, username="bob", password="builder")).status


class World(GatewayWorld):
    async def start_with(self, *, port: int | None = None, **changes: Any) -> GatewayProcess:
        """A gateway with a client of its own at the test provider; ``changes`` are merged
        into the config's top-level sections (``server={...}``, ``logging={...}``)."""
        port = port or free_port()
        config = self.base_config(port, **changes.pop("store_args", {}))
        for section, values in changes.items():
            if isinstance(config.get(section), dict):
                config[section].update(values)
            else:
                config[section] = values
        return await self.start(config)


@pytest.fixture
async def world(oidc_provider: Any, tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(World, oidc_provider, tmp_path) as w:
        yield w


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total, seen = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                seen = True
    assert seen, f"no sample {name}{labels} in /metrics"
    return total


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def log_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    """The JSON lines written whole so far: a line another request's turn is writing at this
    moment may be read half-written (a reader of a file can see a write(2) in progress), and
    every whole line ends in a newline."""
    text = gw.logs()
    out = []
    for line in text[:text.rfind("\n") + 1].splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def logged(gw: GatewayProcess, *needles: str) -> list[str]:
    """The gateway's log lines, once one line holds every needle (a streamed answer reaches
    the client a moment before its log lines are written). Bounded: 5 s."""
    deadline = asyncio.get_running_loop().time() + 5.0
    while True:
        lines = gw.logs().splitlines()
        if any(all(n in line for n in needles) for line in lines):
            return lines
        assert asyncio.get_running_loop().time() < deadline, f"not logged: {needles}"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------


async def test_metrics_count_requests_by_route_status_and_decision(world: World) -> None:
    gw = await world.start_with()
    async with browser() as alice, browser() as bob, aiohttp.ClientSession() as anon:
        for _ in range(3):
            async with anon.get(f"{gw.url}/public/a") as r:
                assert r.status == 200
        async with anon.get(f"{gw.url}/app", headers=HTML, allow_redirects=False) as r:
            assert r.status == 302  # a browser is sent to sign in
        async with anon.get(f"{gw.url}/app", headers=JSON) as r:
            assert r.status == 401  # a script is told
        assert (await browser_login(alice, f"{gw.url}/admin")).status == 200
        assert await bob_login(bob, f"{gw.url}/app/x") == 200
        async with bob.get(f"{gw.url}/admin", headers=HTML) as r:
            assert r.status == 403
        async with anon.get(f"{gw.url}/oauth2/callback?state=forged&code=x",
                            headers=HTML) as r:
            assert r.status == 400  # a failed login
        async with alice.get(f"{gw.url}/oauth2/sign_out") as r:
            assert r.status in (200, 302)
        text = await scrape(anon, f"{gw.url}/metrics")

    req = "oidc_gateway_requests_total"
    assert value(text, req, route="public", status="2xx", decision="public") == 3
    assert value(text, req, route="app", status="3xx", decision="login_redirect") == 2
    assert value(text, req, route="admin", status="3xx", decision="login_redirect") == 1
    assert value(text, req, route="app", status="4xx", decision="unauthenticated_401") == 1
    assert value(text, req, route="admin", status="2xx", decision="allowed") == 1
    assert value(text, req, route="admin", status="4xx", decision="denied") == 1
    assert value(text, req, route="app", status="2xx", decision="allowed") == 1
    assert value(text, req, route="/oauth2/callback", decision="endpoint") == 3
    assert value(text, "oidc_gateway_logins_total", result="ok") == 2
    assert value(text, "oidc_gateway_logins_total", result="failed") == 1
    assert value(text, "oidc_gateway_logouts_total", result="ok") == 1
    # Present from the start, for whoever refreshes tokens to count into.
    assert value(text, "oidc_gateway_refreshes_total", result="failed") == 0
    # Gateway and upstream latency, apart: the upstream saw the 5 forwarded requests only.
    assert value(text, "oidc_gateway_upstream_duration_seconds_count", route="public") == 3
    assert value(text, "oidc_gateway_upstream_duration_seconds_count") == 5
    assert value(text, "oidc_gateway_request_duration_seconds_count", route="public") == 3
    # The session store: timed per operation, no errors. No session was read from it: each
    # login keeps the session it wrote in this process's cache, where the page it returns to,
    # bob's next request and alice's sign-out found it.
    assert value(text, "oidc_gateway_session_store_duration_seconds_count", operation="get") == 0
    assert value(text, "oidc_gateway_session_cache_total", result="hit") >= 3
    # Each login marks its state used and creates its session (SET NX both); the states
    # themselves travelled with the browser, none was stored or taken back (pop).
    assert value(text, "oidc_gateway_session_store_duration_seconds_count",
                 operation="set_new") == 4
    assert value(text, "oidc_gateway_session_store_duration_seconds_count", operation="pop") == 0
    assert value(text, "oidc_gateway_session_store_errors_total") == 0
    assert value(text, "oidc_gateway_provider_ready") == 1
    assert value(text, "oidc_gateway_draining") == 0
    assert value(text, "oidc_gateway_requests_in_flight") == 1  # this scrape


async def test_access_and_audit_lines_name_the_decision_and_never_a_secret(
    world: World,
) -> None:
    gw = await world.start_with()
    async with browser() as bob:
        assert await bob_login(bob, f"{gw.url}/app/page?token=not-logged") == 200
        async with bob.get(f"{gw.url}/admin", headers=HTML) as r:
            assert r.status == 403
            denied_id = r.headers["X-Request-Id"]
            assert denied_id in await r.text()  # the page's reference is the log line's id
        async with bob.get(f"{gw.url}/app/echo") as r:
            assert r.status == 200
            allowed_id = r.headers["X-Request-Id"]
            echoed = {k.lower(): v for k, v in (await r.json())["headers"]}
        secrets = [c.value for c in bob.cookie_jar if c.key.startswith("_oidc_gateway")]
        assert len(secrets) == 2  # the session ticket and the login binding
    # The upstream got the very id the browser was shown and the log has.
    assert echoed["x-request-id"] == allowed_id

    await logged(gw, allowed_id, "gateway.access")
    lines = log_lines(gw)
    access = {line["request_id"]: line for line in lines if line["logger"] == "gateway.access"}
    audit = {line["request_id"]: line for line in lines if line["logger"] == "gateway.audit"}
    denied = audit[denied_id]
    assert denied["decision"] == "denied"
    assert denied["user"] == "bob"
    assert denied["route"] == "admin"
    assert denied["status"] == 403
    assert denied["reason"] == 'denied: no allow rule of route "admin" matches user "bob"'
    assert denied["rule"] == "-"
    assert denied["msg"] == "access denied"
    assert isinstance(denied["duration_ms"], float | int)
    allowed = audit[allowed_id]
    assert (allowed["decision"], allowed["user"], allowed["route"], allowed["status"]) == (
        "allowed", "bob", "app", 200)
    assert allowed["reason"] == "signed in; route has no allow rules"
    assert access[allowed_id]["path"] == "/app/echo"
    assert access[allowed_id]["decision"] == "allowed"
    assert access[denied_id]["reason"] == "policy_denied"
    # One access line per request; audit lines only for access decisions (not /ping...).
    assert len(access) == sum(1 for line in lines if line["logger"] == "gateway.access")
    callback = [line for line in access.values() if line["route"] == "/oauth2/callback"]
    assert callback
    assert all(line["request_id"] not in audit for line in callback)

    text = gw.logs()
    for secret in secrets:
        assert secret not in text
    assert "not-logged" not in text  # query strings are not logged
    assert "code=" not in text


async def test_a_request_answered_at_once_finds_its_lines_written_before_its_answer(
    world: World,
) -> None:
    """401s and redirects to the provider without a session are answered before aiohttp
    parses them, their lines written together once per event-loop turn (issue 7): still,
    when a client has its answer, the log already holds its audit and access lines, the same
    lines (but for the id, time and duration) as the same 401 answered the long way."""
    gw = await world.start_with(logging={"access_log": True})

    async def fetch(path: str, headers: dict[str, str]) -> tuple[int, str, set[str]]:
        async with aiohttp.ClientSession() as client, client.get(
                f"{gw.url}{path}", headers=headers, allow_redirects=False) as r:
            request_id = r.headers["X-Request-Id"]
            # Read the moment the answer is here: no waiting for the lines.
            written = {line["logger"] for line in log_lines(gw)
                       if line.get("request_id") == request_id}
            return r.status, request_id, written

    answers = await asyncio.gather(
        *(fetch(f"/app/api/{i}", JSON) for i in range(30)),
        *(fetch(f"/app/page/{i}", HTML) for i in range(10)))
    assert sorted({status for status, _, _ in answers}) == [302, 401]
    for status, request_id, written in answers:
        assert written == {"gateway.audit", "gateway.access"}, (status, request_id)

    # The long way: a cookie that is no session sends the request through handle().
    status, long_way, written = await fetch("/app/api/0", {**JSON, "Cookie": "other=1"})
    assert status == 401
    assert written == {"gateway.audit", "gateway.access"}
    at_once = answers[0][1]
    by_id: dict[tuple[str, str], dict[str, Any]] = {
        (line["request_id"], line["logger"]): line for line in log_lines(gw)
        if "request_id" in line}
    for logger in ("gateway.audit", "gateway.access"):
        fast, slow = by_id[(at_once, logger)], by_id[(long_way, logger)]
        for line in (fast, slow):
            for key in ("time", "request_id", "duration_ms"):
                line.pop(key)
        assert fast == slow
        assert list(fast) == list(slow)
    assert fast["decision"] == "unauthenticated_401"


async def test_a_signed_in_answer_finds_its_lines_written_before_it(world: World) -> None:
    """Whole answers of signed-in requests also wait for the end of the event-loop turn, their
    lines written first, together (issue 7): a client holding its answer finds them."""
    gw = await world.start_with(logging={"access_log": True})
    async with browser() as bob:
        assert await bob_login(bob, f"{gw.url}/app/page") == 200

        async def fetch(i: int) -> tuple[int, str, set[str]]:
            async with bob.get(f"{gw.url}/app/echo?n={i}") as r:
                request_id = r.headers["X-Request-Id"]
                written = {line["logger"] for line in log_lines(gw)
                           if line.get("request_id") == request_id}
                return r.status, request_id, written

        answers = await asyncio.gather(*(fetch(i) for i in range(20)))
    for status, request_id, written in answers:
        assert status == 200
        assert written == {"gateway.audit", "gateway.access"}, request_id
    # The same user and page: lines made from one template (Gateway._line_template), each
    # with its own request id, time and duration.
    ids = {request_id for _, request_id, _ in answers}
    assert len(ids) == 20
    for logger in ("gateway.audit", "gateway.access"):
        mine = [line for line in log_lines(gw)
                if line["logger"] == logger and line.get("request_id") in ids]
        assert len(mine) == 20
        assert all(isinstance(line.pop("duration_ms"), float | int) for line in mine)
        assert all(line.pop("time").endswith("Z") for line in mine)
        assert {line.pop("request_id") for line in mine} == ids
        assert all(line == mine[0] for line in mine)
        assert (mine[0]["path"], mine[0]["user"], mine[0]["status"]) == ("/app/echo", "bob", 200)


async def test_a_trusted_proxys_request_id_is_kept_and_anyone_elses_replaced(
    world: World,
) -> None:
    trusting = await world.start_with(server={"trusted_proxies": ["127.0.0.1/32"]})
    plain = await world.start_with()
    async with aiohttp.ClientSession() as http:

        async def ids(gw: GatewayProcess, sent: str) -> tuple[str, str]:
            async with http.get(f"{gw.url}/public/x", headers={"X-Request-Id": sent}) as r:
                assert r.status == 200
                body = await r.json()
                upstream = [v for k, v in body["headers"] if k.lower() == "x-request-id"]
                assert len(upstream) == 1
                return r.headers["X-Request-Id"], upstream[0]

        assert await ids(trusting, "ingress-7f3a.42") == ("ingress-7f3a.42", "ingress-7f3a.42")
        for unsafe in ("<script>", "a b", "x" * 200):
            shown, forwarded = await ids(trusting, unsafe)
            assert shown == forwarded
            assert re.fullmatch(r"[0-9a-f]{16}", shown)
        shown, forwarded = await ids(plain, "ingress-7f3a.42")
        assert shown == forwarded != "ingress-7f3a.42"
        # Errors carry it too, in the header and on the page.
        async with http.get(f"{plain.url}/oauth2/nothing", headers=HTML) as r:
            assert r.status == 404
            assert r.headers["X-Request-Id"] in await r.text()


async def test_text_format_writes_the_same_fields_as_key_values(world: World) -> None:
    gw = await world.start_with(logging={"format": "text"})
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/public/x y") as r:
        assert r.status == 200
        rid = r.headers["X-Request-Id"]
    lines = await logged(gw, " gateway.access: request ", f"request_id={rid}")
    line = next(line for line in lines
                if " gateway.access: request " in line and f"request_id={rid}" in line)
    for field in ("method=GET", 'path="/public/x y"', "status=200", "route=public",
                  "decision=public", "user=-", "client_ip=127.0.0.1", "duration_ms="):
        assert field in line, line
    audit = next(line for line in lines
                 if " gateway.audit: public access " in line and f"request_id={rid}" in line)
    assert 'reason="public route"' in audit


async def test_metrics_listen_moves_metrics_off_the_main_port(world: World) -> None:
    metrics_port = free_port()
    gw = await world.start_with(server={"metrics_listen": f"127.0.0.1:{metrics_port}"})
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/public/x") as r:
            assert r.status == 200
        # Not on the port the ingress exposes: there /metrics is a path like any other,
        # here one the app route claims (sign-in needed).
        async with http.get(f"{gw.url}/metrics", headers=JSON) as r:
            assert r.status == 401
            assert "oidc_gateway" not in await r.text()
        text = await scrape(http, f"http://127.0.0.1:{metrics_port}/metrics")
    assert value(text, "oidc_gateway_requests_total", route="public", decision="public") == 1
    assert value(text, "oidc_gateway_requests_total", route="app", status="4xx",
                 decision="unauthenticated_401") == 1


@pytest.mark.redis
async def test_session_store_errors_are_counted_and_fail_closed(
    world: World, redis_server_factory: Any
) -> None:
    redis = redis_server_factory(persist=False)
    gw = await world.start_with(store_args={"store": "redis", "redis_url": redis.url},
                           session={"redis_timeout": "0.5s"})
    async with browser() as alice, aiohttp.ClientSession() as http:
        assert (await browser_login(alice, f"{gw.url}/app/x")).status == 200
        redis.stop()
        async with alice.get(f"{gw.url}/app/x", headers=JSON) as r:
            assert r.status == 503
        text = await scrape(http, f"{gw.url}/metrics")
    assert value(text, "oidc_gateway_session_store_errors_total", operation="get") >= 1
    assert value(text, "oidc_gateway_requests_total", route="app", status="5xx",
                 decision="error") == 1
    await logged(gw, '"status":503', '"route":"app"', "gateway.access")
    line = next(line for line in log_lines(gw) if line["logger"] == "gateway.access"
                and line["status"] == 503 and line["route"] == "app")
    assert line["reason"] == "session_store_unavailable"
