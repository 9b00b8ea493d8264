"""The signed identity assertion, pure: ``X-Gateway-Assertion``, a JWT saying who the user is.

Why it is built this way (issue 5 item 3):

* An upstream that trusts ``X-Forwarded-User`` trusts the network path: anything that reaches
  it directly can write the header. The assertion is a JWT (RFC 7519) signed by the gateway,
  so the app can check it against the gateway's published keys (JWKS, RFC 7517) and needs to
  trust nothing else. ES256 (RFC 7518 3.4): small signatures (86 characters) on every request,
  and cheap to make: about 30 µs with joserfc on one core.
* Short-lived and bound to one app: ``exp`` is ``iat`` + ``assertion.lifetime`` (default
  60 s, at most 10 min), ``aud`` the route's upstream origin (or ``assertion.audience``), so an
  assertion captured by one app is worth nothing at another, or a minute later. ``jti`` is
  random, for apps that want to refuse replays.
* Pure: the key, the time and the ``jti`` are arguments; the adapter
  (:mod:`gateway.assertion_keys`) keeps keys (config, memory or Redis) and calls these.
* Its size counts in the identity-header budget (``headers.max_bytes``), and its ``groups``
  are the groups the headers carry: :func:`plan_with_assertion` cuts both together, so a user
  in 500 groups gets an assertion an upstream accepts.
* Key rotation without a failed verification: generated keys live in time slots
  (:func:`generation`) of ``assertion.rotate_every``. A slot's key is published in the JWKS
  :data:`SKEW` x 2 before it starts signing (replicas' clocks differ, and apps cache the JWKS)
  and stays published until the assertions it signed have expired
  (:func:`published_generations`).

Its own layer, right above the sibling core modules, because it composes one of them
(:func:`gateway.headers.plan_identity_headers`); it does no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from joserfc import jws
from joserfc.jwk import ECKey
from joserfc.jws import JWSRegistry

from gateway.headers import (
    ASSERTION_HEADER,
    IdentityHeaders,
    IdentityRules,
    plan_identity_headers,
)
from gateway.models import Identity

__all__ = [
    "ALGORITHM",
    "ASSERTION_HEADER",
    "SKEW",
    "AssertionKey",
    "AssertionRequest",
    "assertion_claims",
    "encoded_size",
    "generation",
    "generation_start",
    "jwks",
    "load_key",
    "new_key",
    "plan_with_assertion",
    "private_pem",
    "published_generations",
    "sign",
    "slot_ttl",
]

ALGORITHM: Final = "ES256"
SKEW: Final = 60.0
"""Seconds of clock difference tolerated between replicas (and between a replica and the app
that caches the JWKS) when a generated key takes over from the previous one."""

# ES256 signatures are 64 bytes (RFC 7518 3.4: R || S), 86 base64url characters unpadded.
_SIGNATURE_CHARS: Final = 86
_REGISTRY: Final = JWSRegistry(algorithms=[ALGORITHM])


def _b64_chars(size: int) -> int:
    """Length of unpadded base64url of ``size`` bytes (RFC 7515 2, RFC 4648 5)."""
    return (4 * size + 2) // 3


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class AssertionKey:
    """An EC P-256 key and its ``kid`` (the RFC 7638 thumbprint, so every replica names one key
    alike). ``header`` is the encoded protected header of its assertions: fixed per key, so it
    is made once and the size of an assertion is known before signing."""

    kid: str
    key: ECKey
    header: str

    @property
    def private(self) -> bool:
        return bool(self.key.is_private)

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK for the JWKS (never the private ``d``)."""
        out: dict[str, Any] = dict(self.key.as_dict(private=False))
        out.update({"kid": self.kid, "alg": ALGORITHM, "use": "sig"})
        return out


def _protected(kid: str) -> dict[str, str]:
    return {"alg": ALGORITHM, "kid": kid, "typ": "JWT"}


def _wrap(key: ECKey) -> AssertionKey:
    if key.curve_name != "P-256":
        raise ValueError(f"the assertion key must be on curve P-256 (ES256), not {key.curve_name}")
    kid = key.thumbprint()
    header = ""
    if key.is_private:  # joserfc's own encoding of the header, taken from a signed sample
        header = jws.serialize_compact(_protected(kid), b"", key, registry=_REGISTRY)
        header = header.split(".")[0]
    return AssertionKey(kid=kid, key=key, header=header)


def load_key(pem: str | bytes) -> AssertionKey:
    """An EC P-256 key (private to sign, or public to publish) from PEM. Raises ValueError."""
    try:
        key = ECKey.import_key(pem)
    except Exception as exc:  # joserfc raises several types for unreadable input
        raise ValueError(f"not an EC key in PEM ({type(exc).__name__})") from None
    return _wrap(key)


def new_key() -> AssertionKey:
    """A fresh P-256 private key (the OS's CSPRNG, through ``cryptography``)."""
    return _wrap(ECKey.generate_key("P-256", private=True))


def private_pem(key: AssertionKey) -> bytes:
    """PKCS #8 PEM of the private key, for the adapter to seal and keep."""
    if not key.private:
        raise ValueError("a public key has no private PEM")
    pem = key.key.as_pem(private=True)
    return pem if isinstance(pem, bytes) else pem.encode()


def jwks(keys: Iterable[AssertionKey]) -> dict[str, list[dict[str, Any]]]:
    """The JWK Set (RFC 7517 5) of the public halves, each key once, in the order given."""
    seen: dict[str, dict[str, Any]] = {}
    for key in keys:
        seen.setdefault(key.kid, key.public_jwk())
    return {"keys": list(seen.values())}


# ---------------------------------------------------------------------------------------------
# Generated keys: time slots
# ---------------------------------------------------------------------------------------------


def generation(now: float, rotate_every: float) -> int:
    """The slot whose key signs at ``now``: slot g covers [g x rotate_every, (g+1) x ...).
    Every replica computes the same slot from its clock, so they agree on the key with no
    coordination beyond the store's set-if-absent."""
    return math.floor(now / rotate_every)


def generation_start(slot: int, rotate_every: float) -> float:
    return slot * rotate_every


def published_generations(
    now: float, *, rotate_every: float, lifetime: float, skew: float = SKEW
) -> tuple[int, ...]:
    """The slots whose keys the JWKS carries at ``now``.

    The current slot; the previous one until its last assertions have expired (``lifetime``
    after the switch, plus twice ``skew``: a replica whose clock is behind still signs with
    it, and this replica's clock may be behind too); and the next one from ``2 x skew`` before
    it starts, so a replica whose clock is ahead, and an app caching the JWKS, find it.
    """
    slot = generation(now, rotate_every)
    out: list[int] = []
    if now < generation_start(slot, rotate_every) + lifetime + 2 * skew:
        out.append(slot - 1)
    out.append(slot)
    if now >= generation_start(slot + 1, rotate_every) - 2 * skew:
        out.append(slot + 1)
    return tuple(out)


def slot_ttl(slot: int, now: float, *, rotate_every: float, lifetime: float,
             skew: float = SKEW) -> float:
    """How long the store must keep slot ``slot``'s key from ``now``: until it leaves the
    JWKS, plus ``skew`` to spare."""
    end = generation_start(slot + 1, rotate_every) + lifetime + 3 * skew
    return max(end - now, skew)


# ---------------------------------------------------------------------------------------------
# Claims and signing
# ---------------------------------------------------------------------------------------------


def assertion_claims(
    identity: Identity,
    groups: Sequence[str],
    *,
    issuer: str,
    audience: str,
    now: float,
    lifetime: float,
    jti: str,
) -> dict[str, Any]:
    """The claims of one assertion. Registered claims (RFC 7519 4.1) and the OIDC names of
    the identity (OIDC Core 5.1); ``groups`` last, as :func:`plan_with_assertion` sizes it.
    JSON carries any text exactly, so values go in as the provider gave them."""
    issued = math.floor(now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": identity.sub,
        "iat": issued,
        "exp": issued + math.ceil(lifetime),
        "jti": jti,
    }
    if identity.email:
        claims["email"] = identity.email
    if identity.email_verified is not None:
        claims["email_verified"] = identity.email_verified
    if identity.preferred_username:
        claims["preferred_username"] = identity.preferred_username
    claims["groups"] = list(groups)
    return claims


def _payload(claims: Mapping[str, Any]) -> bytes:
    # ASCII JSON (\u escapes): a claim holding a lone surrogate (JSON allows "\ud800", the
    # provider may send it) has no UTF-8 form and must not become a 500.
    return json.dumps(claims, separators=(",", ":")).encode("ascii")


def sign(claims: Mapping[str, Any], key: AssertionKey) -> str:
    """The compact JWS (RFC 7515 7.1) of ``claims``, signed ES256 with ``key``."""
    if not key.private:
        raise ValueError("a public key cannot sign")
    return jws.serialize_compact(_protected(key.kid), _payload(claims), key.key,
                                 registry=_REGISTRY)


def encoded_size(claims: Mapping[str, Any], key: AssertionKey) -> int:
    """Characters of ``sign(claims, key)``, without signing."""
    return len(key.header) + 1 + _b64_chars(len(_payload(claims))) + 1 + _SIGNATURE_CHARS


def _json_len(text: str) -> int:
    """Bytes of ``text`` as a JSON string in :func:`_payload`: quotes added, and escapes only
    for quotes, backslashes and controls (printable ASCII without them: no escapes)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text) + 2
    return len(json.dumps(text))


# ---------------------------------------------------------------------------------------------
# One request's identity headers with the assertion
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssertionRequest:
    """What one request's assertion needs besides the identity: the signing key, ``iss``,
    ``aud``, the time, the lifetime and a fresh random ``jti``."""

    key: AssertionKey
    issuer: str
    audience: str
    now: float
    lifetime: float
    jti: str


def plan_with_assertion(
    identity: Identity | None,
    access_token: str | None,
    rules: IdentityRules,
    assertion: AssertionRequest | None,
) -> IdentityHeaders:
    """The route's identity headers and, with ``assertion`` and a signed-in user, the
    ``X-Gateway-Assertion`` header last, all within the route's header budget.

    The assertion is sized before it is signed (:func:`encoded_size`) and handed to
    :func:`plan_identity_headers` as a reservation that shrinks with the groups, so the budget
    cuts the groups of the headers and of the assertion alike; one signature per request.
    """
    if assertion is None or identity is None:
        return plan_identity_headers(identity, access_token, rules)
    base = assertion_claims(
        identity, (), issuer=assertion.issuer, audience=assertion.audience,
        now=assertion.now, lifetime=assertion.lifetime, jti=assertion.jti,
    )
    key = assertion.key
    # Bytes of the header line but for the groups' JSON: the budget asks for many lengths of
    # one group list (a binary search over 500 groups), each answered from prefix sums.
    fixed = len(_payload(base))  # with "groups":[]
    overhead = len(ASSERTION_HEADER) + 4 + len(key.header) + 2 + _SIGNATURE_CHARS
    seen: list[str] = []
    sums: list[int] = [0]

    def reserve(groups: Sequence[str]) -> int:
        count = len(groups)
        if count > len(seen) or (count and groups[count - 1] != seen[count - 1]):
            seen[:] = groups  # plan_identity_headers passes prefixes of one list
            sums[:] = [0]
            for group in groups:
                sums.append(sums[-1] + _json_len(group))
        payload = fixed + sums[count] + max(count - 1, 0)
        return overhead + _b64_chars(payload)

    plan = plan_identity_headers(identity, access_token, rules, reserve=reserve)
    token = sign({**base, "groups": list(plan.groups)}, key)
    return replace(plan, headers=(*plan.headers, (ASSERTION_HEADER, token)))
