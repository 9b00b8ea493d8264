"""Policy, pure: route rules, the signed-in user and the request → forward or not, and why.

Why it is built this way:

* ``deny`` before ``allow`` (design §4, issue 5): any one deny rule refuses, whatever the allow
  rules say, so an operator can carve an exception out of a broad allow without rewriting it.
  Then any one ``allow`` rule admits. No ``allow`` list admits every signed-in user (that the
  deny rules let through). A rule holds when EVERY condition it lists holds; a condition holds
  when ANY of its values matches.
* ``default_policy`` replaces, never merges: a route with its own ``allow`` or ``deny`` uses
  only those, so reading one route tells the whole truth about it.
* The one-mapping ``allow: {groups: [...], emails: [...]}`` of earlier versions keeps its
  meaning: any listed value admits (each value is its own rule), claim names literal.
* Facts the caller could not establish fail closed. A condition on the client address or the
  method, when the address or method is unknown, never admits in an allow rule and always
  refuses in a deny rule.
* E-mail addresses and domains compare case-insensitively (RFC 5321 2.4: domains are
  case-insensitive; no provider issues two users differing only by case). No subdomain
  matching for ``email_domains``: whoever runs ``evil.example.com``'s mail could otherwise mint
  accepted addresses. An address with more than one ``@`` matches no domain rule.
* An address the provider marks unverified (``email_verified: false``) never *admits*: OIDC
  Core 5.1 warns that ``email`` alone proves nothing, and some providers let users type any
  address. It still *refuses* in a deny rule: claiming a denied address cannot be a way in.
* Groups the provider could not give in full fail closed (``Identity.groups_state``): when
  they are ``unavailable`` (Entra overage unresolved, access token unusable) or ``invalid``
  (null, non-string members), a condition on groups (``groups``, or a claim condition on
  ``provider.claims.groups``) never admits in an allow rule and always refuses in a deny
  rule; when ``truncated`` (at ``groups_cap``), a present group still admits, but a deny
  rule's group not found counts as found. The reason says "group membership unavailable".
* With a hosted-domain claim configured (Google's ``hd``), an ``email_domains`` rule admits
  only when the provider vouches for the e-mail's domain (``Identity.domain_verified``).
* Claim rules never coerce types: ``"true"`` is not ``True`` and ``1`` is not ``True`` (Python's
  ``1 == True`` would otherwise admit). A list claim matches when any member does.
* ``methods: [GET]`` covers HEAD, as routing does (RFC 9110 9.3.2), in allow and deny alike.
* Every decision carries the rule that decided (:class:`~gateway.models.RuleRef`) and a reason
  that is logged: it names the rule and the values that matched, never tokens, and is cleaned
  of control characters.
* Layer 0: no I/O. Rules are compiled once per route object (sets, lower-cased, parsed networks
  and claim paths) and cached, since :func:`authorize` runs on every proxied request.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway.config import (
    AllowConfig,
    PolicyConfig,
    RouteConfig,
    RuleConfig,
    claim_at,
    parse_claim_path,
)
from gateway.models import Decision, GroupsState, Identity, RuleRef

__all__ = ["Access", "authorize", "client_address", "evaluate", "login_style"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NO_RULES_REASON: Final = "signed in; route has no allow rules"
GROUPS_UNAVAILABLE: Final = "group membership unavailable"
# What a groups condition shows when the groups cannot be trusted (state → words).
_GROUPS_UNKNOWN: Final[dict[GroupsState, str]] = {
    "unavailable": GROUPS_UNAVAILABLE,
    "invalid": f"{GROUPS_UNAVAILABLE} (the provider's groups claim is not a list of names)",
    "truncated": "group membership possibly truncated (at provider.claims.groups_cap)",
}


# ---------------------------------------------------------------------------------------------
# What happens to a request on a route
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Access:
    """What the gateway does with a request on a route, once it knows who (if anyone) is signed
    in. ``forward``: the request goes to the upstream. ``login_needed``: it does not, because
    the route needs a session and there is none. ``identity``: whose identity headers the
    upstream gets (None: none). ``decision``: the policy's answer, None when the policy was not
    consulted (public and optional routes, nobody signed in)."""

    forward: bool
    login_needed: bool
    identity: Identity | None
    decision: Decision | None


def authorize(
    route: RouteConfig,
    identity: Identity | None,
    *,
    method: str | None,
    client_ip: str | None,
    default_policy: PolicyConfig | None,
    groups_claim: str = "groups",
) -> Access:
    """The one answer the live gateway and ``oidc-gateway explain`` both act on.

    ``identity`` is the signed-in user, None without a (valid) session. ``client_ip`` is the
    trusted client address (``Forwarded.client_ip``), ``method`` the request method.
    ``groups_claim``: ``provider.claims.groups``, so that a claim condition on it fails
    closed like a ``groups`` condition when the groups cannot be trusted.
    """
    if route.auth == "public":
        return Access(forward=True, login_needed=False, identity=None, decision=None)
    if identity is None:
        if route.auth == "optional":
            return Access(forward=True, login_needed=False, identity=None, decision=None)
        return Access(forward=False, login_needed=True, identity=None, decision=None)
    if route.auth == "optional":
        return Access(forward=True, login_needed=False, identity=identity, decision=None)
    decision = evaluate(
        route,
        identity,
        method=method,
        client_ip=client_ip,
        default_policy=default_policy,
        groups_claim=groups_claim,
    )
    return Access(
        forward=decision.allowed,
        login_needed=False,
        identity=identity if decision.allowed else None,
        decision=decision,
    )


def login_style(route: RouteConfig, *, navigation: bool) -> Literal["redirect", "401"]:
    """How to ask for a sign-in: ``redirect`` (302 to the provider) or ``401`` (JSON with a
    ``login_url``). ``navigation``: the request is a browser navigating (the endpoint decides,
    from method, ``Accept`` and ``X-Requested-With``); ``unauthenticated`` overrides it."""
    if route.unauthenticated == "redirect":
        return "redirect"
    if route.unauthenticated == "401":
        return "401"
    return "redirect" if navigation else "401"


# ---------------------------------------------------------------------------------------------
# Compiled rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claim:
    path: tuple[str, ...]
    shown: str  # as written in the config
    # (type, value) pairs: the type makes 1, True and "1" distinct.
    accepted: frozenset[tuple[type, Any]]


@dataclass(frozen=True, slots=True)
class _Rule:
    """One rule; a None (or empty ``claims``) condition is absent."""

    users: frozenset[str] | None = None
    emails: frozenset[str] | None = None  # lower case
    email_domains: frozenset[str] | None = None  # lower case
    groups: frozenset[str] | None = None
    claims: tuple[_Claim, ...] = ()
    networks: tuple[IPNetwork, ...] | None = None
    methods: frozenset[str] | None = None  # upper case, HEAD added to GET

    @property
    def mentions_email(self) -> bool:
        return self.emails is not None or self.email_domains is not None

    def mentions_groups(self, groups_path: tuple[str, ...]) -> bool:
        return self.groups is not None or any(c.path == groups_path for c in self.claims)


@dataclass(frozen=True, slots=True)
class _Policy:
    """A route's effective policy. ``allow`` None: no allow list. ``mapping``: ``allow`` came
    from the one-mapping form (no index to report). ``source``: where the rules come from,
    None when there are none at all."""

    allow: tuple[_Rule, ...] | None
    deny: tuple[_Rule, ...]
    mapping: bool
    source: Literal["route", "default_policy"] | None


def _claim(shown: str, path: tuple[str, ...], values: Sequence[object]) -> _Claim:
    return _Claim(path, shown, frozenset((type(v), v) for v in values))


def _methods(methods: Sequence[str]) -> frozenset[str]:
    out = frozenset(m.upper() for m in methods)
    return out | {"HEAD"} if "GET" in out else out


def _rule(rule: RuleConfig) -> _Rule:
    return _Rule(
        users=frozenset(rule.users) if rule.users else None,
        emails=frozenset(e.lower() for e in rule.emails) if rule.emails else None,
        email_domains=(
            frozenset(d.lower() for d in rule.email_domains) if rule.email_domains else None
        ),
        groups=frozenset(rule.groups) if rule.groups else None,
        claims=tuple(
            _claim(name, parse_claim_path(name), values) for name, values in rule.claims.items()
        ),
        networks=tuple(rule.networks) if rule.networks else None,
        methods=_methods(rule.methods) if rule.methods else None,
    )


def _mapping_rules(allow: AllowConfig) -> tuple[_Rule, ...]:
    """The one-mapping form as single-condition rules: any one value admits, which is exactly
    "any one rule admits". Claim names stay literal top-level names, as they always were."""
    rules: list[_Rule] = []
    if allow.users:
        rules.append(_Rule(users=frozenset(allow.users)))
    if allow.emails:
        rules.append(_Rule(emails=frozenset(e.lower() for e in allow.emails)))
    if allow.email_domains:
        rules.append(_Rule(email_domains=frozenset(d.lower() for d in allow.email_domains)))
    if allow.groups:
        rules.append(_Rule(groups=frozenset(allow.groups)))
    rules.extend(
        _Rule(claims=(_claim(name, (name,), values),)) for name, values in allow.claims.items()
    )
    return tuple(rules)


def _policy(route: RouteConfig, default: PolicyConfig | None) -> _Policy:
    if route.allow is not None or route.deny is not None:
        allow: tuple[_Rule, ...] | None
        if isinstance(route.allow, AllowConfig):
            allow, mapping = _mapping_rules(route.allow), True
        else:
            allow = None if route.allow is None else tuple(_rule(r) for r in route.allow)
            mapping = False
        deny = tuple(_rule(r) for r in route.deny or ())
        return _Policy(allow, deny, mapping, "route")
    if default is not None:
        return _Policy(
            None if default.allow is None else tuple(_rule(r) for r in default.allow),
            tuple(_rule(r) for r in default.deny or ()),
            False,
            "default_policy",
        )
    return _Policy(None, (), False, None)


# Compiled policies by id(route). RouteConfig holds dicts, so it is not hashable; the entry keeps
# the route and default policy alive, which keeps their ids unique while cached. Bounded so that
# repeated config reloads cannot grow it forever.
_CACHE: dict[int, tuple[RouteConfig, PolicyConfig | None, _Policy]] = {}
_CACHE_MAX: Final = 4096


def _compiled(route: RouteConfig, default: PolicyConfig | None) -> _Policy:
    cached = _CACHE.get(id(route))
    if cached is not None and cached[0] is route and cached[1] is default:
        return cached[2]
    policy = _policy(route, default)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[id(route)] = (route, default, policy)
    return policy


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    identity: Identity
    method: str | None  # upper case; None: unknown
    address: IPAddress | None  # None: unknown
    email: str  # lower case, "" when none
    groups_path: tuple[str, ...]  # provider.claims.groups, parsed


def client_address(text: str | None) -> IPAddress | None:
    """The client address for ``networks`` conditions, or None when it is not an address.

    Accepts what :func:`gateway.headers.forwarded_facts` reports: an address (a zone id is
    dropped), and the ``::ffff:a.b.c.d`` form a dual-stack socket gives IPv4 peers, which is
    read as the IPv4 address so ``10.0.0.0/8`` matches it.
    """
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def evaluate(
    route: RouteConfig,
    identity: Identity,
    *,
    method: str | None,
    client_ip: str | None,
    default_policy: PolicyConfig | None,
    groups_claim: str = "groups",
) -> Decision:
    """May this signed-in ``identity`` use ``route`` with this request? Deny rules first (any
    one refuses), then allow rules (any one admits). ``None`` for ``method`` or ``client_ip``
    means unknown, and conditions on an unknown fact fail closed."""
    policy = _compiled(route, default_policy)
    facts = _Facts(
        identity=identity,
        method=method.upper() if method else None,
        address=client_address(client_ip),
        email=(identity.email or "").lower(),
        groups_path=_groups_path(groups_claim),
    )
    source = policy.source or "route"
    where = (
        f'of default_policy (route "{_show(route.name)}" has no rules of its own)'
        if source == "default_policy"
        else f'of route "{_show(route.name)}"'
    )

    for index, rule in enumerate(policy.deny):
        matched = _match(rule, facts, deny=True)
        if matched is not None:
            ref = RuleRef("deny", index, source)
            return Decision(False, f"denied by {ref} {where}: {matched}", ref)

    if policy.allow is None:
        if policy.source is None:
            return Decision(True, NO_RULES_REASON)
        return Decision(True, f"signed in; no deny rule {where} matches, and no allow rules")

    for index, rule in enumerate(policy.allow):
        matched = _match(rule, facts, deny=False)
        if matched is not None:
            ref = RuleRef("allow", None if policy.mapping else index, source)
            return Decision(True, f"allowed by {ref} {where}: {matched}", ref)

    reason = f'denied: no allow rule {where} matches user "{_show(identity.user)}"'
    if (
        identity.email
        and identity.email_verified is False
        and any(rule.mentions_email for rule in policy.allow)
    ):
        reason += " (email not verified, email rules skipped)"
    elif (
        identity.email
        and identity.domain_verified is False
        and any(rule.email_domains is not None for rule in policy.allow)
    ):
        reason += " (email domain not the provider's hosted domain, domain rules skipped)"
    state = identity.groups_state
    if state in ("unavailable", "invalid") and any(
        rule.mentions_groups(facts.groups_path) for rule in policy.allow
    ):
        reason += f" ({_GROUPS_UNKNOWN[state]}: rules on groups fail closed)"
    return Decision(False, reason)


@functools.lru_cache(maxsize=64)
def _groups_path(text: str) -> tuple[str, ...]:
    return parse_claim_path(text)


def _match(rule: _Rule, facts: _Facts, *, deny: bool) -> str | None:
    """What made every condition of ``rule`` hold ("groups: eng, methods: GET"), or None when
    one does not. ``deny``: the rule refuses, so unknown facts and unverified e-mail count."""
    shown: list[str] = []
    identity = facts.identity

    if rule.users is not None:
        if identity.user in rule.users:
            shown.append(f"users: {_show(identity.user)}")
        elif identity.sub in rule.users:
            shown.append(f"users: {_show(identity.sub)} (sub)")
        else:
            return None

    if rule.emails is not None or rule.email_domains is not None:
        usable = bool(facts.email) and (deny or identity.email_verified is not False)
        if not usable:
            return None
        if rule.emails is not None:
            if facts.email not in rule.emails:
                return None
            shown.append(f"emails: {_show(facts.email)}")
        if rule.email_domains is not None:
            domain = _domain_of(facts.email)
            if domain is None or domain not in rule.email_domains:
                return None
            # Google: hd is what vouches for a Workspace domain, not the address's spelling.
            if not deny and identity.domain_verified is False:
                return None
            shown.append(f"email_domains: {_show(domain)}")

    state = identity.groups_state
    trusted = state in ("ok", "truncated")  # else nothing in identity.groups is usable
    if rule.groups is not None:
        group = next((g for g in identity.groups if g in rule.groups), None) if trusted else None
        if group is not None:
            shown.append(f"groups: {_show(group)}")
        elif deny and state != "ok":
            shown.append(f"groups: {_GROUPS_UNKNOWN[state]}")
        else:
            return None

    if rule.claims:
        found: list[str] = []
        for claim in rule.claims:
            about_groups = claim.path == facts.groups_path
            value = _claim_match(identity.claims, claim) if trusted or not about_groups else None
            if value is not None:
                found.append(f"{_show(claim.shown)}={_show(repr(value))}")
            elif about_groups and deny and state != "ok":
                found.append(f"{_show(claim.shown)}: {_GROUPS_UNKNOWN[state]}")
            else:
                return None
        shown.append("claims: " + ", ".join(found))

    if rule.networks is not None:
        address = facts.address
        if address is None:
            if not deny:
                return None
            shown.append("networks: client address unknown")
        else:
            network = next((n for n in rule.networks if address in n), None)
            if network is None:
                return None
            shown.append(f"networks: {address} in {network}")

    if rule.methods is not None:
        if facts.method is None:
            if not deny:
                return None
            shown.append("methods: method unknown")
        elif facts.method not in rule.methods:
            return None
        else:
            shown.append(f"methods: {_show(facts.method)}")

    return ", ".join(shown)


def _domain_of(email: str) -> str | None:
    """The domain of an address with exactly one "@" and a non-empty local part, else None.

    "a@b@example.com" has no single meaning (RFC 5321 quotes "@" in local parts; providers
    differ), so it matches no domain rule rather than guessing which "@" counts.
    """
    local, sep, domain = email.partition("@")
    if not sep or not local or not domain or "@" in domain:
        return None
    return domain


def _claim_match(claims: Mapping[str, Any], claim: _Claim) -> object | None:
    """The claim value that an accepted value equals (same type), or None. The path walks
    nested objects; a missing claim (or a non-object on the way) never matches; a list claim
    matches if any member does (``realm_access.roles``)."""
    node = claim_at(claims, claim.path)
    if node is None:
        return None
    members: Sequence[object] = node if isinstance(node, list | tuple) else (node,)
    for member in members:
        try:
            if (type(member), member) in claim.accepted:
                return member
        except TypeError:  # an unhashable member (dict, list) is never an accepted value
            continue
    return None


_UNSAFE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _show(value: str) -> str:
    """A value as it may appear in a log line: no control characters (no forged log lines in
    the text format), and not unboundedly long."""
    text = _UNSAFE.sub("?", value)
    return text if len(text) <= 128 else text[:125] + "..."
