"""``oidc-gateway demo`` in a real browser: what a newcomer sees after the README's first command.

Each test starts ``python -m gateway demo`` (as tests/integration/test_demo.py does, reading the
URL and the passwords from its banner) and clicks through it in Chromium.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Route, expect

from tests.e2e.conftest import (
    assert_readable_on_a_phone,
    echo_row,
    open_tab,
    reference_id,
    sign_in_at_demo_provider,
)
from tests.integration.test_demo import Demo, start_demo


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    running = await start_demo(tmp_path)
    try:
        yield running
    finally:
        await running.stop()


async def test_alice_signs_in_and_sees_what_the_gateway_says_about_her(
    browser: Browser, demo: Demo
) -> None:
    tab = await open_tab(browser)
    page = tab.page
    await page.goto(demo.url)
    assert page.url.startswith(f"{demo.provider}/authorize?")
    await tab.snap("demo-provider-sign-in")
    await sign_in_at_demo_provider(tab, "alice", demo.passwords["alice"])

    assert page.url == demo.url
    assert tab.status == 200
    await expect(page.get_by_role("heading", level=1)).to_have_text(
        "Echo app: what the gateway forwarded")
    await expect(page.get_by_text("The gateway says you are alice.")).to_be_visible()
    assert await echo_row(page, "X-Forwarded-User") == "alice"
    assert await echo_row(page, "X-Forwarded-Email") == "alice@demo.test"
    assert await echo_row(page, "X-Forwarded-Groups") == "admins,staff"
    await tab.snap("demo-alice-echo")

    # The admins-only route, by the echo page's own link: no second sign-in.
    seen = len(tab.documents)
    await page.get_by_role("link", name="/admin", exact=True).click()
    await page.wait_for_load_state()
    assert page.url == demo.url + "admin"
    assert tab.status == 200
    assert await echo_row(page, "X-Forwarded-User") == "alice"
    assert [url for url, _ in tab.documents[seen:]] == [demo.url + "admin"]
    await tab.close()


async def test_bob_gets_a_readable_403_on_desktop_and_phone(browser: Browser, demo: Demo) -> None:
    for phone in (False, True):
        tab = await open_tab(browser, phone=phone)
        page = tab.page
        await page.goto(demo.url + "admin")
        await sign_in_at_demo_provider(tab, "bob", demo.passwords["bob"])
        assert page.url == demo.url + "admin"
        assert tab.status == 403
        await expect(page.get_by_role("heading", level=1)).to_have_text("Access denied")
        await expect(page.get_by_text(
            "You are signed in as bob, but this account may not open this page.")).to_be_visible()
        await expect(page.get_by_text("Ask the owner of this application for access")
                     ).to_be_visible()
        await expect(page.get_by_role("link", name="Sign out")).to_be_visible()
        assert len(await reference_id(page)) >= 8
        body = await page.locator("body").inner_text()
        assert "alice" not in body
        assert "Traceback" not in body
        if phone:
            await assert_readable_on_a_phone(tab)
            await tab.snap("demo-bob-403-phone")
        else:
            await tab.snap("demo-bob-403-desktop")

    # The 403 page's button signs bob out (and out of the provider), so someone else can sign in.
    await page.get_by_role("link", name="Sign out").click()
    await page.wait_for_load_state()
    assert page.url.startswith(f"{demo.provider}/authorize?")
    await expect(page.get_by_role("heading", name="Sign in to the demo provider")).to_be_visible()
    gone = await page.context.request.get(demo.url + "oauth2/userinfo")
    assert gone.status == 401
    await tab.close()


async def test_sign_out_asked_by_another_site_is_confirmed_then_done(
    browser: Browser, demo: Demo
) -> None:
    tab = await open_tab(browser)
    page = tab.page
    await page.goto(demo.url)
    await sign_in_at_demo_provider(tab, "alice", demo.passwords["alice"])
    assert (await page.context.request.get(demo.url + "oauth2/userinfo")).status == 200

    # Another site links to the gateway's sign-out: Chromium says so (Sec-Fetch-Site).
    async def elsewhere(route: Route) -> None:
        await route.fulfill(content_type="text/html", body=(
            f'<!doctype html><title>Elsewhere</title><a href="{demo.url}oauth2/sign_out">'
            "Free prize</a>"))

    await page.route("http://elsewhere.test/**", elsewhere)
    await page.goto("http://elsewhere.test/")
    await page.get_by_role("link", name="Free prize").click()
    await page.wait_for_load_state()
    assert page.url == demo.url + "oauth2/sign_out"
    await expect(page.get_by_role("heading", level=1)).to_have_text("Sign out?")
    await expect(page.get_by_text("Another site sent you here to sign you out")).to_be_visible()
    await tab.snap("demo-sign-out-confirm")
    assert (await page.context.request.get(demo.url + "oauth2/userinfo")).status == 200

    # The user presses the button: signed out here and at the provider, back to the start.
    await page.get_by_role("link", name="Sign out").click()
    await page.wait_for_load_state()
    await expect(page.get_by_role("heading", name="Sign in to the demo provider")).to_be_visible()
    assert (await page.context.request.get(demo.url + "oauth2/userinfo")).status == 401

    # Without a session, the sign-out URL says where the user stands and how to come back.
    await page.goto(demo.url + "oauth2/sign_out")
    assert tab.status == 200
    await expect(page.get_by_role("heading", level=1)).to_have_text("Signed out")
    await expect(page.get_by_text("You are signed out of this gateway.")).to_be_visible()
    await tab.snap("demo-signed-out")
    await page.get_by_role("link", name="Sign in again").click()
    await page.wait_for_load_state()
    await expect(page.get_by_role("heading", name="Sign in to the demo provider")).to_be_visible()
    await tab.close()
