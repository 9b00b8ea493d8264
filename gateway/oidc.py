"""Sans-IO OpenID Connect: everything about the protocol that is not sending bytes.

Discovery parsing, the authorization URL (state, nonce, PKCE S256), token and refresh request
specifications, token/callback response parsing, ID token validation (OpenID Connect Core
§3.1.3.7) and turning claims into an :class:`~gateway.models.Identity`.

Pure: no network, no event loop, no clock and no randomness of its own. The current time comes
in as ``now`` (float seconds since the epoch), randomness as ``token_bytes``; the I/O adapter
(:mod:`gateway.idp`) sends the :class:`HttpRequestSpec` values built here and feeds the answers
back to the parsers.

JOSE work is done with joserfc (``authlib.jose`` is deprecated). The ID token claim checks are
written out here, one per step of §3.1.3.7, rather than delegated to a claims registry, so that
each one is visible, tested, and cannot be switched off by a provider's metadata (security notes
1, 2, 3 and 19).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, OctKey

from gateway.config import ClaimsConfig, claim_at, parse_claim_path
from gateway.errors import OIDCError, UnknownSigningKey
from gateway.issuers import IssuerRule, issuer_problem, same_issuer_spelling
from gateway.models import GroupsState, Identity, LoginState, TokenSet

__all__ = [
    "BACKCHANNEL_LOGOUT_EVENT",
    "HttpRequestSpec",
    "KeySet",
    "LogoutToken",
    "ProviderMetadata",
    "access_token_claims_for_login",
    "authorization_url",
    "code_challenge",
    "coerce_groups",
    "discovery_url",
    "end_session_url",
    "groups_overage",
    "id_token_expiry",
    "identity_from_claims",
    "json_object",
    "needs_refresh",
    "new_login_state",
    "number_claim",
    "parse_callback",
    "parse_discovery",
    "parse_jwks",
    "parse_token_response",
    "premature_claim",
    "refresh_due",
    "refresh_request",
    "signed_access_token",
    "states_match",
    "token_request",
    "tokens_expire_at",
    "validate_id_token",
    "validate_logout_token",
    "with_groups",
]

WELL_KNOWN: Final = "/.well-known/openid-configuration"

# OIDC Core §2: "sub ... MUST NOT exceed 255 ASCII characters in length" (security note 19).
MAX_SUB_LENGTH: Final = 255
# Bytes of randomness in state, nonce and the PKCE verifier (RFC 7636 §4.1: 32 octets → 43 chars).
RANDOM_BYTES: Final = 32
# An authorization code longer than this is not a code, it is an attack on our logs or store.
MAX_CODE_LENGTH: Final = 4096
# What of a provider's error text we repeat in our messages (sanitised, see _printable).
MAX_PROVIDER_TEXT: Final = 200

# Authorization errors caused by the user or their session at the provider (OIDC Core §3.1.2.6,
# RFC 6749 §4.1.2.1), as opposed to the provider failing or rejecting our registration.
_USER_DENIALS: Final = frozenset(
    {
        "access_denied",
        "login_required",
        "consent_required",
        "interaction_required",
        "account_selection_required",
    }
)
_PROVIDER_FAILURES: Final = frozenset({"server_error", "temporarily_unavailable"})

# Claims that only the ID token may assert: userinfo must not override them when merged.
_ID_TOKEN_ONLY: Final = frozenset(
    {
        "sub",
        "iss",
        "aud",
        "azp",
        "exp",
        "iat",
        "nbf",
        "nonce",
        "auth_time",
        "acr",
        "amr",
        "at_hash",
        "c_hash",
        "sid",
        "jti",
    }
)


def _invalid(message: str) -> OIDCError:
    return OIDCError(message, reason="id_token_invalid", status_hint=401)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_object(body: bytes | bytearray) -> dict[str, Any] | None:
    """A provider's answer body as a JSON object, or None when it is not one (not JSON, not
    UTF-8, or JSON of another type): each caller says in its own words what it expected."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _printable(value: object, limit: int = MAX_PROVIDER_TEXT) -> str:
    """A provider-supplied string made safe to repeat: printable ASCII only, length capped."""
    text = value if isinstance(value, str) else ""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text[: limit + 1])
    return clean if len(clean) <= limit else clean[:limit] + "..."


def number_claim(value: object) -> float | None:
    """A JSON number (a NumericDate claim, expires_in) as float; None for bools, NaN,
    infinities and anything not a number."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _with_query(url: str, params: Iterable[tuple[str, str]]) -> str:
    """``url`` with ``params`` appended to whatever query it already has (Azure B2C's ``?p=``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


# ---------------------------------------------------------------------------------------------
# Discovery (OpenID Connect Discovery 1.0)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of the provider's discovery document the gateway uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None = None
    end_session_endpoint: str | None = None
    # RFC 8414 §2 / RFC 7662: where opaque bearer tokens are checked (routes[].bearer).
    introspection_endpoint: str | None = None
    id_token_signing_alg_values_supported: tuple[str, ...] = ("RS256",)
    token_endpoint_auth_methods_supported: tuple[str, ...] = ("client_secret_basic",)
    code_challenge_methods_supported: tuple[str, ...] = ()
    authorization_response_iss_parameter_supported: bool = False


def discovery_url(issuer: str) -> str:
    """Where the discovery document of ``issuer`` lives (Discovery §4: issuer + well-known)."""
    return issuer.rstrip("/") + WELL_KNOWN


def _discovery_invalid(message: str) -> OIDCError:
    return OIDCError(message, reason="discovery_invalid", status_hint=502)


def _optional_url(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _discovery_invalid(f"{key} is not a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise _discovery_invalid(f"{key} must be an http(s) URL, got {_printable(value)!r}")
    return value


def _required_url(doc: Mapping[str, Any], key: str) -> str:
    value = _optional_url(doc, key)
    if value is None:
        raise _discovery_invalid(f"{key} is missing")
    return value


def _str_tuple(doc: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _discovery_invalid(f"{key} must be a list of strings")
    return tuple(value)


def parse_discovery(body: bytes, *, expected_issuer: str) -> ProviderMetadata:
    """Parse a discovery document; its ``issuer`` must equal the configured one exactly.

    Discovery §4.3: "The issuer value returned MUST be identical to the Issuer URL that was
    used as the prefix to /.well-known/openid-configuration". One trailing slash more or less
    (Auth0) is the only difference let through (:func:`gateway.issuers.same_issuer_spelling`):
    the metadata then holds discovery's spelling, which tokens must carry exactly. Anything else
    raises ``OIDCError(reason="discovery_invalid")``.
    """
    doc = json_object(body)
    if doc is None:
        raise _discovery_invalid("the discovery document is not a JSON object")
    issuer = doc.get("issuer")
    if not isinstance(issuer, str):
        raise _discovery_invalid("the discovery document has no issuer")
    if not same_issuer_spelling(issuer, expected_issuer):
        raise _discovery_invalid(
            f"the discovery document names issuer {_printable(issuer)!r}, but provider.issuer "
            f"is {expected_issuer!r}; they must be identical (check the trailing slash)"
        )
    iss_param = doc.get("authorization_response_iss_parameter_supported", False)
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=_required_url(doc, "authorization_endpoint"),
        token_endpoint=_required_url(doc, "token_endpoint"),
        jwks_uri=_required_url(doc, "jwks_uri"),
        userinfo_endpoint=_optional_url(doc, "userinfo_endpoint"),
        end_session_endpoint=_optional_url(doc, "end_session_endpoint"),
        introspection_endpoint=_optional_url(doc, "introspection_endpoint"),
        # REQUIRED by Discovery §3; a provider that omits it signs with RS256 (Core §15.1).
        id_token_signing_alg_values_supported=_str_tuple(
            doc, "id_token_signing_alg_values_supported", ("RS256",)
        ),
        # Discovery §3: "If omitted, the default is client_secret_basic".
        token_endpoint_auth_methods_supported=_str_tuple(
            doc, "token_endpoint_auth_methods_supported", ("client_secret_basic",)
        ),
        code_challenge_methods_supported=_str_tuple(doc, "code_challenge_methods_supported", ()),
        authorization_response_iss_parameter_supported=iss_param is True,
    )


# ---------------------------------------------------------------------------------------------
# Authorization request (state, nonce, PKCE)
# ---------------------------------------------------------------------------------------------


def code_challenge(verifier: str) -> str:
    """RFC 7636 §4.2, S256: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_login_state(*, target: str, now: float, token_bytes: Callable[[int], bytes]) -> LoginState:
    """Fresh state, nonce and PKCE verifier (32 random bytes each, base64url) for one login."""
    return LoginState(
        state=_b64url(token_bytes(RANDOM_BYTES)),
        nonce=_b64url(token_bytes(RANDOM_BYTES)),
        code_verifier=_b64url(token_bytes(RANDOM_BYTES)),
        target=target,
        created_at=now,
    )


def authorization_url(
    meta: ProviderMetadata,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: Sequence[str],
    login: LoginState,
    extra: Sequence[tuple[str, str]] = (),
) -> str:
    """The provider URL that starts the authorization code flow with PKCE S256.

    ``extra`` holds ``provider.auth_params`` (Google's ``access_type``/``prompt``...), added
    after the gateway's own parameters; config refuses any that would replace one of them.
    """
    challenge = code_challenge(login.code_verifier)
    if not (
        _URL_SAFE.fullmatch(login.state)
        and _URL_SAFE.fullmatch(login.nonce)
        and _URL_SAFE.fullmatch(challenge)
    ):
        return _with_query(
            meta.authorization_endpoint,
            [
                ("response_type", "code"),
                ("client_id", client_id),
                ("redirect_uri", redirect_uri),
                ("scope", " ".join(scopes)),
                ("state", login.state),
                ("nonce", login.nonce),
                ("code_challenge", challenge),
                ("code_challenge_method", "S256"),
                *extra,
            ],
        )
    # Every redirect to the provider builds this URL; all but three values are the same each
    # time, so their encoded form is made once (the same bytes urlencode would give).
    head, tail = _authorization_parts(
        meta.authorization_endpoint, client_id, redirect_uri, tuple(scopes), tuple(extra)
    )
    return f"{head}&state={login.state}&nonce={login.nonce}&code_challenge={challenge}{tail}"


# Values that urlencode leaves as they are (base64url: state, nonce, PKCE challenge).
_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


@functools.lru_cache(maxsize=64)
def _authorization_parts(
    endpoint: str,
    client_id: str,
    redirect_uri: str,
    scopes: tuple[str, ...],
    extra: tuple[tuple[str, str], ...],
) -> tuple[str, str]:
    """The authorization URL before ``state`` and after ``code_challenge``."""
    head = _with_query(
        endpoint,
        [
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", redirect_uri),
            ("scope", " ".join(scopes)),
        ],
    )
    tail = "&" + urlencode([("code_challenge_method", "S256"), *extra])
    return head, tail


def states_match(a: str, b: str) -> bool:
    """Compare two state (or nonce) values in constant time."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def parse_callback(query: Mapping[str, str], *, meta: ProviderMetadata) -> str:
    """Check the authorization response (RFC 6749 §4.1.2, RFC 9207) and return the code.

    The state is not checked here: the caller looks up its stored LoginState by it and compares
    with :func:`states_match`.
    """
    # RFC 9207 §2.4: when the provider announces the iss parameter it MUST be present, and when
    # present it must name our provider, for error responses too (mix-up defence, note 12).
    iss = query.get("iss")
    if iss is None:
        if meta.authorization_response_iss_parameter_supported:
            raise OIDCError(
                "The sign-in answer lacks the iss parameter that this provider promises "
                "(RFC 9207); it may come from another provider. Start again.",
                reason="callback_issuer_mismatch",
                status_hint=400,
            )
    elif iss != meta.issuer:
        raise OIDCError(
            f"The sign-in answer comes from issuer {_printable(iss)!r}, not from "
            f"{meta.issuer!r} (RFC 9207 mix-up defence). Start again.",
            reason="callback_issuer_mismatch",
            status_hint=400,
        )

    error = query.get("error")
    if error is not None:
        code = _printable(error, 64) or "unknown"
        description = _printable(query.get("error_description", ""))
        detail = f" ({description})" if description else ""
        if error in _PROVIDER_FAILURES:
            raise OIDCError(
                f"The sign-in service reported a failure: {code}{detail}. Try again later.",
                reason="provider_error",
                status_hint=502,
            )
        hint = "" if error in _USER_DENIALS else " Check the client registration at the provider."
        raise OIDCError(
            f"The sign-in service did not sign you in: {code}{detail}.{hint}",
            reason="provider_denied",
            status_hint=401,
        )

    code_value = query.get("code", "")
    if not code_value:
        raise OIDCError(
            "The sign-in answer carries no authorization code. Start again.",
            reason="callback_invalid",
            status_hint=400,
        )
    if len(code_value) > MAX_CODE_LENGTH:
        raise OIDCError(
            "The sign-in answer carries an implausibly long authorization code.",
            reason="callback_invalid",
            status_hint=400,
        )
    return code_value


# ---------------------------------------------------------------------------------------------
# Token endpoint
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpRequestSpec:
    """An HTTP request for the adapter to send. Headers and form hold secrets: not in repr."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    form: tuple[tuple[str, str], ...] = field(repr=False)

    def body(self) -> bytes:
        """The form, application/x-www-form-urlencoded."""
        return urlencode(self.form).encode("ascii")


def basic_authorization(client_id: str, client_secret: str) -> str:
    """RFC 6749 §2.3.1: Basic over the form-urlencoded id and secret (security note 11)."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def _token_spec(
    meta: ProviderMetadata,
    form: list[tuple[str, str]],
    *,
    client_id: str,
    client_secret: str,
    auth_method: str,
) -> HttpRequestSpec:
    headers = [
        ("Accept", "application/json"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ]
    if auth_method == "client_secret_basic":
        headers.append(("Authorization", basic_authorization(client_id, client_secret)))
    elif auth_method == "client_secret_post":
        form += [("client_id", client_id), ("client_secret", client_secret)]
    else:
        raise ValueError(f"unsupported token endpoint auth method {auth_method!r}")
    return HttpRequestSpec("POST", meta.token_endpoint, tuple(headers), tuple(form))


def token_request(
    meta: ProviderMetadata,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    client_id: str,
    client_secret: str,
    auth_method: str,
) -> HttpRequestSpec:
    """The authorization code exchange (RFC 6749 §4.1.3 with the RFC 7636 verifier)."""
    form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", redirect_uri),
        ("code_verifier", code_verifier),
    ]
    return _token_spec(
        meta, form, client_id=client_id, client_secret=client_secret, auth_method=auth_method
    )


def refresh_request(
    meta: ProviderMetadata,
    *,
    refresh_token: str,
    client_id: str,
    client_secret: str,
    auth_method: str,
    scopes: Sequence[str] | None = None,
) -> HttpRequestSpec:
    """A refresh token grant (RFC 6749 §6); ``scopes`` None or empty asks for the same scope."""
    form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token)]
    if scopes:
        form.append(("scope", " ".join(scopes)))
    return _token_spec(
        meta, form, client_id=client_id, client_secret=client_secret, auth_method=auth_method
    )


def _provider_error(message: str) -> OIDCError:
    return OIDCError(message, reason="provider_error", status_hint=502)


def parse_token_response(
    status: int, body: bytes, *, now: float, require_id_token: bool = True
) -> TokenSet:
    """Turn the token endpoint's answer into a TokenSet, or raise OIDCError.

    4xx with an RFC 6749 §5.2 error → ``token_error`` (401); 5xx, any other status, or a body
    that is not the JSON we need → ``provider_error`` (502). With ``require_id_token=False``
    (refresh: OIDC Core §12.2 lets the provider omit it) a missing ID token gives ``id_token=""``.
    """
    doc = json_object(body)
    if status != 200:
        if 400 <= status < 500 and doc is not None and isinstance(doc.get("error"), str):
            code = _printable(doc["error"], 64) or "unknown"
            description = _printable(doc.get("error_description", ""))
            detail = f" ({description})" if description else ""
            raise OIDCError(
                f"The sign-in service refused the token request: {code}{detail}.",
                reason="token_error",
                status_hint=401,
            )
        raise _provider_error(
            f"The sign-in service's token endpoint answered HTTP {status}. Try again later."
        )
    if doc is None:
        raise _provider_error("The sign-in service's token endpoint answered something not JSON.")
    access_token = doc.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _provider_error("The token response has no access_token.")
    token_type = doc.get("token_type")
    # RFC 6749 §7.1 / §5.1: token_type is REQUIRED and case-insensitive; OIDC Core §3.1.3.3
    # demands Bearer.
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise _provider_error(
            f"The token response's token_type is {_printable(token_type, 32)!r}, not Bearer."
        )
    id_token = doc.get("id_token")
    if id_token is None and not require_id_token:
        id_token = ""
    if not isinstance(id_token, str) or (require_id_token and not id_token):
        raise _provider_error(
            "The token response carries no id_token; is the openid scope granted to this client?"
        )
    refresh_token = doc.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
        raise _provider_error("The token response's refresh_token is not a string.")
    expires_in = doc.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():  # seen in the wild (old Azure AD)
        expires_in = int(expires_in)
    expires_at: float | None = None
    if expires_in is not None:
        seconds = number_claim(expires_in)
        if seconds is None or seconds < 0:
            raise _provider_error("The token response's expires_in is not a number of seconds.")
        expires_at = now + seconds
    return TokenSet(
        id_token=id_token,
        access_token=access_token,
        refresh_token=refresh_token,
        token_type="Bearer",  # noqa: S106 - the normalised type name
        expires_at=expires_at,
    )


def id_token_expiry(id_token: str) -> float | None:
    """The ``exp`` of an ID token the gateway validated at login, or None if unreadable.

    Read without checking the signature: this token was validated when it was received and
    has sat sealed in the store since; only its expiry time is wanted here.
    """
    parts = id_token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return number_claim(payload.get("exp")) if isinstance(payload, dict) else None


def tokens_expire_at(tokens: TokenSet) -> float | None:
    """When the session's tokens expire: the access token's expiry, else the ID token's."""
    if tokens.expires_at is not None:
        return tokens.expires_at
    return id_token_expiry(tokens.id_token) if tokens.id_token else None


def refresh_due(tokens: TokenSet, *, now: float, margin: float) -> bool:
    """True when the tokens expire within ``margin`` seconds and a refresh token exists.

    The access token's expiry counts when the provider gave one, else the ID token's ``exp``
    (issue 4: "the access token, or ID token if no access token expiry is known").
    """
    expires = tokens_expire_at(tokens)
    return tokens.refresh_token is not None and expires is not None and expires - margin <= now


def needs_refresh(tokens: TokenSet, *, now: float, margin: float = 60.0) -> bool:
    """True when the access token expires within ``margin`` seconds and can be refreshed."""
    return (
        tokens.refresh_token is not None
        and tokens.expires_at is not None
        and tokens.expires_at - margin <= now
    )


# ---------------------------------------------------------------------------------------------
# JWKS
# ---------------------------------------------------------------------------------------------

_PUBLIC_KEY_TYPES: Final = frozenset({"RSA", "EC", "OKP"})


class KeySet:
    """The provider's public signing keys, as parsed from its JWKS.

    ``kids`` holds the key ids the JWKS named; keys without one are used for tokens without
    ``kid`` only.
    """

    __slots__ = ("entries", "kids")

    def __init__(self, entries: Iterable[tuple[str | None, Key]] = ()) -> None:
        self.entries: tuple[tuple[str | None, Key], ...] = tuple(entries)
        self.kids: frozenset[str] = frozenset(k for k, _ in self.entries if k is not None)

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple(key for _, key in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __repr__(self) -> str:
        return f"KeySet(kids={sorted(self.kids)!r}, size={len(self.entries)})"

    def usable_for(self, alg: str) -> bool:
        """Whether any key here can verify ``alg``."""
        return any(_key_fits(key, alg) for _, key in self.entries)


def parse_jwks(body: bytes) -> KeySet:
    """Parse a JWKS, keeping the public part of each signature key joserfc understands.

    Keys that fail to parse, are not for signatures (``use`` other than ``sig``, ``key_ops``
    without ``verify``) or are symmetric are skipped; a private key published by mistake is
    reduced to its public part. A body that is not a JWKS at all raises
    ``OIDCError(reason="jwks_invalid")``; a JWKS without a usable key gives an empty KeySet.
    """
    doc = json_object(body)
    if doc is None or not isinstance(doc.get("keys"), list):
        raise OIDCError(
            'the JWKS is not a JSON object with a "keys" list',
            reason="jwks_invalid",
            status_hint=502,
        )
    entries: list[tuple[str | None, Key]] = []
    for item in doc["keys"]:
        if not isinstance(item, dict) or item.get("kty") not in _PUBLIC_KEY_TYPES:
            continue
        use = item.get("use")
        if use is not None and use != "sig":
            continue
        ops = item.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        kid = item.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        alg = item.get("alg")
        if alg is not None and not isinstance(alg, str):
            continue
        try:
            key = JWKRegistry.import_key(item)
            if key.is_private:
                key = JWKRegistry.import_key(key.as_dict(private=False))
        except (JoseError, ValueError, TypeError, KeyError):
            continue
        entries.append((kid, key))
    return KeySet(entries)


def _key_fits(key: Key, alg: str) -> bool:
    """Whether ``key`` can verify ``alg`` (type and curve, and the key's own ``alg`` if set)."""
    model = jws.JWSRegistry.algorithms.get(alg)
    if model is None:
        return False
    declared = key.get("alg")
    if declared is not None and declared != alg:
        return False
    try:
        model.check_key(key)
    except (JoseError, ValueError, TypeError):
        return False
    return True


class _IdTokenRegistry(jws.JWSRegistry):
    # joserfc caps the protected header at 512 bytes; a header with an x5c chain is larger.
    max_header_length = 8192


# ---------------------------------------------------------------------------------------------
# ID token validation (OpenID Connect Core 1.0 §3.1.3.7)
# ---------------------------------------------------------------------------------------------


def _verify_signature(
    id_token: str,
    *,
    keys: KeySet,
    algorithms: Sequence[str],
    client_secret: str | None,
) -> jws.CompactSignature:
    """Steps 6-8: check the JWS signature with an allowed algorithm and the provider's key."""
    if id_token.count(".") == 4:
        raise _invalid("The ID token is encrypted (JWE); encrypted ID tokens are not supported.")
    registry = _IdTokenRegistry(strict_check_header=False)
    try:
        obj = jws.extract_compact(id_token.encode("ascii"), registry=registry)
    except (JoseError, ValueError, TypeError, UnicodeEncodeError):
        raise _invalid("The ID token is not a well-formed signed JWT.") from None
    header = obj.headers()
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _invalid("The ID token header names no signing algorithm.")
    # Step 7 (and security note 2): the algorithm must be one we pinned. `none` is refused
    # whatever list we are handed; HMAC only when the caller listed it explicitly.
    if alg.lower() == "none":
        raise _invalid("The ID token is unsigned (alg none); unsigned tokens are never accepted.")
    if alg not in algorithms:
        raise _invalid(f"The ID token is signed with {_printable(alg, 16)}, which is not allowed.")
    if "crit" in header or "b64" in header:
        raise _invalid("The ID token header uses JWS extensions (crit/b64) that are not accepted.")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _invalid("The ID token header's kid is not a string.")

    candidates: list[Key]
    if alg.startswith("HS"):
        # Step 8: MAC-based algorithms use the octets of the client secret as the key.
        if not client_secret:
            raise _invalid(f"The ID token uses {alg}, but no client secret is available.")
        try:
            candidates = [OctKey.import_key(client_secret.encode("utf-8"))]
        except (JoseError, ValueError):
            raise _invalid(f"The client secret cannot be used as an {alg} key.") from None
    else:
        if kid is not None:
            if kid not in keys.kids:
                # Maybe the provider rotated its keys: the adapter refetches the JWKS.
                raise UnknownSigningKey(
                    "The ID token is signed with a key the provider's JWKS does not list."
                )
            named = [key for k, key in keys.entries if k == kid]
            candidates = [key for key in named if _key_fits(key, alg)]
            if not candidates:
                raise _invalid(f"The ID token's key cannot be used with {alg}.")
        else:
            # No kid: try every key that fits the algorithm (Core §10.1 allows omitting kid
            # when the JWKS holds one key per type; several are tried in turn).
            candidates = [key for _, key in keys.entries if _key_fits(key, alg)]
            if not candidates:
                raise UnknownSigningKey(
                    f"The ID token names no key and the provider's JWKS has none for {alg}."
                )
    verifier = _IdTokenRegistry(algorithms=[alg], strict_check_header=False)
    for key in candidates:
        try:
            if jws.validate_compact(obj, key, registry=verifier):
                return obj
        except (JoseError, ValueError, TypeError):
            continue
    raise _invalid("The ID token's signature is invalid.")


def validate_id_token(
    id_token: str,
    *,
    keys: KeySet,
    issuer: str | IssuerRule,
    client_id: str,
    nonce: str | None,
    algorithms: Sequence[str],
    leeway: float,
    now: float,
    max_age: float | None = None,
    client_secret: str | None = None,
) -> dict[str, Any]:
    """Validate an ID token per OpenID Connect Core §3.1.3.7 and return its claims.

    ``algorithms`` is what the caller allows (config ∩ provider); ``none`` is refused even if
    listed. ``leeway`` is the clock skew tolerated on ``exp``/``iat``/``auth_time`` and must be
    given (authlib's 120 s default is not ours, note 3). ``nonce`` None skips the nonce check
    (refresh, §12.2). ``client_secret`` is only used for HS* algorithms, which must be listed
    in ``algorithms`` explicitly. Raises UnknownSigningKey for a kid the KeySet lacks, else
    ``OIDCError(reason="id_token_invalid", status_hint=401)`` with a specific message.
    """
    # Step 1 (decrypt if encrypted) is not supported: _verify_signature refuses JWE.
    # Steps 6-8 first: nothing in an unverified payload is worth reading.
    obj = _verify_signature(id_token, keys=keys, algorithms=algorithms, client_secret=client_secret)
    claims = json_object(obj.payload)
    if claims is None:
        raise _invalid("The ID token's payload is not a JSON object.")

    # Step 2: iss MUST exactly match the Issuer Identifier from discovery (an IssuerRule
    # spells out the only known exceptions: Entra's {tenantid}, Google's scheme-less iss).
    iss_problem = issuer_problem(issuer, claims)
    if iss_problem is not None:
        raise _invalid(f"The ID token {iss_problem}.")

    # Step 3: aud MUST contain our client_id; a token with audiences we do not trust is
    # rejected outright (security note 1), not just one that lacks ours.
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not audiences:
        raise _invalid("The ID token has no audience.")
    if not all(isinstance(a, str) for a in audiences):
        raise _invalid("The ID token's audience is malformed.")
    if client_id not in audiences:
        raise _invalid("The ID token audience does not contain this client.")
    if any(a != client_id for a in audiences):
        raise _invalid("The ID token audience names other, untrusted clients.")

    # Steps 4-5: azp, when present (it is required with several audiences, which we refuse
    # anyway), MUST be our client_id.
    if "azp" in claims and claims["azp"] != client_id:
        raise _invalid("The ID token was issued to another party (azp).")

    # Step 9: the current time MUST be before exp (with the configured leeway).
    exp = number_claim(claims.get("exp"))
    if exp is None:
        raise _invalid("The ID token has no valid expiry (exp).")
    if now - leeway >= exp:
        raise _invalid("The ID token has expired.")

    # Step 10: iat is required; one issued in the future (beyond the leeway) is refused.
    iat = number_claim(claims.get("iat"))
    if iat is None:
        raise _invalid("The ID token has no valid issue time (iat).")
    if iat > now + leeway:
        raise _invalid("The ID token was issued in the future; check the clocks.")
    nbf = claims.get("nbf")
    if nbf is not None and (number_claim(nbf) is None or float(nbf) > now + leeway):
        raise _invalid("The ID token is not valid yet (nbf).")

    # Step 11: the nonce MUST equal the one sent in the authentication request.
    if nonce is not None:
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str):
            raise _invalid("The ID token carries no nonce.")
        if not states_match(token_nonce, nonce):
            raise _invalid("The ID token's nonce does not match this sign-in.")

    # Step 12 (acr) is not requested by the gateway.
    # Step 13: with max_age, auth_time is required and must be recent enough.
    if max_age is not None:
        auth_time = number_claim(claims.get("auth_time"))
        if auth_time is None:
            raise _invalid("The ID token has no auth_time, but max_age was requested.")
        if auth_time + max_age + leeway < now:
            raise _invalid("The sign-in at the provider is older than max_age.")

    # §2: sub is REQUIRED, a string of at most 255 ASCII characters (security note 19).
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _no_subject()
    if len(sub) > MAX_SUB_LENGTH or not sub.isascii():
        raise _invalid("The ID token's subject is not at most 255 ASCII characters.")
    return claims


# ---------------------------------------------------------------------------------------------
# Back-Channel Logout (OpenID Connect Back-Channel Logout 1.0)
# ---------------------------------------------------------------------------------------------

BACKCHANNEL_LOGOUT_EVENT: Final = "http://schemas.openid.net/event/backchannel-logout"
# A logout token older than this (by iat) is refused: replays are caught by jti for this long.
LOGOUT_TOKEN_MAX_AGE: Final = 600.0


@dataclass(frozen=True, slots=True)
class LogoutToken:
    """The parts of a validated logout token the gateway acts on."""

    jti: str
    sid: str | None
    sub: str | None
    iat: float


def _logout_invalid(message: str) -> OIDCError:
    return OIDCError(message, reason="logout_token_invalid", status_hint=400)


def validate_logout_token(
    token: str,
    *,
    keys: KeySet,
    issuer: str | IssuerRule,
    client_id: str,
    algorithms: Sequence[str],
    leeway: float,
    now: float,
) -> LogoutToken:
    """Validate a logout token per Back-Channel Logout 1.0 §2.6 and return what it names.

    Signature with the provider's keys (same pinned algorithms as ID tokens, never ``none`` or
    HMAC unless listed), ``iss`` exact, ``aud`` ours only, ``iat`` present and recent, ``exp``
    if present not passed, the back-channel ``events`` member, ``sid`` and/or ``sub``, ``jti``
    (for replay detection by the caller), and no ``nonce`` (§2.4: its presence tells a logout
    token apart from an ID token, so an ID token can never log anyone out). Raises
    UnknownSigningKey for an unknown kid, else ``OIDCError(reason="logout_token_invalid",
    status_hint=400)``.
    """
    try:
        obj = _verify_signature(token, keys=keys, algorithms=algorithms, client_secret=None)
    except UnknownSigningKey:
        raise
    except OIDCError as exc:
        raise _logout_invalid(
            "logout token: " + exc.message.replace("The ID token", "the token")) from None
    try:
        claims = json.loads(obj.payload)
    except (ValueError, UnicodeDecodeError):
        raise _logout_invalid("logout token: the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise _logout_invalid("logout token: the payload is not a JSON object")
    if issuer_problem(issuer, claims) is not None:
        raise _logout_invalid("logout token: issued by another issuer")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if (not isinstance(audiences, list) or not audiences
            or any(a != client_id for a in audiences)):
        raise _logout_invalid("logout token: the audience is not this client alone")
    iat = number_claim(claims.get("iat"))
    if iat is None:
        raise _logout_invalid("logout token: no issue time (iat)")
    if iat > now + leeway:
        raise _logout_invalid("logout token: issued in the future; check the clocks")
    if iat < now - LOGOUT_TOKEN_MAX_AGE - leeway:
        raise _logout_invalid("logout token: too old")
    if "exp" in claims:
        exp = number_claim(claims.get("exp"))
        if exp is None or now - leeway >= exp:
            raise _logout_invalid("logout token: expired")
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
        raise _logout_invalid("logout token: no back-channel logout event")
    if "nonce" in claims:
        raise _logout_invalid("logout token: carries a nonce (an ID token is not a logout token)")
    sid, sub = claims.get("sid"), claims.get("sub")
    if sid is not None and (not isinstance(sid, str) or not sid):
        raise _logout_invalid("logout token: sid is not a string")
    if sub is not None and (not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH):
        raise _logout_invalid("logout token: sub is not a string of at most 255 characters")
    if sid is None and sub is None:
        raise _logout_invalid("logout token: names neither sid nor sub")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 256:
        raise _logout_invalid("logout token: no jti")
    return LogoutToken(jti=jti, sid=sid, sub=sub, iat=iat)


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _path(text: str) -> tuple[str, ...]:
    # Validated when the config loaded (ClaimsConfig); cached: it runs at every login.
    return parse_claim_path(text)


def _claim(claims: Mapping[str, Any], name: str) -> object | None:
    """The claim at path ``name`` (``realm_access.roles``, ``["cognito:groups"]``), or None."""
    return claim_at(claims, _path(name))


def _find(claims: Mapping[str, Any], name: str) -> tuple[bool, object]:
    """Whether the claim at path ``name`` is present (a JSON null counts), and its value."""
    path = _path(name)
    parent = claim_at(claims, path[:-1]) if len(path) > 1 else claims
    if not isinstance(parent, Mapping) or path[-1] not in parent:
        return False, None
    return True, parent[path[-1]]


def _bool_claim(value: object) -> bool | None:
    """A real bool, or the strings "true"/"false"; anything else present fails closed."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return False


# provider.claims.email_verified's default: when this standard claim is absent, verification is
# unknown; when the config names another one (Entra's xms_edov), its absence means unverified.
DEFAULT_EMAIL_VERIFIED: Final = "email_verified"

# Best to worst: the state of groups gathered from several sources is the worst of theirs.
_STATE_RANK: Final[dict[GroupsState, int]] = {
    "ok": 0,
    "truncated": 1,
    "unavailable": 2,
    "invalid": 3,
}


def coerce_groups(value: object, *, cap: int | None = None) -> tuple[tuple[str, ...], GroupsState]:
    """A groups claim as the policy may use it, never failing open.

    A string is a one-element list (Dex, some Keycloak mappers). A list of strings is used as
    is (empty names dropped, duplicates once). Anything else present (``null``, a number, an
    object, a list with a ``null`` or non-string member) is ``invalid``: silently dropping a
    member could drop exactly the group a deny rule names, so every rule on groups fails
    closed instead, and no group is passed on. ``cap``: a list with at least that many members
    (Okta stops at 100) may be truncated.
    """
    if isinstance(value, str):
        return ((value,) if value else ()), "ok"
    if not isinstance(value, list | tuple) or not all(isinstance(g, str) for g in value):
        return (), "invalid"
    out = tuple(dict.fromkeys(g for g in value if g))
    if cap is not None and len(value) >= cap:
        return out, "truncated"
    return out, "ok"


def groups_overage(claims: Mapping[str, Any]) -> bool:
    """Whether ``claims`` say the groups were left out for being too many (Entra ID: the
    ``groups`` claim replaced by ``_claim_names``/``_claim_sources``, or ``hasgroups: true``
    in the implicit flow). The endpoint those sources name is never called: it comes from a
    token, while Microsoft Graph's origin comes from the config (``provider.graph_url``)."""
    names = claims.get("_claim_names")
    return (isinstance(names, Mapping) and "groups" in names) or claims.get("hasgroups") is True


def identity_from_claims(
    id_claims: Mapping[str, Any],
    *,
    userinfo: Mapping[str, Any] | None,
    claims: ClaimsConfig,
    access_claims: Mapping[str, Any] | None = None,
) -> Identity:
    """Build the Identity from validated ID token claims and (optionally) userinfo.

    OIDC Core §5.3.2: the userinfo ``sub`` MUST equal the ID token's, else the answer is
    refused. Userinfo adds and overrides profile claims, never the ID token's own (sub, iss,
    aud, exp, nonce, sid, ...).

    Groups are the union of the sources in ``claims.groups_from`` that carry the claim, and
    their state the worst of theirs (:func:`coerce_groups`). ``access_claims``: the access
    token's claims once :func:`access_token_claims_for_login` validated it; None with
    ``access_token`` listed means it could not be validated, so groups are ``unavailable``.
    A group overage (:func:`groups_overage`) leaves them ``unavailable`` until the caller
    resolves it (:func:`with_groups`). Access token claims feed the groups only, never
    ``Identity.claims``: the token is meant for an API, not a description of the user.

    ``email_verified``: the standard claim absent means unknown (a deny rule still refuses,
    an allow rule admits); a provider-specific claim configured instead (Entra's
    ``xms_edov``) absent means unverified. With ``claims.hosted_domain`` (Google's ``hd``),
    ``domain_verified`` says whether that claim equals the e-mail's domain.
    """
    sub = id_claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _no_subject()
    merged: dict[str, Any] = dict(id_claims)
    if userinfo is not None:
        if userinfo.get("sub") != sub:
            raise OIDCError(
                "The provider's userinfo sub does not match the ID token's; refusing the login.",
                reason="userinfo_invalid",
                status_hint=401,
            )
        for name, value in userinfo.items():
            if name not in _ID_TOKEN_ONLY:
                merged[name] = value
    user = _claim(merged, claims.user)
    email = _claim(merged, claims.email)
    email = email if isinstance(email, str) and email else None
    verified = _bool_claim(_claim(merged, claims.email_verified))
    if verified is None and claims.email_verified != DEFAULT_EMAIL_VERIFIED:
        verified = False
    domain_verified: bool | None = None
    if claims.hosted_domain is not None:
        hosted = _claim(merged, claims.hosted_domain)
        domain = email.rpartition("@")[2].lower() if email and "@" in email else None
        domain_verified = isinstance(hosted, str) and hosted.lower() == domain
    groups, state = _gather_groups(id_claims, userinfo, access_claims, claims)
    preferred = merged.get("preferred_username")
    return Identity(
        sub=sub,
        user=user if isinstance(user, str) and user else sub,
        email=email,
        email_verified=verified,
        groups=groups,
        preferred_username=preferred if isinstance(preferred, str) and preferred else None,
        claims=merged,
        groups_state=state,
        domain_verified=domain_verified,
    )


def _gather_groups(
    id_claims: Mapping[str, Any],
    userinfo: Mapping[str, Any] | None,
    access_claims: Mapping[str, Any] | None,
    claims: ClaimsConfig,
) -> tuple[tuple[str, ...], GroupsState]:
    sources: list[Mapping[str, Any] | None] = []
    for name in claims.groups_from:
        if name == "id_token":
            sources.append(id_claims)
        elif name == "userinfo":
            if userinfo is not None:  # userinfo off or not offered: nothing to read there
                sources.append(userinfo)
        else:
            sources.append(access_claims)  # None: could not be validated
    found: list[str] = []
    state: GroupsState = "ok"
    seen_claim = False
    for source in sources:
        if source is None:
            state = _worse(state, "unavailable")
            continue
        present, value = _find(source, claims.groups)
        if not present:
            continue
        seen_claim = True
        values, got = coerce_groups(value, cap=claims.groups_cap)
        found.extend(values)
        state = _worse(state, got)
    if not seen_claim and any(s is not None and groups_overage(s) for s in sources):
        state = _worse(state, "unavailable")
    if state in ("invalid", "unavailable"):
        return (), state  # rules on groups fail closed; no partial list reaches a header
    return tuple(dict.fromkeys(found)), state


def _worse(a: GroupsState, b: GroupsState) -> GroupsState:
    return a if _STATE_RANK[a] >= _STATE_RANK[b] else b


def with_groups(identity: Identity, groups: Sequence[str]) -> Identity:
    """``identity`` with a group overage resolved: ``groups`` as fetched (complete: paging
    was followed to the end, so no cap applies)."""
    values, state = coerce_groups(list(groups))
    return replace(identity, groups=values, groups_state=state)


def _no_subject() -> OIDCError:
    # Not the user's fault and not an attack (the token is validated): the provider is
    # configured to leave out a REQUIRED claim (OIDC Core §2), so say where to look.
    return OIDCError(
        "The ID token has no subject (sub). The sign-in service is misconfigured: every ID "
        "token must name its user in sub (OpenID Connect Core, section 2); ask its "
        "administrator to check the client's claim mappings. No session was created.",
        reason="id_token_invalid",
        status_hint=502,
    )


# ---------------------------------------------------------------------------------------------
# The access token, for groups (provider.claims.groups_from: access_token)
# ---------------------------------------------------------------------------------------------


def _access_invalid(message: str) -> OIDCError:
    return OIDCError(message, reason="access_token_invalid", status_hint=401)


def signed_access_token(
    token: str, *, keys: KeySet, algorithms: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The protected header and the claims of a JWT access token whose signature checks out
    with the provider's keys under ``algorithms`` (HMAC never: the client secret does not sign
    access tokens). The part the login's access token (:func:`access_token_claims_for_login`)
    and an API client's bearer token (``gateway.bearer``) share; each adds its own claim rules.

    Raises UnknownSigningKey for an unknown kid, else ``OIDCError`` whose message names the
    access token (callers turn it into their own error).
    """
    if token.count(".") != 2:
        raise OIDCError("The access token is not a signed JWT (it may be opaque).")
    try:
        obj = _verify_signature(
            token,
            keys=keys,
            algorithms=[a for a in algorithms if not a.upper().startswith("HS")],
            client_secret=None,
        )
    except UnknownSigningKey:
        raise
    except OIDCError as exc:
        raise OIDCError(exc.message.replace("The ID token", "The access token")) from None
    claims = json_object(obj.payload)
    if claims is None:
        raise OIDCError("The access token's payload is not a JSON object.")
    return dict(obj.headers()), claims


def premature_claim(claims: Mapping[str, Any], *, now: float, leeway: float) -> str | None:
    """``nbf`` or ``iat`` when present but not a number or later than ``now`` + ``leeway``."""
    for name in ("nbf", "iat"):
        if name in claims:
            when = number_claim(claims[name])
            if when is None or when > now + leeway:
                return name
    return None


def access_token_claims_for_login(
    token: str,
    *,
    keys: KeySet,
    issuer: str,
    client_id: str,
    algorithms: Sequence[str],
    leeway: float,
    now: float,
) -> dict[str, Any]:
    """The claims of the access token of a login, once it is proven to be the provider's and
    ours, for reading groups from it (Keycloak puts roles there). Not for bearer tokens sent
    by API clients: those need their own audience rules.

    Checked: a signed JWT (an opaque token cannot be read at all), its signature with the
    provider's JWKS under the pinned algorithms (never ``none``, never HMAC: the client
    secret does not sign access tokens), ``iss`` exactly the issuer, ``exp`` present and not
    passed, ``nbf``/``iat`` not in the future. The party: every one of ``azp`` (OIDC),
    ``client_id`` (RFC 9068 §2.2) and ``cid`` (Okta) that is present must be our client_id;
    only when none is present must ``aud`` contain it. ``aud`` is not required to be ours
    otherwise: access tokens are addressed to APIs (Keycloak's ``account``), and the token
    came to us from the token endpoint in the same answer as the ID token. ``sub`` is not
    compared: Okta and Entra put another identifier there.

    Raises UnknownSigningKey for an unknown kid, else ``OIDCError(reason=
    "access_token_invalid")``; the caller treats any failure as "groups unavailable".
    """
    try:
        _, claims = signed_access_token(token, keys=keys, algorithms=algorithms)
    except UnknownSigningKey:
        raise
    except OIDCError as exc:
        raise _access_invalid(exc.message) from None
    if claims.get("iss") != issuer:
        raise _access_invalid("The access token was issued by another issuer.")
    parties = [claims[name] for name in ("azp", "client_id", "cid") if name in claims]
    if parties:
        if any(party != client_id for party in parties):
            raise _access_invalid("The access token was issued to another client (azp).")
    else:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or client_id not in audiences:
            raise _access_invalid("The access token names neither this client nor its party.")
    exp = number_claim(claims.get("exp"))
    if exp is None:
        raise _access_invalid("The access token has no valid expiry (exp).")
    if now - leeway >= exp:
        raise _access_invalid("The access token has expired.")
    premature = premature_claim(claims, now=now, leeway=leeway)
    if premature is not None:
        raise _access_invalid(f"The access token's {premature} is invalid or in the future.")
    return claims


# ---------------------------------------------------------------------------------------------
# RP-initiated logout
# ---------------------------------------------------------------------------------------------


def end_session_url(
    meta: ProviderMetadata,
    *,
    id_token_hint: str,
    post_logout_redirect_uri: str | None,
    client_id: str,
) -> str | None:
    """OIDC RP-Initiated Logout §2: the URL ending the session at the provider, if it has one."""
    if meta.end_session_endpoint is None:
        return None
    params = [("client_id", client_id)]
    if id_token_hint:
        params.insert(0, ("id_token_hint", id_token_hint))
    if post_logout_redirect_uri:
        params.append(("post_logout_redirect_uri", post_logout_redirect_uri))
    return _with_query(meta.end_session_endpoint, params)
