"""Policy, pure: a route's ``allow`` rules and a signed-in identity → allowed or denied, and why.

Why it is built this way:

* Any one rule admits (design §4): ``users``, ``emails``, ``email_domains``, ``groups`` and
  ``claims`` are alternatives, not conditions that must all hold. A route without ``allow``
  admits every signed-in user.
* Comparisons are exact, with the two deliberate exceptions e-mail addresses and domains,
  which are compared case-insensitively (RFC 5321 2.4: domains are case-insensitive; mailbox
  local parts are case-sensitive in theory but no provider issues two users differing by case).
  No subdomain matching for ``email_domains``: ``evil.example.com`` is not ``example.com``,
  since whoever runs a subdomain's mail could otherwise mint accepted addresses.
* E-mail rules apply only when the provider has not said the address is unverified
  (``email_verified`` is not ``False``): OIDC Core 5.1 warns that ``email`` alone is not proof
  of ownership, and some providers let users type any address.
* Claim rules never coerce types: ``"true"`` is not ``True`` and ``1`` is not ``True``
  (Python's ``1 == True`` would otherwise admit), so a string claim cannot satisfy a boolean
  rule by accident.
* The reason string is logged for every decision; it names the rule and value that admitted,
  or the route and user denied, and never contains tokens.
* Layer 0: no I/O. The rules of each ``AllowConfig`` are compiled once (sets, lower-cased)
  and cached, since :func:`evaluate` runs on every proxied request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.config import AllowConfig, RouteConfig
from gateway.models import Decision, Identity

__all__ = ["evaluate"]

NO_RULES_REASON: Final = "signed in; route has no allow rules"


@dataclass(frozen=True, slots=True)
class _Rules:
    users: frozenset[str]
    emails: frozenset[str]  # lower case
    email_domains: frozenset[str]  # lower case
    groups: frozenset[str]
    # claim name → accepted (type, value) pairs: the type makes 1, True and "1" distinct.
    claims: tuple[tuple[str, frozenset[tuple[type, Any]]], ...]


# Compiled rules by id(AllowConfig). AllowConfig holds a dict, so it is not hashable; the entry
# keeps the config object alive, which keeps its id unique while cached. Bounded so that
# repeated config reloads cannot grow it forever.
_CACHE: dict[int, tuple[AllowConfig, _Rules]] = {}
_CACHE_MAX: Final = 4096


def _compile(allow: AllowConfig) -> _Rules:
    cached = _CACHE.get(id(allow))
    if cached is not None and cached[0] is allow:
        return cached[1]
    rules = _Rules(
        users=frozenset(allow.users),
        emails=frozenset(e.lower() for e in allow.emails),
        email_domains=frozenset(d.lower() for d in allow.email_domains),
        groups=frozenset(allow.groups),
        claims=tuple(
            (name, frozenset((type(v), v) for v in values)) for name, values in allow.claims.items()
        ),
    )
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[id(allow)] = (allow, rules)
    return rules


def evaluate(route: RouteConfig, identity: Identity) -> Decision:
    """May this signed-in ``identity`` use ``route``? Any one ``allow`` rule admits."""
    allow = route.allow
    if allow is None:
        return Decision(True, NO_RULES_REASON)
    rules = _compile(allow)

    if rules.users:
        if identity.user in rules.users:
            return Decision(True, f"allowed by users: {_show(identity.user)}")
        if identity.sub in rules.users:
            return Decision(True, f"allowed by users: {_show(identity.sub)} (sub)")

    email_checked = identity.email_verified is not False and bool(identity.email)
    email = (identity.email or "").lower()
    if rules.emails and email_checked and email in rules.emails:
        return Decision(True, f"allowed by emails: {_show(email)}")
    if rules.email_domains and email_checked:
        domain = _domain_of(email)
        if domain is not None and domain in rules.email_domains:
            return Decision(True, f"allowed by email_domains: {_show(domain)}")

    if rules.groups:
        for group in identity.groups:
            if group in rules.groups:
                return Decision(True, f"allowed by groups: {_show(group)}")

    for name, accepted in rules.claims:
        matched = _claim_match(identity.claims, name, accepted)
        if matched is not None:
            return Decision(True, f"allowed by claims: {_show(name)}={_show(repr(matched))}")

    reason = f'denied: no allow rule of route "{route.name}" matches user "{_show(identity.user)}"'
    if (rules.emails or rules.email_domains) and identity.email and not email_checked:
        reason += " (email not verified, email rules skipped)"
    return Decision(False, reason)


def _domain_of(email: str) -> str | None:
    """The domain of an address with exactly one "@" and a non-empty local part, else None.

    "a@b@example.com" has no single meaning (RFC 5321 quotes "@" in local parts; providers
    differ), so it matches no domain rule rather than guessing which "@" counts.
    """
    local, sep, domain = email.partition("@")
    if not sep or not local or not domain or "@" in domain:
        return None
    return domain


def _claim_match(
    claims: Mapping[str, Any], name: str, accepted: frozenset[tuple[type, Any]]
) -> object | None:
    """The claim value that an accepted value equals (same type), or None. A missing claim
    never matches; a list claim matches if any member does (OIDC claims such as ``roles``)."""
    if name not in claims:
        return None
    value: object = claims[name]
    members: tuple[object, ...] | list[object] = (
        value if isinstance(value, list | tuple) else (value,)
    )
    for member in members:
        try:
            if (type(member), member) in accepted:
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
