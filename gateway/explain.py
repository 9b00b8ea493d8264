"""``oidc-gateway explain``, pure: what the live gateway would do with one request, and why.

Why it is built this way:

* No second implementation (issue 5): every step is the function the live gateway calls.
  The host is ``routing.authority_host`` of the URL's authority, the path
  ``routing.normalize_path`` of its raw path, the route ``routing.RouteTable.match``, the
  client ``headers.forwarded_facts`` (so ``X-Forwarded-For`` given with ``-H`` is believed only
  from ``server.trusted_proxies``, as live), the outcome ``policy.authorize`` (routes,
  ``default_policy``, deny before allow), the identity ``oidc.identity_from_claims`` (the
  ``provider.claims`` mapping), and the headers ``headers.HeaderPolicy`` built from the same
  config keys as ``endpoints.Gateway``.
* Its own layer, just above the pure core it composes (sibling core modules do not import each
  other, design §2), and pure itself: the CLI reads the file and prints.
* Nothing secret is shown: an access token the upstream would get appears as a placeholder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as _replace
from typing import Any, Final
from urllib.parse import urlsplit

from gateway.assertion import (
    ASSERTION_HEADER,
    AssertionRequest,
    assertion_claims,
    new_key,
    plan_with_assertion,
)
from gateway.config import BearerConfig, ClaimsConfig, Config, RouteConfig, parse_claim_path
from gateway.errors import BadRequest, OIDCError
from gateway.headers import (
    HeaderPolicy,
    compile_identity_rules,
    configured_identity_headers,
    forwarded_facts,
)
from gateway.issuers import discovery_location
from gateway.models import Identity
from gateway.oidc import identity_from_claims
from gateway.policy import Access, authorize, login_style
from gateway.routing import RouteTable, authority_host, encode_path, normalize_path

__all__ = [
    "Explanation", "claims_from_options", "explain", "identity_of", "provider_lines", "render",
]

# Shown instead of the session's access token when a route passes it upstream.
ACCESS_TOKEN_PLACEHOLDER: Final = "<the session's access token>"  # noqa: S105 - a label
# The gateway's own endpoints outside server.prefix (endpoints.Gateway.own).
_OWN_PATHS: Final = ("/ping", "/ready", "/metrics")
# Also the gateway's own when some route signs assertions (its public keys).
_JWKS_PATH: Final = "/.well-known/jwks.json"


@dataclass(frozen=True, slots=True)
class Explanation:
    """One request, judged. ``error``: the 400 the gateway would answer before any routing.
    ``own_endpoint``: the gateway answers itself, nothing is forwarded. ``route`` and
    ``route_index``: the matched route (None: 404). ``access``: the outcome on that route.
    ``upstream`` and ``headers``: what the upstream would receive (only when forwarded)."""

    method: str
    url: str
    client_ip: str
    identity: Identity | None
    path: str | None = None
    error: str | None = None
    own_endpoint: bool = False
    route: RouteConfig | None = None
    route_index: int | None = None
    access: Access | None = None
    upstream: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # What the identity-header budget (headers.max_bytes) would cut, as the log would say.
    trimmed: tuple[str, ...] = ()

    @property
    def forwarded(self) -> bool:
        """Would the request reach an upstream? (The exit status of ``explain``.)"""
        return self.access is not None and self.access.forward


def claims_from_options(
    claims: ClaimsConfig, *, user: str, email: str | None, groups: Sequence[str]
) -> dict[str, Any]:
    """ID token claims for ``--user U --email E --groups a,b``, under the claim names the
    config reads (``provider.claims``), so the identity is built as at a real login."""
    out: dict[str, Any] = {"sub": user}
    _put(out, claims.user, user)
    if email is not None:
        _put(out, claims.email, email)
    if groups:
        _put(out, claims.groups, list(groups))
    return out


def _put(claims: dict[str, Any], path_text: str, value: object) -> None:
    """Set the claim at a claim path (``resource_access["app"].roles``), nesting objects."""
    *parents, last = parse_claim_path(path_text)
    node = claims
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def identity_of(config: Config, claims: Mapping[str, Any]) -> Identity:
    """The identity a login with these ID token claims gives. Raises ``ValueError`` with the
    provider check's message when a real login would be refused (no ``sub``)."""
    try:
        # The claims given stand for every token of the login, the access token included
        # (provider.claims.groups_from: access_token), as if it had validated.
        return identity_from_claims(
            claims, userinfo=None, claims=config.provider.claims, access_claims=claims
        )
    except OIDCError as exc:
        raise ValueError(exc.message) from None


def explain(
    config: Config,
    *,
    method: str,
    url: str,
    identity: Identity | None,
    client_ip: str | None,
    headers: Sequence[tuple[str, str]] = (),
) -> Explanation:
    """Judge ``method url`` from ``client_ip`` (the TCP peer; None: unknown) with the client
    ``headers``, for ``identity`` (None: not signed in). Raises ``ValueError`` when ``url`` is
    not an absolute http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an absolute http:// or https:// URL")
    method = method.upper()
    peer = client_ip or ""
    base = Explanation(method=method, url=url, client_ip=peer, identity=identity)

    # endpoints.Gateway._facts: one validated authority, the path normalised once.
    host_header = parts.netloc
    host = authority_host(host_header)
    if host is None:
        return _replace(base, error="400: the Host header is missing or malformed")
    try:
        path = normalize_path(parts.path or "/")
    except BadRequest as exc:
        return _replace(base, error=f"400: {exc.message}")
    forwarded = forwarded_facts(
        peer_ip=peer,
        headers=list(headers),
        trusted=config.server.trusted_proxies,
        scheme=parts.scheme,
        host=host_header,
    )
    base = _replace(base, path=path, client_ip=forwarded.client_ip)

    # endpoints.Gateway.handle: the gateway's own paths first, then the route table.
    prefix = config.server.prefix
    jwks = path == _JWKS_PATH and any(r.assertion for r in config.routes)
    if path in _OWN_PATHS or jwks or path == prefix or path.startswith(prefix + "/"):
        return _replace(base, own_endpoint=True)
    route = RouteTable(config.routes).match(host, path, method)
    if route is None:
        return base
    index = next(i for i, r in enumerate(config.routes) if r is route)

    access = authorize(
        route,
        identity,
        method=method,
        client_ip=forwarded.client_ip or None,
        default_policy=config.default_policy,
        groups_claim=config.provider.claims.groups,
    )
    base = _replace(base, route=route, route_index=index, access=access)
    if not access.forward:
        return base

    # endpoints.Gateway._proxy: the same HeaderPolicy, built from the same keys.
    policy = HeaderPolicy(
        strip_patterns=config.server.strip_headers,
        own_cookie_name=config.session.cookie.effective_name,
        identity_names=configured_identity_headers(config),
    )
    access_token = (
        ACCESS_TOKEN_PLACEHOLDER
        if access.identity is not None and route.pass_access_token
        else None
    )
    # endpoints.Gateway._identity_headers: the route's headers and assertion, the same budget;
    # the assertion is sized with a throwaway key and shown as its claims, never signed here.
    assertion = None
    if route.assertion and access.identity is not None:
        assertion = AssertionRequest(
            key=new_key(),
            issuer=config.server.public_url or f"{forwarded.proto}://{forwarded.host}",
            audience=config.assertion.audience or route.upstream,
            now=0.0,
            lifetime=config.assertion.lifetime,
            jti="<random>",
        )
    plan = plan_with_assertion(
        access.identity, access_token, compile_identity_rules(config)[route.name], assertion
    )
    added = list(plan.headers)
    if assertion is not None and access.identity is not None:
        claims = assertion_claims(
            access.identity, plan.groups, issuer=assertion.issuer,
            audience=assertion.audience, now=0.0, lifetime=assertion.lifetime, jti="<random>",
        )
        shown = {k: v for k, v in claims.items() if k not in ("iat", "exp")}
        added[-1] = (ASSERTION_HEADER, f"<JWT signed ES256, valid {assertion.lifetime:g}s: "
                     f"{json.dumps(shown, ensure_ascii=False)}>")
    sent = policy.upstream_request_headers(
        list(headers),
        identity=access.identity,
        access_token=access_token,
        forwarded=forwarded,
        host_header=host_header if route.pass_host_header else urlsplit(route.upstream).netloc,
        added=added,
    )
    query = f"?{parts.query}" if parts.query else ""
    return _replace(
        base, upstream=f"{route.upstream}{encode_path(path)}{query}", headers=tuple(sent),
        trimmed=plan.trimmed,
    )


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def render(e: Explanation) -> str:
    """The explanation as ``key: value`` lines an operator reads top to bottom."""
    lines = [f"request:  {e.method} {e.url}"]
    if e.error is not None:
        lines += [f"answer:   {e.error} (before any route is matched)", _result(e)]
        return "\n".join(lines)
    lines.append(f"path:     {e.path}")
    lines.append(f"client:   {e.client_ip or 'unknown (give --client-ip)'}")
    if e.own_endpoint:
        lines += ["route:    none: the gateway's own endpoint answers this path", _result(e)]
        return "\n".join(lines)
    route, access = e.route, e.access
    if route is None or access is None:
        lines += ["route:    none matches: 404 from the gateway", _result(e)]
        return "\n".join(lines)

    match = route.match
    methods = ", ".join(match.methods) if match.methods else "any"
    lines.append(
        f"route:    {route.name} (routes[{e.route_index}]: host {match.host or 'any'}, "
        f"path {match.path}, methods {methods}) -> {route.upstream}"
    )
    lines.append(f"login:    {_login(route)}")
    if route.bearer is not None:
        lines.append(f"bearer:   {_bearer(route.bearer)}")
    lines.append(f"identity: {_identity(e.identity)}")
    lines += _decision(route, access)
    if e.upstream is not None:
        lines.append(f"upstream: {e.method} {e.upstream}")
        lines.append("headers:")
        lines += [f"  {name}: {value}" for name, value in e.headers]
        if e.trimmed:
            lines.append(f"cut:      to fit headers.max_bytes: {'; '.join(e.trimmed)}")
    lines.append(_result(e))
    return "\n".join(lines)


def _bearer(bearer: BearerConfig) -> str:
    """What ``routes[].bearer`` accepts instead of a session (gateway.bearer checks it)."""
    issuers = ", ".join(bearer.issuers) if bearer.issuers else "provider.issuer"
    extra = "".join(
        f"; {name} {' or '.join((v,) if isinstance(v, str) else v)}"
        for name, v in bearer.required_claims.items()
    )
    opaque = "introspected" if bearer.introspection else "refused"
    return (
        f"Authorization: Bearer accepted instead of a session: aud "
        f"{' or '.join(bearer.audiences)}; iss {issuers}{extra}; opaque tokens {opaque}"
    )


def _login(route: RouteConfig) -> str:
    if route.auth == "public":
        return "not needed (auth: public; no identity headers)"
    if route.auth == "optional":
        return "optional (auth: optional; identity headers only when signed in)"
    navigation = login_style(route, navigation=True)
    other = login_style(route, navigation=False)
    how = {"redirect": "a 302 to sign-in", "401": "a 401 (JSON with login_url)"}
    if navigation == other:
        answer = f"every request gets {how[navigation]}, as unauthenticated: {navigation} says"
    else:
        answer = f"browser navigations get {how[navigation]}, other requests {how[other]}"
    return f"needed (auth: required); without a session, {answer}"


def _identity(identity: Identity | None) -> str:
    if identity is None:
        return "none (not signed in; give --claims or --user)"
    verified = {True: "verified", False: "NOT verified", None: "verification unknown"}
    email = (
        f"{identity.email} ({verified[identity.email_verified]})" if identity.email else "none"
    )
    groups = ", ".join(identity.groups) or "none"
    if identity.groups_state == "truncated":
        groups += " [possibly truncated: deny rules on groups refuse]"
    elif identity.groups_state != "ok":
        groups += f" [{identity.groups_state}: every rule on groups fails closed]"
    if identity.domain_verified is False:
        email += " (not the provider's hosted domain)"
    return f"{identity.user} (sub {identity.sub}; email {email}; groups {groups})"


def _decision(route: RouteConfig, access: Access) -> list[str]:
    decision = access.decision
    if decision is not None:
        rule = decision.rule
        if rule is None:
            which = (
                "none (no deny rule matched, and there are no allow rules)"
                if decision.allowed
                else "none (no allow rule matched)"
            )
        elif rule.index is None:
            which = f"{rule} (the one-mapping form: any listed value admits)"
        else:
            which = str(rule)
        return [
            f"decision: {'allow' if decision.allowed else 'deny'}",
            f"rule:     {which}",
            f"reason:   {decision.reason}",
        ]
    if access.login_needed:
        return ["decision: sign-in needed (no session); the policy is judged after sign-in"]
    if route.auth == "public":
        return ["decision: allow (public route: everyone, without identity)"]
    if access.identity is None:
        return ["decision: allow (optional route, not signed in: no identity headers)"]
    return ["decision: allow (optional route, signed in: identity headers, no policy)"]


def _result(e: Explanation) -> str:
    if e.forwarded:
        return "result:   forwarded to the upstream (exit 0)"
    return "result:   not forwarded (exit 1)"


# ---------------------------------------------------------------------------------------------
# The provider settings in effect (provider.preset)
# ---------------------------------------------------------------------------------------------


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def provider_lines(config: Config) -> list[str]:
    """The provider settings in effect, each with where it comes from: ``(preset)`` for the
    preset's default, ``(config)`` when written in the file, ``(default)`` otherwise.

    Empty under ``preset: generic`` (the default): nothing comes from a preset then, and
    ``check`` prints a bare ``ok`` as it always did.
    """
    provider = config.provider
    if provider.preset == "generic":
        return []
    preset = provider.from_preset
    claims = provider.claims

    def source(key: str) -> str:
        if key in preset:
            return "preset"
        head, _, tail = key.partition(".")
        written = claims.model_fields_set if tail else provider.model_fields_set
        return "config" if (tail or head) in written else "default"

    lines = [
        f"provider: preset {provider.preset}; each value from the (preset), the (config) file "
        "or the gateway's (default)"
    ]

    def add(key: str, value: object, origin: str | None = None) -> None:
        lines.append(f"  {key}: {_shown(value)} ({origin or source(key)})")

    add("issuer", provider.issuer)
    add("discovery", discovery_location(provider),
        "config" if provider.discovery_url is not None else "derived")
    if provider.backchannel_url is not None:
        add("backchannel_url", provider.backchannel_url)
    if provider.tenants:
        add("tenants", provider.tenants)
    issuer_rule = "exact"
    if provider.tenant_template:
        issuer_rule = "{tenantid} filled from the token's tid, tid in tenants"
    elif provider.preset == "google":
        issuer_rule = "exact, or without https:// (Google)"
    lines.append(f"  iss accepted: {issuer_rule} (discovery's issuer may add or drop one "
                 "trailing slash; tokens then carry its spelling)")
    add("scopes", provider.scopes)
    params = [
        f"{name}={value} "
        f"({'preset' if {'auth_params', f'auth_params.{name}'} & preset else 'config'})"
        for name, value in provider.effective_auth_params
    ]
    lines.append(f"  auth_params: {', '.join(params) or 'none'}")
    add("logout", provider.logout)
    for key in ("user", "email", "email_verified", "groups", "groups_from", "groups_cap",
                "hosted_domain", "groups_overage"):
        add(f"claims.{key}", getattr(claims, key))
    return lines
