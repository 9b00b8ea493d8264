"""Microsoft Graph, asked for a user's groups when Entra ID left them out of the ID token.

Entra ID puts at most 200 groups in a JWT (150 in SAML); beyond that the ``groups`` claim is
replaced by ``_claim_names``/``_claim_sources`` ("group overage"). The gateway then asks
Graph once, at login, with the access token of that login, and keeps the answer in the
sealed session.

Why it is built this way:

* Only ``provider.graph_url`` is ever called, never the endpoint named in
  ``_claim_sources``: that URL comes from a token, and following it would send the user's
  access token wherever a token says. ``@odata.nextLink`` is followed only while it stays on
  the same origin (scheme, host and port) as ``provider.graph_url``.
* ``transitiveMemberOf``, not ``memberOf``: the groups claim Entra would have sent lists
  nested memberships too, and a deny rule on a parent group must see them.
* Bounded: ``MAX_PAGES`` pages of up to 999 entries, each request with the provider timeout
  and a capped body. Anything unexpected (a status other than 200, a body that is not the
  expected JSON, a foreign nextLink, too many pages) raises :class:`GraphError`; the caller
  then leaves the groups "unavailable", so every rule on groups fails closed.
* The access token is sent as a bearer token and never logged.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.oidc import json_object
from gateway.upstream_client import UpstreamBodyTooLarge, UpstreamClient, UpstreamClientError

__all__ = ["MAX_PAGES", "GraphError", "member_groups"]

MAX_PAGES: Final = 20
MAX_BODY: Final = 4 * 1024 * 1024
_GROUP_TYPE: Final = "#microsoft.graph.group"


class GraphError(GatewayError):
    """Microsoft Graph could not say which groups the user is in (the message says why)."""

    status_hint = 502
    reason = "groups_unavailable"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or default


async def member_groups(
    http: UpstreamClient, graph_url: str, access_token: str, *, seconds: float
) -> list[str]:
    """The ids of every group the token's user is a member of, directly or through nested
    groups, following ``@odata.nextLink`` on ``graph_url``'s origin only. ``seconds``: the
    time allowed for each page."""
    origin = _origin(graph_url)
    url = graph_url.rstrip("/") + "/v1.0/me/transitiveMemberOf?$select=id&$top=999"
    headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
    groups: list[str] = []
    for _ in range(MAX_PAGES):
        page = await _get(http, url, headers, seconds)
        values = page.get("value")
        if not isinstance(values, list):
            raise GraphError('Microsoft Graph answered without a "value" list.')
        for item in values:
            if not isinstance(item, dict):
                raise GraphError("Microsoft Graph answered a member that is not an object.")
            kind = item.get("@odata.type", _GROUP_TYPE)
            group = item.get("id")
            if kind != _GROUP_TYPE:
                continue  # directory roles and administrative units are not groups
            if not isinstance(group, str) or not group:
                raise GraphError("Microsoft Graph answered a group without an id.")
            groups.append(group)
        link = page.get("@odata.nextLink")
        if link is None:
            return groups
        if not isinstance(link, str) or _origin(link) != origin:
            raise GraphError(
                "Microsoft Graph's next page link leaves provider.graph_url; not followed."
            )
        url = link
    raise GraphError(f"Microsoft Graph listed more than {MAX_PAGES} pages of groups.")


async def _get(
    http: UpstreamClient, url: str, headers: dict[str, str], seconds: float
) -> dict[str, Any]:
    where = _origin(url)[1]
    try:
        status, body = await http.fetch("GET", url, headers=headers, limit=MAX_BODY,
                                        seconds=seconds)
    except TimeoutError:
        raise GraphError(f"Microsoft Graph at {where} did not answer in time.") from None
    except UpstreamBodyTooLarge:
        raise GraphError(f"Microsoft Graph answered more than {MAX_BODY} bytes.") from None
    except UpstreamClientError as exc:
        raise GraphError(
            f"Microsoft Graph at {where} cannot be reached ({type(exc).__name__})."
        ) from None
    if status != 200:
        raise GraphError(f"Microsoft Graph at {where} answered HTTP {status}.")
    doc = json_object(body)
    if doc is None:
        raise GraphError("Microsoft Graph answered something other than a JSON object.")
    return doc
