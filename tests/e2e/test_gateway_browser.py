"""The gateway (``python -m gateway run``) in a real browser, signing in at the test OP.

The OP is panva's oidc-provider (tests/op/server.js: alice in eng and admins, bob in sales).
The app behind the gateway is the demo's echo app, which shows the identity it received as a
page. Error pages are checked for what a person reads, and their reference id is looked up in
the gateway's own log.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, Request, expect

from gateway.demo import make_echo_app
from tests.e2e.conftest import (
    Tab,
    assert_readable_on_a_phone,
    echo_row,
    open_tab,
    reference_id,
    sign_in_at_test_op,
)
from tests.support.gateway_proc import GatewayProcess, free_port, gateway_config, start_gateway

pytestmark = [pytest.mark.provider]


async def _form_page(request: web.Request) -> web.Response:
    """A page of an app with a form, as any app has (and no Referrer-Policy of its own)."""
    return web.Response(content_type="text/html", text=(
        "<!doctype html><title>Notes</title><h1>New note</h1>"
        '<form method="post" action="/notes/save"><input name="text" value="my note">'
        "<button>Save</button></form>"))


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def gateway(
    provider: Any, tmp: Path, *, templates_dir: Path | None = None
) -> AsyncIterator[GatewayProcess]:
    """A gateway in front of the echo app; /admin for the admins group, /down for an app that
    is not running, /public/ (a page with a form) without sign-in."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    client_id, secret = provider.register_client(
        redirect_uris=[f"{origin}/oauth2/callback"], post_logout_redirect_uris=[f"{origin}/"])
    forms = web.Application()
    forms.router.add_get("/{tail:.*}", _form_page)
    async with serving(make_echo_app()) as app, serving(forms) as form_app:
        routes: list[dict[str, Any]] = [
            {"name": "public", "match": {"path": "/public/"}, "upstream": form_app,
             "auth": "public"},
            {"name": "admin", "match": {"path": "/admin"}, "upstream": app,
             "allow": [{"groups": ["admins"]}]},
            {"name": "down", "match": {"path": "/down"},
             "upstream": f"http://127.0.0.1:{free_port()}"},
            {"name": "app", "match": {"path": "/"}, "upstream": app},
        ]
        config = gateway_config(port=port, issuer=provider.issuer, client_id=client_id,
                                client_secret=secret, upstream=app, routes=routes)
        if templates_dir is not None:
            config["server"]["templates_dir"] = str(templates_dir)
        gw = await start_gateway(config, directory=tmp)
        try:
            yield gw
        finally:
            gw.stop()


def logged(gw: GatewayProcess, request_id: str) -> list[dict[str, Any]]:
    """The gateway's JSON log lines about one request (at least one, or the test fails)."""
    lines = [json.loads(line) for line in gw.logs().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert mine, f"no log line has request_id {request_id}:\n{gw.logs()}"
    return mine


async def assert_signed_in_as(tab: Tab, user: str, groups: str) -> None:
    await expect(tab.page.get_by_text(f"The gateway says you are {user}.")).to_be_visible()
    assert await echo_row(tab.page, "X-Forwarded-User") == user
    assert await echo_row(tab.page, "X-Forwarded-Groups") == groups


async def test_alice_signs_in_at_the_provider_and_an_app_that_is_down_says_so(
    browser: Browser, oidc_provider: Any, tmp_path: Path
) -> None:
    async with gateway(oidc_provider, tmp_path) as gw:
        tab = await open_tab(browser)
        page = tab.page
        await page.goto(f"{gw.url}/wiki/page?x=1")
        assert page.url.startswith(oidc_provider.issuer)
        await tab.snap("op-sign-in")
        await sign_in_at_test_op(tab, "alice", "wonderland")
        # Back on exactly the page asked for, as alice.
        assert page.url == f"{gw.url}/wiki/page?x=1"
        assert tab.status == 200
        await assert_signed_in_as(tab, "alice", "eng,admins")
        await expect(page.get_by_text("GET /wiki/page?x=1")).to_be_visible()
        await tab.snap("op-alice-echo")

        await page.goto(f"{gw.url}/down/report")
        assert tab.status == 502
        await expect(page.get_by_role("heading", level=1)).to_have_text(
            "The application is not answering")
        await expect(page.get_by_text(
            "The application behind this address could not be reached.")).to_be_visible()
        await expect(page.get_by_text("Try again in a minute")).to_be_visible()
        body = await page.locator("body").inner_text()
        assert "http://" not in body  # the app's internal address is for the log only
        assert "ConnectorError" not in body  # nor the name of the client's exception
        ref = await reference_id(page)
        assert {line.get("status") for line in logged(gw, ref)} == {502}
        await tab.snap("op-upstream-down")
        # "Try again" asks for the same page again (and it is still down).
        await page.get_by_role("link", name="Try again").click()
        await page.wait_for_load_state()
        assert tab.documents[-1] == (f"{gw.url}/down/report", 502)
        assert await reference_id(page) != ref
        await tab.close()


async def test_a_stale_sign_in_shows_what_happened_and_try_again_signs_in(
    browser: Browser, oidc_provider: Any, tmp_path: Path
) -> None:
    async with gateway(oidc_provider, tmp_path) as gw:
        tab = await open_tab(browser)
        page = tab.page
        callbacks: list[str] = []

        def on_request(request: Request) -> None:
            if request.url.startswith(f"{gw.url}/oauth2/callback?"):
                callbacks.append(request.url)

        page.on("request", on_request)
        await page.goto(f"{gw.url}/notes")
        await sign_in_at_test_op(tab, "alice", "wonderland")
        assert page.url == f"{gw.url}/notes"
        (callback,) = callbacks

        # The browser's back button, or a bookmark: the same callback a second time.
        await page.goto(callback)
        assert tab.status == 400
        await expect(page.get_by_role("heading", level=1)).to_have_text("Sign-in failed")
        await expect(page.get_by_text(
            "This sign-in has expired or was already completed. Start again.")).to_be_visible()
        body = await page.locator("body").inner_text()
        for leak in ("Traceback", "code=", "state="):
            assert leak not in body
        ref = await reference_id(page)
        assert any(line.get("reason") == "login_state_unknown" for line in logged(gw, ref))
        await tab.snap("op-stale-callback")

        # "Try again" starts a new sign-in; the provider still knows alice: straight back.
        await page.get_by_role("link", name="Try again").click()
        await page.wait_for_load_state()
        assert page.url == f"{gw.url}/"
        await assert_signed_in_as(tab, "alice", "eng,admins")
        await tab.close()


async def test_bob_gets_the_operators_403_page_from_templates_dir(
    browser: Browser, oidc_provider: Any, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "denied.html").write_text(
        '<h1>No entry</h1><p class="message">$message</p>'
        "<p>Ask the ACME help desk for access, quoting $request_id.</p>"
        '<p class="ref">Reference: $request_id</p>', "utf-8")
    (templates / "error.html").write_text("<h1>$heading</h1><p>$oops</p>", "utf-8")
    async with gateway(oidc_provider, tmp_path, templates_dir=templates) as gw:
        # The broken one is reported at start and replaced by the built-in page.
        (problem,) = [line for line in map(json.loads, gw.logs().splitlines())
                      if line["msg"].startswith("page template not used")]
        assert problem["level"] == "error"
        assert f"{templates / 'error.html'}: uses unknown placeholder(s) $oops" in problem["msg"]

        tab = await open_tab(browser)
        page = tab.page
        await page.goto(f"{gw.url}/admin/users")
        await sign_in_at_test_op(tab, "bob", "builder")
        assert page.url == f"{gw.url}/admin/users"
        assert tab.status == 403
        await expect(page.get_by_role("heading", level=1)).to_have_text("No entry")
        await expect(page.get_by_text(
            "You are signed in as bob, but this account may not open this page.")).to_be_visible()
        ref = await reference_id(page)
        await expect(page.get_by_text(f"Ask the ACME help desk for access, quoting {ref}.")
                     ).to_be_visible()
        lines = logged(gw, ref)
        assert {line.get("status") for line in lines} == {403}
        assert any(line.get("user") == "bob" for line in lines)
        await tab.snap("op-bob-403-custom-template")

        # The error page whose override is broken: the built-in one, never a 500.
        await page.goto(f"{gw.url}/oauth2/callback?state=unknown&code=x")
        assert tab.status == 400
        await expect(page.get_by_role("heading", level=1)).to_have_text("Sign-in failed")
        await expect(page.get_by_role("link", name="Try again")).to_be_visible()
        await tab.close()


async def test_a_form_sent_after_the_session_ended_gets_a_sign_in_page(
    browser: Browser, oidc_provider: Any, tmp_path: Path
) -> None:
    async with gateway(oidc_provider, tmp_path) as gw:
        tab = await open_tab(browser, phone=True)
        page = tab.page
        # A page with a form, open long enough for the session to end (here: never signed in).
        await page.goto(f"{gw.url}/public/form?draft=1")
        assert tab.status == 200
        await page.get_by_role("button", name="Save").click()
        await page.wait_for_url(f"{gw.url}/notes/save")
        assert tab.status == 401
        await expect(page.get_by_role("heading", level=1)).to_have_text("Sign-in needed")
        await expect(page.get_by_text(
            "Your session has ended, so what you just sent did not reach the application."
        )).to_be_visible()
        await expect(page.get_by_text("Sign in, then send it again.")).to_be_visible()
        ref = await reference_id(page)
        assert {line.get("status") for line in logged(gw, ref)} == {401}
        await assert_readable_on_a_phone(tab)
        await tab.snap("op-sign-in-needed-phone")

        # Sign in: back on the page the form was on.
        await page.get_by_role("link", name="Sign in").click()
        await sign_in_at_test_op(tab, "alice", "wonderland")
        assert page.url == f"{gw.url}/public/form?draft=1"
        assert tab.status == 200
        await expect(page.get_by_role("heading", level=1)).to_have_text("New note")
        await tab.close()

        # A script posting the same form (no Fetch Metadata) still gets JSON, never a page.
        async with aiohttp.ClientSession() as http, http.post(
            f"{gw.url}/notes/save", data={"text": "x"}, headers={"Accept": "text/html"},
            allow_redirects=False,
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "unauthenticated"
