"""Provider presets: what each identity provider needs by default, as one table.

Why a table and not code per provider: a preset only fills in config keys the operator did not
write (``provider.preset`` is applied by :class:`gateway.config.ProviderConfig` before
validation), so everything a preset does is visible in ``oidc-gateway explain``/``check`` and
can be overridden key by key. No preset switches a check off: the issuer quirks that need
behaviour (Google's scheme-less ``iss``, Entra's ``{tenantid}``) are decided in
:mod:`gateway.issuers` from the preset's name and the written config, never from a token.

Pure data, below :mod:`gateway.config` in the layers: it imports nothing of the gateway.
Keys are dotted paths inside ``provider:``; values are what the YAML would hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = ["PRESETS", "PRESET_KEYS", "PresetName", "apply_preset"]

PresetName = Literal[
    "generic", "keycloak", "entra", "okta", "google", "auth0", "dex", "gitlab", "cognito"
]

# The keys a preset may supply, in the order explain lists them.
PRESET_KEYS: Final = (
    "scopes",
    "auth_params",
    "logout",
    "claims.user",
    "claims.email",
    "claims.email_verified",
    "claims.groups",
    "claims.groups_from",
    "claims.groups_cap",
    "claims.hosted_domain",
    "claims.groups_overage",
)

_STANDARD = ["openid", "email", "profile"]
# offline_access: the providers that hand out refresh tokens only when it is asked for
# (Entra, Okta, Auth0, Dex). Keycloak gives one without it (and with it an *offline* token,
# which outlives the user's SSO session: not what a gateway wants).
_OFFLINE = [*_STANDARD, "offline_access"]

_TABLE: dict[str, dict[str, Any]] = {
    # Nothing: the defaults of the config model itself.
    "generic": {},
    # Keycloak: groups need a "Group Membership" mapper (claim name `groups`, full path off);
    # realm roles live in the access token (`realm_access.roles`), see the README.
    # end_session_endpoint is published: sign-out ends the Keycloak session too.
    "keycloak": {
        "scopes": _STANDARD,
        "logout": "provider",
        "claims.user": "preferred_username",
        "claims.groups": "groups",
        "claims.groups_from": ["id_token", "userinfo"],
    },
    # Microsoft Entra ID (v2.0 endpoints): refresh tokens need offline_access; `groups` holds
    # object ids (or names, per the app's token configuration) in the ID token only; the email
    # is verified only when `xms_edov` says so (the `email` claim alone is whatever the tenant
    # admin typed). preferred_username is the UPN: readable, but mutable.
    "entra": {
        "scopes": _OFFLINE,
        "logout": "provider",
        "claims.user": "preferred_username",
        "claims.email": "email",
        "claims.email_verified": "xms_edov",
        "claims.groups": "groups",
        "claims.groups_from": ["id_token"],
        # Over 200 groups the token names none (_claim_names/hasgroups): ask Graph.
        "claims.groups_overage": "graph",
    },
    # Okta (org or custom authorization server): a `groups` claim configured on the app or the
    # authorization server, cut at 100 entries in ID tokens; offline_access for refresh.
    "okta": {
        "scopes": _OFFLINE,
        "logout": "provider",
        "claims.user": "preferred_username",
        "claims.groups": "groups",
        "claims.groups_from": ["id_token", "userinfo"],
        "claims.groups_cap": 100,
    },
    # Google: no refresh token unless access_type=offline, and only on the first consent unless
    # prompt=consent; no groups in tokens; `hd` names the Workspace domain; no
    # end_session_endpoint (sign-out is local).
    "google": {
        "scopes": _STANDARD,
        "auth_params": {"access_type": "offline", "prompt": "consent"},
        "logout": "local",
        "claims.user": "email",
        "claims.email": "email",
        "claims.hosted_domain": "hd",
        "claims.groups_from": ["id_token"],
    },
    # Auth0: no preferred_username; groups/roles only through an Action adding a (namespaced)
    # claim; RP-initiated logout when enabled in the tenant settings.
    "auth0": {
        "scopes": _OFFLINE,
        "logout": "provider",
        "claims.user": "email",
        "claims.groups": "groups",
        "claims.groups_from": ["id_token", "userinfo"],
    },
    # Dex: groups only with the `groups` scope, refresh tokens only with offline_access; no
    # end_session_endpoint.
    "dex": {
        "scopes": [*_STANDARD, "groups", "offline_access"],
        "logout": "local",
        "claims.user": "email",
        "claims.groups": "groups",
        "claims.groups_from": ["id_token"],
    },
    # GitLab: the user name is `nickname`; `groups` (every group, full paths) comes from
    # userinfo only (the ID token has `groups_direct`); no end_session_endpoint.
    "gitlab": {
        "scopes": _STANDARD,
        "logout": "local",
        "claims.user": "nickname",
        "claims.groups": "groups",
        "claims.groups_from": ["userinfo"],
    },
    # AWS Cognito user pools: `cognito:username` and `cognito:groups`; the hosted UI's /logout
    # is not in discovery (not RP-initiated logout), so sign-out is local.
    "cognito": {
        "scopes": _STANDARD,
        "logout": "local",
        "claims.user": '["cognito:username"]',
        "claims.groups": '["cognito:groups"]',
        "claims.groups_from": ["id_token"],
    },
}

PRESETS: Final[Mapping[str, Mapping[str, Any]]] = MappingProxyType(
    {name: MappingProxyType(values) for name, values in _TABLE.items()}
)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def apply_preset(data: Mapping[str, Any], name: str) -> tuple[dict[str, Any], frozenset[str]]:
    """``data`` (the raw ``provider:`` mapping) with the preset's defaults for the keys it does
    not hold, and the dotted keys that the preset supplied.

    What the operator wrote always wins: a key present in ``data`` is kept whatever its value
    (a wrong value is then the operator's, reported by validation under its own path).
    ``auth_params`` is merged key by key, so writing ``auth_params: {hd: example.com}`` keeps
    Google's ``access_type``; a key set to null there removes the preset's parameter.
    """
    out = dict(data)
    supplied: set[str] = set()
    for key, value in PRESETS.get(name, {}).items():
        head, _, tail = key.partition(".")
        if not tail:
            if head not in out:
                out[head] = _copy(value)
                supplied.add(key)
            elif head == "auth_params" and isinstance(out[head], Mapping):
                merged = dict(out[head])
                for param, param_value in value.items():
                    if param not in merged:
                        merged[param] = param_value
                        supplied.add(f"auth_params.{param}")
                out[head] = merged
            continue
        nested = out.get(head)
        if nested is None and head not in out:
            nested = {}
        if not isinstance(nested, Mapping):
            continue  # not a mapping: validation reports it at its path
        if tail not in nested:
            out[head] = {**nested, tail: _copy(value)}
            supplied.add(key)
    return out, frozenset(supplied)
