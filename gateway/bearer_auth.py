"""Bearer-token authentication of one request: the I/O around :mod:`gateway.bearer`.

Called from one place, ``Gateway._decide``, on routes with ``bearer:``. A request that sends
``Authorization: Bearer`` is judged by its token alone: no cookie is read, no session is
written, no Set-Cookie and no redirect follow, whatever the token's fate. JWTs are validated
against the provider's JWKS (an unknown ``kid`` triggers the one throttled refetch that ID
tokens get); other tokens are introspected when the route allows it, and an active answer is
kept in memory by the token's hash (:class:`gateway.bearer.IntrospectionCache`).

The introspection endpoint failing (down, slow, 5xx, garbage, our credentials refused) fails
closed with 503: the token is not called bad, since it may well be good, but nothing passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.bearer import (
    IntrospectionCache,
    Requirements,
    bearer_token,
    check_introspection,
    identity_from_token,
    introspection_request,
    is_jwt,
    parse_introspection,
    requirements,
    token_hash,
    validate_access_token,
)
from gateway.config import Config, RouteConfig
from gateway.errors import BearerTokenError, OIDCError, ProviderUnavailable, UnknownSigningKey
from gateway.idp import IdentityProvider
from gateway.models import Identity
from gateway.oidc import KeySet

__all__ = ["BearerAuth", "BearerAuthenticator"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BearerAuth:
    """A request authenticated by its bearer token: who, and the token (for
    ``pass_access_token``; never logged)."""

    identity: Identity
    token: str


class BearerAuthenticator:
    """Judges ``Authorization: Bearer`` on the routes that accept it."""

    def __init__(
        self, config: Config, idp: IdentityProvider, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._idp = idp
        self._clock = clock
        self._claims = config.provider.claims
        self._requirements: dict[str, Requirements] = {
            route.name: requirements(route.bearer, config.provider)
            for route in config.routes
            if route.bearer is not None
        }
        self.cache = IntrospectionCache()

    async def authenticate(
        self, authorization: Sequence[str], route: RouteConfig
    ) -> BearerAuth | None:
        """The identity the request's bearer token proves on ``route``; None when the request
        sends no Bearer credential (or the route takes none). Raises ``BearerTokenError``
        (401/400) for a token refused, ``ProviderUnavailable``/``OIDCError`` (503, 502, 504)
        when the provider cannot be asked."""
        need = self._requirements.get(route.name)
        if need is None:
            return None
        token = bearer_token(authorization)
        if token is None:
            return None
        if is_jwt(token):
            claims = await self._validate_jwt(token, need)
        elif need.introspection:
            claims = await self._introspect(token, need)
        else:
            raise BearerTokenError(
                "The token is not a JWT access token, and this route does not introspect "
                "opaque tokens."
            )
        return BearerAuth(identity_from_token(claims, self._claims), token)

    async def _validate_jwt(self, token: str, need: Requirements) -> dict[str, object]:
        def check(keys: KeySet) -> dict[str, object]:
            return validate_access_token(token, keys=keys, need=need, now=self._clock())

        if not self._idp.ready:
            raise ProviderUnavailable(
                "The sign-in service has not been reached yet, so tokens cannot be checked. "
                "Try again in a minute."
            )
        try:
            return await self._idp.with_keys(check)
        except UnknownSigningKey:
            raise BearerTokenError(
                "The access token is signed with a key the provider's JWKS does not list."
            ) from None

    async def _introspect(self, token: str, need: Requirements) -> dict[str, object]:
        now = self._clock()
        key = token_hash(token)
        doc = self.cache.get(key, now=now)
        if doc is None:
            endpoint = self._idp.metadata.introspection_endpoint
            if endpoint is None:
                raise ProviderUnavailable(
                    "The provider announces no introspection_endpoint, so opaque tokens "
                    "cannot be checked; send a JWT access token.",
                    reason="introspection_unavailable",
                )
            provider = self._idp.config
            spec = introspection_request(
                endpoint,
                token,
                client_id=provider.client_id,
                client_secret=provider.client_secret.get_secret_value(),
                auth_method=provider.token_endpoint_auth,
            )
            try:
                status, body = await self._idp.send(spec, what="introspection endpoint")
            except OIDCError as exc:
                log.warning(
                    "token introspection failed: %s", exc.message, extra={"reason": exc.reason}
                )
                raise ProviderUnavailable(
                    "The provider's introspection endpoint cannot be reached; try again later.",
                    reason="introspection_unavailable",
                ) from None
            doc = parse_introspection(status, body)
            if doc is not None:
                self.cache.put(key, doc, now=now, cache_for=need.cache_for)
        return check_introspection(doc, need=need, now=now)
