"""Frozen value types shared by the core, the adapters and the wiring.

They hold no behaviour beyond trivial properties, so every layer may import them.
Times are float seconds since the epoch; the caller supplies ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# How far the policy may trust ``Identity.groups``. ``ok``: complete. ``truncated``: at the
# provider's cap (Okta: 100), so groups may be missing: deny rules on groups fail closed.
# ``unavailable`` (the access token or Microsoft Graph could not be used) and ``invalid``
# (a null claim, or a member that is not a string): every rule on groups fails closed.
GroupsState = Literal["ok", "truncated", "unavailable", "invalid"]


# weakref_slot: the gateway keeps per-identity results (policy answers, identity headers) for
# exactly as long as the Identity lives (endpoints.Gateway._memo_of).
@dataclass(frozen=True, slots=True, weakref_slot=True)
class Identity:
    """Who the user is, as taken from the validated ID token (and userinfo).

    ``domain_verified``: None when no hosted-domain claim is configured; else whether the
    provider vouches (Google's ``hd``) for the e-mail's domain, which ``email_domains`` rules
    then require."""

    sub: str
    user: str
    email: str | None = None
    email_verified: bool | None = None
    groups: tuple[str, ...] = ()
    preferred_username: str | None = None
    # Merged ID token + userinfo claims, for `allow.claims` rules. JSON-compatible values only.
    claims: Mapping[str, Any] = field(default_factory=dict)
    groups_state: GroupsState = "ok"
    domain_verified: bool | None = None


@dataclass(frozen=True, slots=True)
class TokenSet:
    """Tokens from the provider's token endpoint. Never logged, never sent to the browser."""

    id_token: str
    access_token: str | None = None
    refresh_token: str | None = None
    token_type: str = "Bearer"  # noqa: S105 - a token type name, not a secret
    expires_at: float | None = None  # access token expiry, absolute


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser session, as kept (sealed) in the session store."""

    identity: Identity
    tokens: TokenSet
    created_at: float
    last_seen: float
    expires_at: float  # hard end: created_at + session.lifetime
    issuer: str
    sid: str | None = None  # the provider's session id, when the ID token carries one


@dataclass(frozen=True, slots=True)
class LoginState:
    """What a login needs between /oauth2/start and /oauth2/callback. Single use, short-lived."""

    state: str
    nonce: str
    code_verifier: str
    target: str  # where the browser goes after login: a path, or an absolute URL on a known host
    created_at: float


@dataclass(frozen=True, slots=True)
class Ticket:
    """The content of the session cookie: which session, and the secret that opens it."""

    session_id: str
    secret: bytes


@dataclass(frozen=True, slots=True)
class RuleRef:
    """Which rule decided: ``kind`` is the list holding it (``allow`` or ``deny``), ``index``
    its position there (None for the one-mapping ``allow:`` form), ``source`` whether it is the
    route's own rule (``route``) or one of ``default_policy``."""

    kind: str
    index: int | None
    source: str

    def __str__(self) -> str:
        where = "default_policy." if self.source == "default_policy" else ""
        return f"{where}{self.kind}" + ("" if self.index is None else f"[{self.index}]")


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one request; ``reason`` is logged either way. ``rule`` is the
    rule that decided, or None when no rule did (no rules at all, or no allow rule matched)."""

    allowed: bool
    reason: str
    rule: RuleRef | None = None


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One entry to put in a session index of the store (``SessionStore.index_put``):
    ``member`` → ``value`` in the index ``key``, which lives ``ttl`` more seconds (never less
    than before). Sessions are listed by provider session, subject, user and id hash."""

    key: str
    member: str
    value: bytes
    ttl: float
