"""One exception tree for the whole gateway.

Every error knows the HTTP status it should become (``status_hint``) and a stable ``reason``
id that appears in logs, metrics and on error pages, so an operator can grep for it. Messages
are written for the person who has to act on them; they never contain tokens or secrets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status_hint: int = 500
    reason: str = "internal_error"

    def __init__(self, message: str, *, reason: str | None = None, status_hint: int | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if status_hint is not None:
            self.status_hint = status_hint


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file: where (``routes[1].match.path``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(GatewayError):
    """The configuration is invalid; carries every problem found, not just the first."""

    reason = "config_invalid"

    def __init__(self, problems: Sequence[ConfigProblem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid configuration")


class RequestError(GatewayError):
    """An error that ends one request with an error answer."""

    status_hint = 400
    reason = "bad_request"


class BadRequest(RequestError):
    status_hint = 400
    reason = "bad_request"


class ExpectationFailed(RequestError):
    """An ``Expect`` header other than ``100-continue`` (RFC 9110 10.1.1)."""

    status_hint = 417
    reason = "expectation_failed"


class HeadersTooLarge(RequestError):
    status_hint = 431
    reason = "headers_too_large"


class NotFound(RequestError):
    status_hint = 404
    reason = "no_route"


class NotAuthenticated(RequestError):
    status_hint = 401
    reason = "unauthenticated"


class Forbidden(RequestError):
    status_hint = 403
    reason = "forbidden"


class BearerTokenError(RequestError):
    """An ``Authorization: Bearer`` credential was refused (RFC 6750 §3.1).

    ``error`` is the RFC 6750 error code (``invalid_token``, ``invalid_request`` or
    ``insufficient_scope``); the answer carries :attr:`challenge` in ``WWW-Authenticate`` so
    an API client learns why without a redirect or a cookie. The message names the failed
    check only, never the token.
    """

    status_hint = 401
    reason = "bearer_token_invalid"

    def __init__(
        self,
        message: str,
        *,
        error: str = "invalid_token",
        reason: str | None = None,
        status_hint: int | None = None,
    ):
        super().__init__(message, reason=reason, status_hint=status_hint)
        self.error = error

    @property
    def challenge(self) -> str:
        # RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E (no " or \).
        text = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in self.message)
        return (
            f'Bearer realm="oidc-gateway", error="{self.error}", error_description="{text[:200]}"'
        )


class BadRedirect(RequestError):
    status_hint = 400
    reason = "bad_redirect"


class OIDCError(RequestError):
    """The login could not be completed: the provider said no, or sent something invalid.

    ``status_hint`` is 400 for problems with the browser's request (stale state), 401 when the
    provider's answer fails validation, 502/504 when the provider is broken or unreachable.
    """

    status_hint = 401
    reason = "oidc_error"
    # Where "try again" should lead: the page the user wanted when the login started.
    retry_target: str = "/"


class UnknownSigningKey(OIDCError):
    """The ID token names a key (``kid``) that is not in the JWKS we hold: maybe a rotation."""

    reason = "unknown_signing_key"


class ProviderUnavailable(OIDCError):
    status_hint = 503
    reason = "provider_unavailable"


class SessionStoreError(RequestError):
    """The session store cannot be reached or answered garbage: fail closed with 503."""

    status_hint = 503
    reason = "session_store_unavailable"


class UpstreamError(RequestError):
    status_hint = 502
    reason = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status_hint = 504
    reason = "upstream_timeout"
