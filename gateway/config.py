"""The configuration model: one YAML file, validated once, every problem reported with its path.

Pure: this module parses text it is given and reads the environment mapping it is given; the CLI
is the only place that opens files or looks at ``os.environ``. Unknown keys are errors, because a
typo such as ``alow:`` must never silently drop an access rule.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gateway.errors import ConfigError, ConfigProblem
from gateway.presets import PRESETS, PresetName, apply_preset

# ---------------------------------------------------------------------------------------------
# Scalar types
# ---------------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_PLAIN_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """``12h``, ``1h30m``, ``45s``, ``500ms`` or a plain number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 15m, 12h or 1h30m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            # Only plain decimal seconds ("45", "2.5"): float() alone would also take "nan",
            # "inf", "1e3" and "1_0".
            if not _PLAIN_SECONDS.fullmatch(text):
                raise ValueError(
                    f"{value!r} is not a duration; use a number with a unit: 30s, 15m, 12h, 1h30m"
                )
            seconds = float(text)
    else:
        raise ValueError("must be a duration such as 30s, 15m, 12h or 1h30m")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration such as 30s, 15m, 12h or 1h30m")
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^((\d+(\.\d+)?(ms|s|m|h|d))+|\d+(\.\d+)?)$"},
                {"type": "number", "exclusiveMinimum": 0},
            ],
            "description": "a duration: 30s, 15m, 12h, 1h30m, or seconds as a number",
        }
    ),
]


_ZERO_DURATION = re.compile(r"0+(\.0+)?(ms|s|m|h|d)?")


def parse_delay(value: object) -> float:
    """A duration that may also be zero (``0``, ``"0s"``): "no delay" is a meaningful choice."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip()):
        return 0.0
    return parse_duration(value)


Delay = Annotated[
    float,
    BeforeValidator(parse_delay),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^((\d+(\.\d+)?(ms|s|m|h|d))+|\d+(\.\d+)?)$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "a duration (30s, 1m, 500ms) or 0 for none",
        }
    ),
]


def decode_session_key(value: str) -> bytes:
    """A ``session.keys`` entry: standard or URL-safe base64 of exactly 32 bytes."""
    text = value.strip().replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64; make a key with `oidc-gateway gen-key`") from None
    if len(raw) != 32:
        raise ValueError(
            f"must be base64 of 32 bytes, got {len(raw)} bytes; "
            "make a key with `oidc-gateway gen-key`"
        )
    return raw


def _network(value: object) -> object:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR") from None


# One trusted proxy: an address or CIDR. Validated per item so an error reads
# ``server.trusted_proxies[1]``.
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(_network),
    WithJsonSchema({"type": "string", "description": "an IP address or CIDR: 10.0.0.0/8, ::1"}),
]


def _session_key(value: SecretStr) -> SecretStr:
    decode_session_key(value.get_secret_value())
    return value


# One ``session.keys`` entry, validated per item so an error reads ``session.keys[1]``.
SessionKey = Annotated[SecretStr, AfterValidator(_session_key)]


def _claim_value(value: object) -> object:
    if not isinstance(value, str | int | bool):
        raise ValueError("must be a string, a whole number or true/false")
    return value


# One accepted claim value. Checked up front so a wrong type gives one problem, not one per
# member of the union.
ClaimValue = Annotated[str | int | bool, BeforeValidator(_claim_value)]

# A claim path: names joined by dots walk into nested objects (``realm_access.roles``); a name
# with any other character is written in brackets and double quotes, so that namespaced claims
# (``["https://example.com/roles"]``) and keys with dots (``resource_access["my.app"].roles``)
# are never split by accident. Inside the quotes, \" and \\ escape.
_CLAIM_NAME = re.compile(r"[A-Za-z0-9_-]+")
_CLAIM_QUOTED = re.compile(r'\["((?:[^"\\]|\\["\\])+)"\]')
_CLAIM_UNESCAPE = re.compile(r"\\([\"\\])")


def parse_claim_path(text: str) -> tuple[str, ...]:
    """``resource_access["my.app"].roles`` → ``("resource_access", "my.app", "roles")``.

    Strict on purpose: a claim rule whose path cannot mean anything would never match, and a
    rule that silently never matches is a rule the operator thinks is there. ``https://x/roles``
    written bare is refused rather than read as three nested names.
    """
    problem = (
        f"{text!r} is not a claim path: join names of letters, digits, _ and - with dots "
        '(realm_access.roles); write any other name in brackets and double quotes '
        '(resource_access["my.app"].roles, ["https://example.com/roles"])'
    )
    parts: list[str] = []
    pos, size = 0, len(text)
    while pos < size:
        quoted = _CLAIM_QUOTED.match(text, pos)
        if quoted is not None:
            parts.append(_CLAIM_UNESCAPE.sub(r"\1", quoted.group(1)))
            pos = quoted.end()
        else:
            if parts:  # a bare name only at the start or right after a dot
                if text[pos] != ".":
                    raise ValueError(problem)
                pos += 1
            name = _CLAIM_NAME.match(text, pos)
            if name is None:
                raise ValueError(problem)
            parts.append(name.group(0))
            pos = name.end()
        if pos < size and text[pos] not in ".[":
            raise ValueError(problem)
    if not parts:
        raise ValueError(problem)
    return tuple(parts)


def claim_at(claims: Mapping[str, Any], path: Sequence[str]) -> object | None:
    """The value at a parsed claim ``path`` in ``claims``, or None when any step is missing or
    is not an object. The one walk shared by the identity (provider.claims), the policy's
    claim rules and the identity headers, so that a path means the same thing everywhere."""
    node: object = claims
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _check_http_url(value: str, *, allow_path: bool) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials")
    if not allow_path and parts.path not in ("", "/"):
        raise ValueError("must be an origin only (scheme, host and port), without a path")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port``, ``[::1]:port`` or ``:port`` (all interfaces) → (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not host:port (IPv6 as [::1]:4180)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} is not host:port, e.g. 0.0.0.0:4180 or 127.0.0.1:4180")
        if ":" in host:
            raise ValueError("write an IPv6 address in brackets, e.g. [::1]:4180")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} must be a number from 1 to 65535")
    return host or "0.0.0.0", int(port)  # noqa: S104 - ":4180" means every interface, by request


HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

# Signing algorithms accepted for ID tokens unless the config narrows or widens them.
# `none` is never accepted; HMAC (HS*) only when listed explicitly (security note 2).
DEFAULT_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
)
KNOWN_ALGORITHMS = frozenset({*DEFAULT_ALGORITHMS, "HS256", "HS384", "HS512", "EdDSA"})

# Entra multi-tenant issuers hold this placeholder; each token's `tid` fills it in.
TENANT_PLACEHOLDER = "{tenantid}"
# A tenant id (Entra `tid`): a GUID; letters, digits and hyphens, nothing a URL could bend.
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
# Authorization request parameters the gateway sets itself: provider.auth_params must not
# override them (state, nonce and PKCE are its defences; the rest its registration), nor
# replace the whole request (JAR's request/request_uri) or the answer's shape (response_mode).
GATEWAY_AUTH_PARAMS = frozenset({
    "state", "nonce", "code_challenge", "code_challenge_method", "redirect_uri", "client_id",
    "response_type", "scope", "response_mode", "request", "request_uri",
})

# Identity headers set by other gateways that apps often trust (security note 16): stripped
# from every request besides our own. `*` matches any suffix.
DEFAULT_STRIP_HEADERS = (
    "X-Auth-Request-*",
    "Remote-User",
    "Remote-Email",
    "Remote-Groups",
    "Remote-Name",
    "X-Remote-User",
    "X-WebAuth-User",
)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class ServerConfig(_Model):
    """Where the gateway listens and which peers' forwarding headers it believes."""

    listen: str = Field("0.0.0.0:4180", description="host:port to serve on")
    public_url: str | None = Field(
        None,
        description="External origin (https://apps.example.com); else Host + trusted X-Forwarded-*",
    )
    trusted_proxies: tuple[Network, ...] = Field(
        (), description="CIDRs whose X-Forwarded-* headers are believed"
    )
    prefix: str = Field("/oauth2", description="path prefix of the gateway's own endpoints")
    strip_headers: tuple[str, ...] = Field(
        DEFAULT_STRIP_HEADERS,
        description="other proxies' identity headers removed from every request (* = any suffix)",
    )
    max_header_count: int = Field(100, ge=10, le=1000)
    max_header_bytes: int = Field(16384, ge=1024, le=65536)
    keepalive_timeout: Duration = Field(
        15.0,
        description="idle keep-alive connections close after this; also the deadline for "
        "the headers of each request (slow-header clients are cut off)",
    )
    max_connections: int = Field(
        4096, ge=1, le=1_000_000,
        description="client connections served at once; beyond it new ones get 503 and close",
    )
    shutdown_timeout: Duration = Field(
        10.0, description="after SIGTERM (and shutdown_delay), in-flight requests get this long"
    )
    shutdown_delay: Delay = Field(
        0.0, description="after SIGTERM, keep accepting this long with /ready answering 503 "
        "so load balancers stop sending first; 0: stop accepting at once",
    )
    metrics_listen: str | None = Field(
        None, description="host:port of a separate listener for /metrics; when set, the main "
        "listener has no /metrics (the path goes to the routes like any other)",
    )
    workers: int = Field(
        1, ge=1, le=64,
        description="processes serving the one port (SO_REUSEPORT); sessions need store: redis",
    )
    watch_config: bool = Field(
        True, description="reload the config file when it changes (SIGHUP reloads too)"
    )
    watch_interval: Duration = Field(
        2.0, description="how often the config file is checked for a change"
    )
    templates_dir: str | None = Field(
        None, min_length=1,
        description="directory of HTML templates replacing the built-in pages of the same "
        "name (error.html, denied.html, ...); missing or broken ones fall back to the built-in",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        address = parse_listen(v)
        listen = info.data.get("listen")
        if isinstance(listen, str) and parse_listen(listen)[1] == address[1]:
            raise ValueError(
                f"must be another port than server.listen ({listen}): /metrics gets a "
                "listener of its own"
            )
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v, allow_path=False).rstrip("/")

    @field_validator("strip_headers")
    @classmethod
    def _strip_headers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # The proxy refuses a bare "*" at start-up; say so here, where `check` can report it.
        for name in v:
            if not re.fullmatch(r"[!#$%&'+.^_`|~0-9A-Za-z-]+\*?", name):
                raise ValueError(
                    f"{name!r} is not a header name, or a header-name prefix ending in * "
                    "(X-Auth-Request-*); a bare * would remove every header"
                )
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", v):
            raise ValueError('must start with "/" and be a plain path like /oauth2')
        return v

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)


class ClaimsConfig(_Model):
    """Which claims become the user, email and groups identity."""

    user: str = Field("preferred_username", description="falls back to sub when absent")
    email: str = "email"
    groups: str = "groups"
    email_verified: str = Field(
        "email_verified",
        description="claim saying the email is verified (Entra: xms_edov); an unverified "
        "email never satisfies an email or domain rule",
    )
    groups_from: tuple[Literal["id_token", "userinfo", "access_token"], ...] = Field(
        ("id_token", "userinfo"),
        description="where groups are read; access_token only after validating it",
    )
    groups_cap: int | None = Field(
        None,
        ge=1,
        description="a groups claim with this many entries may be truncated (Okta: 100): "
        "deny rules on groups then fail closed",
    )
    hosted_domain: str | None = Field(
        None,
        description="claim naming the user's verified domain (Google: hd); email_domains rules "
        "need it to equal the domain",
    )
    groups_overage: Literal["unavailable", "graph"] = Field(
        "unavailable",
        description="Entra group overage (_claim_names/hasgroups instead of groups): graph "
        "asks provider.graph_url with the access token; unavailable makes every rule on groups "
        "fail closed",
    )

    @field_validator("user", "email", "groups", "email_verified", "hosted_domain")
    @classmethod
    def _claim_path(cls, v: str | None) -> str | None:
        # A path that cannot mean anything would silently yield no user, email or groups.
        if v is not None:
            parse_claim_path(v)
        return v


class ProviderConfig(_Model):
    """The OpenID Connect provider and this gateway's client registration there."""

    issuer: str = Field(description="issuer URL; discovery at /.well-known/openid-configuration")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    token_endpoint_auth: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"  # noqa: S105 - the method's name, not a password
    )
    claims: ClaimsConfig = ClaimsConfig()
    algorithms: tuple[str, ...] = Field(
        DEFAULT_ALGORITHMS, description="ID token signing algorithms accepted; never none"
    )
    leeway: Duration = Field(60.0, description="clock skew tolerated on exp/iat")
    userinfo: bool = Field(True, description="fetch userinfo after login when offered")
    timeout: Duration = Field(10.0, description="timeout of each call to the provider")
    jwks_refetch_interval: Duration = Field(
        30.0, description="at most one JWKS refetch per interval on an unknown kid"
    )
    redirect_url: str | None = Field(
        None, description="callback URL registered at the provider; default public_url + prefix"
    )
    graph_url: str = Field(
        "https://graph.microsoft.com",
        description="Entra: Microsoft Graph origin asked for group overage; never a URL "
        "taken from a token",
    )
    preset: PresetName = Field(
        "generic",
        description="defaults for one provider's quirks (scopes, claims, logout); every key "
        "written here wins over the preset's",
    )
    tenants: tuple[str, ...] = Field(
        (),
        description="tenant ids (tid) admitted by an issuer with {tenantid} (Entra "
        "multi-tenant); required with one, refused without",
    )
    discovery_url: str | None = Field(
        None,
        description="where to fetch discovery when not at issuer + /.well-known/... (a "
        "cluster-internal URL); its issuer must still be provider.issuer",
    )
    backchannel_url: str | None = Field(
        None,
        description="origin for the gateway's own calls (token, JWKS, userinfo, discovery) "
        "instead of the issuer's public one; the browser still goes to the public URLs",
    )
    auth_params: dict[str, str | None] = Field(
        default_factory=dict,
        description="extra authorization request parameters (Google: access_type, prompt); "
        "null drops a preset's; the gateway's own (state, nonce, scope...) are refused",
    )
    logout: Literal["provider", "local"] = Field(
        "provider",
        description="sign-out also ends the provider session (end_session_endpoint, when "
        "discovery offers one), or only the gateway's",
    )
    # Dotted keys whose value came from the preset, not the file (for explain/check).
    _from_preset: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _apply_preset(
        cls, data: Any, handler: ModelWrapValidatorHandler[ProviderConfig]
    ) -> ProviderConfig:
        """Fill in the preset's defaults before validation, so a preset value is validated
        like a written one and every key the operator wrote wins."""
        name = data.get("preset") if isinstance(data, dict) else None
        if not isinstance(name, str) or name not in PRESETS:
            return handler(data)
        merged, supplied = apply_preset(data, name)
        model = handler(merged)
        model._from_preset = supplied
        return model

    @property
    def from_preset(self) -> frozenset[str]:
        """Dotted keys (``claims.user``, ``auth_params.prompt``) the preset supplied."""
        return self._from_preset

    @property
    def tenant_template(self) -> bool:
        """Whether the issuer is a multi-tenant template (``.../{tenantid}/v2.0``)."""
        return TENANT_PLACEHOLDER in self.issuer

    @property
    def effective_auth_params(self) -> tuple[tuple[str, str], ...]:
        """The extra authorization request parameters actually sent."""
        return tuple((k, v) for k, v in self.auth_params.items() if v is not None)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        _check_http_url(v, allow_path=True)
        if "{" in v or "}" in v:
            parts = urlsplit(v)
            segments = parts.path.split("/")
            rest = v.replace(TENANT_PLACEHOLDER, "", 1)
            if TENANT_PLACEHOLDER not in segments or "{" in rest or "}" in rest:
                raise ValueError(
                    "the only placeholder an issuer may hold is {tenantid}, once, as a whole "
                    "path segment (https://login.microsoftonline.com/{tenantid}/v2.0)"
                )
        return v

    @field_validator("discovery_url")
    @classmethod
    def _discovery(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v, allow_path=True)

    @field_validator("backchannel_url")
    @classmethod
    def _backchannel(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v, allow_path=False).rstrip("/")

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for tenant in v:
            if not _TENANT_ID.fullmatch(tenant):
                raise ValueError(
                    f"{tenant!r} is not a tenant id: use the directory (tenant) id, a GUID "
                    "such as 72f988bf-86f1-41af-91ab-2d7cd011db47"
                )
        return tuple(t.lower() for t in v)

    @field_validator("auth_params")
    @classmethod
    def _auth_params(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for name in v:
            if name.lower() in GATEWAY_AUTH_PARAMS:
                raise ValueError(
                    f"{name!r} is set by the gateway itself (state, nonce, PKCE, redirect_uri, "
                    "client_id, response_type, scope...); use provider.scopes for scopes"
                )
            if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise ValueError(f"{name!r} is not a parameter name")
        return v

    @model_validator(mode="after")
    def _tenant_rules(self) -> ProviderConfig:
        found: list[tuple[tuple[str | int, ...], str]] = []
        if self.tenant_template:
            if not self.tenants:
                found.append((("tenants",), (
                    "an issuer with {tenantid} admits any tenant's tokens: list the tenant ids "
                    "(tid) to admit; the issuer check is never switched off")))
            if self.discovery_url is None and self.preset != "entra":
                found.append((("discovery_url",), (
                    "an issuer with {tenantid} has no discovery document of its own: give "
                    "the discovery URL (e.g. https://login.microsoftonline.com/organizations/"
                    "v2.0/.well-known/openid-configuration)")))
        elif self.tenants:
            found.append((("tenants",), (
                "only an issuer with {tenantid} takes a tenant list; this issuer admits one "
                "tenant already")))
        _conflicts("ProviderConfig", found)
        return self

    @field_validator("redirect_url")
    @classmethod
    def _redirect(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v, allow_path=True)

    @field_validator("graph_url")
    @classmethod
    def _graph(cls, v: str) -> str:
        return _check_http_url(v, allow_path=False).rstrip("/")

    @field_validator("client_secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("must not be empty")
        return v

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "openid" not in v:
            raise ValueError('must include "openid"')
        return v

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one algorithm")
        for alg in v:
            if alg.lower() == "none":
                raise ValueError('"none" is never accepted: unsigned ID tokens prove nothing')
            if alg not in KNOWN_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}; known: {sorted(KNOWN_ALGORITHMS)}")
        return v


_HOST_PREFIX = "__Host-"
_SECURE_PREFIX = "__Secure-"


class CookieConfig(_Model):
    name: str = Field(
        "_oidc_gateway",
        description="base name; with secure and no domain the browser sees __Host-<name>",
    )
    secure: bool = Field(True, description="false only for plain-http development")
    samesite: Literal["lax", "strict"] = "lax"
    domain: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", v):
            raise ValueError("must be 1-64 letters, digits, _ or -")
        return v

    @model_validator(mode="after")
    def _prefix_rules(self) -> CookieConfig:
        # RFC 6265bis 4.1.3: browsers drop a __Secure- cookie without Secure, and a __Host-
        # cookie without Secure, with a Domain, or with a Path other than "/". A config that
        # asks for one of those would make every login fail silently: refuse it here.
        found: list[tuple[tuple[str | int, ...], str]] = []
        if self.name.startswith((_HOST_PREFIX, _SECURE_PREFIX)) and not self.secure:
            found.append((("name",), f"a {self.name.split('-', 1)[0]}- cookie needs secure: "
                          "true (browsers drop it otherwise)"))
        if self.name.startswith(_HOST_PREFIX) and self.domain is not None:
            found.append((("domain",), "a __Host- cookie cannot have a domain (browsers drop "
                          "it); remove domain or the __Host- prefix"))
        _conflicts("CookieConfig", found)
        return self

    @property
    def effective_name(self) -> str:
        """The name the browser sees. With ``secure`` and no ``domain`` it is ``__Host-``
        + ``name``: browsers then accept the cookie only from this very host, over https,
        with Path=/ and no Domain, so a sibling subdomain (or a plain-http man in the middle)
        cannot plant or overwrite it (cookie tossing: login CSRF, session fixation)."""
        if self.secure and self.domain is None and not self.name.startswith(
            (_HOST_PREFIX, _SECURE_PREFIX)
        ):
            return _HOST_PREFIX + self.name
        return self.name


def _conflicts(title: str, found: Sequence[tuple[tuple[str | int, ...], str]]) -> None:
    """Report problems found across several keys, each at its own key path.

    A model validator's ValueError would be reported at the model's path only; a
    ValidationError raised here is merged by pydantic under the model's path, so the operator
    reads ``session.redis.cluster: ...`` rather than a bare ``session``.
    """
    if found:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(
                    type=PydanticCustomError("conflict", "{detail}", {"detail": message}),
                    loc=loc,
                    input=None,
                )
                for loc, message in found
            ],
        )


def _sentinel_node(value: str) -> str:
    problem = f"{value!r} is not host:port, e.g. 10.0.0.1:26379 or [fd00::1]:26379"
    try:
        parse_listen(value)
    except ValueError:
        raise ValueError(problem) from None
    if value.startswith(":"):  # parse_listen reads ":26379" as every interface
        raise ValueError(problem)
    return value


# One sentinel, validated per item so an error reads ``session.redis.sentinel.nodes[1]``.
SentinelNode = Annotated[str, AfterValidator(_sentinel_node)]


def _none_if_empty(value: object) -> object:
    # `password: "${REDIS_PASSWORD:-}"` with the variable unset means "no password".
    return None if value == "" else value


class SentinelConfig(_Model):
    """Redis Sentinel: the sentinels say which server is the master, so a failover needs no
    gateway restart or config change. Off while ``master`` is null."""

    master: str | None = Field(
        None, min_length=1,
        description="name the sentinels monitor (sentinel monitor NAME ...); null = no Sentinel",
    )
    nodes: tuple[SentinelNode, ...] = Field((), description="the sentinels, host:port")
    password: Annotated[SecretStr | None, BeforeValidator(_none_if_empty)] = Field(
        None, description="the sentinels' own password (their requirepass), if they have one"
    )

    @model_validator(mode="after")
    def _complete(self) -> SentinelConfig:
        found: list[tuple[tuple[str | int, ...], str]] = []
        if self.master is None and (self.nodes or self.password is not None):
            found.append((("master",), "is required with sentinel.nodes or sentinel.password: "
                          "the name the sentinels monitor (sentinel monitor NAME ...)"))
        if self.master is not None and not self.nodes:
            found.append((("nodes",), "must list at least one sentinel (host:port) when "
                          "sentinel.master is set"))
        _conflicts("SentinelConfig", found)
        return self

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_listen(node) for node in self.nodes)


class RedisConfig(_Model):
    """Redis settings beyond ``session.redis_url``: credentials, TLS trust, Sentinel, Cluster."""

    username: Annotated[str | None, BeforeValidator(_none_if_empty)] = Field(
        None, description="ACL user, when not in redis_url"
    )
    password: Annotated[SecretStr | None, BeforeValidator(_none_if_empty)] = Field(
        None, description='password, when not in redis_url; take it from "${REDIS_PASSWORD}"'
    )
    tls_ca_file: str | None = Field(
        None, min_length=1,
        description="PEM file of the CA(s) that signed the Redis certificates (rediss:// only)",
    )
    sentinel: SentinelConfig = SentinelConfig()
    cluster: bool = Field(False, description="redis_url is one node of a Redis Cluster")

    @model_validator(mode="after")
    def _one_topology(self) -> RedisConfig:
        if self.cluster and self.sentinel.master is not None:
            _conflicts("RedisConfig", [(("cluster",), (
                "cannot be combined with session.redis.sentinel: a Redis Cluster fails over "
                "by itself; choose one"))])
        return self


class SessionCacheConfig(_Model):
    """Each gateway process keeps recently used sessions in memory, so that a signed-in request
    needs no Redis round trip. Sign-out, back-channel logout and admin revoke still reach every
    process within a second (Redis pub/sub; without a live subscription the cache is not used)."""

    ttl: Delay = Field(
        10.0, description="longest a session is served from memory; 0 turns the cache off"
    )
    max_entries: int = Field(10_000, ge=1, description="sessions kept in memory per process")


class SessionConfig(_Model):
    store: Literal["redis", "memory"] = Field(
        "redis", description="memory keeps sessions in one process only"
    )
    # Out of repr: a redis URL may carry a password (redis://:secret@host/0).
    redis_url: str = Field("redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "oidcgw:"
    redis_timeout: Duration = Field(1.0, description="connect and command timeout for Redis")
    redis: RedisConfig = Field(
        RedisConfig(), description="credentials, TLS, Sentinel or Cluster (defaults: none)"
    )
    memory_max_sessions: int = Field(
        100_000, ge=1, description="store: memory refuses new sessions (503) beyond this many"
    )
    cache: SessionCacheConfig = Field(
        SessionCacheConfig(), description="per-process session cache (default on, 10 s)"
    )
    cookie: CookieConfig = CookieConfig()
    lifetime: Duration = 12 * 3600.0
    idle_timeout: Duration = 3600.0
    login_timeout: Duration = Field(
        600.0, description="a sign-in must come back from the provider within this"
    )
    refresh_before: Duration = Field(
        60.0, description="refresh the tokens this long before the access (else ID) token "
        "expires, when there is a refresh token",
    )
    expire_with_tokens: bool = Field(
        False, description="without a refresh token, end the session when its tokens expire "
        "(else at lifetime)",
    )
    keys: tuple[SessionKey, ...] = Field(
        min_length=1, description="base64 32-byte keys; the first seals, all open (rotation)"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return v

    @model_validator(mode="after")
    def _redis_combinations(self) -> SessionConfig:
        """Settings that contradict each other, each reported at the key to change."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        redis = self.redis
        url = urlsplit(self.redis_url)
        url_set = "redis_url" in self.model_fields_set
        if redis.sentinel.master is not None and url_set:
            try:
                port = url.port
            except ValueError:
                port = None
            if url.scheme == "unix":
                found.append((("redis_url",), "a unix:// socket cannot be used with "
                              "session.redis.sentinel; use redis:// or rediss://"))
            elif url.hostname not in (None, redis.sentinel.master.lower()) or port:
                found.append((("redis_url",), (
                    "with session.redis.sentinel the sentinels give the master's address: "
                    "leave host and port out of the URL (rediss://:PASSWORD@/0) or write the "
                    f"master's name as host (rediss://{redis.sentinel.master}/0)")))
        if redis.cluster:
            if url.scheme == "unix":
                found.append((("redis_url",), "a unix:// socket cannot be used with "
                              "session.redis.cluster; use redis:// or rediss://"))
            elif url.path.strip("/") not in ("", "0"):
                found.append((("redis_url",), "Redis Cluster has database 0 only: end the URL "
                              "with /0 or nothing"))
        if redis.tls_ca_file is not None and url.scheme != "rediss":
            found.append((("redis", "tls_ca_file"), (
                "needs TLS: make session.redis_url a rediss:// URL (it is "
                f"{url.scheme or 'not a'}://...)")))
        if redis.password is not None and url.password:
            found.append((("redis", "password"), "session.redis_url has a password too: give "
                          "it in one place"))
        if redis.username is not None and url.username:
            found.append((("redis", "username"), "session.redis_url has a user name too: give "
                          "it in one place"))
        if redis.username is not None and redis.password is None and not url.password:
            found.append((("redis", "username"), "an ACL user needs session.redis.password"))
        _conflicts("SessionConfig", found)
        return self

    @property
    def key_bytes(self) -> tuple[bytes, ...]:
        return tuple(decode_session_key(k.get_secret_value()) for k in self.keys)


class AllowConfig(_Model):
    """The one-mapping ``allow:`` form, kept as it always worked: ANY one listed value admits.

    ``allow: {groups: [eng], emails: [a@example.com]}`` admits members of eng *or* that
    address. The list form (:class:`RuleConfig`) is the richer one; this form stays so that
    existing configs keep their meaning. Its ``claims`` names are top-level claim names, taken
    literally (a dot is part of the name), again as before.
    """

    users: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    claims: dict[str, tuple[ClaimValue, ...]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _not_empty(self) -> AllowConfig:
        if not (self.users or self.emails or self.email_domains or self.groups or self.claims):
            raise ValueError(
                "names no rule, so it would admit nobody; list users, emails, email_domains, "
                "groups or claims, or remove allow to admit every signed-in user"
            )
        return self

    @field_validator("email_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _bare_domains(v)


def _bare_domains(v: tuple[str, ...]) -> tuple[str, ...]:
    for d in v:
        if "@" in d or not d or d.startswith("."):
            raise ValueError(f"{d!r} must be a bare domain such as example.com")
    return tuple(d.lower() for d in v)


# A value in a rule's list: an empty string would be a condition no identity can meet.
_Value = Annotated[str, Field(min_length=1)]

RULE_CONDITIONS = (
    "users", "emails", "email_domains", "groups", "claims", "networks", "methods",
)


class RuleConfig(_Model):
    """One ``allow`` or ``deny`` rule: EVERY condition it lists must hold; a condition holds
    when ANY of its values matches. ``{groups: [eng], email_domains: [example.com]}`` means a
    member of eng whose address is at example.com.

    A key left out is no condition. A key given with no values (``groups: []``, ``groups:``)
    is an error rather than "no condition": it can never hold, or, read the other way, would
    silently widen the rule; either way it is not what the operator meant.
    """

    users: tuple[_Value, ...] = Field((), description="user name (claims.user) or sub")
    emails: tuple[_Value, ...] = Field((), description="whole addresses, case-insensitive")
    email_domains: tuple[_Value, ...] = Field((), description="exact domains of the address")
    groups: tuple[_Value, ...] = Field((), description="any group in the groups claim")
    claims: dict[str, tuple[ClaimValue, ...]] = Field(
        default_factory=dict,
        description="claim path → accepted values; every listed claim must match",
    )
    networks: tuple[Network, ...] = Field((), description="client address in one of these CIDRs")
    methods: tuple[str, ...] = Field((), description="request method; GET includes HEAD")

    @model_validator(mode="after")
    def _conditions(self) -> RuleConfig:
        if not self.model_fields_set & set(RULE_CONDITIONS):
            raise ValueError(
                "names no condition; give at least one of " + ", ".join(RULE_CONDITIONS)
            )
        return self

    @field_validator("users", "emails", "email_domains", "groups", "networks", "methods",
                     "claims", mode="after")
    @classmethod
    def _not_empty(cls, v: tuple[object, ...] | dict[str, object]) -> object:
        if not v:
            raise ValueError(
                "lists no value, so this condition could never hold; list at least one, or "
                "remove the key"
            )
        if isinstance(v, dict):
            for name, values in v.items():
                parse_claim_path(name)  # kept as written: it is what logs and explain show
                if not values:
                    raise ValueError(
                        f"{name!r} lists no value, so it could never match; list at least one"
                    )
        return v

    @field_validator("emails")
    @classmethod
    def _emails(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for e in v:
            local, _, domain = e.partition("@")
            if not local or not domain or "@" in domain:
                raise ValueError(f"{e!r} is not an e-mail address (one @, text on both sides)")
        return v

    @field_validator("email_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _bare_domains(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(m.upper() for m in v)
        for m in out:
            if m not in HTTP_METHODS:
                raise ValueError(f"{m!r} is not an HTTP method")
        return out


def _no_null(value: object, what: str) -> object:
    """``allow:`` with nothing after it is YAML null: refuse it instead of reading it as "no
    rules" (which admits every signed-in user): a half-written policy must not open a route."""
    if value is None:
        raise ValueError(f"is empty; list {what} under it, or remove the key")
    return value


def _allow_form(value: Any) -> str | None:
    if isinstance(value, Mapping | AllowConfig):
        return "<mapping>"
    if isinstance(value, list | tuple):
        return "<rules>"
    return None


# Tags of the ``allow`` union: pydantic puts them in error locations, and _problems drops them
# so that paths read like the YAML (``routes[1].allow[0].groups``).
_UNION_TAGS = frozenset({"<mapping>", "<rules>"})

def _some_rules(rules: tuple[RuleConfig, ...]) -> tuple[RuleConfig, ...]:
    if not rules:
        raise ValueError("lists no rule; list at least one, or remove the key")
    return rules


Rules = Annotated[
    tuple[RuleConfig, ...], AfterValidator(_some_rules), Field(json_schema_extra={"minItems": 1})
]

# ``allow`` is a list of rules (any one admits), or the one-mapping any-of form of old.
AllowRules = Annotated[
    Annotated[Rules, Tag("<rules>")] | Annotated[AllowConfig, Tag("<mapping>")],
    Discriminator(
        _allow_form,
        custom_error_type="allow_form",
        custom_error_message="must be a list of rules, or one mapping (any listed value admits)",
    ),
]


class PolicyConfig(_Model):
    """``default_policy``: the allow and deny rules of every route that has neither."""

    allow: Rules | None = Field(None, description="rules; any one admits")
    deny: Rules | None = Field(None, description="rules; any one refuses, before allow")

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _null(cls, v: object) -> object:
        return _no_null(v, "rules")

    @model_validator(mode="after")
    def _something(self) -> PolicyConfig:
        if self.allow is None and self.deny is None:
            raise ValueError("names neither allow nor deny; give one, or remove default_policy")
        return self


def _unauthenticated(value: object) -> object:
    # YAML reads `unauthenticated: 401` as a number.
    if isinstance(value, int) and not isinstance(value, bool) and value == 401:
        return "401"
    return value


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


class MatchConfig(_Model):
    host: str | None = Field(None, description="exact host or *.example.com; none = any host")
    path: str = Field("/", description="path prefix, matched at segment boundaries")
    methods: tuple[str, ...] | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        host = v.lower()
        bare = host[2:] if host.startswith("*.") else host
        if not _HOST_NAME.fullmatch(bare):
            raise ValueError(f"{v!r} is not a host name (a wildcard is written *.example.com)")
        return host

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError('must start with "/"')
        if any(c in v for c in "?#%\\") or "/../" in v + "/" or "/./" in v + "/":
            raise ValueError("must be a plain path prefix without ?, #, %, \\ or dot-segments")
        if any(seg.partition(";")[0] in (".", "..") for seg in v.split("/")):
            # The router refuses "/..;/" (a dot-segment to Tomcat and Jetty): say so here, where
            # `check` reports it, rather than at start-up.
            raise ValueError('must not have a dot-segment with ";" parameters, like /..;/')
        if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must list at least one method, or be left out to match any")
        out = tuple(m.upper() for m in v)
        for m in out:
            if m not in HTTP_METHODS:
                raise ValueError(f"{m!r} is not an HTTP method")
        return out


# ---------------------------------------------------------------------------------------------
# Identity headers and the signed assertion (issue 5 items 2 and 3)
# ---------------------------------------------------------------------------------------------

# Names a `headers.send` entry may not use: what HTTP or the proxy owns (framing, Host, cookies,
# the forwarding facts the gateway computes, method overrides it strips), the client's own
# Authorization, the access token header of pass_access_token, X-Gateway-Assertion and
# X-Request-Id (the request's id, always the gateway's own).
# Canonical spelling (lower case, "-"), as gateway.headers.canonical compares.
_RESERVED_HEADERS = frozenset({
    "host", "cookie", "authorization", "connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length", "content-type", "content-encoding", "expect", "forwarded",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port",
    "x-forwarded-uri", "x-original-uri", "x-real-ip", "x-http-method-override",
    "x-http-method", "x-method-override", "x-forwarded-access-token", "x-gateway-assertion",
    "x-request-id",
})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Joins list values. Never a character of an encoded value (base64url, RFC 2047's
# =?UTF-8?B?...?=), so a list always splits back into the items it was made of.
_SEPARATOR = re.compile(r"[,;|: ]{1,3}")
HEADER_ENCODINGS = ("rfc2047", "base64url", "utf8", "refuse")


def _canonical_header(name: str) -> str:
    return name.lower().replace("_", "-")


class HeadersConfig(_Model):
    """Identity headers to the upstream: ``headers:`` at the top (every route) or in a route
    (its keys replace the top-level ones, key by key)."""

    send: dict[str, str] | None = Field(
        None,
        description="header name → claim path (X-User-Id: sub, X-Roles: realm_access.roles); "
        "replaces the built-in X-Forwarded-User/-Email/-Groups/-Preferred-Username",
    )
    required: tuple[str, ...] = Field(
        (), description="headers of send that must be sent; a user without a value is refused"
    )
    separator: Annotated[str, StringConstraints(strip_whitespace=False)] = Field(
        ",", description="joins the values of a list claim"
    )
    encoding: Literal["rfc2047", "base64url", "utf8", "refuse"] | None = Field(
        None,
        description="non-ASCII values: rfc2047 encoded-words (default for send), base64url "
        "(every value), utf8 (as is; default of the built-in headers), refuse (left out)",
    )
    groups_filter: str | None = Field(
        None,
        min_length=1,
        description='regex a group name must match as a whole, or "policy": only the '
        "groups the route's rules name; applies to the groups header and the assertion",
    )
    max_bytes: int = Field(
        8192,
        ge=512,
        le=65536,
        description="budget of all identity headers (and the assertion): over it, list items "
        "then optional headers are dropped, with a warning",
    )

    @field_validator("send")
    @classmethod
    def _send(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError(
                "names no header; list header: claim pairs, or remove send for the built-in "
                "X-Forwarded-* headers"
            )
        seen: dict[str, str] = {}
        for name, claim in v.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            key = _canonical_header(name)
            if key in _RESERVED_HEADERS:
                raise ValueError(
                    f"{name!r} cannot carry an identity: the gateway or HTTP itself owns it"
                )
            if key in seen:
                raise ValueError(
                    f"{seen[key]!r} and {name!r} are one header to upstream frameworks "
                    "(case and _ do not count); keep one"
                )
            seen[key] = name
            try:
                parse_claim_path(claim)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return v

    @field_validator("separator")
    @classmethod
    def _separator(cls, v: str) -> str:
        if not _SEPARATOR.fullmatch(v):
            raise ValueError(
                'must be 1 to 3 of the characters , ; | : and space (",", ", ", ";", " ")'
            )
        return v

    @field_validator("groups_filter")
    @classmethod
    def _groups_filter(cls, v: str | None) -> str | None:
        if v is None or v == "policy":
            return v
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"{v!r} is not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _required_in_send(self) -> HeadersConfig:
        if "send" in self.model_fields_set and "required" in self.model_fields_set:
            _check_required(self.send, self.required)
        return self

    def merged(self, route: HeadersConfig | None) -> HeadersConfig:
        """These (top-level) settings with a route's own keys put in their place."""
        if route is None:
            return self
        return self.model_copy(
            update={name: getattr(route, name) for name in route.model_fields_set}
        )


def _check_required(send: Mapping[str, str] | None, required: Sequence[str]) -> None:
    if not required:
        return
    if send is None:
        raise ValueError(
            "required names headers of send; without send, the built-in X-Forwarded-User is "
            "required and the other built-in headers optional"
        )
    names = {_canonical_header(n) for n in send}
    for name in required:
        if _canonical_header(name) not in names:
            raise ValueError(f"{name!r} is not one of the headers of send")


def _pem_key(value: SecretStr, *, private: bool) -> SecretStr:
    """An EC P-256 key in PEM (the assertion is signed with ES256, RFC 7518 3.4)."""
    text = value.get_secret_value().strip().encode()
    loaded: object
    try:
        loaded = load_pem_private_key(text, password=None)
    except (ValueError, TypeError):
        loaded = None
        if not private:
            try:
                loaded = load_pem_public_key(text)
            except (ValueError, TypeError):
                loaded = None
    want = "an EC P-256 private key" if private else "an EC P-256 key (public or private)"
    curve = getattr(loaded, "curve", None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or (
        not isinstance(curve, ec.SECP256R1)
    ):
        raise ValueError(
            f"is not {want} in PEM (unencrypted); make one with "
            "`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`"
        )
    return value


def _private_pem(value: SecretStr | None) -> SecretStr | None:
    return None if value is None else _pem_key(value, private=True)


def _any_pem(value: SecretStr) -> SecretStr:
    return _pem_key(value, private=False)


def _drop_empty(value: object) -> object:
    # `published_keys: ["${ASSERTION_KEY_OLD:-}"]` with the variable unset lists no key.
    if isinstance(value, list | tuple):
        return [v for v in value if v != ""]
    return value


class AssertionConfig(_Model):
    """The signed identity assertion (``X-Gateway-Assertion``) of routes with
    ``assertion: true``: its signing key, audience and lifetime."""

    key: Annotated[
        SecretStr | None, BeforeValidator(_none_if_empty), AfterValidator(_private_pem)
    ] = Field(
        None,
        description='EC P-256 private key, PEM, from the environment ("${ASSERTION_KEY}"); '
        "none (and no key_file): generated, shared through Redis, rotated every rotate_every",
    )
    key_file: str | None = Field(
        None, min_length=1, description="file holding the EC P-256 private key (PEM) instead"
    )
    published_keys: Annotated[
        tuple[Annotated[SecretStr, AfterValidator(_any_pem)], ...],
        BeforeValidator(_drop_empty),
    ] = Field(
        (),
        description="more keys (PEM, public or private) in the JWKS: the previous key during "
        "a rotation, or the next one before it signs",
    )
    audience: str | None = Field(
        None, min_length=1, description="the aud claim; default: the route's upstream origin"
    )
    lifetime: Duration = Field(60.0, description="exp - iat of each assertion; at most 10m")
    rotate_every: Duration = Field(
        86400.0, description="generated keys only: a new signing key this often; at least 1h"
    )

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, v: float) -> float:
        if v > 600:
            raise ValueError("must be at most 10m: an assertion proves one request, now")
        return v

    @field_validator("rotate_every")
    @classmethod
    def _rotate(cls, v: float) -> float:
        if v < 3600:
            raise ValueError("must be at least 1h")
        return v

    @model_validator(mode="after")
    def _one_key(self) -> AssertionConfig:
        if self.key is not None and self.key_file is not None:
            _conflicts("AssertionConfig", [(("key_file",), "give the signing key once: key "
                                            "or key_file, not both")])
        return self


def _token_text(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty string without spaces")
    return value


# An audience, issuer or claim value: what a token must carry, written exactly.
TokenText = Annotated[str, AfterValidator(_token_text)]


class BearerConfig(_Model):
    """``routes[].bearer``: API clients may send ``Authorization: Bearer <access token>``.

    The token replaces the session cookie on that request; the route's policy and identity
    headers apply unchanged. Signature, ``iss``, ``aud``, ``exp`` and ``nbf`` are always
    checked (RFC 9068); nothing here can switch one of them off.
    """

    audiences: tuple[TokenText, ...] = Field(
        min_length=1,
        description="aud values this API accepts (a token must name at least one); required",
    )
    issuers: tuple[TokenText, ...] | None = Field(
        None, description="iss values accepted; default: provider.issuer"
    )
    algorithms: tuple[str, ...] | None = Field(
        None, description="signing algorithms accepted; default: provider.algorithms; never none "
        "or HMAC"
    )
    required_claims: dict[str, TokenText | tuple[TokenText, ...]] = Field(
        default_factory=dict,
        description="claim name → the value (or one of the values) it must have; Cognito: "
        "{token_use: access}",
    )
    introspection: bool = Field(
        False, description="check tokens that are not JWTs (opaque) at the provider's RFC 7662 "
        "introspection_endpoint, with the gateway's client credentials"
    )
    introspection_cache: Duration = Field(
        300.0, description="longest an active introspection answer is reused (never past the "
        "token's exp); 0: ask the provider every time"
    )

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must list at least one algorithm, or be left out")
        for alg in v:
            if alg.lower() == "none":
                raise ValueError('"none" is never accepted: an unsigned token proves nothing')
            if alg.startswith("HS"):
                raise ValueError(
                    f"{alg} is refused: an access token MACed with a secret the gateway shares "
                    "could be minted by the gateway itself (use the provider's public keys)"
                )
            if alg not in KNOWN_ALGORITHMS:
                raise ValueError(f"unknown algorithm {alg!r}; known: {sorted(KNOWN_ALGORITHMS)}")
        return v

    @field_validator("required_claims")
    @classmethod
    def _claims(
        cls, v: dict[str, str | tuple[str, ...]]
    ) -> dict[str, str | tuple[str, ...]]:
        for name, value in v.items():
            if not name:
                raise ValueError("a claim name must not be empty")
            if isinstance(value, tuple) and not value:
                raise ValueError(f"{name}: list at least one accepted value")
        return v


class RouteConfig(_Model):
    name: str = Field(min_length=1)
    match: MatchConfig = MatchConfig()
    upstream: str = Field(description="origin of the app: http://127.0.0.1:8080")
    auth: Literal["required", "public", "optional"] = Field(
        "required",
        description="required: sign-in needed; public: no sign-in, no identity; optional: "
        "identity headers when signed in, anonymous pass otherwise",
    )
    unauthenticated: Annotated[
        Literal["auto", "redirect", "401"],
        BeforeValidator(_unauthenticated),
        # YAML users write `401` unquoted, a number: the schema says it is welcome.
        WithJsonSchema({"enum": ["auto", "redirect", "401", 401]}),
    ] = Field(
        "auto",
        description="without a session: auto (browser navigations redirect, the rest 401), "
        "redirect (always), 401 (always; APIs)",
    )
    allow: AllowRules | None = Field(
        None, description="rules, any one admits; none (and no deny): default_policy applies"
    )
    deny: Rules | None = Field(None, description="rules, any one refuses; deny wins over allow")
    pass_access_token: bool = False
    pass_host_header: bool = Field(True, description="send the client's Host to the upstream")
    timeout: Duration = Field(30.0, description="upstream answer deadline (504 after)")
    headers: HeadersConfig | None = Field(
        None, description="identity headers of this route; its keys replace those of headers:"
    )
    assertion: bool = Field(
        False, description="add X-Gateway-Assertion, a signed JWT of the identity (assertion:)"
    )
    bearer: BearerConfig | None = Field(
        None, description="also accept Authorization: Bearer access tokens (API clients)"
    )

    @model_validator(mode="after")
    def _bearer_needs_auth(self) -> RouteConfig:
        if self.bearer is not None and self.auth == "public":
            _conflicts("RouteConfig", [(("bearer",), (
                "a public route never looks at credentials; remove bearer or set auth: "
                "required (or optional)"))])
        return self

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        return _check_http_url(v, allow_path=False).rstrip("/")

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _null(cls, v: object) -> object:
        return _no_null(v, "rules")

    @model_validator(mode="after")
    def _public_has_no_allow(self) -> RouteConfig:
        policy = " and ".join(k for k in ("allow", "deny") if getattr(self, k) is not None)
        if self.auth == "public" and policy:
            raise ValueError(
                f"a public route admits everyone; remove {policy} or set auth: required"
            )
        if self.auth == "optional" and policy:
            raise ValueError(
                "an optional route admits everyone (identity headers only for those signed in); "
                f"remove {policy} or set auth: required"
            )
        if self.auth != "required" and "unauthenticated" in self.model_fields_set:
            raise ValueError(
                f"unauthenticated has no effect on an auth: {self.auth} route, which never asks "
                "anyone to sign in; remove it"
            )
        self._rules_can_match()
        return self

    def _rules_can_match(self) -> None:
        """A rule whose ``methods`` share none with the route's ``match.methods`` can never
        match: refuse it, since the operator believes it guards (or opens) something."""
        if self.match.methods is None:
            return
        route_methods = _with_head(self.match.methods)
        lists = (("allow", self.allow), ("deny", self.deny))
        for kind, rules in lists:
            if not isinstance(rules, tuple):
                continue
            for i, rule in enumerate(rules):
                if rule.methods and not _with_head(rule.methods) & route_methods:
                    raise ValueError(
                        f"{kind}[{i}].methods: lists none of the methods this route matches "
                        f"({', '.join(sorted(route_methods))}), so the rule can never match"
                    )


def _with_head(methods: Sequence[str]) -> frozenset[str]:
    """GET includes HEAD (RFC 9110 9.3.2), as in routing and in the policy."""
    out = frozenset(methods)
    return out | {"HEAD"} if "GET" in out else out


class AdminConfig(_Model):
    """The session admin API: off while ``listen`` is null; needs ``token`` when on."""

    listen: str | None = Field(
        None, description="host:port of the admin API (list and revoke sessions); null: off"
    )
    token: Annotated[SecretStr | None, BeforeValidator(_none_if_empty)] = Field(
        None, description="bearer token the admin API requires; from ${ENV}; never logged"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v

    @model_validator(mode="after")
    def _token_needed(self) -> AdminConfig:
        token = self.token.get_secret_value() if self.token is not None else ""
        if self.listen is not None and len(token) < 16:
            _conflicts("AdminConfig", [(("token",), (
                "the admin API (admin.listen) needs a bearer token of at least 16 characters; "
                "take it from the environment: \"${ADMIN_TOKEN}\""))])
        return self


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True
    audit_log: bool = Field(
        True, description="one line per access decision on a route (allowed, denied, ...)"
    )


class Config(_Model):
    """The whole gateway configuration (``version: 1``)."""

    version: Literal[1]
    server: ServerConfig = ServerConfig()
    provider: ProviderConfig
    session: SessionConfig
    default_policy: PolicyConfig | None = Field(
        None, description="allow/deny of every protected route that has neither"
    )
    routes: tuple[RouteConfig, ...] = Field(min_length=1)
    logging: LoggingConfig = LoggingConfig()
    headers: HeadersConfig = Field(
        HeadersConfig(), description="identity headers of every route (a route's own replace)"
    )
    assertion: AssertionConfig = Field(
        AssertionConfig(), description="key, audience and lifetime of X-Gateway-Assertion"
    )
    admin: AdminConfig = Field(
        AdminConfig(), description="session admin API on its own address; off by default"
    )

    @field_validator("default_policy", mode="before")
    @classmethod
    def _null_policy(cls, v: object) -> object:
        return _no_null(v, "allow and/or deny rules")

    @model_validator(mode="after")
    def _route_headers(self) -> Config:
        """A route's headers keys combined with the top-level ones must still agree: its
        ``send`` may leave out a header the top-level ``required`` names, and vice versa."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        try:
            _check_required(self.headers.send, self.headers.required)
        except ValueError as exc:
            found.append((("headers",), str(exc)))
        for i, route in enumerate(self.routes):
            if route.headers is None:
                continue
            merged = self.headers_for(route)
            try:
                _check_required(merged.send, merged.required)
            except ValueError as exc:
                found.append((("routes", i, "headers"), f"with the top-level headers: {exc}"))
        _conflicts("Config", found)
        return self

    def headers_for(self, route: RouteConfig) -> HeadersConfig:
        """The identity-header settings of ``route``: its own keys, else the top-level ones."""
        return self.headers.merged(route.headers)

    @field_validator("routes")
    @classmethod
    def _unique_names(cls, v: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        seen: dict[str, int] = {}
        for i, r in enumerate(v):
            if r.name in seen:
                raise ValueError(
                    f"route name {r.name!r} is used twice (routes[{seen[r.name]}] and routes[{i}])"
                )
            seen[r.name] = i
        return v


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

# `$$`, a good reference `${NAME}` / `${NAME:-default}`, or anything else starting with `${`
# (a bad reference, reported rather than kept as literal text: `${SESSION_KEY:x}` or
# `${OIDC-SECRET}` must not silently become the secret itself). Defaults do not nest.
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}$]*))?\}|\$\{[^}]*\}?")


def format_path(loc: Sequence[str | int]) -> str:
    """("routes", 1, "match", "path") → ``routes[1].match.path``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _expand(node: Any, env: Mapping[str, str], loc: tuple[str | int, ...],
            problems: list[ConfigProblem]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, env, (*loc, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, env, (*loc, i), problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "$" in node:

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name is None:
                problems.append(
                    ConfigProblem(
                        format_path(loc),
                        f"bad environment reference {m.group(0)!r}: write ${{NAME}} or "
                        "${NAME:-default}, and $$ for a literal $",
                    )
                )
                return ""
            value = env.get(name)
            if value is None or (value == "" and default is not None):
                if default is not None:
                    return default
                problems.append(
                    ConfigProblem(
                        format_path(loc), f"environment variable {name} is not set"
                    )
                )
                return ""
            return value

        return _ENV_REF.sub(repl, node)
    return node


# pydantic error types whose stock message names Python types; said in the YAML's words instead.
_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "too_short": "must list at least one entry",
    "string_too_short": "must not be empty",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
    "dict_type": "must be a mapping (key: value)",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
}


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    msg = str(err.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind == "literal_error":
        ctx = err.get("ctx") or {}
        msg = f"must be one of {ctx.get('expected', '')}"
    return msg


def _yaml_loc(loc: Sequence[str | int]) -> tuple[str | int, ...]:
    """A pydantic error location as a path in the YAML: without the internal tags of function
    validators, nor those of the ``allow`` union (right after ``allow``, where no YAML key can
    stand, so a claim that happens to be named like a tag keeps its name)."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and (
            part.startswith("function-") or (part in _UNION_TAGS and out and out[-1] == "allow")
        ):
            continue
        out.append(part)
    return tuple(out)


def _problems(exc: ValidationError, unset: set[str]) -> list[ConfigProblem]:
    """Config problems from pydantic's errors.

    ``unset`` holds the paths whose value came from a missing environment variable: that
    problem is already reported, and a second one ("must not be empty") would only distract.
    """
    errors = exc.errors(include_url=False)
    # Skip pydantic's internal union/function tags so paths read like the YAML.
    locs = [_yaml_loc(err["loc"]) for err in errors]
    out: list[ConfigProblem] = []
    for err, loc in zip(errors, locs, strict=True):
        path = format_path(loc)
        if err["type"] != "extra_forbidden" and any(
            path == u or path.startswith((u + ".", u + "[")) for u in unset
        ):
            continue
        # pydantic counts a list's length after dropping failed items: `keys: [bad]` would
        # also read "must list at least one entry". The item's own problem says it all.
        if err["type"] == "too_short" and any(
            other[: len(loc)] == loc and len(other) > len(loc) for other in locs
        ):
            continue
        problem = ConfigProblem(path, _message(err))
        if problem not in out:
            out.append(problem)
    return out


def parse_config(data: Any, env: Mapping[str, str]) -> Config:
    """Validate already-parsed YAML data; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("", "the config must be a YAML mapping (key: value)")])
    problems: list[ConfigProblem] = []
    expanded = _expand(data, env, (), problems)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        problems.extend(_problems(exc, {p.path for p in problems}))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


class _Loader(yaml.SafeLoader):
    """The safe loader, but a key given twice in one mapping is an error.

    PyYAML keeps the last of duplicate keys silently, so a second ``allow:`` under a route
    would drop the first one's rules unnoticed; YAML itself says keys must be unique.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` keys may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key {key!r} is given twice", key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def load_config(text: str, env: Mapping[str, str]) -> Config:
    """Parse YAML text (safe loader only; duplicate keys are errors) and validate it."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        if context and problem.startswith("but "):
            # PyYAML splits some messages in two: "expected a single document in the stream",
            # "but found another document".
            problem = f"{context}, {problem}"
        raise ConfigError([ConfigProblem("", f"YAML syntax error at {where}{problem}")]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([ConfigProblem("", "the YAML is nested too deeply")]) from None
    except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as exc:
        # PyYAML's constructors let Python's own errors out on some scalars: an integer past
        # the 4300-digit limit, an impossible date (2001-13-45), an explicit tag on a value
        # that is not of its type (`!!int x`, `!!bool x`, `!!timestamp x`, `!!int ''`).
        raise ConfigError([ConfigProblem(
            "", f"a YAML value cannot be read ({type(exc).__name__}: {exc}); check numbers, "
            "dates and explicit !!tags",
        )]) from None
    return parse_config(data, env)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file, for editors and CI linting."""
    schema = Config.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "oidc-gateway configuration"
    return schema
