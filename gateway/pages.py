"""HTML pages people see when the gateway itself answers: errors, denials, signed-out.

Server-rendered from ``templates/page.html`` with ``string.Template``: no template engine, no
external assets, every value HTML-escaped. Pages name what happened and what to do next, and
carry the request id that the matching log line has, never a stack trace or a token.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources
from string import Template

_STATUS_TEXT = {
    400: "Bad request",
    401: "Sign-in failed",
    403: "Access denied",
    404: "Not found",
    431: "Request headers too large",
    500: "Internal error",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


@dataclass(frozen=True, slots=True)
class Link:
    href: str
    label: str


class Pages:
    """Renders the gateway's pages; the template is read once, at start-up."""

    def __init__(self) -> None:
        text = resources.files("gateway").joinpath("templates/page.html").read_text("utf-8")
        self._page = Template(text)

    def render(
        self,
        *,
        status: int,
        heading: str,
        message: str,
        advice: str = "",
        link: Link | None = None,
        request_id: str = "",
    ) -> str:
        action = (
            f'<a class="button" href="{html.escape(link.href)}">{html.escape(link.label)}</a>'
            if link
            else ""
        )
        status_line = f"{status} {_STATUS_TEXT.get(status, '')}".strip() if status else ""
        return self._page.substitute(
            title=html.escape(heading),
            status_line=html.escape(status_line),
            heading=html.escape(heading),
            message=html.escape(message),
            advice=html.escape(advice),
            action=action,
            request_id=html.escape(request_id),
        )
