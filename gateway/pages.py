"""HTML pages people see when the gateway itself answers: errors, denials, sign-in, sign-out.

Why server-rendered from plain ``string.Template`` files: the pages have no logic worth a
template engine, must load without any external asset (the gateway may be the very thing that
is failing), and must never show a stack trace or a token. Every value is HTML-escaped here,
before it reaches a template, so a template (built-in or an operator's) cannot forget to.

Files (in ``gateway/templates/``, or replaced one by one from ``server.templates_dir``):

- ``page.html``: the page around every kind (head, styles); ``$content`` is the kind's body.
- ``error.html`` (4xx, 500, failed sign-in), ``denied.html`` (403), ``unavailable.html``
  (502/503/504), ``sign_in.html`` (the sign-in interstitial), ``signed_out.html``,
  ``sign_out_confirm.html`` (a sign-out another site asked for).

An operator's file of the same name replaces the built-in one; names it does not provide keep
the built-in. A file that cannot be read or used (a ``$`` that starts no placeholder, an
unknown placeholder, a ``page.html`` without ``$content``) is reported once at start-up, in
the log and in :attr:`Pages.problems`, and the built-in one is used instead: a typo in a
template never turns an error page into a 500.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Final, Literal, get_args

log = logging.getLogger("gateway")

PageKind = Literal["error", "denied", "unavailable", "sign_in", "signed_out", "sign_out_confirm"]
KINDS: Final[tuple[PageKind, ...]] = get_args(PageKind)
PAGE: Final = "page.html"
TEMPLATE_NAMES: Final[tuple[str, ...]] = (PAGE, *(f"{kind}.html" for kind in KINDS))

# What every template may use as $name. All are HTML-escaped text, except $action (an <a>
# element built from escaped parts, or nothing) and, in page.html only, $content.
PLACEHOLDERS: Final = frozenset({
    "title", "kind", "status", "status_line", "heading", "message", "advice",
    "action", "action_href", "action_label", "request_id",
})
_ALLOWED: Final = {PAGE: PLACEHOLDERS | {"content"}}


@dataclass(frozen=True, slots=True)
class Link:
    """The page's one action (a button): where it goes and what it says."""

    href: str
    label: str


def kind_for_status(status: int) -> PageKind:
    """The page kind an error status gets when the caller names none."""
    if status == 403:
        return "denied"
    if status in (502, 503, 504):
        return "unavailable"
    return "error"


def _builtin(name: str) -> Template:
    return Template(resources.files("gateway").joinpath("templates", name).read_text("utf-8"))


def template_problem(name: str, template: Template) -> str | None:
    """Why ``template`` cannot stand in for the built-in ``name``, or None when it can."""
    if not template.is_valid():
        return 'has a "$" that starts no placeholder (write "$$" for a literal "$")'
    allowed = _ALLOWED.get(name, PLACEHOLDERS)
    unknown = sorted(set(template.get_identifiers()) - allowed)
    if unknown:
        return (f"uses unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                f"known: {', '.join('$' + p for p in sorted(allowed))}")
    if name == PAGE and "content" not in template.get_identifiers():
        return "has no $content, where each page's own text goes"
    return None


class Pages:
    """Renders the gateway's pages; every template is read and checked once, at start-up."""

    def __init__(self, templates_dir: str | Path | None = None) -> None:
        self._templates = {name: _builtin(name) for name in TEMPLATE_NAMES}
        # What an operator sees in the log at start, also kept for `check`-like callers.
        self.problems: list[str] = []
        self.overridden: list[str] = []
        if templates_dir is not None:
            self._load_overrides(Path(templates_dir))

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        log.error("page template not used: %s", text)

    def _load_overrides(self, directory: Path) -> None:
        if not directory.is_dir():
            self._problem(f"server.templates_dir {directory}: not a directory; "
                          "the built-in pages are used")
            return
        for name in TEMPLATE_NAMES:
            path = directory / name
            if not path.exists():
                continue  # the built-in one stays
            try:
                template = Template(path.read_text("utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "is not UTF-8 text"
                self._problem(f"{path}: cannot be read ({reason}); the built-in {name} is used")
                continue
            problem = template_problem(name, template)
            if problem is not None:
                self._problem(f"{path}: {problem}; the built-in {name} is used")
                continue
            self._templates[name] = template
            self.overridden.append(name)
        strays = sorted(p.name for p in directory.glob("*.html") if p.name not in TEMPLATE_NAMES)
        if strays:
            # Not an error (the pages still work) but most likely a misnamed file.
            log.warning(
                "ignored in server.templates_dir %s: %s (the templates are %s)",
                directory, ", ".join(strays), ", ".join(TEMPLATE_NAMES),
            )

    def render(
        self,
        kind: PageKind | None = None,
        *,
        status: int,
        heading: str,
        message: str,
        advice: str = "",
        link: Link | None = None,
        request_id: str = "",
    ) -> str:
        """The whole HTML page. ``kind`` defaults from ``status`` (:func:`kind_for_status`)."""
        kind = kind or kind_for_status(status)
        esc = html.escape  # quote=True: values are safe in attributes too
        action = (
            f'<a class="button" href="{esc(link.href)}">{esc(link.label)}</a>' if link else ""
        )
        values = {
            "title": esc(heading),
            "kind": esc(kind),
            "status": str(status),
            "status_line": f"Error {status}" if status >= 400 else "",
            "heading": esc(heading),
            "message": esc(message),
            "advice": esc(advice),
            "action": action,
            "action_href": esc(link.href) if link else "",
            "action_label": esc(link.label) if link else "",
            "request_id": esc(request_id),
        }
        content = self._templates[f"{kind}.html"].substitute(values)
        return self._templates[PAGE].substitute(values, content=content)
