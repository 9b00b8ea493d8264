"""The identity provider adapter: the I/O around the sans-IO core in :mod:`gateway.oidc`.

Loads discovery and the JWKS (retrying with backoff while the provider is down), exchanges
authorization codes, refreshes tokens, fetches userinfo, and validates ID tokens with a JWKS
cache that is refetched at most once per ``provider.jwks_refetch_interval`` when a token names
an unknown key (security note 4).

Every call to the provider has ``provider.timeout``; a timeout becomes ``OIDCError`` 504
(``provider_timeout``), a connection failure 502 (``provider_unreachable``). Tokens are never
logged: log lines name URLs, statuses and reasons only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

from gateway import graph, issuers, oidc
from gateway.config import ProviderConfig
from gateway.errors import OIDCError, ProviderUnavailable, UnknownSigningKey
from gateway.models import Identity, LoginState, TokenSet
from gateway.upstream_client import UpstreamBodyTooLarge, UpstreamClient, UpstreamClientError

__all__ = ["IdentityProvider"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The provider's answers are small JSON documents; a bigger one is a fault, not data.
MAX_RESPONSE_BYTES: Final = 1024 * 1024


class IdentityProvider:
    """One OpenID Connect provider, as configured in ``provider:``.

    Not ready until :meth:`load` has succeeded once; :meth:`run_loader` keeps trying in the
    background so the gateway can serve (with ``/ready`` false) while the provider is down.
    """

    def __init__(
        self,
        config: ProviderConfig,
        http: UpstreamClient,
        *,
        clock: Callable[[], float] = time.time,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.config = config
        self._http = http
        self._clock = clock
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._meta: oidc.ProviderMetadata | None = None
        self._keys = oidc.KeySet()
        self._algorithms: tuple[str, ...] = ()
        # Unknown-kid refetches: when the last one was tried, and a generation counter so
        # that callers queued behind a refetch retry with its result instead of fetching again.
        self._last_refetch: float | None = None
        self._jwks_generation = 0
        self._jwks_lock = asyncio.Lock()

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        """Whether discovery and the JWKS have been loaded."""
        return self._meta is not None

    @property
    def metadata(self) -> oidc.ProviderMetadata:
        """The provider's metadata; ProviderUnavailable until :meth:`load` succeeded."""
        if self._meta is None:
            raise ProviderUnavailable(
                "The sign-in service has not been reached yet. Try again in a minute."
            )
        return self._meta

    @property
    def issuer_rule(self) -> issuers.IssuerRule:
        """How the ``iss`` of this provider's tokens is judged: discovery's issuer exactly,
        with only the exceptions the config spells out (``{tenantid}`` + ``provider.tenants``,
        Google's scheme-less ``iss`` under its preset)."""
        return issuers.IssuerRule.of(self.metadata.issuer, self.config)

    @property
    def algorithms(self) -> tuple[str, ...]:
        """ID token algorithms accepted: provider.algorithms ∩ the provider's announced ones."""
        return self._algorithms

    @property
    def keys(self) -> oidc.KeySet:
        return self._keys

    # ------------------------------------------------------------------ HTTP

    async def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        what: str,
    ) -> tuple[int, bytes]:
        """Send one request to the provider and read its (capped) answer."""
        try:
            return await self._http.fetch(
                method, url, headers=headers or {}, body=body, limit=MAX_RESPONSE_BYTES,
                seconds=self.config.timeout)
        except TimeoutError:
            raise OIDCError(
                f"The {what} at {url} did not answer within {self.config.timeout:g}s.",
                reason="provider_timeout",
                status_hint=504,
            ) from None
        except UpstreamBodyTooLarge:
            raise OIDCError(
                f"The {what} at {url} answered more than {MAX_RESPONSE_BYTES} bytes.",
                reason="provider_error",
                status_hint=502,
            ) from None
        except UpstreamClientError as exc:
            raise OIDCError(
                f"The {what} at {url} cannot be reached: {_describe(exc)}.",
                reason="provider_unreachable",
                status_hint=502,
            ) from None

    async def _send(self, spec: oidc.HttpRequestSpec, *, what: str) -> tuple[int, bytes]:
        return await self._request(
            spec.method, spec.url, headers=dict(spec.headers), body=spec.body(), what=what
        )

    async def _get_document(self, url: str, *, what: str) -> bytes:
        """GET a discovery document or JWKS; anything but 200 raises ProviderUnavailable."""
        try:
            status, body = await self._request(
                "GET", url, headers={"Accept": "application/json"}, what=what
            )
        except OIDCError as exc:
            raise ProviderUnavailable(exc.message) from None
        if status != 200:
            raise ProviderUnavailable(f"The {what} at {url} answered HTTP {status}, not 200.")
        return body

    # ------------------------------------------------------------------ loading

    async def load(self) -> oidc.ProviderMetadata:
        """Fetch discovery and the JWKS; on any problem raise ProviderUnavailable saying what."""
        cfg = self.config
        url = issuers.discovery_location(cfg)
        body = await self._get_document(url, what="discovery document")
        try:
            meta = oidc.parse_discovery(body, expected_issuer=cfg.issuer)
        except OIDCError as exc:
            raise ProviderUnavailable(
                f"The discovery document at {url} is unusable: {exc.message}"
            ) from None
        # Split horizon: the gateway's own calls go to provider.backchannel_url; the browser's
        # (authorization, end_session) stay on the public URLs discovery names.
        moved: dict[str, Any] = issuers.backchannel_endpoints(
            {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)},
            issuer=meta.issuer,
            backchannel_url=cfg.backchannel_url,
        )
        meta = dataclasses.replace(meta, **moved)
        algorithms = tuple(
            a for a in cfg.algorithms if a in meta.id_token_signing_alg_values_supported
        )
        if not algorithms:
            raise ProviderUnavailable(
                "The provider signs ID tokens with "
                f"{', '.join(meta.id_token_signing_alg_values_supported) or 'nothing announced'}"
                f", but provider.algorithms allows only {', '.join(cfg.algorithms)}; "
                "allow one of the provider's algorithms."
            )
        keys = await self._fetch_jwks(meta.jwks_uri)
        if not any(a.startswith("HS") or keys.usable_for(a) for a in algorithms):
            raise ProviderUnavailable(
                f"The JWKS at {meta.jwks_uri} holds no key usable for "
                f"{', '.join(algorithms)} ({len(keys)} usable signing keys in all)."
            )
        if cfg.token_endpoint_auth not in meta.token_endpoint_auth_methods_supported:
            log.warning(
                "provider does not announce token endpoint auth method %s (it announces %s); "
                "trying it anyway",
                cfg.token_endpoint_auth,
                ", ".join(meta.token_endpoint_auth_methods_supported),
            )
        if meta.code_challenge_methods_supported and (
            "S256" not in meta.code_challenge_methods_supported
        ):
            log.warning("provider does not announce PKCE S256; sending it anyway")
        self._keys = keys
        self._jwks_generation += 1
        self._algorithms = algorithms
        self._meta = meta
        log.info(
            "provider loaded",
            extra={"issuer": meta.issuer, "algorithms": list(algorithms), "keys": len(keys)},
        )
        return meta

    async def _fetch_jwks(self, url: str) -> oidc.KeySet:
        body = await self._get_document(url, what="JWKS")
        try:
            return oidc.parse_jwks(body)
        except OIDCError as exc:
            raise ProviderUnavailable(f"The JWKS at {url} is unusable: {exc.message}") from None

    async def run_loader(self) -> None:
        """Retry :meth:`load` with exponential backoff until it succeeds (a background task)."""
        delay = self._backoff_initial
        while True:
            try:
                await self.load()
            except ProviderUnavailable as exc:
                log.warning(
                    "provider not available, retrying in %gs: %s",
                    delay,
                    exc.message,
                    extra={"reason": exc.reason},
                )
            except Exception:
                log.exception("loading the provider failed unexpectedly; retrying in %gs", delay)
            else:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _refetch_jwks(self, generation: int) -> bool:
        """Refetch the JWKS after an unknown kid, at most once per jwks_refetch_interval.

        Returns True when the caller should retry with new keys: this call fetched them, or
        another caller did while this one waited.
        """
        async with self._jwks_lock:
            if self._jwks_generation != generation:
                return True
            now = self._clock()
            if (
                self._last_refetch is not None
                and now - self._last_refetch < self.config.jwks_refetch_interval
            ):
                return False
            self._last_refetch = now
            uri = self.metadata.jwks_uri
            try:
                keys = await self._fetch_jwks(uri)
            except ProviderUnavailable as exc:
                log.warning("JWKS refetch failed: %s", exc.message)
                return False
            self._keys = keys
            self._jwks_generation += 1
            log.info("JWKS refetched after an unknown key id", extra={"keys": len(keys)})
            return True

    # ------------------------------------------------------------------ login

    def authorization_url(self, login: LoginState, redirect_uri: str) -> str:
        return oidc.authorization_url(
            self.metadata,
            client_id=self.config.client_id,
            redirect_uri=redirect_uri,
            scopes=self.config.scopes,
            login=login,
            extra=self.config.effective_auth_params,
        )

    async def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenSet:
        """Redeem an authorization code at the token endpoint."""
        spec = oidc.token_request(
            self.metadata,
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=code_verifier,
            client_id=self.config.client_id,
            client_secret=self.config.client_secret.get_secret_value(),
            auth_method=self.config.token_endpoint_auth,
        )
        status, body = await self._send(spec, what="token endpoint")
        return oidc.parse_token_response(status, body, now=self._clock())

    async def refresh(self, tokens: TokenSet, *, sub: str) -> TokenSet:
        """Refresh ``tokens`` (OIDC Core §12); a new ID token must be for the same ``sub``.

        The answer keeps the old ID token and refresh token when the provider sends none.
        """
        if tokens.refresh_token is None:
            raise OIDCError(
                "The session has no refresh token.", reason="refresh_unavailable", status_hint=401
            )
        spec = oidc.refresh_request(
            self.metadata,
            refresh_token=tokens.refresh_token,
            client_id=self.config.client_id,
            client_secret=self.config.client_secret.get_secret_value(),
            auth_method=self.config.token_endpoint_auth,
        )
        status, body = await self._send(spec, what="token endpoint")
        fresh = oidc.parse_token_response(status, body, now=self._clock(), require_id_token=False)
        if fresh.id_token:
            # §12.2: iss, sub and aud as at login; no nonce check (none was sent).
            claims = await self.validate_id_token(fresh.id_token, nonce=None)
            if claims.get("sub") != sub:
                raise OIDCError(
                    "The refreshed ID token is for another subject.",
                    reason="id_token_invalid",
                    status_hint=401,
                )
        return TokenSet(
            id_token=fresh.id_token or tokens.id_token,
            access_token=fresh.access_token,
            refresh_token=fresh.refresh_token or tokens.refresh_token,
            token_type=fresh.token_type,
            expires_at=fresh.expires_at,
        )

    async def validate_id_token(
        self, id_token: str, *, nonce: str | None, max_age: float | None = None
    ) -> dict[str, Any]:
        """Validate an ID token; an unknown kid triggers one (throttled) JWKS refetch."""
        rule = self.issuer_rule
        for attempt in range(2):
            generation = self._jwks_generation
            try:
                return oidc.validate_id_token(
                    id_token,
                    keys=self._keys,
                    issuer=rule,
                    client_id=self.config.client_id,
                    nonce=nonce,
                    algorithms=self._algorithms,
                    leeway=self.config.leeway,
                    now=self._clock(),
                    max_age=max_age,
                    client_secret=self.config.client_secret.get_secret_value(),
                )
            except UnknownSigningKey:
                if attempt or not await self._refetch_jwks(generation):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def with_keys(self, check: Callable[[oidc.KeySet], T]) -> T:
        """Run ``check`` (a token validation) with the provider's keys; an unknown kid
        triggers one (throttled) JWKS refetch and a second try, as for ID tokens."""
        for attempt in range(2):
            generation = self._jwks_generation
            try:
                return check(self._keys)
            except UnknownSigningKey:
                if attempt or not await self._refetch_jwks(generation):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def send(self, spec: oidc.HttpRequestSpec, *, what: str) -> tuple[int, bytes]:
        """Send a request built by the core (introspection) with the provider's timeout;
        failures raise ``OIDCError`` 502/504 like every other call to the provider."""
        return await self._send(spec, what=what)

    async def validate_logout_token(self, token: str) -> oidc.LogoutToken:
        """Validate a back-channel logout token; an unknown kid triggers one (throttled) JWKS
        refetch, and a kid still unknown after it is a 400 like any other bad token."""
        rule = self.issuer_rule
        for attempt in range(2):
            generation = self._jwks_generation
            try:
                return oidc.validate_logout_token(
                    token,
                    keys=self._keys,
                    issuer=rule,
                    client_id=self.config.client_id,
                    algorithms=self._algorithms,
                    leeway=self.config.leeway,
                    now=self._clock(),
                )
            except UnknownSigningKey:
                if attempt or not await self._refetch_jwks(generation):
                    raise OIDCError(
                        "logout token: signed with a key the provider's JWKS does not list",
                        reason="logout_token_invalid", status_hint=400) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def userinfo(self, access_token: str | None) -> dict[str, Any] | None:
        """The userinfo claims, or None when disabled, not offered, or without access token."""
        endpoint = self.metadata.userinfo_endpoint
        if not self.config.userinfo or endpoint is None or not access_token:
            return None
        status, body = await self._request(
            "GET",
            endpoint,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            what="userinfo endpoint",
        )
        if status != 200:
            raise OIDCError(
                f"The userinfo endpoint at {endpoint} answered HTTP {status}.",
                reason="userinfo_error",
                status_hint=502,
            )
        doc = oidc.json_object(body)
        if doc is None:
            raise OIDCError(
                f"The userinfo endpoint at {endpoint} answered something other than a JSON "
                "object (signed or encrypted userinfo is not supported).",
                reason="userinfo_error",
                status_hint=502,
            )
        return doc

    async def complete_login(
        self, query: Mapping[str, str], login: LoginState, *, redirect_uri: str
    ) -> tuple[Identity, TokenSet, dict[str, Any]]:
        """Finish a login from the callback query: code → tokens → validated identity.

        Returns the identity, the tokens and the validated ID token claims.
        """
        if not oidc.states_match(query.get("state", ""), login.state):
            raise OIDCError(
                "The sign-in answer does not belong to this sign-in. Start again.",
                reason="state_mismatch",
                status_hint=400,
            )
        code = oidc.parse_callback(query, meta=self.metadata)
        tokens = await self.exchange_code(
            code, redirect_uri=redirect_uri, code_verifier=login.code_verifier
        )
        claims, info = await self._claims_and_userinfo(
            tokens.id_token, tokens.access_token, nonce=login.nonce)
        identity = await self.identity_for_login(claims, info, tokens.access_token)
        return identity, tokens, claims

    async def _claims_and_userinfo(
        self, id_token: str, access_token: str | None, *, nonce: str | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The ID token's validated claims and the userinfo answer, asked for at once (the
        access token came straight from the token endpoint): one wait instead of two.

        Userinfo first: the check is CPU work with no wait in it (the keys are cached), so
        started first it ran whole before the request left, and a login waited for both one
        after the other (issue 7: 0.5 ms of a callback at idle). A refused ID token wins over
        a userinfo failure; the userinfo answer is then dropped unread.
        """
        fetched, checked = await asyncio.gather(
            self.userinfo(access_token),
            self.validate_id_token(id_token, nonce=nonce),
            return_exceptions=True,
        )
        if isinstance(checked, BaseException):  # the ID token's verdict first, always
            raise checked
        if isinstance(fetched, BaseException):
            raise fetched
        return checked, fetched

    async def identity_after_refresh(
        self, identity: Identity, old: TokenSet, fresh: TokenSet
    ) -> Identity:
        """Who the user is after a refresh: rebuilt like at login when the provider sent a new
        ID token (a user removed from a group loses it now, not at the session's end), with
        groups re-read from the new access token when they come from it; else unchanged.

        ``fresh`` comes from :meth:`refresh`, which already refused an ID token for another
        subject. A rebuild that cannot be done (userinfo down) keeps the old identity: the
        new tokens must be saved whatever happens, or a rotated refresh token is lost.
        """
        new_id_token = fresh.id_token != old.id_token
        new_access = (
            "access_token" in self.config.claims.groups_from
            and fresh.access_token is not None
            and fresh.access_token != old.access_token
        )
        if not new_id_token and not new_access:
            return identity
        try:
            claims: Mapping[str, Any]
            if new_id_token:
                claims, info = await self._claims_and_userinfo(
                    fresh.id_token, fresh.access_token, nonce=None)
            else:
                # The ID token is the old one (maybe expired by now): its claims as kept.
                claims, info = identity.claims, None
            rebuilt = await self.identity_for_login(claims, info, fresh.access_token)
        except (OIDCError, ProviderUnavailable) as exc:
            log.warning("identity not updated after a token refresh; keeping the previous one",
                        extra={"reason": exc.reason, "user": identity.user})
            return identity
        if rebuilt.sub != identity.sub:  # refresh() checks this; never trust it to be so
            log.warning("refreshed identity is for another subject; keeping the previous one",
                        extra={"user": identity.user})
            return identity
        return rebuilt

    async def identity_for_login(
        self, claims: Mapping[str, Any], info: Mapping[str, Any] | None, access_token: str | None
    ) -> Identity:
        """The identity of a login, with its groups from every configured source: the access
        token only once validated, a group overage resolved through Microsoft Graph. What
        cannot be had leaves the groups "unavailable" (rules on groups fail closed), never an
        error and never a pass. Resolved once here and kept in the sealed session."""
        cfg = self.config.claims
        access: dict[str, Any] | None = None
        if "access_token" in cfg.groups_from and access_token:
            access = await self.access_token_claims(access_token)
        identity = oidc.identity_from_claims(
            claims, userinfo=info, claims=cfg, access_claims=access
        )
        if (
            identity.groups_state == "unavailable"
            and cfg.groups_overage == "graph"
            and access_token
            and oidc.groups_overage(claims)
        ):
            try:
                found = await graph.member_groups(
                    self._http, self.config.graph_url, access_token, seconds=self.config.timeout
                )
            except graph.GraphError as exc:
                log.warning("group overage not resolved: %s", exc.message,
                            extra={"reason": exc.reason, "user": identity.user})
            else:
                identity = oidc.with_groups(identity, found)
                log.info("group overage resolved through Microsoft Graph",
                         extra={"user": identity.user, "groups": len(found)})
        if identity.groups_state == "truncated":
            log.warning(
                "groups claim has %d entries, at provider.claims.groups_cap: it may be "
                "truncated, so deny rules on groups fail closed",
                len(identity.groups), extra={"user": identity.user})
        elif identity.groups_state != "ok":
            log.warning("group membership %s: rules on groups fail closed",
                        identity.groups_state, extra={"user": identity.user})
        return identity

    async def access_token_claims(self, access_token: str) -> dict[str, Any] | None:
        """The login's access token claims when it validates (signature, issuer, party,
        expiry: :func:`oidc.access_token_claims_for_login`), else None (logged, never the
        token). An unknown kid triggers one (throttled) JWKS refetch."""
        meta = self.metadata
        for attempt in range(2):
            generation = self._jwks_generation
            try:
                return oidc.access_token_claims_for_login(
                    access_token,
                    keys=self._keys,
                    issuer=meta.issuer,
                    client_id=self.config.client_id,
                    algorithms=self._algorithms,
                    leeway=self.config.leeway,
                    now=self._clock(),
                )
            except UnknownSigningKey as exc:
                if attempt or not await self._refetch_jwks(generation):
                    log.warning("access token not usable for groups: %s", exc.message)
                    return None
            except OIDCError as exc:
                log.warning("access token not usable for groups: %s", exc.message,
                            extra={"reason": exc.reason})
                return None
        return None  # pragma: no cover

    def end_session_url(
        self, *, id_token_hint: str, post_logout_redirect_uri: str | None
    ) -> str | None:
        """Where to send the browser to end its session at the provider (None if unsupported)."""
        if self._meta is None:
            return None
        return oidc.end_session_url(
            self._meta,
            id_token_hint=id_token_hint,
            post_logout_redirect_uri=post_logout_redirect_uri,
            client_id=self.config.client_id,
        )


def _describe(exc: BaseException) -> str:
    """A short operator-facing description of a client error (no request data in it)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
