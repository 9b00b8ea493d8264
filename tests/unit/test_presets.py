"""Provider presets and issuer spelling, pure: the preset table, how it merges with what the
operator wrote, the config errors of the new provider keys, the issuer rules, and what
``oidc-gateway check``/``explain`` print for each shipped ``config/providers/<preset>.yaml``.
"""

from __future__ import annotations

import base64
import typing
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import Config, ProviderConfig, parse_config
from gateway.errors import ConfigError
from gateway.explain import provider_lines
from gateway.issuers import (
    IssuerRule,
    backchannel_endpoints,
    discovery_location,
    issuer_problem,
    same_issuer_spelling,
)
from gateway.models import LoginState
from gateway.oidc import ProviderMetadata, authorization_url
from gateway.presets import PRESET_KEYS, PRESETS, PresetName, apply_preset

PROVIDERS_DIR = Path(__file__).resolve().parents[2] / "config" / "providers"
KEY = base64.b64encode(bytes(range(32))).decode()
ENV = {"OIDC_CLIENT_SECRET": "test-secret", "SESSION_KEY": KEY}
NAMES: tuple[str, ...] = typing.get_args(PresetName)
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
ENTRA = "https://login.microsoftonline.com/{tenantid}/v2.0"


def config(**provider: Any) -> Config:
    data = {
        "version": 1,
        "provider": {
            "issuer": "https://idp.example.com",
            "client_id": "gateway",
            "client_secret": "${OIDC_CLIENT_SECRET}",
            **provider,
        },
        "session": {"keys": ["${SESSION_KEY}"], "store": "memory"},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:8080"}],
    }
    return parse_config(data, ENV)


def problems(**provider: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(**provider)
    return [str(p) for p in info.value.problems]


def _at(provider: ProviderConfig, key: str) -> Any:
    node: Any = provider
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _normal(value: Any) -> Any:
    """A table value as the model holds it (lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_every_preset_name_has_a_table_entry_and_only_known_keys() -> None:
    assert set(PRESETS) == set(NAMES)
    assert len(NAMES) == 9
    for name, values in PRESETS.items():
        assert set(values) <= set(PRESET_KEYS), name


@pytest.mark.parametrize("name", NAMES)
def test_each_preset_alone_gives_a_valid_config_with_its_values(name: str) -> None:
    issuer = ENTRA if name == "entra" else "https://idp.example.com"
    extra = {"tenants": [TENANT]} if name == "entra" else {}
    provider = config(preset=name, issuer=issuer, **extra).provider
    assert provider.preset == name
    for key, value in PRESETS[name].items():
        if key == "auth_params":
            assert provider.auth_params == value
        else:
            assert _at(provider, key) == _normal(value), key
    assert provider.from_preset == frozenset(PRESETS[name])


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("keycloak", "logout", "provider"),
        ("keycloak", "claims.user", "preferred_username"),
        ("entra", "claims.email_verified", "xms_edov"),
        ("entra", "scopes", ("openid", "email", "profile", "offline_access")),
        ("entra", "claims.groups_from", ("id_token",)),
        ("okta", "claims.groups_cap", 100),
        ("okta", "scopes", ("openid", "email", "profile", "offline_access")),
        ("google", "auth_params", {"access_type": "offline", "prompt": "consent"}),
        ("google", "claims.hosted_domain", "hd"),
        ("google", "logout", "local"),
        ("auth0", "scopes", ("openid", "email", "profile", "offline_access")),
        ("dex", "scopes", ("openid", "email", "profile", "groups", "offline_access")),
        ("dex", "logout", "local"),
        ("gitlab", "claims.user", "nickname"),
        ("gitlab", "claims.groups_from", ("userinfo",)),
        ("cognito", "claims.user", '["cognito:username"]'),
        ("cognito", "claims.groups", '["cognito:groups"]'),
        ("cognito", "logout", "local"),
    ],
)
def test_provider_quirks_in_the_table(name: str, key: str, value: Any) -> None:
    issuer = ENTRA if name == "entra" else "https://idp.example.com"
    extra = {"tenants": [TENANT]} if name == "entra" else {}
    assert _at(config(preset=name, issuer=issuer, **extra).provider, key) == value


def test_generic_is_the_default_and_changes_nothing() -> None:
    plain, generic = config().provider, config(preset="generic").provider
    assert plain.preset == "generic"
    assert plain.from_preset == generic.from_preset == frozenset()
    assert plain.scopes == generic.scopes == ("openid", "email", "profile")
    assert plain.claims == generic.claims
    assert plain.logout == "provider"
    assert plain.auth_params == {}


# ---------------------------------------------------------------------------------------------
# What the operator writes wins
# ---------------------------------------------------------------------------------------------


def test_written_keys_win_over_the_preset_key_by_key() -> None:
    provider = config(
        preset="cognito",
        scopes=["openid", "email"],
        logout="provider",
        claims={"user": "email"},
    ).provider
    assert provider.scopes == ("openid", "email")
    assert provider.logout == "provider"
    assert provider.claims.user == "email"
    # The claims keys not written still come from the preset.
    assert provider.claims.groups == '["cognito:groups"]'
    assert "claims.groups" in provider.from_preset
    assert not {"scopes", "logout", "claims.user"} & provider.from_preset


def test_auth_params_merge_by_name_and_null_drops_a_preset_one() -> None:
    provider = config(preset="google", auth_params={"hd": "example.com", "prompt": None}).provider
    assert provider.auth_params == {"hd": "example.com", "prompt": None, "access_type": "offline"}
    assert provider.effective_auth_params == (("hd", "example.com"), ("access_type", "offline"))
    assert "auth_params.access_type" in provider.from_preset
    assert "auth_params.prompt" not in provider.from_preset


def test_apply_preset_leaves_a_non_mapping_to_validation() -> None:
    merged, supplied = apply_preset({"claims": "oops"}, "okta")
    assert merged["claims"] == "oops"
    assert not any(key.startswith("claims.") for key in supplied)
    assert any("claims" in p for p in problems(preset="okta", claims="oops"))


def test_the_preset_table_is_not_changed_by_a_config() -> None:
    before = {k: dict(v) for k, v in PRESETS.items()}
    provider = config(preset="dex").provider
    assert provider.scopes[-1] == "offline_access"
    assert {k: dict(v) for k, v in PRESETS.items()} == before


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


def test_an_unknown_preset_is_an_error_naming_the_choices() -> None:
    (problem,) = problems(preset="azure")
    assert problem.startswith("provider.preset: must be one of")
    assert "'entra'" in problem
    assert "'cognito'" in problem


@pytest.mark.parametrize(
    "name",
    [
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
        "redirect_uri",
        "client_id",
        "response_type",
        "scope",
        "response_mode",
        "request",
        "request_uri",
        "STATE",
    ],
)
def test_auth_params_the_gateway_owns_are_refused(name: str) -> None:
    (problem,) = problems(auth_params={name: "x"})
    assert problem.startswith("provider.auth_params: ")
    assert "set by the gateway itself" in problem


def test_auth_params_values_must_be_strings() -> None:
    found = problems(auth_params={"max_age": 300})
    assert found
    assert all(p.startswith("provider.auth_params.max_age: ") for p in found)


def test_a_tenant_template_needs_a_tenant_list() -> None:
    assert problems(preset="entra", issuer=ENTRA) == [
        "provider.tenants: an issuer with {tenantid} admits any tenant's tokens: list the "
        "tenant ids (tid) to admit; the issuer check is never switched off"
    ]
    assert problems(preset="entra", issuer=ENTRA, tenants=[])[0].startswith("provider.tenants")


def test_a_tenant_list_without_a_template_is_refused() -> None:
    (problem,) = problems(tenants=[TENANT])
    assert problem.startswith("provider.tenants: only an issuer with {tenantid}")


def test_a_tenant_template_without_the_entra_preset_needs_a_discovery_url() -> None:
    (problem,) = problems(issuer=ENTRA, tenants=[TENANT])
    assert problem.startswith("provider.discovery_url: ")
    fine = config(issuer=ENTRA, tenants=[TENANT], discovery_url="https://idp.example.com/d")
    assert discovery_location(fine.provider) == "https://idp.example.com/d"


@pytest.mark.parametrize(
    "issuer",
    [
        "https://login.microsoftonline.com/{tenant}/v2.0",
        "https://login.microsoftonline.com/x{tenantid}/v2.0",
        "https://login.microsoftonline.com/{tenantid}/{tenantid}",
        "https://{tenantid}.example.com/v2.0",
    ],
)
def test_only_a_whole_tenantid_segment_may_stand_in_an_issuer(issuer: str) -> None:
    found = problems(preset="entra", issuer=issuer, tenants=[TENANT])
    assert any(p.startswith("provider.issuer: the only placeholder") for p in found), found


@pytest.mark.parametrize("tenant", ["", "a/b", "x?y", "../evil", "a" * 65])
def test_tenant_ids_cannot_bend_the_issuer(tenant: str) -> None:
    found = problems(preset="entra", issuer=ENTRA, tenants=[tenant])
    assert any(p.startswith("provider.tenants") and "not a tenant id" in p for p in found)


def test_tenant_ids_are_kept_lower_case() -> None:
    provider = config(preset="entra", issuer=ENTRA, tenants=[TENANT.upper()]).provider
    assert provider.tenants == (TENANT,)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("backchannel_url", "http://kc.internal:8080/auth", "origin only"),
        ("backchannel_url", "ftp://kc.internal", "http:// or https://"),
        ("discovery_url", "not a url", "http:// or https://"),
        ("logout", "idp", "must be one of"),
    ],
)
def test_new_provider_keys_are_checked(key: str, value: str, says: str) -> None:
    (problem,) = problems(**{key: value})
    assert problem.startswith(f"provider.{key}: ")
    assert says in problem


# ---------------------------------------------------------------------------------------------
# Issuers (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("published", "configured", "same"),
    [
        ("https://x.auth0.com/", "https://x.auth0.com", True),
        ("https://x.auth0.com", "https://x.auth0.com/", True),
        ("https://x.auth0.com", "https://x.auth0.com", True),
        ("https://x.auth0.com//", "https://x.auth0.com", False),
        ("https://X.auth0.com/", "https://x.auth0.com", False),
        ("http://x.auth0.com/", "https://x.auth0.com", False),
        ("https://x.auth0.com/a/", "https://x.auth0.com", False),
        ("https://x.auth0.com.evil/", "https://x.auth0.com", False),
    ],
)
def test_only_one_trailing_slash_separates_two_spellings(
    published: str, configured: str, same: bool
) -> None:
    assert same_issuer_spelling(published, configured) is same


def test_google_schemeless_iss_only_under_its_preset() -> None:
    google = IssuerRule("https://accounts.google.com", schemeless=True)
    generic = IssuerRule("https://accounts.google.com")
    assert google.problem({"iss": "accounts.google.com"}) is None
    assert google.problem({"iss": "https://accounts.google.com"}) is None
    assert generic.problem({"iss": "accounts.google.com"}) is not None
    assert google.problem({"iss": "evil.example.com"}) is not None
    assert google.problem({"iss": "http://accounts.google.com"}) is not None
    assert google.problem({}) is not None


def test_the_preset_decides_the_rule_not_the_token() -> None:
    google = config(preset="google", issuer="https://accounts.google.com").provider
    assert IssuerRule.of("https://accounts.google.com", google).schemeless
    assert not IssuerRule.of("https://accounts.google.com", config().provider).schemeless


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        ({"iss": f"https://login.microsoftonline.com/{TENANT}/v2.0", "tid": TENANT}, None),
        (
            {"iss": f"https://login.microsoftonline.com/{TENANT}/v2.0", "tid": TENANT.upper()},
            "another issuer",
        ),
        (
            {"iss": f"https://login.microsoftonline.com/{OTHER_TENANT}/v2.0", "tid": OTHER_TENANT},
            "not in provider.tenants",
        ),
        (
            {"iss": f"https://login.microsoftonline.com/{OTHER_TENANT}/v2.0", "tid": TENANT},
            "another issuer",
        ),
        ({"iss": ENTRA, "tid": TENANT}, "another issuer"),
        ({"iss": f"https://login.microsoftonline.com/{TENANT}/v2.0"}, "no valid tenant"),
        ({"iss": "https://login.microsoftonline.com/a/b/v2.0", "tid": "a/b"}, "no valid tenant"),
        ({"iss": f"https://login.microsoftonline.com/{TENANT}/v2.0", "tid": 5}, "no valid tenant"),
    ],
)
def test_entra_template_takes_the_tokens_own_allowed_tid(
    claims: dict[str, Any], says: str | None
) -> None:
    rule = IssuerRule(ENTRA, tenants=frozenset({TENANT}))
    problem = rule.problem(claims)
    if says is None:
        assert problem is None
    else:
        assert problem is not None
        assert says in problem


def test_a_plain_issuer_is_compared_exactly() -> None:
    assert issuer_problem("https://a", {"iss": "https://a"}) is None
    assert issuer_problem("https://a", {"iss": "https://a/"}) is not None
    assert issuer_problem("https://a", {"iss": "https://a", "tid": "x"}) is None


def test_backchannel_moves_only_server_to_server_endpoints_on_the_public_origin() -> None:
    public = "https://sso.example.com/realms/corp"
    endpoints = {
        "authorization_endpoint": f"{public}/protocol/openid-connect/auth",
        "end_session_endpoint": f"{public}/protocol/openid-connect/logout",
        "token_endpoint": f"{public}/protocol/openid-connect/token",
        "jwks_uri": f"{public}/protocol/openid-connect/certs",
        "userinfo_endpoint": "https://graph.example.com/oidc/userinfo",
        "revocation_endpoint": f"{public}/protocol/openid-connect/revoke?x=1",
        "introspection_endpoint": None,
    }
    moved = backchannel_endpoints(endpoints, issuer=public, backchannel_url="http://kc:8080")
    assert moved == {
        "token_endpoint": "http://kc:8080/realms/corp/protocol/openid-connect/token",
        "jwks_uri": "http://kc:8080/realms/corp/protocol/openid-connect/certs",
        "revocation_endpoint": "http://kc:8080/realms/corp/protocol/openid-connect/revoke?x=1",
    }
    assert backchannel_endpoints(endpoints, issuer=public, backchannel_url=None) == {}


@pytest.mark.parametrize(
    ("provider", "where"),
    [
        ({}, "https://idp.example.com/.well-known/openid-configuration"),
        (
            {"issuer": "https://x.auth0.com/"},
            "https://x.auth0.com/.well-known/openid-configuration",
        ),
        (
            {"issuer": "https://sso.example.com/realms/corp", "backchannel_url": "http://kc:8080"},
            "http://kc:8080/realms/corp/.well-known/openid-configuration",
        ),
        ({"backchannel_url": "http://kc:8080", "discovery_url": "http://d/x"}, "http://d/x"),
        (
            {"preset": "entra", "issuer": ENTRA, "tenants": [TENANT]},
            "https://login.microsoftonline.com/organizations/v2.0/.well-known/openid-configuration",
        ),
    ],
)
def test_where_discovery_is_fetched(provider: dict[str, Any], where: str) -> None:
    assert discovery_location(config(**provider).provider) == where


def test_auth_params_follow_the_gateways_own_parameters() -> None:
    meta = ProviderMetadata(
        issuer="https://accounts.google.com",
        authorization_endpoint="https://accounts.google.com/o/oauth2/v2/auth",
        token_endpoint="https://oauth2.googleapis.com/token",
        jwks_uri="https://www.googleapis.com/oauth2/v3/certs",
    )
    login = LoginState(state="s", nonce="n", code_verifier="v" * 43, target="/", created_at=0.0)
    provider = config(preset="google", auth_params={"hd": "example.com"}).provider
    url = authorization_url(
        meta,
        client_id="c",
        redirect_uri="https://app/cb",
        scopes=provider.scopes,
        login=login,
        extra=provider.effective_auth_params,
    )
    query = url.split("?", 1)[1]
    assert query.endswith("&hd=example.com&access_type=offline&prompt=consent")
    assert query.count("state=") == 1
    assert "scope=openid+email+profile" in query


# ---------------------------------------------------------------------------------------------
# check and explain show the settings in effect
# ---------------------------------------------------------------------------------------------


def test_provider_lines_say_where_each_value_comes_from() -> None:
    lines = provider_lines(
        config(preset="google", claims={"user": "sub"}, auth_params={"hd": "example.com"})
    )
    assert lines[0].startswith("provider: preset google;")
    assert "  claims.user: sub (config)" in lines
    assert "  claims.hosted_domain: hd (preset)" in lines
    assert "  claims.email_verified: email_verified (default)" in lines
    assert "  logout: local (preset)" in lines
    assert (
        "  auth_params: hd=example.com (config), access_type=offline (preset), "
        "prompt=consent (preset)"
    ) in lines
    assert any(line.startswith("  iss accepted: exact, or without https://") for line in lines)
    assert provider_lines(config()) == []


SHIPPED = sorted(PROVIDERS_DIR.glob("*.yaml"))


def test_there_is_a_shipped_config_per_preset() -> None:
    assert {p.stem for p in SHIPPED} == set(NAMES)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_each_shipped_provider_config_passes_check_and_shows_its_preset(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "ok"
    preset = path.stem
    if preset == "generic":
        assert out == ["ok"]
        return
    assert out[0].startswith(f"provider: preset {preset};")
    shown = {line.split(":", 1)[0].strip(): line for line in out[1:-1]}
    for key in PRESETS[preset]:
        if key == "auth_params":
            assert "(preset)" in shown["auth_params"], shown["auth_params"]
        else:
            assert shown[key].endswith(("(preset)", "(config)")), shown[key]
    # explain prints the same block above its verdict.
    status = main(["explain", "-c", str(path), "GET", "http://app.example.com/"])
    explained = capsys.readouterr().out.splitlines()
    assert status == 1  # not signed in: not forwarded
    assert explained[: len(out) - 1] == out[:-1]
    assert explained[len(out) - 1].startswith("request:")


# ---------------------------------------------------------------------------------------------
# The README's "Providers" section
# ---------------------------------------------------------------------------------------------


def _providers_section() -> str:
    text = (PROVIDERS_DIR.parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Providers\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_has_a_subsection_per_provider() -> None:
    section = _providers_section()
    for title in (
        "Keycloak",
        "Microsoft Entra ID",
        "Okta",
        "Google",
        "Auth0",
        "Dex",
        "GitLab",
        "AWS Cognito",
    ):
        assert f"\n### {title}\n" in section, title
    assert "https://<host>/oauth2/callback" in section
    assert "https://<host>/oauth2/backchannel_logout" in section


def test_the_readme_check_example_is_what_check_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    section = _providers_section()
    command = "$ oidc-gateway check -c config/providers/google.yaml\n"
    shown = section[section.index(command) + len(command) :].split("  ...\n", 1)[0]
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert main(["check", "-c", str(PROVIDERS_DIR / "google.yaml")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(shown)
    assert shown.count("\n") >= 8
