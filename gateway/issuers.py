"""Which ``iss`` a provider's tokens may carry, and where the gateway itself talks to it.

OpenID Connect wants one issuer string, compared exactly (Core §3.1.3.7 step 2, Discovery
§4.3). Real providers bend that in a few known ways, and each bend is accepted here only in its
exact shape, never by switching the comparison off:

* Auth0 publishes ``https://tenant.auth0.com/`` for the ``https://tenant.auth0.com`` people
  write: one trailing slash more or less is accepted between the config and discovery (both
  spellings fetch the same document); tokens must then carry discovery's spelling exactly.
* Google's ID tokens may say ``accounts.google.com`` without the scheme: accepted under
  ``preset: google`` only.
* Entra multi-tenant discovery publishes ``https://login.microsoftonline.com/{tenantid}/v2.0``:
  a token's ``iss`` must be that template with the token's own ``tid`` filled in, and the
  ``tid`` must be one of ``provider.tenants``.

And the split-horizon deployment (Keycloak behind a cluster-internal URL): discovery, token,
JWKS and userinfo calls go to ``provider.backchannel_url`` while the browser goes to the public
endpoints and tokens must name the public issuer.

Pure: string work on values handed in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from gateway.config import TENANT_PLACEHOLDER, ProviderConfig

__all__ = [
    "BACKCHANNEL_ENDPOINTS",
    "ENTRA_DISCOVERY_TENANT",
    "WELL_KNOWN",
    "IssuerRule",
    "backchannel_endpoints",
    "discovery_location",
    "issuer_problem",
    "same_issuer_spelling",
]

WELL_KNOWN: Final = "/.well-known/openid-configuration"
# Under preset entra, an issuer with {tenantid} and no discovery_url reads the discovery of
# work and school accounts, which publishes the {tenantid} template as its issuer.
ENTRA_DISCOVERY_TENANT: Final = "organizations"
# Discovery members the gateway calls server to server (never the browser): the ones moved to
# provider.backchannel_url. authorization_endpoint and end_session_endpoint stay public.
BACKCHANNEL_ENDPOINTS: Final = (
    "token_endpoint",
    "jwks_uri",
    "userinfo_endpoint",
    "revocation_endpoint",
    "introspection_endpoint",
)
# What a tid must look like before it is put into an issuer string: no "/", "?", "#" or
# anything else that could make the filled-in template name another place.
_TID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")


def discovery_location(cfg: ProviderConfig) -> str:
    """Where the discovery document is fetched from.

    ``provider.discovery_url`` when given; else the issuer + ``/.well-known/...`` (Discovery
    §4), on ``provider.backchannel_url``'s origin when one is set, and for an Entra
    ``{tenantid}`` issuer the ``organizations`` document.
    """
    if cfg.discovery_url is not None:
        return cfg.discovery_url
    issuer = cfg.issuer.replace(TENANT_PLACEHOLDER, ENTRA_DISCOVERY_TENANT)
    base = issuer.rstrip("/")
    if cfg.backchannel_url is not None:
        base = cfg.backchannel_url + urlsplit(base).path
    return base + WELL_KNOWN


def same_issuer_spelling(published: str, configured: str) -> bool:
    """Whether discovery's ``issuer`` is the configured one: identical, or differing by one
    trailing slash only (Auth0). Case, scheme, port and path must all be the same."""
    if published == configured:
        return True
    return (
        published.rstrip("/") == configured.rstrip("/")
        and abs(len(published) - len(configured)) == 1
    )


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def backchannel_endpoints(
    endpoints: Mapping[str, str | None], *, issuer: str, backchannel_url: str | None
) -> dict[str, str]:
    """The back-channel endpoints to move: those on the public issuer's origin, rewritten to
    ``backchannel_url``'s origin (path and query kept). Endpoints already elsewhere (Keycloak
    publishing its internal hostname for back-channel calls, Entra's userinfo on Graph) stay
    where they are."""
    if backchannel_url is None:
        return {}
    public = _origin(issuer)
    internal = urlsplit(backchannel_url)
    moved: dict[str, str] = {}
    for name in BACKCHANNEL_ENDPOINTS:
        url = endpoints.get(name)
        if url is None or _origin(url) != public:
            continue
        parts = urlsplit(url)
        moved[name] = urlunsplit(
            (internal.scheme, internal.netloc, parts.path, parts.query, parts.fragment)
        )
    return moved


@dataclass(frozen=True, slots=True)
class IssuerRule:
    """How the ``iss`` of tokens from this provider is judged.

    ``issuer`` is discovery's issuer (for Entra multi-tenant, the ``{tenantid}`` template);
    ``tenants`` the admitted tids (lower case); ``schemeless`` admits Google's spelling without
    ``https://``.
    """

    issuer: str
    tenants: frozenset[str] = frozenset()
    schemeless: bool = False

    @classmethod
    def of(cls, issuer: str, cfg: ProviderConfig) -> IssuerRule:
        """The rule for discovery's ``issuer`` under ``cfg`` (its preset and tenants)."""
        return cls(
            issuer=issuer,
            tenants=frozenset(cfg.tenants) if TENANT_PLACEHOLDER in issuer else frozenset(),
            schemeless=cfg.preset == "google",
        )

    def problem(self, claims: Mapping[str, Any]) -> str | None:
        """None when ``claims["iss"]`` is acceptable, else what is wrong (for the user's page
        and the log; no claim value is repeated)."""
        iss = claims.get("iss")
        if not isinstance(iss, str):
            return "was issued by another issuer (no iss)"
        if TENANT_PLACEHOLDER in self.issuer:
            tid = claims.get("tid")
            if not isinstance(tid, str) or not _TID.fullmatch(tid):
                return "names no valid tenant (tid) for this multi-tenant issuer"
            if tid.lower() not in self.tenants:
                return "comes from a tenant (tid) that is not in provider.tenants"
            if iss != self.issuer.replace(TENANT_PLACEHOLDER, tid):
                return "was issued by another issuer (iss does not name the token's own tenant)"
            return None
        if iss == self.issuer:
            return None
        _, sep, rest = self.issuer.partition("://")
        if self.schemeless and sep and iss == rest:
            return None
        return "was issued by another issuer"


def issuer_problem(issuer: str | IssuerRule, claims: Mapping[str, Any]) -> str | None:
    """:meth:`IssuerRule.problem` for a rule, or the exact comparison for a plain issuer."""
    rule = issuer if isinstance(issuer, IssuerRule) else IssuerRule(issuer)
    return rule.problem(claims)
