"""Bearer access tokens for API clients, pure: RFC 6750 parsing, RFC 9068 JWT checks, RFC 7662
introspection answers, and the small cache that spares the provider a call per request.

Why it is built this way:

* The token only replaces the cookie. What it yields is an :class:`~gateway.models.Identity`
  made by :func:`gateway.oidc.identity_from_claims`, the very function a browser login uses,
  so ``policy.authorize`` and the identity headers cannot tell the two apart.
* Every check is explicit and none can be configured away: signature with the provider's
  keys and a pinned algorithm (never ``none``, never HMAC: an access token is not addressed to
  the gateway, so a shared secret would let the gateway mint its own), ``iss`` among the
  route's issuers, ``aud`` naming one of the route's audiences, ``exp`` (required, RFC 9068
  §2.2), ``nbf`` and ``iat`` with the provider's leeway, and the route's ``required_claims``
  (Cognito's ``token_use: access`` keeps an ID token out).
* Sender-constrained tokens (a ``cnf`` claim: DPoP, mTLS) are refused: the gateway cannot
  check the proof of possession, and accepting them as plain bearer tokens would undo it.
* Introspection answers are cached by a hash of the token (never the token), at most until
  the token's ``exp`` and at most ``introspection_cache``; inactive answers are not cached
  (a flood of junk tokens gets no cheaper with a cache, and a token the provider has not
  activated yet must not be refused for long).
* Layer 0: no I/O. Time comes in as ``now``.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.config import BearerConfig, ClaimsConfig, ProviderConfig
from gateway.errors import BearerTokenError, OIDCError, UnknownSigningKey
from gateway.models import Identity
from gateway.oidc import (
    MAX_SUB_LENGTH,
    HttpRequestSpec,
    KeySet,
    basic_authorization,
    identity_from_claims,
    json_object,
    number_claim,
    premature_claim,
    signed_access_token,
)

__all__ = [
    "INTROSPECTION_CACHE_SIZE",
    "IntrospectionCache",
    "Requirements",
    "bearer_token",
    "check_introspection",
    "identity_from_token",
    "introspection_request",
    "is_jwt",
    "parse_introspection",
    "requirements",
    "token_hash",
    "validate_access_token",
]

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_TOKEN68: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A JWS in compact form: three base64url parts (RFC 7515 §7.1).
_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# RFC 9068 §2.1: "at+jwt" (media type application/at+jwt); plain "JWT" and none are what most
# providers still send. Anything else (logout+jwt, dpop+jwt, secevent+jwt) is another kind.
_ACCESS_TOKEN_TYPES: Final = frozenset({"jwt", "at+jwt", "application/at+jwt"})
# RFC 7662 §2.2 token_type, when given, must describe an access token usable as a bearer one.
_BEARER_TOKEN_TYPES: Final = frozenset(
    {"bearer", "access_token", "urn:ietf:params:oauth:token-type:access_token"}
)
INTROSPECTION_CACHE_SIZE: Final = 10_000


def _invalid(message: str) -> BearerTokenError:
    return BearerTokenError(message)


def _malformed(message: str) -> BearerTokenError:
    # RFC 6750 §3.1: a malformed request is invalid_request, answered 400.
    return BearerTokenError(
        message, error="invalid_request", reason="bearer_request_invalid", status_hint=400
    )


# ---------------------------------------------------------------------------------------------
# The Authorization header (RFC 6750 §2.1)
# ---------------------------------------------------------------------------------------------


def bearer_token(values: Sequence[str]) -> str | None:
    """The bearer token of a request's ``Authorization`` header values, or None when it
    carries no Bearer credential (no header, or another scheme such as Basic, which is the
    upstream's business).

    Strict: the scheme is case-insensitive (RFC 9110 §11.1), then one space and exactly one
    token68 value; a second Authorization header next to a Bearer one, an empty token or two
    tokens are ``invalid_request`` (400): a request must not be ambiguous about who sends it.
    """
    bearer = [v for v in values if v.strip().partition(" ")[0].lower() == "bearer"]
    if not bearer:
        return None
    if len(values) > 1:
        raise _malformed("The request has more than one Authorization header.")
    token = values[0].strip().partition(" ")[2]
    token = token.strip(" ")
    if not token:
        raise _malformed("The Bearer credential is empty.")
    if not _TOKEN68.fullmatch(token):
        raise _malformed("The Bearer credential is not a single token (RFC 6750 section 2.1).")
    return token


def is_jwt(token: str) -> bool:
    """Whether ``token`` has the shape of a signed JWT (an opaque token does not)."""
    return _JWS.fullmatch(token) is not None


def token_hash(token: str) -> str:
    """The name of a token in caches and logs: a hash, since the token itself is a key."""
    return hashlib.sha256(b"oidc-gateway bearer\x00" + token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# What a route asks of a token
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requirements:
    """A route's ``bearer:`` with the provider defaults filled in."""

    issuers: frozenset[str]
    audiences: frozenset[str]
    algorithms: tuple[str, ...]
    required_claims: Mapping[str, tuple[str, ...]]
    leeway: float
    introspection: bool
    cache_for: float


def requirements(bearer: BearerConfig, provider: ProviderConfig) -> Requirements:
    """``bearer:`` of a route, completed: issuers default to ``provider.issuer`` and the
    algorithms to ``provider.algorithms`` without the HMAC ones (see the module docstring)."""
    algorithms = bearer.algorithms or tuple(
        a for a in provider.algorithms if not a.startswith("HS")
    )
    return Requirements(
        issuers=frozenset(bearer.issuers or (provider.issuer,)),
        audiences=frozenset(bearer.audiences),
        algorithms=algorithms,
        required_claims={
            name: (value,) if isinstance(value, str) else tuple(value)
            for name, value in bearer.required_claims.items()
        },
        leeway=provider.leeway,
        introspection=bearer.introspection,
        cache_for=bearer.introspection_cache,
    )


def _check_claims(
    claims: Mapping[str, Any], need: Requirements, *, now: float, what: str, jwt: bool
) -> None:
    """The checks a JWT and an introspection answer share (RFC 9068 §4, RFC 7662 §2.2); a
    JWT must carry ``iss`` and ``exp``, an introspection answer may leave them out."""
    iss = claims.get("iss")
    if (iss is not None or jwt) and (not isinstance(iss, str) or iss not in need.issuers):
        raise _invalid(f"The {what} was issued by an issuer this route does not accept.")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise _invalid(f"The {what} names no audience.")
    if not need.audiences.intersection(audiences):
        raise _invalid(f"The {what} is for another audience (aud).")
    exp = claims.get("exp")
    if exp is None and jwt:
        raise _invalid(f"The {what} has no expiry (exp).")
    if exp is not None:
        expires = number_claim(exp)
        if expires is None:
            raise _invalid(f"The {what}'s expiry (exp) is not a number.")
        if now - need.leeway >= expires:
            raise _invalid(f"The {what} has expired.")
    premature = premature_claim(claims, now=now, leeway=need.leeway)
    if premature is not None:
        raise _invalid(f"The {what} is not valid yet ({premature}); check the clocks.")
    if "cnf" in claims:
        raise _invalid(
            f"The {what} is bound to a key (cnf: DPoP or mTLS); the gateway accepts plain "
            "bearer tokens only."
        )
    for name, accepted in need.required_claims.items():
        value = claims.get(name)
        if not isinstance(value, str) or value not in accepted:
            raise _invalid(f"The {what}'s {name} claim is not one this route accepts.")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _invalid(f"The {what} names no subject (sub).")
    if len(sub) > MAX_SUB_LENGTH or not sub.isascii():
        raise _invalid(f"The {what}'s subject is not at most 255 ASCII characters.")


# ---------------------------------------------------------------------------------------------
# JWT access tokens (RFC 9068)
# ---------------------------------------------------------------------------------------------


def validate_access_token(
    token: str, *, keys: KeySet, need: Requirements, now: float
) -> dict[str, Any]:
    """Validate a JWT access token and return its claims.

    Raises :class:`~gateway.errors.UnknownSigningKey` for a ``kid`` the key set lacks (the
    adapter refetches the JWKS once), else ``BearerTokenError`` (``invalid_token``, 401)
    naming the check that failed.
    """
    try:
        header, claims = signed_access_token(token, keys=keys, algorithms=need.algorithms)
    except UnknownSigningKey:
        raise
    except OIDCError as exc:
        raise _invalid(exc.message) from None
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCESS_TOKEN_TYPES):
        raise _invalid("The token's type (typ) is not an access token's.")
    _check_claims(claims, need, now=now, what="access token", jwt=True)
    return claims


# ---------------------------------------------------------------------------------------------
# Opaque tokens: introspection (RFC 7662)
# ---------------------------------------------------------------------------------------------


def introspection_request(
    endpoint: str, token: str, *, client_id: str, client_secret: str, auth_method: str
) -> HttpRequestSpec:
    """RFC 7662 §2.1: POST the token, authenticated like the gateway at the token endpoint."""
    headers = [
        ("Accept", "application/json"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ]
    form = [("token", token), ("token_type_hint", "access_token")]
    if auth_method == "client_secret_basic":
        headers.append(("Authorization", basic_authorization(client_id, client_secret)))
    elif auth_method == "client_secret_post":
        form += [("client_id", client_id), ("client_secret", client_secret)]
    else:
        raise ValueError(f"unsupported client auth method {auth_method!r}")
    return HttpRequestSpec("POST", endpoint, tuple(headers), tuple(form))


def parse_introspection(status: int, body: bytes) -> dict[str, Any] | None:
    """The provider's introspection answer: its claims when active, None when inactive.

    Anything but a 200 JSON object with a boolean ``active`` is the provider failing (or
    refusing the gateway's credentials): ``OIDCError`` 503, so the request fails closed
    without calling the token bad.
    """
    if status != 200:
        raise OIDCError(
            f"The provider's introspection endpoint answered HTTP {status}.",
            reason="introspection_unavailable",
            status_hint=503,
        )
    doc = json_object(body)
    if doc is None or not isinstance(doc.get("active"), bool):
        raise OIDCError(
            "The provider's introspection endpoint answered something other than a JSON "
            'object with a boolean "active".',
            reason="introspection_unavailable",
            status_hint=503,
        )
    return doc if doc["active"] is True else None


def check_introspection(
    doc: Mapping[str, Any] | None, *, need: Requirements, now: float
) -> dict[str, Any]:
    """The route's checks on an introspection answer (from :func:`parse_introspection`).

    ``iss`` is checked when the answer has one (RFC 7662 leaves it optional, and the answer
    comes from the provider's own endpoint); ``aud`` is required, as for JWTs: without it a
    token issued for another API of the same provider would open this one.
    """
    if doc is None:
        raise _invalid("The token is not active (revoked, expired or unknown).")
    token_type = doc.get("token_type")
    if token_type is not None and (
        not isinstance(token_type, str) or token_type.lower() not in _BEARER_TOKEN_TYPES
    ):
        raise _invalid("The token is not a bearer access token (token_type).")
    claims = dict(doc)
    _check_claims(claims, need, now=now, what="token", jwt=False)
    return claims


class IntrospectionCache:
    """Active introspection answers by token hash, each until ``min(exp, now + cache_for)``.

    Bounded: past ``size`` entries, expired ones go first, then the oldest. Answers without
    ``exp`` are not kept: nothing says how long they stay true.
    """

    def __init__(self, size: int = INTROSPECTION_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, *, now: float) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, doc: Mapping[str, Any], *, now: float, cache_for: float) -> None:
        exp = number_claim(doc.get("exp"))
        if exp is None or cache_for <= 0:
            return
        until = min(exp, now + cache_for)
        if until <= now:
            return
        if len(self._entries) >= self._size:
            for stale in [k for k, (t, _) in self._entries.items() if t <= now]:
                del self._entries[stale]
            while len(self._entries) >= self._size:
                self._entries.popitem(last=False)
        self._entries[key] = (until, dict(doc))


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def identity_from_token(claims: Mapping[str, Any], config: ClaimsConfig) -> Identity:
    """The Identity of a validated token: the same claim mapping as a browser login, with
    the token's claims in place of the ID token's and no userinfo. The token is a validated
    access token too, so ``groups_from: [access_token]`` reads it (an Entra group overage is
    not resolved for tokens: group rules then fail closed)."""
    try:
        return identity_from_claims(claims, userinfo=None, claims=config, access_claims=claims)
    except OIDCError as exc:
        raise _invalid(exc.message.replace("The ID token", "The access token")) from None
