"""The gateway's own pages: what each kind says, escaping, and ``server.templates_dir``.

The browser tests (tests/e2e/) show the pages in Chromium; these check the rendering rules
that every page must keep, built-in or an operator's: escaped values, no external assets,
a broken override never breaking the page.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

import pytest

from gateway.pages import KINDS, TEMPLATE_NAMES, Link, PageKind, Pages, kind_for_status

HOSTILE = '<script>alert("x")</script>&\'"'


def render(pages: Pages, kind: PageKind | None = None, /, **overrides: object) -> str:
    values: dict[str, object] = {
        "status": 403,
        "heading": "Access denied",
        "message": "You are signed in as bob, but this account may not open this page.",
        "advice": "Ask the owner of this application for access.",
        "link": Link("/oauth2/sign_out", "Sign out"),
        "request_id": "0123abcd",
    }
    values.update(overrides)
    return pages.render(kind, **values)  # type: ignore[arg-type]


def main_class(page: str) -> str:
    found = re.search(r'<main class="([^"]*)">', page)
    assert found, page
    return found.group(1)


# ---------------------------------------------------------------------------------------------
# Built-in pages
# ---------------------------------------------------------------------------------------------


def test_every_built_in_template_ships_in_the_package() -> None:
    shipped = {p.name for p in resources.files("gateway").joinpath("templates").iterdir()}
    assert set(TEMPLATE_NAMES) <= shipped
    assert Pages().problems == []


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_shows_its_texts_in_one_shared_page(kind: PageKind) -> None:
    page = render(Pages(), kind, status=400, heading="What happened",
                  message="The details.", advice="What to do.",
                  link=Link("/next?x=1&y=2", "Do it"))
    assert page.startswith("<!doctype html>")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "<title>What happened</title>" in page
    assert "<h1>What happened</h1>" in page
    assert "The details." in page
    assert "What to do." in page
    assert '<a class="button" href="/next?x=1&amp;y=2">Do it</a>' in page
    assert main_class(page) == kind
    assert "$" not in page  # every placeholder filled


@pytest.mark.parametrize(("status", "kind"), [
    (400, "error"), (401, "error"), (404, "error"), (500, "error"), (403, "denied"),
    (502, "unavailable"), (503, "unavailable"), (504, "unavailable"),
])
def test_the_kind_follows_the_status_unless_named(status: int, kind: str) -> None:
    assert kind_for_status(status) == kind
    assert main_class(render(Pages(), status=status)) == kind
    assert main_class(render(Pages(), "sign_in", status=status)) == "sign_in"


@pytest.mark.parametrize("kind", ["error", "denied", "unavailable", "sign_in"])
def test_error_pages_show_the_reference(kind: PageKind) -> None:
    page = render(Pages(), kind, status=503, request_id="7f3e9a0c11")
    assert "Reference: <code>7f3e9a0c11</code>" in page
    # The sign-in interstitial is no failure to the user: it asks, it shows no error code.
    assert ("Error 503" in page) == (kind != "sign_in")


def test_pages_that_are_no_error_show_no_status() -> None:
    page = render(Pages(), "signed_out", status=200, heading="Signed out")
    assert "Error" not in page
    assert '<p class="status"></p>' not in page


@pytest.mark.parametrize("field", ["heading", "message", "advice", "request_id"])
def test_every_value_is_escaped(field: str) -> None:
    page = render(Pages(), **{field: HOSTILE})
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;" in page


def test_the_button_cannot_break_out_of_its_attribute() -> None:
    page = render(Pages(), link=Link('/x" onclick="alert(1)', HOSTILE))
    assert 'href="/x&quot; onclick=&quot;alert(1)"' in page
    assert "<script>" not in page
    assert 'onclick="' not in page


def test_no_page_without_a_link_shows_an_empty_button() -> None:
    page = render(Pages(), link=None)
    assert "<a " not in page
    assert '<p class="actions"></p>' in page  # hidden by p:empty in the page's CSS
    assert "p:empty { display: none; }" in page


@pytest.mark.parametrize("kind", KINDS)
def test_pages_load_nothing_from_elsewhere(kind: PageKind) -> None:
    """No script, stylesheet, font or image to fetch: the page works when all else fails."""
    page = render(Pages(), kind, link=None)
    for needle in ("<script", "<link", "<img", "<iframe", "src=", "url(", "@import", "http:",
                   "https:"):
        assert needle not in page.lower(), needle


# ---------------------------------------------------------------------------------------------
# server.templates_dir
# ---------------------------------------------------------------------------------------------


def test_a_file_in_templates_dir_replaces_only_its_namesake(tmp_path: Path) -> None:
    (tmp_path / "denied.html").write_text(
        "<h1>No entry: $heading</h1><p>$message</p><p>Ask at the help desk ($$0), "
        "reference $request_id.</p>$action", "utf-8")
    pages = Pages(tmp_path)
    assert pages.problems == []
    assert pages.overridden == ["denied.html"]
    denied = render(pages, status=403)
    assert "<h1>No entry: Access denied</h1>" in denied
    assert "Ask at the help desk ($0), reference 0123abcd." in denied
    assert '<a class="button" href="/oauth2/sign_out">Sign out</a>' in denied
    assert main_class(denied) == "denied"  # inside the built-in page.html
    # The other kinds keep the built-in templates.
    assert render(pages, status=404) == render(Pages(), status=404)


def test_page_html_in_templates_dir_frames_every_kind(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(
        "<!doctype html><title>$title | ACME</title><body class=\"$kind\">"
        "<header>ACME intranet</header>$content</body>", "utf-8")
    pages = Pages(str(tmp_path))
    for kind in KINDS:
        page = render(pages, kind)
        assert page.startswith("<!doctype html><title>Access denied | ACME</title>")
        assert f'<body class="{kind}"><header>ACME intranet</header>' in page
        assert "<h1>Access denied</h1>" in page  # the built-in kind template inside


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("denied.html", "<h1>$heading</h1><p>$reason</p>", "unknown placeholder(s) $reason"),
    ("error.html", "<p>Costs 5$ to ask</p>", 'has a "$" that starts no placeholder'),
    ("error.html", "<p>${heading</p>", 'has a "$" that starts no placeholder'),
    ("page.html", "<html><body>$heading</body></html>", "has no $content"),
    ("signed_out.html", "<p>$content</p>", "unknown placeholder(s) $content"),
])
def test_a_broken_template_falls_back_to_the_built_in_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, text: str, problem: str
) -> None:
    (tmp_path / name).write_text(text, "utf-8")
    with caplog.at_level(logging.ERROR, logger="gateway"):
        pages = Pages(tmp_path)
    assert pages.overridden == []
    (reported,) = pages.problems
    assert reported.startswith(f"{tmp_path / name}: ")
    assert problem in reported
    assert f"the built-in {name} is used" in reported
    assert [r.getMessage() for r in caplog.records] == [f"page template not used: {reported}"]
    assert caplog.records[0].levelno == logging.ERROR
    # Every page still renders, exactly as the built-in one.
    for kind in KINDS:
        assert render(pages, kind) == render(Pages(), kind)


def test_an_unreadable_template_falls_back(tmp_path: Path) -> None:
    (tmp_path / "denied.html").write_bytes(b"<h1>\xff\xfe caf\xe9</h1>")
    (tmp_path / "error.html").mkdir()
    pages = Pages(tmp_path)
    assert sorted(pages.problems) == [
        f"{tmp_path / 'denied.html'}: cannot be read (is not UTF-8 text); "
        "the built-in denied.html is used",
        f"{tmp_path / 'error.html'}: cannot be read (Is a directory); "
        "the built-in error.html is used",
    ]
    assert render(pages, status=403) == render(Pages(), status=403)
    assert render(pages, status=400) == render(Pages(), status=400)


def test_a_missing_templates_dir_is_reported_and_the_built_ins_serve(tmp_path: Path) -> None:
    pages = Pages(tmp_path / "nowhere")
    assert pages.problems == [
        f"server.templates_dir {tmp_path / 'nowhere'}: not a directory; "
        "the built-in pages are used"
    ]
    assert render(pages) == render(Pages())


def test_a_misnamed_template_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "403.html").write_text("<h1>$heading</h1>", "utf-8")
    (tmp_path / "README.txt").write_text("not a template", "utf-8")
    with caplog.at_level(logging.WARNING, logger="gateway"):
        pages = Pages(tmp_path)
    assert pages.problems == []
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "403.html" in record.getMessage()
    assert "README.txt" not in record.getMessage()
    assert "denied.html" in record.getMessage()  # the name it should have
