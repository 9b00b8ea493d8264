"""A real browser for the end-to-end tests: Debian's Chromium, driven by Playwright.

Playwright drives ``/usr/bin/chromium`` (``apt-get install chromium``; ``bash .ci/run`` installs
it): never a browser of its own, so ``playwright install`` is never run. This machine reaches
nothing beyond loopback, hence the switches that stop Chromium phoning home.

Screenshots go to ``test-artifacts/screenshots/<name>.png`` under stable names, overwritten by
each run, for a person to look at (CI keeps them as artefacts).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import (
    Browser,
    Page,
    Response,
    ViewportSize,
    async_playwright,
    expect,
)

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)  # a common phone, in CSS pixels
TIMEOUT_MS = 15_000


@pytest.fixture
def chromium_executable() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (bash .ci/run does)",
                    pytrace=False)
    return CHROMIUM


@pytest.fixture
async def browser(chromium_executable: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=chromium_executable, headless=True, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Tab:
    """One page in its own browser context (its own cookies), with the status of every
    document it loaded, since a page shows text but not its HTTP status."""

    page: Page
    documents: list[tuple[str, int]] = field(default_factory=list)

    @property
    def status(self) -> int:
        """The HTTP status of the document on screen."""
        assert self.documents, "no document loaded yet"
        return self.documents[-1][1]

    async def snap(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        return path

    async def close(self) -> None:
        await self.page.context.close()


async def open_tab(browser: Browser, *, phone: bool = False) -> Tab:
    context = await browser.new_context(
        viewport=PHONE if phone else DESKTOP, is_mobile=phone, has_touch=phone,
        locale="en-US", color_scheme="light",
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    tab = Tab(page)

    def on_response(response: Response) -> None:
        if response.request.is_navigation_request() and response.frame == page.main_frame:
            tab.documents.append((response.url, response.status))

    page.on("response", on_response)
    return tab


async def sign_in_at_test_op(tab: Tab, username: str, password: str) -> None:
    """The test OP's login form, then its consent form when it asks (tests/op/server.js)."""
    page = tab.page
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await page.fill('input[name="login"]', username)
    await page.fill('input[name="password"]', password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()
    if await page.get_by_role("heading", name="Authorize").is_visible():
        await page.get_by_role("button", name="Continue").click()
        await page.wait_for_load_state()


async def sign_in_at_demo_provider(tab: Tab, username: str, password: str) -> None:
    page = tab.page
    await expect(page.get_by_role("heading", name="Sign in to the demo provider")).to_be_visible()
    await page.fill('input[name="username"]', username)
    await page.fill('input[name="password"]', password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()


async def echo_row(page: Page, header: str) -> str:
    """What the demo's echo app shows for a request header it received."""
    return await page.locator(f'tr:has(th:text-is("{header}")) td').inner_text()


async def reference_id(page: Page) -> str:
    """The reference an error page shows (the request id of the log line)."""
    text = await page.locator("p.ref").inner_text()
    found = re.fullmatch(r"Reference: ([0-9a-f]{8,64})", text.strip())
    assert found, text
    return found.group(1)


async def assert_readable_on_a_phone(tab: Tab) -> None:
    """Nothing wider than the screen, body text at least 16px, a button big enough to tap."""
    page = tab.page
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone"
    size = await page.evaluate(
        "parseFloat(getComputedStyle(document.querySelector('p.message')).fontSize)")
    assert size >= 16
    button = await page.locator("a.button").bounding_box()
    assert button is not None
    assert button["height"] >= 44
    assert button["x"] >= 0
    assert button["x"] + button["width"] <= PHONE["width"]
